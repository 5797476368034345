"""Per-module budget allocation: which modules to factor, with which factor shapes and R.

One shape everywhere wastes parameters: some modules' outputs barely move the loss, others are
fragile. Given calibration statistics (``kronlm.compress.calibration``) we estimate, for every
candidate factorisation of every module, its increase of the mean token NLL and pick the set of
candidates that minimises the total increase under a parameter budget.

Estimate. For a module with input second moment C and output-gradient energy s (per output unit,
see ``collect_calibration(sensitivity=True)``), the diagonal-Fisher approximation gives
ΔL ≈ ½ · s · E_t||ΔW x_t||² = ½ · s · tr(ΔW C ΔWᵀ). For the best activation-aware factors of a
given shape and R, tr(ΔW C ΔWᵀ) is the tail Σ_{j>R} σ_j² of the singular values of the whitened
rearrangement R(W (L1 ⊗ L2)) (``kronlm.decompose.activation_aware``): exact when n1 = 1 or n2 = 1,
an estimate otherwise. So one SVD per (module, shape) prices every R at once.

Candidates per module: keep it dense; the rank-R truncated SVD as the degenerate Kronecker product
A (out, 1) ⊗ B (1, in) (SPEC §2: n1 = 1, m2 = 1), R a multiple of ``svd_step``; and Kronecker
products with a small factor B of each shape in ``b_shapes`` and every R that saves parameters.

Choice. Minimising Σ_m ΔL_m subject to Σ_m params_m ≤ budget is a multiple-choice knapsack; we
solve its Lagrangian relaxation: for a price λ every module independently takes the candidate
with the least ΔL + λ·params, and λ is bisected until the model fits the budget. This picks
points of each module's lower convex hull, the standard rate–distortion allocation.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from kronlm.compress.calibration import ModuleCalibration, collect_calibration
from kronlm.compress.config import CompressionConfig, KroneckerTarget, pattern_regex
from kronlm.compress.report import count_parameters
from kronlm.decompose.activation_aware import (
    psd_sqrt_and_inverse,
    whitened_tail_energies,
    whitening_roots,
)
from kronlm.layers.dense import dense_weight, is_conv1d

DEFAULT_B_SHAPES = ((2, 1), (1, 2), (4, 1), (1, 4))


@dataclass
class BudgetOption:
    """One way to store one module.

    Attributes:
        family: "dense", "svd" (A (out, 1) ⊗ B (1, in), rank R) or "kronecker".
        a_shape, b_shape: factor shapes (rows, cols), None for dense.
        rank: number of terms R (0 for dense).
        params: weight parameters of this choice (bias excluded; it never changes).
        output_error: estimated E_t ||ΔW x_t||² (squared output units per token).
        loss: estimated increase of the mean token NLL, nats.
        relative_error: output_error / E_t ||W x_t||².
    """

    family: str
    a_shape: tuple[int, int] | None
    b_shape: tuple[int, int] | None
    rank: int
    params: int
    output_error: float
    loss: float
    relative_error: float = 0.0


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
    """

    name: str
    weight_shape: tuple[int, int]
    sensitivity: float | None
    option: BudgetOption
    relative_error: float


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
    """

    target_params: int
    params_before: int
    params_after: int
    estimated_loss: float
    price: float
    choices: list[ModuleChoice] = field(default_factory=list)

    def to_config(self, init: str = "activation_aware", name: str | None = None) -> CompressionConfig:
        """A ``CompressionConfig`` with one exact-name target per factored module."""
        targets = [
            KroneckerTarget(
                modules=[f"re:{re.escape(c.name)}"], a_shape=c.option.a_shape, b_shape=c.option.b_shape, rank=c.option.rank, init=init
            )
            for c in self.choices
            if c.option.family != "dense"
        ]
        description = f"budget allocation to {self.target_params:,} parameters (estimated +{self.estimated_loss:.3f} nats/token)"
        return CompressionConfig(targets=targets, name=name, description=description)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for the compression report)."""
        return asdict(self)

    def table(self, max_rows: int | None = None) -> str:
        """Per-module choice as a fixed-width text table (dense modules included), then a count of
        the choices by family and the totals; ``max_rows`` cuts the per-module part."""
        lines = [f"{'module':<40} {'shape':>12} {'choice':>26} {'params':>10} {'rel.err':>8} {'est. dNLL':>10}"]
        for c in self.choices[:max_rows]:
            o = c.option
            what = "dense" if o.family == "dense" else f"{tuple(o.a_shape)}x{tuple(o.b_shape)} R={o.rank}"
            shape = f"({c.weight_shape[0]},{c.weight_shape[1]})"
            lines.append(f"{c.name[-40:]:<40} {shape:>12} {what:>26} {o.params:>10,} {c.relative_error:>8.4f} {o.loss:>10.5f}")
        if max_rows is not None and len(self.choices) > max_rows:
            lines.append(f"... {len(self.choices) - max_rows} more modules")
        counts: dict[str, int] = {}
        for c in self.choices:
            key = c.option.family if c.option.family != "kronecker" else f"kronecker B {tuple(c.option.b_shape)}"
            counts[key] = counts.get(key, 0) + 1
        lines.append("choices: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        lines.append(
            f"params {self.params_before:,} -> {self.params_after:,} (budget {self.target_params:,}); "
            f"estimated NLL increase {self.estimated_loss:.4f} nats/token (x{math.exp(self.estimated_loss):.3f} perplexity)"
        )
        return "\n".join(lines)


def module_options(
    weight: torch.Tensor,
    covariance: torch.Tensor,
    *,
    sensitivity: float | None = None,
    b_shapes: tuple[tuple[int, int], ...] = DEFAULT_B_SHAPES,
    svd_step: int = 8,
    damping: float = 1e-2,
) -> list[BudgetOption]:
    """Price every candidate factorisation of one module (module docstring).

    Args:
        weight: (out, in) dense weight, ``nn.Linear`` orientation.
        covariance: (in, in) input second moment.
        sensitivity: s (mean squared output gradient per unit); None prices by relative output
            error instead (loss = error / E||W x||²).
        b_shapes: small-factor shapes (m2, n2) of the Kronecker candidates; those that do not
            divide the weight are skipped.
        svd_step: truncated-SVD ranks are multiples of this.
        damping: as in ``activation_aware_factors``.

    Returns:
        Options (dense first) with params below the dense count.
    """
    W = weight.detach().double()
    out_f, in_f = W.shape
    C = covariance.double()
    C = C + damping * C.diagonal().mean().clamp_min(0) * torch.eye(in_f, dtype=C.dtype)
    energy = ((W @ covariance.double()) * W).sum().item()
    scale = 0.5 * sensitivity if sensitivity is not None else 1.0 / max(energy, 1e-300)
    options = [BudgetOption("dense", None, None, 0, out_f * in_f, 0.0, 0.0, 0.0)]
    # With n1 = 1 or n2 = 1 the Kronecker-factored whitening is C^{1/2} itself: one eigh serves all.
    full_root = psd_sqrt_and_inverse(C)[0]
    candidates = [("svd", (out_f, 1), (1, in_f))]
    for m2, n2 in b_shapes:
        if out_f % m2 == 0 and in_f % n2 == 0 and (m2, n2) != (1, 1):
            candidates.append(("kronecker", (out_f // m2, in_f // n2), (m2, n2)))
    for family, a_shape, b_shape in candidates:
        tails = whitened_tail_energies(W, whitening_roots(C, a_shape, b_shape, full_root), a_shape, b_shape)
        per_term = a_shape[0] * a_shape[1] + b_shape[0] * b_shape[1]
        max_rank = min(len(tails) - 1, (out_f * in_f - 1) // per_term)
        ranks = range(svd_step, max_rank + 1, svd_step) if family == "svd" else range(1, max_rank + 1)
        for rank in ranks:
            error = tails[rank].item()
            relative = error / energy if energy > 0 else 0.0
            options.append(BudgetOption(family, a_shape, b_shape, rank, rank * per_term, error, scale * error, relative))
    return options


def _pick(options: list[list[BudgetOption]], price: float) -> list[int]:
    return [min(range(len(opts)), key=lambda i: opts[i].loss + price * opts[i].params) for opts in options]


def price_modules(
    model: nn.Module,
    calibration: dict[str, Any],
    *,
    b_shapes: tuple[tuple[int, int], ...] = DEFAULT_B_SHAPES,
    svd_step: int = 8,
    progress: bool = True,
) -> dict[str, list[BudgetOption]]:
    """``module_options`` of every calibrated module: {name: options}, reusable across budgets.

    Raises:
        ValueError: a module calibrated without its full input second moment.
    """
    priced = {}
    for name in tqdm(list(calibration), desc="price options", unit="module", disable=not progress):
        entry = calibration[name]
        covariance = entry.inputs.covariance()
        if covariance is None:
            raise ValueError(f"{name}: budget allocation needs the full input second moment (raise max_full_dim)")
        weight = dense_weight(model.get_submodule(name))
        priced[name] = module_options(weight, covariance, sensitivity=entry.grad_sq, b_shapes=b_shapes, svd_step=svd_step)
    return priced


def allocate_budget(
    model: nn.Module,
    calibration: dict[str, Any],
    target_params: int,
    *,
    b_shapes: tuple[tuple[int, int], ...] = DEFAULT_B_SHAPES,
    svd_step: int = 8,
    options: dict[str, list[BudgetOption]] | None = None,
    progress: bool = True,
) -> BudgetAllocation:
    """Choose, per calibrated module, dense or a factorisation so the model fits ``target_params``.

    Args:
        model: the dense model (parameters counted before anything changes).
        calibration: {module name: ``ModuleCalibration``} with full covariances; the modules
            listed are the candidates. With ``grad_sq`` set (``sensitivity=True``) options are
            priced in estimated nats, otherwise by relative output error.
        target_params: total parameters allowed for the whole model.
        b_shapes, svd_step: see ``module_options``.
        options: the result of ``price_modules`` for these statistics, to allocate several budgets
            without pricing again.
        progress: tqdm bar over modules.

    Returns:
        A ``BudgetAllocation``; ``to_config()`` turns it into a ``CompressionConfig``.

    Raises:
        ValueError: a budget at or above the dense count, a budget the candidates cannot reach even
            at their smallest options (the message gives the smallest reachable count), or a module
            calibrated without its full covariance.
    """
    before = count_parameters(model)
    if target_params >= before:
        raise ValueError(f"budget of {target_params:,} parameters is not below the model's {before:,}: nothing to compress")
    names = list(calibration)
    if options is None:
        options = price_modules(model, calibration, b_shapes=b_shapes, svd_step=svd_step, progress=progress)
    weights = [tuple(dense_weight(model.get_submodule(name)).shape) for name in names]
    options = [options[name] for name in names]
    fixed = before - sum(o[0].params for o in options)
    smallest = fixed + sum(min(opt.params for opt in o) for o in options)
    if target_params < smallest:
        raise ValueError(f"budget of {target_params:,} parameters is below the smallest reachable {smallest:,} with these candidates")

    def total(picks: list[int]) -> int:
        return fixed + sum(o[i].params for o, i in zip(options, picks))

    lo, hi = 0.0, 1.0
    while total(_pick(options, hi)) > target_params:
        hi *= 4.0
    for _ in range(60):  # bisection in log space to relative precision ~1e-6
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6
        if total(_pick(options, mid)) > target_params:
            lo = mid
        else:
            hi = mid
        if lo > 0 and hi / lo < 1 + 1e-6:
            break
    picks = _pick(options, hi)
    choices = [
        ModuleChoice(name=name, weight_shape=shape, sensitivity=calibration[name].grad_sq, option=opts[i], relative_error=opts[i].relative_error)
        for name, shape, opts, i in zip(names, weights, options, picks)
    ]
    return BudgetAllocation(
        target_params=int(target_params),
        params_before=before,
        params_after=total(picks),
        estimated_loss=sum(c.option.loss for c in choices),
        price=hi,
        choices=choices,
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


def plan_budget(
    model: nn.Module,
    target_params: int,
    calibration: torch.Tensor,
    *,
    modules: list[str] | None = None,
    sensitivity_sequences: int = 16,
    batch_size: int = 4,
    b_shapes: tuple[tuple[int, int], ...] = DEFAULT_B_SHAPES,
    init: str = "activation_aware",
    progress: bool = True,
) -> tuple[CompressionConfig, dict[str, ModuleCalibration], BudgetAllocation]:
    """Calibrate the dense model and allocate a parameter budget across its modules.

    Input second moments come from all calibration sequences; the output-gradient sensitivities
    from the first ``sensitivity_sequences`` of them (a backward pass costs twice a forward one,
    and a scalar per module needs far fewer tokens than an (in, in) matrix). The model is not
    changed: compress it with the returned config and statistics
    (``kronlm.compress_to_budget`` does both).

    Args:
        model: dense causal LM.
        target_params: parameters allowed for the whole model.
        calibration: (num_sequences, seq_len) token ids.
        modules: name patterns of candidate modules (``budget_candidates``).
        sensitivity_sequences: sequences used for the sensitivity pass (0: price by relative
            output error instead).
        batch_size: sequences per forward pass.
        b_shapes: small-factor shapes of the Kronecker candidates.
        init: initialiser for the chosen factors.
        progress: tqdm bars.

    Returns:
        (the ``CompressionConfig`` of the allocation, the per-module calibration statistics its
        initialiser needs, the ``BudgetAllocation``).

    Raises:
        ValueError: see ``allocate_budget`` and ``collect_calibration``.
    """
    names = budget_candidates(model, modules)
    stats = collect_calibration(model, names, calibration, batch_size=batch_size, progress=progress)
    if sensitivity_sequences > 0:
        grads = collect_calibration(model, names, calibration[:sensitivity_sequences], batch_size=batch_size, sensitivity=True, progress=progress)
        for name in names:
            stats[name].grad_sq = grads[name].grad_sq
    allocation = allocate_budget(model, stats, target_params, b_shapes=b_shapes, progress=progress)
    return allocation.to_config(init=init), stats, allocation


__all__ = [
    "DEFAULT_B_SHAPES",
    "BudgetAllocation",
    "BudgetOption",
    "ModuleChoice",
    "allocate_budget",
    "budget_candidates",
    "plan_budget",
    "module_options",
    "price_modules",
]
