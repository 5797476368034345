"""Allocation: which priced option each module takes so that the model fits a parameter budget,
and the check that fits the chosen factors and allocates again with their measured errors
(docs/compression.md, "Compressing to a parameter budget", steps 3 and 4).

Minimising Σ_m ΔL_m subject to Σ_m params_m ≤ budget is a multiple-choice knapsack; its
Lagrangian relaxation lets every module take, for a price λ, the option with the least
ΔL + λ·params, and bisects λ until the model fits: the standard rate–distortion allocation, which
picks points of each module's lower convex hull.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from kronlm.compression.budget.pricing import BudgetOption, ModulePricing, Pricing, price_modules
from kronlm.compression.budget.report import allocation_table
from kronlm.compression.budget.settings import FACTOR_FAMILIES, BudgetSettings, check_families
from kronlm.compression.calibration import ModuleCalibration, collect_calibration
from kronlm.compression.config import CompressionConfig, KroneckerTarget, pattern_regex
from kronlm.compression.report import count_parameters
from kronlm.compression.surgery import fit_factors
from kronlm.decompose.lowrank import damp, output_error
from kronlm.layers.dense import dense_weight, is_conv1d


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
        held_out_nll: the subset check's measurements ({family set, e.g. "svd,kronecker" or
            "svd": held-out NLL in nats per token, None when that set cannot reach the budget});
            empty when no check ran (``subset_check``).
        decided_by: what chose this allocation among them (empty when no check ran).
        measured_nll: held-out NLL of this allocation fitted on the dense model's statistics
            (nats per token), None when no check ran.
        tie_break: the measured tie-break's trials, in order: {"module", "from", "to",
            "estimated_gap" (relative), "held_out_nll", "kept"}; empty when none ran.
    """

    target_params: int
    params_before: int
    params_after: int
    estimated_loss: float
    price: float
    choices: list[ModuleChoice] = field(default_factory=list)
    families: tuple[str, ...] = FACTOR_FAMILIES
    check_rounds: int = 0
    held_out_nll: dict[str, float | None] = field(default_factory=dict)
    decided_by: str = ""
    measured_nll: float | None = None
    tie_break: list[dict[str, Any]] = field(default_factory=list)

    def to_config(self, init: str = "activation_aware", name: str | None = None) -> CompressionConfig:
        """A ``CompressionConfig`` with one exact-name target per factored module."""
        targets = [option_target(c.name, c.option, init) for c in self.choices if c.option.family != "dense"]
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
        """The text table of :func:`kronlm.compression.budget.report.allocation_table`."""
        return allocation_table(self, max_rows)


def option_target(name: str, option: BudgetOption, init: str) -> KroneckerTarget:
    """The ``KroneckerTarget`` that stores module ``name`` (exact name) as ``option`` (not dense)."""
    return KroneckerTarget(modules=[f"re:{re.escape(name)}"], a_shape=option.a_shape, b_shape=option.b_shape, rank=option.rank,
                           init=init, lowrank_rank=option.lowrank)


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
    tr(ΔW C ΔWᵀ) under the damped C of the pricing (squared output units per token), on the CPU
    beside C."""
    weight = weight.detach().cpu()
    factors = fit_factors(weight, option.a_shape, option.b_shape, option.rank, lowrank_rank=option.lowrank, init=init,
                          calibration=stats, name=name)
    approx = factors.to_dense().double()
    return output_error(weight.detach().double() - approx, damp(stats.inputs.covariance(), damping))


def solve_budget(hulls: list[list[BudgetOption]], fixed: int, target_params: int, families: tuple[str, ...]) -> tuple[list[int], float]:
    """(index of the option each module takes, the price λ) that fits ``target_params``.

    Args:
        hulls: per module, its options on the lower convex hull (``ModulePricing.hull``).
        fixed: parameters outside the candidate modules.
        target_params: parameters allowed for the whole model.
        families: the families offered (named in the error).

    Raises:
        ValueError: the budget is below what the smallest options reach (both counts named).
    """
    smallest = fixed + sum(min(o.params for o in h) for h in hulls)
    if target_params < smallest:
        raise ValueError(
            f"budget of {target_params:,} parameters is below the smallest reachable {smallest:,} with these candidates "
            f"(families {', '.join(families)})"
        )
    return _solve(hulls, fixed, target_params)


def check_choices(
    model: nn.Module,
    statistics: dict[str, ModuleCalibration],
    names: list[str],
    pricing: list[ModulePricing],
    chosen: list[BudgetOption],
    settings: BudgetSettings,
    progress: bool,
) -> bool:
    """One check round: fit every chosen factored option not yet measured, record its measured
    output error in its spectrum (every rank of that shape is rescaled by measured / estimated)
    and return whether any chosen option's error changed, i.e. whether to allocate again."""
    changed = False
    for name, p, option in tqdm(list(zip(names, pricing, chosen)), desc="check errors", unit="module", disable=not progress):
        if option.family == "dense" or option.measured_error is not None:
            continue
        weight = dense_weight(model.get_submodule(name))
        measured = measure_option(weight, option, statistics[name], init=settings.init, damping=settings.damping, name=name)
        spectrum = next(s for s in p.spectra if s.family == option.family and s.a_shape == option.a_shape
                        and s.b_shape == option.b_shape and (s.family != "kronecker_lowrank" or s.kron_rank == option.rank))
        key = option.lowrank if option.family == "kronecker_lowrank" else option.rank
        spectrum.measured[key] = measured
        if option.estimated_error > 0:
            spectrum.correction = measured / option.estimated_error
        changed = changed or abs(measured - option.output_error) > 1e-6 * max(option.output_error, 1e-30)
    return changed


def allocate_budget(
    model: nn.Module,
    statistics: dict[str, ModuleCalibration],
    target_params: int,
    *,
    settings: BudgetSettings | None = None,
    pricing: Pricing | None = None,
    families: tuple[str, ...] | str | None = None,
    progress: bool = True,
) -> BudgetAllocation:
    """Choose, per calibrated module, dense or a factorisation so the model fits ``target_params``.

    Stages: price every module (unless ``pricing`` is given), solve the Lagrangian allocation on
    each module's convex hull, then up to ``settings.check_rounds`` times fit the chosen options,
    put their measured errors in place of the estimates and solve again (module docstring).

    Args:
        model: the dense model (parameters counted before anything changes).
        statistics: {module name: ``ModuleCalibration``} with full covariances (``budget_statistics``);
            the modules listed are the candidates. With ``grad_sq`` set (sensitivities) options
            are priced in estimated nats, otherwise by relative output error. The checked fits
            are cached in each entry's ``fitted``, for the compression that follows.
        target_params: total parameters allowed for the whole model.
        settings: ``BudgetSettings`` (a ``BudgetConfig`` is one; its target is not read here);
            defaults when None.
        pricing: the ``price_modules`` result for these statistics, to allocate several budgets
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
    families = check_families(families) if families is not None else settings.families
    before = count_parameters(model)
    if target_params >= before:
        raise ValueError(f"budget of {target_params:,} parameters is not below the model's {before:,}: nothing to compress")
    names = list(statistics)
    if pricing is None:
        pricing = price_modules(model, statistics, settings=settings, progress=progress)
    priced = [pricing.modules[name] for name in names]
    fixed = before - sum(p.dense_params for p in priced)
    rounds = 0
    while True:
        hulls = [p.hull(families) for p in priced]
        picks, price = solve_budget(hulls, fixed, target_params, families)
        if rounds >= settings.check_rounds:
            break
        changed = check_choices(model, statistics, names, priced, [h[i] for h, i in zip(hulls, picks)], settings, progress)
        rounds += 1
        if not changed:
            break
    choices = [
        ModuleChoice(name=name, weight_shape=p.weight_shape, sensitivity=statistics[name].grad_sq, option=h[i],
                     relative_error=h[i].relative_error, energy=p.energy)
        for name, p, h, i in zip(names, priced, hulls, picks)
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

    With no patterns, every Linear/Conv1D of the base model (``model.base_model`` of a Hugging
    Face model with a head): never the LM head (its input is the final hidden state and a tied
    head shares the embedding, which stays dense here) nor a task head (a span or class head of a
    fine-tuned encoder, a few rows that the task's logits come straight from). Patterns may name
    a task head all the same.

    Raises:
        ValueError: no module matches.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    regexes = [pattern_regex(p) for p in patterns or []]
    base = set() if regexes else {id(m) for m in getattr(model, "base_model", model).modules()}
    names = [
        name
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear) or is_conv1d(module))
        and module is not head
        and (any(rx.fullmatch(name) for rx in regexes) if regexes else id(module) in base)
    ]
    if not names:
        raise ValueError(f"no Linear or Conv1D module of {type(model).__name__} matches {patterns}")
    return names


def budget_statistics(
    model: nn.Module,
    calibration: torch.Tensor,
    names: list[str],
    *,
    sensitivity_sequences: int,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, ModuleCalibration]:
    """The statistics a budget is priced on: input second moments of ``names`` on all
    calibration sequences, and output-gradient sensitivities on the first
    ``sensitivity_sequences`` (0: none). A backward pass costs twice a forward one, and a scalar
    per module needs far fewer tokens than an (in, in) matrix.

    Args:
        model: the dense model.
        calibration: (num_sequences, seq_len) int64 token ids.
        names: the candidate modules (``budget_candidates``).
        sensitivity_sequences: sequences of the backward pass.
        batch_size: sequences per forward pass.
        progress: tqdm bars.

    Returns:
        {module name: ``ModuleCalibration``} in ``names`` order.

    Raises:
        ValueError: see ``collect_calibration``.
    """
    stats = collect_calibration(model, names, calibration, batch_size=batch_size, progress=progress)
    if sensitivity_sequences > 0:
        grads = collect_calibration(model, names, calibration[:sensitivity_sequences], batch_size=batch_size, sensitivity=True, progress=progress)
        for name in names:
            stats[name].grad_sq = grads[name].grad_sq
    return stats


__all__ = [
    "BudgetAllocation",
    "ModuleChoice",
    "allocate_budget",
    "budget_candidates",
    "budget_statistics",
    "check_choices",
    "measure_option",
    "option_target",
    "solve_budget",
]
