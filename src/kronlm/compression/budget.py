"""Per-module budget allocation: which modules to factor, with which family, factor shapes and R.

One shape everywhere wastes parameters: some modules' outputs barely move the loss, others are
fragile, and different matrices suit different factorisations. Given calibration statistics
(``kronlm.compression.calibration``) we estimate, for every candidate factorisation of every module,
its increase of the mean token NLL and pick the set of candidates that minimises the total
increase under a parameter budget.

Estimate. For a module with input second moment C and output-gradient energy s (per output unit,
see ``collect_calibration(sensitivity=True)``), the diagonal-Fisher approximation gives
ΔL ≈ ½ · s · E_t||ΔW x_t||² = ½ · s · tr(ΔW C ΔWᵀ). Every family is priced with the same
activation-aware error estimate, under the damped C the fits use:

- ``svd``: truncated SVD, the degenerate Kronecker product A (out, 1) ⊗ B (1, in) (SPEC §2) with
  R terms; the tail Σ_{j>R} σ_j² of W C^{1/2} is its exact error (SVD-LLM).
- ``kronecker``: Σ_{r<=R} A_r ⊗ B_r for every factor-shape pair of
  ``kronecker_shape_window`` (small input-side, output-side and square factors, and balanced
  shapes such as A (48, 24) ⊗ B (32, 24)); the tail of the whitened rearrangement
  R(W (L1 ⊗ L2)) (``kronlm.decompose.activation_aware``): exact when n1 = 1 or n2 = 1, an
  estimate otherwise (the Kronecker-factored root of C).
- ``kronecker_lowrank``: Σ_r A_r ⊗ B_r + U V (``kronlm.decompose.lowrank``): for a few Kronecker
  parts (the best Kronecker option within each of ``lowrank_fractions`` of the dense size), the
  whitened SVD tail of W minus that part prices every k at once; the joint fit only improves on it.
- ``dense``: keep the module.

One spectrum prices every R (or k) of a shape at once.

Screening. Pricing every shape of the window on all of SmolLM2's 210 matrices takes over ten
minutes on one CPU thread, so the window is priced in full only on the modules of the
``screen_blocks`` blocks; a shape is kept for a module class (the name with its block index
removed, e.g. ``model.layers.*.mlp.up_proj``) when it gives a vertex of the lower convex hull of
the Kronecker family's (parameters, error) points on a screened module of that class. Only hull
vertices can ever be chosen by the allocation below, so this drops the shapes that no screened
matrix would pick. It is a screen, not a proof: a shape useless on the screened blocks is assumed
useless on the others of the same class.

Choice. Minimising Σ_m ΔL_m subject to Σ_m params_m ≤ budget is a multiple-choice knapsack; we
solve its Lagrangian relaxation: for a price λ every module independently takes the candidate
with the least ΔL + λ·params, and λ is bisected until the model fits the budget. This picks
points of each module's lower convex hull, the standard rate–distortion allocation.

Check. Each chosen option is then fitted (``kronlm.compression.surgery.fit_factors``, cached for the
compression that follows) and its output error measured on the calibration statistics. Where it
differs from the estimate, every rank of that module's shape is rescaled by the measured /
estimated ratio, the chosen option keeps its measured error, and the allocation runs again, up to
``check_rounds`` times; the table reports both numbers.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from kronlm.compression.calibration import ModuleCalibration, collect_calibration
from kronlm.compression.config import CompressionConfig, KroneckerTarget, pattern_regex
from kronlm.compression.report import count_parameters
from kronlm.compression.surgery import fit_factors
from kronlm.decompose.activation_aware import (
    partial_traces,
    psd_sqrt_and_inverse,
    whitened_tail_energies,
)
from kronlm.decompose.initializers import INITIALIZERS
from kronlm.decompose.lowrank import damp, kronecker_lowrank_tail, output_error
from kronlm.decompose.shapes import FactorShape, kronecker_shape_window
from kronlm.decompose.vanloan import kron_sum, nearest_kronecker_product
from kronlm.layers.dense import dense_weight, is_conv1d

FAMILIES = ("dense", "svd", "kronecker", "kronecker_lowrank")
FACTOR_FAMILIES = FAMILIES[1:]
# None: the shape window of ``kronecker_shape_window``. A tuple of small-factor shapes (m2, n2)
# instead restricts the Kronecker family to B of those shapes (the allocation before the window).
DEFAULT_B_SHAPES = None


def check_families(families) -> tuple[str, ...]:
    """The factor families as a tuple, in ``FACTOR_FAMILIES`` order ("dense" is always a candidate).

    Raises:
        ValueError: an unknown family name (named, with the valid ones), or none at all.
    """
    if isinstance(families, str):
        families = [f for f in re.split(r"[,\s]+", families) if f]
    names = list(families or [])
    for name in names:
        if name not in FAMILIES:
            raise ValueError(f"unknown factor family {name!r}; choose from {', '.join(FACTOR_FAMILIES)}")
    picked = tuple(f for f in FACTOR_FAMILIES if f in names)
    if not picked:
        raise ValueError(f"give at least one factor family of {', '.join(FACTOR_FAMILIES)}, got {names}")
    return picked


@dataclass
class BudgetSettings:
    """Every knob of the budget allocation, with the defaults that ``kronlm compress --budget``,
    :func:`plan_budget` and the benchmarks share (so a figure's command reproduces it).

    Attributes:
        families: factor families offered (``FACTOR_FAMILIES``); "dense" is always a candidate.
        sensitivity_sequences: calibration sequences of the sensitivity (backward) pass; 0 prices
            by relative output error instead of estimated nats.
        svd_step: ranks of the truncated SVD and of the low-rank part are multiples of this.
        damping: δ of the damped C = C + δ·mean(diag C)·I used for pricing and fitting.
        b_shapes: None for the shape window; else only Kronecker factors B of these (m2, n2).
        small_factor, balanced_slack: the shape window (``kronecker_shape_window``).
        screen_blocks: blocks whose modules price the whole window (module docstring); None:
            the first, middle and last block of the candidates.
        lowrank_fractions: sizes of the Kronecker parts of the ``kronecker_lowrank`` candidates,
            as fractions of the dense matrix.
        check_rounds: rounds of fit-measure-reallocate (0: trust the estimates).
        init: initialiser of the chosen factors.
        sequential: None (fit on the dense model's statistics), "output" or "weight" (fit each
            block on the partially compressed model's, ``kronlm.compression.sequential``).

    Raises:
        ValueError: an unknown family or initialiser, or a value out of range (named).
    """

    families: tuple[str, ...] = FACTOR_FAMILIES
    sensitivity_sequences: int = 32
    svd_step: int = 8
    damping: float = 1e-2
    b_shapes: tuple[tuple[int, int], ...] | None = DEFAULT_B_SHAPES
    small_factor: int = 8
    balanced_slack: float = 1.05
    screen_blocks: tuple[int, ...] | None = None
    lowrank_fractions: tuple[float, ...] = (0.02, 0.08)
    check_rounds: int = 2
    init: str = "activation_aware"
    sequential: str | None = None

    def __post_init__(self) -> None:
        self.families = check_families(self.families)
        if self.b_shapes is not None:
            self.b_shapes = tuple((int(a), int(b)) for a, b in self.b_shapes)
        for name, value, low in (("sensitivity_sequences", self.sensitivity_sequences, 0), ("svd_step", self.svd_step, 1),
                                 ("small_factor", self.small_factor, 2), ("check_rounds", self.check_rounds, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"budget settings: {name} must be an integer >= {low}, got {value!r}")
        if not self.damping >= 0 or not self.balanced_slack >= 1:
            raise ValueError(f"budget settings: damping must be >= 0 and balanced_slack >= 1, got {self.damping}, {self.balanced_slack}")
        if any(not 0 < f < 1 for f in self.lowrank_fractions):
            raise ValueError(f"budget settings: lowrank_fractions must lie in (0, 1), got {self.lowrank_fractions}")
        if self.init not in INITIALIZERS:
            raise ValueError(f"budget settings: unknown initialiser {self.init!r}; registered: {', '.join(sorted(INITIALIZERS))}")
        if self.sequential not in (None, "output", "weight"):
            raise ValueError(f"budget settings: sequential must be None, 'output' or 'weight', got {self.sequential!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists)."""
        return asdict(self)


@dataclass
class BudgetOption:
    """One way to store one module.

    Attributes:
        family: "dense", "svd" (A (out, 1) ⊗ B (1, in), R terms), "kronecker" or
            "kronecker_lowrank" (Σ_r A_r ⊗ B_r + U V with U V of rank ``lowrank``).
        a_shape, b_shape: factor shapes (rows, cols), None for dense.
        rank: number of Kronecker terms R (0 for dense).
        params: weight parameters of this choice (bias excluded; it never changes).
        output_error: estimated E_t ||ΔW x_t||² under the damped C (squared output units per
            token); the measured one once checked, the estimate rescaled by the check of a
            sibling rank otherwise.
        loss: estimated increase of the mean token NLL, nats.
        relative_error: output_error / E_t ||W x_t||².
        lowrank: rank k of the low-rank part (``kronecker_lowrank``), else 0.
        estimated_error: the priced output error before any check.
        measured_error: the output error of the fitted factors on the calibration statistics
            (damped C, as the estimate), or None when not fitted.
    """

    family: str
    a_shape: tuple[int, int] | None
    b_shape: tuple[int, int] | None
    rank: int
    params: int
    output_error: float
    loss: float
    relative_error: float = 0.0
    lowrank: int = 0
    estimated_error: float = 0.0
    measured_error: float | None = None

    def describe(self) -> str:
        """``dense``, ``svd R=64``, ``(48,24)x(32,24) R=5``, ``(768,576)x(2,1) R=1 +k64``."""
        if self.family == "dense":
            return "dense"
        if self.family == "svd":
            return f"svd R={self.rank}"
        text = f"{tuple(self.a_shape)}x{tuple(self.b_shape)} R={self.rank}".replace(" ", "")
        return text + (f" +k{self.lowrank}" if self.lowrank else "")


@dataclass
class Spectrum:
    """Estimated errors of one family and shape of one module, for every rank it offers.

    Attributes:
        family: "svd", "kronecker" or "kronecker_lowrank".
        a_shape, b_shape: factor shapes.
        kron_rank: R for "kronecker_lowrank" (fixed), else 0.
        base_params: parameters that do not grow with the rank (the Kronecker part of
            "kronecker_lowrank"), else 0.
        per_rank: parameters per unit of rank (per Kronecker term, or out + in per low-rank unit).
        ranks: (n,) int64 ranks offered (R, or k for "kronecker_lowrank").
        errors: (n,) float64 estimated output errors under the damped C.
        correction: measured / estimated ratio from the check (1 until checked).
        measured: {rank: measured output error} of the checked ranks.
    """

    family: str
    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    kron_rank: int
    base_params: int
    per_rank: int
    ranks: torch.Tensor
    errors: torch.Tensor
    correction: float = 1.0
    measured: dict[int, float] = field(default_factory=dict)

    def params(self) -> torch.Tensor:
        """(n,) parameters of every rank."""
        return self.base_params + self.per_rank * self.ranks

    def option(self, index: int, scale: float, energy: float) -> BudgetOption:
        """The ``BudgetOption`` of ``ranks[index]`` (``scale`` turns output error into nats)."""
        rank = int(self.ranks[index])
        estimate = float(self.errors[index])
        measured = self.measured.get(rank)
        error = measured if measured is not None else estimate * self.correction
        kron_rank, lowrank = (self.kron_rank, rank) if self.family == "kronecker_lowrank" else (rank, 0)
        return BudgetOption(
            self.family, self.a_shape, self.b_shape, kron_rank, int(self.params()[index]), error, scale * error,
            error / energy if energy > 0 else 0.0, lowrank, estimate, measured,
        )


@dataclass
class ModulePricing:
    """Everything priced for one module.

    Attributes:
        weight_shape: (out, in).
        energy: E_t ||W x_t||² under the undamped C.
        scale: nats per unit of output error (½·s, or 1 / energy without sensitivities).
        spectra: one ``Spectrum`` per (family, shape[, Kronecker part]).
        screened: True when the whole shape window was priced on this module.
    """

    weight_shape: tuple[int, int]
    energy: float
    scale: float
    spectra: list[Spectrum] = field(default_factory=list)
    screened: bool = False

    @property
    def dense_params(self) -> int:
        """out · in."""
        return self.weight_shape[0] * self.weight_shape[1]

    def hull(self, families: tuple[str, ...]) -> list[BudgetOption]:
        """Dense plus the lower convex hull of the (params, loss) points of ``families``, by params.

        Only hull vertices can be picked by the Lagrangian allocation, so the rest is dropped.
        """
        params, losses, where = [], [], []
        for s_index, spectrum in enumerate(self.spectra):
            if spectrum.family not in families:
                continue
            p = spectrum.params()
            keep = p < self.dense_params
            errors = spectrum.errors * spectrum.correction
            if spectrum.measured:
                errors = errors.clone()
                for rank, value in spectrum.measured.items():
                    errors[spectrum.ranks == rank] = value
            params.append(p[keep])
            losses.append(errors[keep] * self.scale)
            where.append(torch.stack([torch.full_like(p[keep], s_index), torch.arange(len(p))[keep]], 1))
        dense = BudgetOption("dense", None, None, 0, self.dense_params, 0.0, 0.0, 0.0)
        if not params:
            return [dense]
        p = torch.cat(params + [torch.tensor([self.dense_params])]).double()
        loss = torch.cat(losses + [torch.tensor([0.0], dtype=torch.float64)])
        idx = torch.cat(where + [torch.tensor([[-1, -1]])])
        order = torch.argsort(loss, stable=True)
        order = order[torch.argsort(p[order], stable=True)]  # by params, ties by loss
        p, loss, idx = p[order], loss[order], idx[order]
        # Pareto front first (each point strictly better than every cheaper one), then the hull.
        best = torch.cummin(loss, 0).values
        front = torch.ones_like(loss, dtype=torch.bool)
        front[1:] = loss[1:] < best[:-1]
        p, loss, idx = p[front].tolist(), loss[front].tolist(), idx[front].tolist()
        hull: list[int] = []
        for i in range(len(p)):
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                # b lies on or above the segment a -> i: not a vertex of the lower hull.
                if (loss[b] - loss[a]) * (p[i] - p[a]) >= (loss[i] - loss[a]) * (p[b] - p[a]):
                    hull.pop()
                else:
                    break
            hull.append(i)
        out = []
        for i in hull:
            s_index, r_index = idx[i]
            out.append(dense if s_index < 0 else self.spectra[s_index].option(r_index, self.scale, self.energy))
        return sorted(out, key=lambda o: -o.params)


@dataclass
class PricingSummary:
    """How pricing went: for the report and the benchmark.

    Attributes:
        modules: modules priced.
        seconds: wall time (seconds).
        window: {class: shapes in the window} per module class.
        kept: {class: shapes kept after screening}.
        screen_blocks: the blocks that priced the whole window.
    """

    modules: int = 0
    seconds: float = 0.0
    window: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    screen_blocks: list[int] = field(default_factory=list)

    def describe(self) -> str:
        """One line."""
        shapes = ", ".join(f"{k.rsplit('.', 1)[-1]} {self.kept[k]}/{self.window[k]}" for k in sorted(self.window))
        return (f"priced {self.modules} modules in {self.seconds:.0f} s; Kronecker shapes kept after screening on blocks "
                f"{self.screen_blocks} (kept/window): {shapes}")


@dataclass
class Pricing:
    """``price_modules``' result: {module name: ``ModulePricing``} and a ``PricingSummary``."""

    modules: dict[str, ModulePricing]
    summary: PricingSummary


@dataclass
class ModuleChoice:
    """The option chosen for one module, with the numbers behind it.

    Attributes:
        name: module name.
        weight_shape: (out, in).
        sensitivity: s, mean squared output gradient per output unit (nats² per unit²), or None
            when the allocation ran on relative output error alone.
        option: the chosen ``BudgetOption``.
        relative_error: output_error / E_t ||W x_t||².
        energy: E_t ||W x_t||² (squared output units per token).
    """

    name: str
    weight_shape: tuple[int, int]
    sensitivity: float | None
    option: BudgetOption
    relative_error: float
    energy: float = 0.0


def _family_key(option: BudgetOption) -> str:
    if option.family in ("kronecker", "kronecker_lowrank"):
        return f"{option.family} B {tuple(option.b_shape)}"
    return option.family


@dataclass
class BudgetAllocation:
    """Result of ``allocate_budget``.

    Attributes:
        target_params: the budget (whole model, parameters).
        params_before: parameters of the dense model.
        params_after: parameters after applying the choice (whole model).
        estimated_loss: Σ of the chosen options' estimated NLL increases, nats per token.
        price: the Lagrange multiplier λ (nats per parameter) that met the budget.
        choices: one ``ModuleChoice`` per candidate module, in model order.
        families: the factor families that were offered.
        check_rounds: fit-measure-reallocate rounds that ran.
    """

    target_params: int
    params_before: int
    params_after: int
    estimated_loss: float
    price: float
    choices: list[ModuleChoice] = field(default_factory=list)
    families: tuple[str, ...] = FACTOR_FAMILIES
    check_rounds: int = 0

    def to_config(self, init: str = "activation_aware", name: str | None = None) -> CompressionConfig:
        """A ``CompressionConfig`` with one exact-name target per factored module."""
        targets = [
            KroneckerTarget(
                modules=[f"re:{re.escape(c.name)}"], a_shape=c.option.a_shape, b_shape=c.option.b_shape, rank=c.option.rank,
                init=init, lowrank_rank=c.option.lowrank,
            )
            for c in self.choices
            if c.option.family != "dense"
        ]
        description = f"budget allocation to {self.target_params:,} parameters (estimated +{self.estimated_loss:.3f} nats/token)"
        return CompressionConfig(targets=targets, name=name, description=description)

    def family_counts(self) -> dict[str, int]:
        """{family: number of modules} ("dense" included)."""
        counts: dict[str, int] = {}
        for c in self.choices:
            counts[c.option.family] = counts.get(c.option.family, 0) + 1
        return dict(sorted(counts.items()))

    def estimate_check(self) -> dict[str, dict[str, float]]:
        """Per family, how the priced output errors compare with the measured ones of the chosen
        options: {family: {"modules": n, "median": median measured / estimated, "max": max}}."""
        ratios: dict[str, list[float]] = {}
        for c in self.choices:
            o = c.option
            if o.measured_error is not None and o.estimated_error > 0:
                ratios.setdefault(o.family, []).append(o.measured_error / o.estimated_error)
        return {f: {"modules": len(r), "median": sorted(r)[len(r) // 2], "max": max(r)} for f, r in sorted(ratios.items())}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for the compression report), with ``family_counts`` and ``estimate_check``."""
        out = asdict(self)
        out["family_counts"] = self.family_counts()
        out["estimate_check"] = self.estimate_check()
        return out

    def table(self, max_rows: int | None = None) -> str:
        """Per-module choice as a fixed-width text table (dense modules included), then counts of
        the choices by family (and small-factor shape) and the totals; ``max_rows`` cuts the
        per-module part. Columns: family, A, B, R, k (low rank), params, relative output error
        (estimate; measured after "/" when checked), estimated NLL increase."""
        lines = [f"{'module':<36} {'shape':>11} {'family':>17} {'A':>11} {'B':>9} {'R':>4} {'k':>4} {'params':>9} "
                 f"{'rel.err est/meas':>17} {'est. dNLL':>9}"]
        for c in self.choices[:max_rows]:
            o = c.option
            shape = f"({c.weight_shape[0]},{c.weight_shape[1]})"
            a = "-" if o.a_shape is None else f"({o.a_shape[0]},{o.a_shape[1]})"
            b = "-" if o.b_shape is None else f"({o.b_shape[0]},{o.b_shape[1]})"
            energy = c.energy
            est = o.estimated_error / energy if energy > 0 else 0.0
            err = f"{est:.4f}" + (f"/{o.measured_error / energy:.4f}" if o.measured_error is not None and energy > 0 else "")
            lines.append(f"{c.name[-36:]:<36} {shape:>11} {o.family:>17} {a:>11} {b:>9} {o.rank or '-':>4} {o.lowrank or '-':>4} "
                         f"{o.params:>9,} {err:>17} {o.loss:>9.5f}")
        if max_rows is not None and len(self.choices) > max_rows:
            lines.append(f"... {len(self.choices) - max_rows} more modules")
        counts: dict[str, int] = {}
        for c in self.choices:
            counts[_family_key(c.option)] = counts.get(_family_key(c.option), 0) + 1
        lines.append("choices: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        check = self.estimate_check()
        if check:
            lines.append("measured / estimated output error of the chosen options: " + ", ".join(
                f"{f} median {v['median']:.2f} (max {v['max']:.2f}, {v['modules']} modules)" for f, v in check.items()))
        lines.append(
            f"params {self.params_before:,} -> {self.params_after:,} (budget {self.target_params:,}); "
            f"estimated NLL increase {self.estimated_loss:.4f} nats/token (x{math.exp(self.estimated_loss):.3f} perplexity); "
            f"families {', '.join(self.families)}; {self.check_rounds} check rounds"
        )
        return "\n".join(lines)


def _roots_for(cache: dict, C: torch.Tensor, n1: int, n2: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L1, L2, L1⁻¹, L2⁻¹) of the Kronecker-factored root of the damped C, cached per (n1, n2)."""
    key = (n1, n2)
    if key not in cache:
        one = torch.ones(1, 1, dtype=C.dtype)
        if n1 == 1 or n2 == 1:
            if "full" not in cache:
                cache["full"] = psd_sqrt_and_inverse(C)
            root, inv = cache["full"]
            cache[key] = (one, root, one, inv) if n1 == 1 else (root, one, inv, one)
        else:
            p1, p2 = partial_traces(C, n1, n2)
            L1, L1i = psd_sqrt_and_inverse(p1)
            L2, L2i = psd_sqrt_and_inverse(p2 / C.trace())
            cache[key] = (L1, L2, L1i, L2i)
    return cache[key]


def _max_rank(per_rank: int, base: int, dense: int, limit: int) -> int:
    return min(limit, max(0, (dense - 1 - base) // per_rank))


def kronecker_spectrum(W: torch.Tensor, C: torch.Tensor, shape: FactorShape, roots_cache: dict) -> Spectrum:
    """The ``kronecker`` family's spectrum of one shape: errors for R = 1 .. below dense size."""
    a_shape, b_shape = shape.a_shape, shape.b_shape
    L1, L2, _, _ = _roots_for(roots_cache, C, a_shape[1], b_shape[1])
    tails = whitened_tail_energies(W, (L1, L2), a_shape, b_shape)
    per = a_shape[0] * a_shape[1] + b_shape[0] * b_shape[1]
    top = _max_rank(per, 0, W.numel(), len(tails) - 1)
    ranks = torch.arange(1, top + 1)
    return Spectrum("kronecker", a_shape, b_shape, 0, 0, per, ranks, tails[1 : top + 1].clone())


def lowrank_spectrum(
    W: torch.Tensor, C: torch.Tensor, base: Spectrum, index: int, roots_cache: dict, svd_step: int
) -> Spectrum:
    """``kronecker_lowrank`` spectrum on the Kronecker part ``base.ranks[index]`` of ``base``:
    whitened Van Loan of W for that part, then the whitened SVD tail of the residual for every k."""
    rank = int(base.ranks[index])
    L1, L2, L1i, L2i = _roots_for(roots_cache, C, base.a_shape[1], base.b_shape[1])
    (m1, n1), (m2, n2) = base.a_shape, base.b_shape
    whitened = torch.einsum("qik,ij,kl->qjl", W.reshape(m1 * m2, n1, n2), L1, L2).reshape(m1 * m2, n1 * n2)
    fw = nearest_kronecker_product(whitened, base.a_shape, base.b_shape, rank, svd_solver="exact")
    K = kron_sum(fw.A @ L1i, fw.B @ L2i)
    root = _roots_for(roots_cache, C, 1, W.shape[1])[1]
    tails = kronecker_lowrank_tail(W - K, root)
    out_f, in_f = W.shape
    base_params = rank * base.per_rank
    top = _max_rank(out_f + in_f, base_params, W.numel(), len(tails) - 1)
    ranks = torch.arange(svd_step, top + 1, svd_step)
    return Spectrum("kronecker_lowrank", base.a_shape, base.b_shape, rank, base_params, out_f + in_f, ranks, tails[ranks].clone())


def _price_one(
    weight: torch.Tensor,
    covariance: torch.Tensor,
    *,
    sensitivity: float | None,
    families: tuple[str, ...],
    shapes: list[FactorShape],
    svd_step: int,
    damping: float,
    lowrank_fractions: tuple[float, ...],
    roots_cache: dict | None = None,
) -> ModulePricing:
    W = weight.detach().double()
    out_f, in_f = W.shape
    energy = ((W @ covariance.double()) * W).sum().item()
    scale = 0.5 * sensitivity if sensitivity is not None else 1.0 / max(energy, 1e-300)
    C = damp(covariance, damping)
    cache = roots_cache if roots_cache is not None else {}
    pricing = ModulePricing((out_f, in_f), energy, scale)
    if "svd" in families:
        root = _roots_for(cache, C, 1, in_f)[1]
        tails = whitened_tail_energies(W, (torch.ones(1, 1, dtype=C.dtype), root), (out_f, 1), (1, in_f))
        top = _max_rank(out_f + in_f, 0, W.numel(), len(tails) - 1)
        ranks = torch.arange(svd_step, top + 1, svd_step)
        pricing.spectra.append(Spectrum("svd", (out_f, 1), (1, in_f), 0, 0, out_f + in_f, ranks, tails[ranks].clone()))
    if "kronecker" in families or "kronecker_lowrank" in families:
        kron = [kronecker_spectrum(W, C, shape, cache) for shape in shapes]
        if "kronecker" in families:
            pricing.spectra.extend(kron)
        if "kronecker_lowrank" in families:
            seen = set()
            for fraction in lowrank_fractions:
                best = None
                for spectrum in kron:
                    fits = (spectrum.params() <= fraction * W.numel()).nonzero().flatten()
                    if len(fits):
                        i = int(fits[-1])  # the most terms within the size: the least error of this shape
                        if best is None or spectrum.errors[i] < best[0].errors[best[1]]:
                            best = (spectrum, i)
                if best is not None and (id(best[0]), best[1]) not in seen:
                    seen.add((id(best[0]), best[1]))
                    pricing.spectra.append(lowrank_spectrum(W, C, best[0], best[1], cache, svd_step))
    return pricing


def module_options(
    weight: torch.Tensor,
    covariance: torch.Tensor,
    *,
    sensitivity: float | None = None,
    families: tuple[str, ...] | str = FACTOR_FAMILIES,
    b_shapes: tuple[tuple[int, int], ...] | None = DEFAULT_B_SHAPES,
    small_factor: int = 8,
    balanced_slack: float = 1.05,
    svd_step: int = 8,
    damping: float = 1e-2,
    lowrank_fractions: tuple[float, ...] = (0.02, 0.08),
) -> list[BudgetOption]:
    """Price every candidate factorisation of one module (module docstring): all options.

    Args:
        weight: (out, in) dense weight, ``nn.Linear`` orientation.
        covariance: (in, in) input second moment.
        sensitivity: s (mean squared output gradient per unit); None prices by relative output
            error instead (loss = error / E||W x||²).
        families: factor families to price.
        b_shapes: None for ``kronecker_shape_window(small_factor, balanced_slack)``; else only
            Kronecker factors B of these (m2, n2) (those that do not divide W are skipped).
        svd_step: truncated-SVD (and low-rank part) ranks are multiples of this.
        damping: as in ``activation_aware_factors``.
        lowrank_fractions: see ``BudgetSettings``.

    Returns:
        Options (dense first) with params below the dense count, every rank of every shape.

    Raises:
        ValueError: an unknown family.
    """
    families = check_families(families)
    shapes = _window(tuple(weight.shape), b_shapes, small_factor, balanced_slack)
    pricing = _price_one(weight, covariance, sensitivity=sensitivity, families=families, shapes=shapes, svd_step=svd_step,
                         damping=damping, lowrank_fractions=lowrank_fractions)
    options = [BudgetOption("dense", None, None, 0, pricing.dense_params, 0.0, 0.0, 0.0)]
    for spectrum in pricing.spectra:
        options += [spectrum.option(i, pricing.scale, pricing.energy) for i in range(len(spectrum.ranks))]
    return options


def _window(weight_shape, b_shapes, small_factor: int, balanced_slack: float) -> list[FactorShape]:
    out_f, in_f = weight_shape
    if b_shapes is None:
        return kronecker_shape_window(out_f, in_f, small_factor=small_factor, balanced_slack=balanced_slack)
    shapes = []
    for m2, n2 in b_shapes:
        if out_f % m2 == 0 and in_f % n2 == 0 and (m2, n2) != (1, 1):
            a = (out_f // m2, in_f // n2)
            shapes.append(FactorShape(a, (m2, n2), 1, a[0] * a[1] + m2 * n2, 0, 0, 0.0))
    return shapes


def module_class(name: str) -> str:
    """A module's name with its block index replaced by ``*`` (``model.layers.*.mlp.up_proj``)."""
    return re.sub(r"(^|\.)\d+(\.|$)", r"\1*\2", name, count=1)


def _block(name: str) -> int | None:
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None


def default_screen_blocks(names: list[str]) -> list[int]:
    """First, middle and last block index among ``names`` (fewer when there are fewer blocks)."""
    blocks = sorted({b for b in (_block(n) for n in names) if b is not None})
    if not blocks:
        return []
    return sorted({blocks[0], blocks[len(blocks) // 2], blocks[-1]})


def hull_shapes(pricing: ModulePricing) -> set[tuple]:
    """The Kronecker shapes with a vertex on the lower convex hull of the Kronecker family's points."""
    return {(o.a_shape, o.b_shape) for o in pricing.hull(("kronecker",)) if o.family == "kronecker"}


def price_modules(
    model: nn.Module,
    calibration: dict[str, Any],
    *,
    settings: BudgetSettings | None = None,
    b_shapes: tuple[tuple[int, int], ...] | None = None,
    svd_step: int | None = None,
    progress: bool = True,
) -> Pricing:
    """Price every calibrated module (module docstring), screening the shape window first.

    Args:
        model: the dense model.
        calibration: {name: ``ModuleCalibration``} with full covariances (and ``grad_sq`` to
            price in nats).
        settings: ``BudgetSettings`` (families, window, screening, ...); defaults when None.
        b_shapes, svd_step: override the settings' values (older keyword arguments).
        progress: tqdm bar over modules.

    Returns:
        A ``Pricing``, reusable across budgets and family subsets (``allocate_budget(options=)``).

    Raises:
        ValueError: a module calibrated without its full input second moment.
    """
    settings = settings or BudgetSettings()
    if b_shapes is not None or svd_step is not None:
        settings = BudgetSettings(**{**settings.to_dict(), "b_shapes": b_shapes or settings.b_shapes,
                                     "svd_step": svd_step or settings.svd_step})
    start = time.perf_counter()
    names = list(calibration)
    screen = list(settings.screen_blocks) if settings.screen_blocks is not None else default_screen_blocks(names)
    summary = PricingSummary(modules=len(names), screen_blocks=screen)
    needs_window = "kronecker" in settings.families or "kronecker_lowrank" in settings.families
    classes: dict[str, list[FactorShape]] = {}
    kept: dict[str, set] = {}
    first = [n for n in names if _block(n) in screen or _block(n) is None or not screen]
    order = first + [n for n in names if n not in first]
    priced: dict[str, ModulePricing] = {}
    roots_cache: dict = {}
    cache_owner = None
    for name in tqdm(order, desc="price options", unit="module", disable=not progress):
        entry = calibration[name]
        covariance = entry.inputs.covariance()
        if covariance is None:
            raise ValueError(f"{name}: budget allocation needs the full input second moment (raise max_full_dim)")
        if cache_owner is not entry.inputs:  # modules reading one input (Q/K/V, gate/up) share the roots
            roots_cache, cache_owner = {}, entry.inputs
        weight = dense_weight(model.get_submodule(name))
        cls = f"{module_class(name)} {tuple(weight.shape)}"
        window = classes.setdefault(cls, _window(tuple(weight.shape), settings.b_shapes, settings.small_factor, settings.balanced_slack))
        summary.window[cls] = len(window)
        screening = name in first or cls not in kept
        shapes = window if screening or settings.b_shapes is not None else [s for s in window if (s.a_shape, s.b_shape) in kept[cls]]
        pricing = _price_one(weight, covariance, sensitivity=entry.grad_sq, families=settings.families, shapes=shapes if needs_window else [],
                             svd_step=settings.svd_step, damping=settings.damping, lowrank_fractions=settings.lowrank_fractions,
                             roots_cache=roots_cache)
        if screening and needs_window:
            if "kronecker" not in settings.families:  # screen on the Kronecker spectra all the same
                pricing_k = _price_one(weight, covariance, sensitivity=entry.grad_sq, families=("kronecker",), shapes=window,
                                       svd_step=settings.svd_step, damping=settings.damping, lowrank_fractions=(), roots_cache=roots_cache)
                kept.setdefault(cls, set()).update(hull_shapes(pricing_k))
            else:
                kept.setdefault(cls, set()).update(hull_shapes(pricing))
            pricing.screened = True
        priced[name] = pricing
    summary.kept = {cls: len(kept.get(cls, ())) if settings.b_shapes is None else summary.window[cls] for cls in summary.window}
    summary.seconds = time.perf_counter() - start
    return Pricing({name: priced[name] for name in names}, summary)


def _pick(options: list[list[BudgetOption]], price: float) -> list[int]:
    return [min(range(len(opts)), key=lambda i: opts[i].loss + price * opts[i].params) for opts in options]


def _solve(options: list[list[BudgetOption]], fixed: int, target_params: int) -> tuple[list[int], float]:
    def total(picks: list[int]) -> int:
        return fixed + sum(o[i].params for o, i in zip(options, picks))

    lo, hi = 0.0, 1.0
    while total(_pick(options, hi)) > target_params:
        hi *= 4.0
    for _ in range(200):  # bisection in log space to relative precision ~1e-6
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6
        if total(_pick(options, mid)) > target_params:
            lo = mid
        else:
            hi = mid
        if lo > 0 and hi / lo < 1 + 1e-6:
            break
    return _pick(options, hi), hi


def measure_option(weight: torch.Tensor, option: BudgetOption, stats: ModuleCalibration, *, init: str, damping: float, name: str) -> float:
    """Fit ``option`` (``fit_factors``, cached in ``stats.fitted``) and return its output error
    tr(ΔW C ΔWᵀ) under the damped C of the pricing (squared output units per token)."""
    factors = fit_factors(weight, option.a_shape, option.b_shape, option.rank, lowrank_rank=option.lowrank, init=init,
                          calibration=stats, name=name)
    approx = factors.to_dense().double()
    return output_error(weight.detach().double() - approx, damp(stats.inputs.covariance(), damping))


def allocate_budget(
    model: nn.Module,
    calibration: dict[str, Any],
    target_params: int,
    *,
    settings: BudgetSettings | None = None,
    b_shapes: tuple[tuple[int, int], ...] | None = None,
    svd_step: int | None = None,
    options: Pricing | None = None,
    families: tuple[str, ...] | str | None = None,
    progress: bool = True,
) -> BudgetAllocation:
    """Choose, per calibrated module, dense or a factorisation so the model fits ``target_params``.

    Args:
        model: the dense model (parameters counted before anything changes).
        calibration: {module name: ``ModuleCalibration``} with full covariances; the modules
            listed are the candidates. With ``grad_sq`` set (``sensitivity=True``) options are
            priced in estimated nats, otherwise by relative output error.
        target_params: total parameters allowed for the whole model.
        settings: ``BudgetSettings`` (defaults when None).
        b_shapes, svd_step: override the settings (older keyword arguments).
        options: the ``price_modules`` result for these statistics, to allocate several budgets
            or family subsets without pricing again (its measured-error checks carry over).
        families: offer only these families (a subset of what was priced); default the
            settings' families.
        progress: tqdm bars.

    Returns:
        A ``BudgetAllocation``; ``to_config()`` turns it into a ``CompressionConfig``.

    Raises:
        ValueError: a budget at or above the dense count, a budget the candidates cannot reach even
            at their smallest options (the message gives the smallest reachable count and the
            families), an unknown family, or a module calibrated without its full covariance.
    """
    settings = settings or BudgetSettings()
    if b_shapes is not None or svd_step is not None:
        settings = BudgetSettings(**{**settings.to_dict(), "b_shapes": b_shapes or settings.b_shapes, "svd_step": svd_step or settings.svd_step})
    families = check_families(families) if families is not None else settings.families
    before = count_parameters(model)
    if target_params >= before:
        raise ValueError(f"budget of {target_params:,} parameters is not below the model's {before:,}: nothing to compress")
    names = list(calibration)
    if options is None:
        options = price_modules(model, calibration, settings=settings, progress=progress)
    pricing = [options.modules[name] for name in names]
    fixed = before - sum(p.dense_params for p in pricing)
    rounds = 0
    while True:
        hulls = [p.hull(families) for p in pricing]
        smallest = fixed + sum(min(o.params for o in h) for h in hulls)
        if target_params < smallest:
            raise ValueError(
                f"budget of {target_params:,} parameters is below the smallest reachable {smallest:,} with these candidates "
                f"(families {', '.join(families)})"
            )
        picks, price = _solve(hulls, fixed, target_params)
        if rounds >= settings.check_rounds:
            break
        changed = False
        for name, p, h, i in tqdm(list(zip(names, pricing, hulls, picks)), desc="check errors", unit="module", disable=not progress):
            option = h[i]
            if option.family == "dense" or option.measured_error is not None:
                continue
            weight = dense_weight(model.get_submodule(name))
            measured = measure_option(weight, option, calibration[name], init=settings.init, damping=settings.damping, name=name)
            spectrum = next(s for s in p.spectra if s.family == option.family and s.a_shape == option.a_shape
                            and s.b_shape == option.b_shape and (s.family != "kronecker_lowrank" or s.kron_rank == option.rank))
            key = option.lowrank if option.family == "kronecker_lowrank" else option.rank
            spectrum.measured[key] = measured
            if option.estimated_error > 0:
                spectrum.correction = measured / option.estimated_error
            changed = changed or abs(measured - option.output_error) > 1e-6 * max(option.output_error, 1e-30)
        rounds += 1
        if not changed:
            break
    choices = [
        ModuleChoice(name=name, weight_shape=p.weight_shape, sensitivity=calibration[name].grad_sq, option=h[i],
                     relative_error=h[i].relative_error, energy=p.energy)
        for name, p, h, i in zip(names, pricing, hulls, picks)
    ]
    return BudgetAllocation(
        target_params=int(target_params),
        params_before=before,
        params_after=fixed + sum(h[i].params for h, i in zip(hulls, picks)),
        estimated_loss=sum(c.option.loss for c in choices),
        price=price,
        choices=choices,
        families=families,
        check_rounds=rounds,
    )


def budget_candidates(model: nn.Module, patterns: list[str] | None = None) -> list[str]:
    """Names of the modules a budget may factor: Linear/Conv1D layers matching ``patterns``.

    With no patterns, every Linear/Conv1D except the LM head (its input is the final hidden state
    and a tied head shares the embedding, which stays dense here).

    Raises:
        ValueError: no module matches.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    regexes = [pattern_regex(p) for p in patterns or []]
    names = [
        name
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear) or is_conv1d(module))
        and module is not head
        and (not regexes or any(rx.fullmatch(name) for rx in regexes))
    ]
    if not names:
        raise ValueError(f"no Linear or Conv1D module of {type(model).__name__} matches {patterns}")
    return names


def budget_calibration(
    model: nn.Module,
    calibration: torch.Tensor,
    names: list[str],
    *,
    sensitivity_sequences: int,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, ModuleCalibration]:
    """Input second moments of ``names`` on all calibration sequences, and output-gradient
    sensitivities on the first ``sensitivity_sequences`` (0: none).

    Raises:
        ValueError: see ``collect_calibration``.
    """
    stats = collect_calibration(model, names, calibration, batch_size=batch_size, progress=progress)
    if sensitivity_sequences > 0:
        grads = collect_calibration(model, names, calibration[:sensitivity_sequences], batch_size=batch_size, sensitivity=True, progress=progress)
        for name in names:
            stats[name].grad_sq = grads[name].grad_sq
    return stats


def plan_budget(
    model: nn.Module,
    target_params: int,
    calibration: torch.Tensor,
    *,
    modules: list[str] | None = None,
    settings: BudgetSettings | None = None,
    sensitivity_sequences: int | None = None,
    batch_size: int = 4,
    b_shapes: tuple[tuple[int, int], ...] | None = None,
    init: str | None = None,
    stats: dict[str, ModuleCalibration] | None = None,
    options: Pricing | None = None,
    progress: bool = True,
) -> tuple[CompressionConfig, dict[str, ModuleCalibration], BudgetAllocation]:
    """Calibrate the dense model and allocate a parameter budget across its modules.

    Input second moments come from all calibration sequences; the output-gradient sensitivities
    from the first ``settings.sensitivity_sequences`` of them (a backward pass costs twice a
    forward one, and a scalar per module needs far fewer tokens than an (in, in) matrix). The
    model is not changed: compress it with the returned config and statistics
    (``kronlm.compress_to_budget`` does both; with ``settings.sequential`` pass a
    ``kronlm.compression.sequential.SequentialCalibration`` on the same ids instead).

    Args:
        model: dense causal LM.
        target_params: parameters allowed for the whole model.
        calibration: (num_sequences, seq_len) token ids.
        modules: name patterns of candidate modules (``budget_candidates``).
        settings: ``BudgetSettings``; defaults when None.
        sensitivity_sequences, b_shapes, init: override the settings when given (older keyword
            arguments).
        batch_size: sequences per forward pass.
        stats, options: statistics (``budget_calibration``) and pricing (``price_modules``)
            already computed for these ids and settings, to allocate several budgets.
        progress: tqdm bars.

    Returns:
        (the ``CompressionConfig`` of the allocation, the per-module calibration statistics its
        initialiser needs, with the checked fits cached, the ``BudgetAllocation``).

    Raises:
        ValueError: see ``allocate_budget`` and ``collect_calibration``.
    """
    settings = settings or BudgetSettings()
    overrides = {k: v for k, v in (("sensitivity_sequences", sensitivity_sequences), ("b_shapes", b_shapes), ("init", init)) if v is not None}
    if overrides:
        settings = BudgetSettings(**{**settings.to_dict(), **overrides})
    if stats is None:
        names = budget_candidates(model, modules)
        stats = budget_calibration(model, calibration, names, sensitivity_sequences=settings.sensitivity_sequences,
                                   batch_size=batch_size, progress=progress)
    allocation = allocate_budget(model, stats, target_params, settings=settings, options=options, progress=progress)
    return allocation.to_config(init=settings.init), stats, allocation


__all__ = [
    "DEFAULT_B_SHAPES",
    "FACTOR_FAMILIES",
    "FAMILIES",
    "BudgetAllocation",
    "BudgetOption",
    "BudgetSettings",
    "ModuleChoice",
    "ModulePricing",
    "Pricing",
    "PricingSummary",
    "Spectrum",
    "allocate_budget",
    "budget_calibration",
    "budget_candidates",
    "check_families",
    "default_screen_blocks",
    "hull_shapes",
    "kronecker_spectrum",
    "lowrank_spectrum",
    "measure_option",
    "module_class",
    "module_options",
    "plan_budget",
    "price_modules",
]
