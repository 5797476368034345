"""Pricing: the estimated NLL increase of every candidate factorisation of every module
(docs/compression.md, "Compressing to a parameter budget"; the estimate is derived in
:mod:`kronlm.compression.budget`).

For a module with input second moment C and output-gradient energy s, ΔL ≈ ½ · s · tr(ΔW C ΔWᵀ);
one whitened spectrum prices every rank R (or k) of a family and shape at once. Pricing the whole
Kronecker shape window on every module is slow, so :func:`price_modules` prices it in full on the
modules of a few screened blocks and keeps, per module class, the shapes that reach the lower
convex hull there.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from kronlm.compression.budget.settings import DEFAULT_B_SHAPES, FACTOR_FAMILIES, BudgetSettings, check_families
from kronlm.compression.config import layer_index
from kronlm.decompose.activation_aware import (
    partial_traces,
    psd_sqrt_and_inverse,
    whitened_tail_energies,
)
from kronlm.decompose.lowrank import damp, kronecker_lowrank_tail
from kronlm.decompose.shapes import FactorShape, contraction_macs, kronecker_shape_window
from kronlm.decompose.vanloan import kron_sum, nearest_kronecker_product
from kronlm.layers.dense import dense_weight


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
        macs: multiply-adds per token of this choice's forward pass (the cheaper contraction
            order of the Kronecker part, plus k·(out + in) for a low-rank part; out·in for dense).
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
    macs: int = 0

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
        base_macs, macs_per_rank: multiply-adds per token = base_macs + macs_per_rank · rank
            (``kronlm.decompose.shapes.contraction_macs``, the cheaper order).
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
    base_macs: int = 0
    macs_per_rank: int = 0

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
            error / energy if energy > 0 else 0.0, lowrank, estimate, measured, self.base_macs + self.macs_per_rank * rank,
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

    def _points(self, families: tuple[str, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Per spectrum of ``families``: (params, loss in nats, (spectrum index, rank index)) of
        every option smaller than dense, measured errors in place of the estimates."""
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
        return params, losses, where

    def best_within(self, families: tuple[str, ...], max_params: int) -> BudgetOption | None:
        """The option of ``families`` with the lowest estimated loss among those of at most
        ``max_params`` parameters (ties: the smaller), or None when there is none.

        The measured tie-break (``kronlm.compression.budget.tie_break``) takes its alternatives
        here: an option no larger than the chosen one keeps the budget.
        """
        params, losses, where = self._points(families)
        if not params:
            return None
        p, loss, idx = torch.cat(params), torch.cat(losses), torch.cat(where)
        fits = p <= max_params
        if not fits.any():
            return None
        p, loss, idx = p[fits], loss[fits], idx[fits]
        best = min(range(len(p)), key=lambda i: (float(loss[i]), int(p[i])))
        s_index, r_index = idx[best].tolist()
        return self.spectra[s_index].option(r_index, self.scale, self.energy)

    def hull(self, families: tuple[str, ...]) -> list[BudgetOption]:
        """Dense plus the lower convex hull of the (params, loss) points of ``families``, by params.

        Only hull vertices can be picked by the Lagrangian allocation, so the rest is dropped.
        """
        params, losses, where = self._points(families)
        dense = dense_option(self.weight_shape)
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


def dense_option(weight_shape: tuple[int, int]) -> BudgetOption:
    """Keeping an (out, in) module dense: out·in parameters and multiply-adds per token, no error."""
    size = weight_shape[0] * weight_shape[1]
    return BudgetOption("dense", None, None, 0, size, 0.0, 0.0, 0.0, macs=size)


def _max_rank(per_rank: int, base: int, dense: int, limit: int, *, per_rank_macs: int = 0, base_macs: int = 0,
              max_macs: float | None = None) -> int:
    """The largest rank below ``dense`` parameters (and within ``max_macs`` · dense multiply-adds
    per token when given), at most ``limit``."""
    top = min(limit, max(0, (dense - 1 - base) // per_rank))
    if max_macs is not None and per_rank_macs > 0:
        top = min(top, max(0, int((max_macs * dense - base_macs) // per_rank_macs)))
    return top


def kronecker_term_macs(a_shape: tuple[int, int], b_shape: tuple[int, int]) -> int:
    """Multiply-adds per token of one Kronecker term in its cheaper contraction order."""
    return min(contraction_macs(a_shape, b_shape, 1))


def kronecker_spectrum(W: torch.Tensor, C: torch.Tensor, shape: FactorShape, roots_cache: dict,
                       max_macs: float | None = None) -> Spectrum:
    """The ``kronecker`` family's spectrum of one shape: errors for R = 1 .. below dense size (and,
    with ``max_macs``, for the R whose multiply-adds per token stay within ``max_macs`` · out·in)."""
    a_shape, b_shape = shape.a_shape, shape.b_shape
    L1, L2, _, _ = _roots_for(roots_cache, C, a_shape[1], b_shape[1])
    tails = whitened_tail_energies(W, (L1, L2), a_shape, b_shape)
    per = a_shape[0] * a_shape[1] + b_shape[0] * b_shape[1]
    term_macs = kronecker_term_macs(a_shape, b_shape)
    top = _max_rank(per, 0, W.numel(), len(tails) - 1, per_rank_macs=term_macs, max_macs=max_macs)
    ranks = torch.arange(1, top + 1)
    return Spectrum("kronecker", a_shape, b_shape, 0, 0, per, ranks, tails[1 : top + 1].clone(), macs_per_rank=term_macs)


def lowrank_spectrum(
    W: torch.Tensor, C: torch.Tensor, base: Spectrum, index: int, roots_cache: dict, svd_step: int,
    max_macs: float | None = None,
) -> Spectrum:
    """``kronecker_lowrank`` spectrum on the Kronecker part ``base.ranks[index]`` of ``base``:
    whitened Van Loan of W for that part, then the whitened SVD tail of the residual for every k
    (below dense size, and within ``max_macs`` · out·in multiply-adds per token when given)."""
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
    base_macs = rank * base.macs_per_rank
    top = _max_rank(out_f + in_f, base_params, W.numel(), len(tails) - 1, per_rank_macs=out_f + in_f, base_macs=base_macs,
                    max_macs=max_macs)
    ranks = torch.arange(svd_step, top + 1, svd_step)
    return Spectrum("kronecker_lowrank", base.a_shape, base.b_shape, rank, base_params, out_f + in_f, ranks, tails[ranks].clone(),
                    base_macs=base_macs, macs_per_rank=out_f + in_f)


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
    max_macs: float | None = None,
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
        top = _max_rank(out_f + in_f, 0, W.numel(), len(tails) - 1, per_rank_macs=out_f + in_f, max_macs=max_macs)
        # A matrix too small for one step of rank below its dense size (a 2-row span head) has no SVD option.
        if top >= svd_step:
            ranks = torch.arange(svd_step, top + 1, svd_step)
            pricing.spectra.append(Spectrum("svd", (out_f, 1), (1, in_f), 0, 0, out_f + in_f, ranks, tails[ranks].clone(),
                                            macs_per_rank=out_f + in_f))
    if "kronecker" in families or "kronecker_lowrank" in families:
        kron = [kronecker_spectrum(W, C, shape, cache, max_macs) for shape in shapes]
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
                    pricing.spectra.append(lowrank_spectrum(W, C, best[0], best[1], cache, svd_step, max_macs))
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
    max_macs: float | None = 1.0,
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
        max_macs: see ``BudgetSettings``; None offers every rank below the dense size.

    Returns:
        Options (dense first) with params below the dense count (and multiply-adds per token
        within ``max_macs`` · out·in), every rank of every shape.

    Raises:
        ValueError: an unknown family.
    """
    families = check_families(families)
    shapes = shape_window(tuple(weight.shape), b_shapes, small_factor, balanced_slack)
    pricing = _price_one(weight, covariance, sensitivity=sensitivity, families=families, shapes=shapes, svd_step=svd_step,
                         damping=damping, lowrank_fractions=lowrank_fractions, max_macs=max_macs)
    options = [dense_option(pricing.weight_shape)]
    for spectrum in pricing.spectra:
        options += [spectrum.option(i, pricing.scale, pricing.energy) for i in range(len(spectrum.ranks))]
    return options


def shape_window(weight_shape, b_shapes, small_factor: int, balanced_slack: float) -> list[FactorShape]:
    """The Kronecker factor shapes priced for an (out, in) weight: ``kronecker_shape_window``, or
    with ``b_shapes`` only B of those (m2, n2) that divide the weight (B (1, 1) excluded)."""
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


def default_screen_blocks(names: list[str]) -> list[int]:
    """First, middle and last block index among ``names`` (fewer when there are fewer blocks)."""
    blocks = sorted({b for b in (layer_index(n) for n in names) if b is not None})
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
    progress: bool = True,
) -> Pricing:
    """Price every calibrated module, screening the shape window first (module docstring).

    Args:
        model: the dense model.
        calibration: {name: ``ModuleCalibration``} with full covariances (and ``grad_sq`` to
            price in nats).
        settings: ``BudgetSettings`` (families, window, screening, ...; a ``BudgetConfig`` is
            one); defaults when None.
        progress: tqdm bar over modules.

    Returns:
        A ``Pricing``, reusable across budgets and family subsets (``allocate_budget(pricing=)``).

    Raises:
        ValueError: a module calibrated without its full input second moment.
    """
    settings = settings or BudgetSettings()
    start = time.perf_counter()
    names = list(calibration)
    screen = list(settings.screen_blocks) if settings.screen_blocks is not None else default_screen_blocks(names)
    summary = PricingSummary(modules=len(names), screen_blocks=screen)
    needs_window = "kronecker" in settings.families or "kronecker_lowrank" in settings.families
    classes: dict[str, list[FactorShape]] = {}
    kept: dict[str, set] = {}
    first = [n for n in names if layer_index(n) in screen or layer_index(n) is None or not screen]
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
        weight = dense_weight(model.get_submodule(name)).detach().cpu()  # priced beside its statistics, on the CPU
        cls = f"{module_class(name)} {tuple(weight.shape)}"
        window = classes.setdefault(cls, shape_window(tuple(weight.shape), settings.b_shapes, settings.small_factor, settings.balanced_slack))
        summary.window[cls] = len(window)
        screening = name in first or cls not in kept
        shapes = window if screening or settings.b_shapes is not None else [s for s in window if (s.a_shape, s.b_shape) in kept[cls]]
        pricing = _price_one(weight, covariance, sensitivity=entry.grad_sq, families=settings.families, shapes=shapes if needs_window else [],
                             svd_step=settings.svd_step, damping=settings.damping, lowrank_fractions=settings.lowrank_fractions,
                             roots_cache=roots_cache, max_macs=settings.max_macs)
        if screening and needs_window:
            if "kronecker" not in settings.families:  # screen on the Kronecker spectra all the same
                pricing_k = _price_one(weight, covariance, sensitivity=entry.grad_sq, families=("kronecker",), shapes=window,
                                       svd_step=settings.svd_step, damping=settings.damping, lowrank_fractions=(), roots_cache=roots_cache,
                                       max_macs=settings.max_macs)
                kept.setdefault(cls, set()).update(hull_shapes(pricing_k))
            else:
                kept.setdefault(cls, set()).update(hull_shapes(pricing))
            pricing.screened = True
        priced[name] = pricing
    summary.kept = {cls: len(kept.get(cls, ())) if settings.b_shapes is None else summary.window[cls] for cls in summary.window}
    summary.seconds = time.perf_counter() - start
    return Pricing({name: priced[name] for name in names}, summary)


__all__ = [
    "BudgetOption",
    "ModulePricing",
    "Pricing",
    "PricingSummary",
    "Spectrum",
    "default_screen_blocks",
    "dense_option",
    "hull_shapes",
    "kronecker_spectrum",
    "kronecker_term_macs",
    "lowrank_spectrum",
    "module_class",
    "module_options",
    "price_modules",
    "shape_window",
]
