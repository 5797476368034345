"""The measured tie-break between close candidates of one module (docs/compression.md,
"Compressing to a parameter budget", step 5).

The subset check (:mod:`~kronlm.compression.budget.subset_check`) compares whole allocations. It
cannot tell that one module would be better stored by another family while the rest keeps the
kept plan: the diagonal-Fisher estimate mis-ranks such close candidates, and no single-family
plan holds the better mix. The tie-break looks at the modules where another offered family has
an option no larger than the chosen one whose estimated NLL increase is within a margin of it
(or below it), takes the closest ``tie_break_modules`` of them, and tries each swap in turn on the
model compressed in place: the swap stays when the NLL on the check's held-out calibration
sequences goes down, and is undone otherwise. Every alternative is no larger than what it
replaces, so the budget still holds; the result is never worse on those held-out tokens than the
plan it started from.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from kronlm.compression.budget.allocation import BudgetAllocation, option_target
from kronlm.compression.budget.pricing import BudgetOption, Pricing
from kronlm.compression.budget.settings import BudgetSettings
from kronlm.compression.budget.subset_check import compressed_in_place, held_out_nll
from kronlm.compression.calibration import ModuleCalibration
from kronlm.compression.config import CompressionConfig
from kronlm.compression.surgery import compress_modules, set_module


@dataclass
class Swap:
    """One candidate of the tie-break.

    Attributes:
        index: position of the module in ``BudgetAllocation.choices``.
        name: module name.
        current: the option the allocation chose.
        alternative: the best option of another family with at most ``current.params`` parameters.
        gap: (alternative.loss - current.loss) / current.loss, the relative difference of their
            estimated NLL increases (negative: the estimate already prefers the alternative).
    """

    index: int
    name: str
    current: BudgetOption
    alternative: BudgetOption
    gap: float


def close_alternatives(allocation: BudgetAllocation, pricing: Pricing, families: tuple[str, ...], margin: float,
                       limit: int) -> list[Swap]:
    """The modules whose chosen option has a close alternative of another family, closest first.

    Per factored module and per other family of ``families``: the option with the lowest
    estimated loss among those no larger than the chosen one (``ModulePricing.best_within``); it is
    close when its loss is at most ``(1 + margin)`` times the chosen one's. Each module keeps its
    closest alternative; the ``limit`` modules with the smallest gaps are returned.

    Args:
        allocation: the allocation to improve (its options were priced in ``pricing``).
        pricing: the pricing of every family in ``families``.
        families: the families offered to the budget.
        margin: relative closeness (0.1: within 10 % of the chosen option's estimated loss).
        limit: most swaps returned.
    """
    swaps: list[Swap] = []
    for index, choice in enumerate(allocation.choices):
        current = choice.option
        if current.family == "dense" or current.loss <= 0:
            continue
        module = pricing.modules[choice.name]
        best: Swap | None = None
        for family in families:
            if family == current.family:
                continue
            alternative = module.best_within((family,), current.params)
            if alternative is None:
                continue
            gap = (alternative.loss - current.loss) / current.loss
            if gap <= margin and (best is None or gap < best.gap):
                best = Swap(index, choice.name, current, alternative, gap)
        if best is not None:
            swaps.append(best)
    return sorted(swaps, key=lambda s: s.gap)[:limit]


def break_ties(
    model: nn.Module,
    statistics: dict[str, ModuleCalibration],
    allocation: BudgetAllocation,
    pricing: Pricing,
    held_out: torch.Tensor,
    *,
    settings: BudgetSettings,
    batch_size: int = 4,
    progress: bool = True,
) -> BudgetAllocation:
    """Try the closest per-module swaps of ``allocation`` one at a time and keep those that lower
    the held-out NLL (module docstring).

    Args:
        model: the dense model (the swaps are tried on it in place; its dense modules are put back
            after: :func:`~kronlm.compression.budget.subset_check.compressed_in_place`).
        statistics: the statistics the allocation was priced on (fits are cached in them).
        allocation: the allocation the subset check kept, with ``measured_nll`` set (else it is
            measured here).
        pricing: the pricing of every family in ``settings.families``.
        held_out: (num_sequences, seq_len) int64 ids the statistics were not computed on.
        settings: ``tie_break_modules`` (most swaps tried), ``tie_break_margin``, ``families``
            and ``init``.
        batch_size: sequences per forward pass.
        progress: a tqdm bar over the swaps.

    Returns:
        ``allocation``, changed in place: the kept swaps in ``choices`` (``params_after`` and
        ``estimated_loss`` follow), every trial in ``tie_break``, ``measured_nll`` the NLL after the
        kept swaps, and ``decided_by`` extended with the count.

    Raises:
        ValueError: see :func:`~kronlm.compression.budget.subset_check.held_out_nll`.
    """
    swaps = close_alternatives(allocation, pricing, settings.families, settings.tie_break_margin, settings.tie_break_modules)
    if not swaps:
        allocation.decided_by += f"; tie-break: no module had a close alternative (margin {settings.tie_break_margin:g})"
        return allocation
    with compressed_in_place(model, allocation.to_config(init=settings.init), statistics) as dense:
        current = allocation.measured_nll
        if current is None:
            current = held_out_nll(model, held_out, batch_size)
        start = current
        for swap in tqdm(swaps, desc="tie-break", unit="swap", disable=not progress):
            before = model.get_submodule(swap.name)
            set_module(model, swap.name, dense[swap.name])
            config = CompressionConfig(targets=[option_target(swap.name, swap.alternative, settings.init)])
            compress_modules(model, config, statistics={swap.name: statistics[swap.name]}, progress=False)
            nll = held_out_nll(model, held_out, batch_size)
            kept = nll < current
            if kept:
                current = nll
                allocation.params_after -= swap.current.params - swap.alternative.params
                choice = allocation.choices[swap.index]
                allocation.choices[swap.index] = replace(choice, option=swap.alternative, relative_error=swap.alternative.relative_error)
            else:
                set_module(model, swap.name, before)
            allocation.tie_break.append({"module": swap.name, "from": swap.current.describe(), "to": swap.alternative.describe(),
                                         "estimated_gap": swap.gap, "held_out_nll": nll, "kept": kept})
    allocation.estimated_loss = sum(c.option.loss for c in allocation.choices)
    allocation.measured_nll = current
    kept_count = sum(t["kept"] for t in allocation.tie_break)
    allocation.decided_by += (f"; tie-break: {kept_count} of {len(swaps)} close swaps kept (held-out NLL {start:.4f} -> "
                              f"{current:.4f})")
    return allocation


__all__ = ["Swap", "break_ties", "close_alternatives"]
