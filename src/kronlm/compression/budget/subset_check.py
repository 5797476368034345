"""The measured check of an allocation over several factor families: never worse than a subset
(docs/compression.md, "Compressing to a parameter budget", step 5).

The allocation minimises a sum of per-module estimates (the diagonal-Fisher ½ · s · E‖ΔW x‖²).
Offering more families can only lower that sum, but the estimate ignores how the errors of
different modules interact, so a mixed allocation whose estimate is lowest can measure worse than
the same budget spent on one family alone. The check therefore allocates the same budget with
each offered family on its own, compresses the model with each distinct allocation in turn
(in place, the dense modules put back after each),
measures the mean next-token NLL on calibration sequences that none of them was priced on, and
keeps the lowest: the result is never worse, on held-out tokens, than any single family's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from kronlm.compression.budget.allocation import BudgetAllocation, allocate_budget
from kronlm.compression.budget.pricing import Pricing
from kronlm.compression.budget.settings import BudgetSettings
from kronlm.compression.calibration import ModuleCalibration
from kronlm.compression.config import CompressionConfig
from kronlm.compression.surgery import compress_modules, plan_compression, set_module


@contextmanager
def compressed_in_place(model: nn.Module, config: CompressionConfig,
                        statistics: Mapping[str, ModuleCalibration]) -> Iterator[dict[str, nn.Module]]:
    """Within the block, ``model`` holds the modules ``config`` selects compressed (in eval mode);
    afterwards its own dense modules are back, the very same objects, and its training flag too.

    The checks of a budget measure several plans of one model; swapping modules in place keeps
    one copy of the weights in memory where a copy of the model per plan would double it.

    Args:
        model: the dense model.
        config: the plan (``BudgetAllocation.to_config``).
        statistics: {module name: ``ModuleCalibration``} to fit the factors on.

    Yields:
        {module name: the dense module it replaced}, to swap single modules back during the block.

    Raises:
        ValueError: see :func:`~kronlm.compression.surgery.compress_modules`.
    """
    originals = {choice.name: model.get_submodule(choice.name) for choice in plan_compression(model, config)}
    training = model.training
    model.eval()
    try:
        compress_modules(model, config, statistics=statistics, progress=False)
        yield originals
    finally:
        for name, module in originals.items():
            set_module(model, name, module)
        model.train(training)


def held_out_nll(model: nn.Module, ids: torch.Tensor, batch_size: int = 4, *,
                 needed_by: str = "subset check (subset_check=True)") -> float:
    """Mean next-token negative log-likelihood of a causal LM on ``ids``, in nats per token,
    measured in eval mode (the model's training flag is restored after).

    Args:
        model: a causal LM whose output has ``logits`` (batch, seq_len, vocab).
        ids: (num_sequences, seq_len) int64 token ids; every position after the first of each
            sequence is scored.
        batch_size: sequences per forward pass.
        needed_by: the budget setting(s) that score this loss, named in the error for a model
            without next-token logits.

    Raises:
        ValueError: ``ids`` is not a 2-D integer tensor with at least 2 tokens per sequence, or
            the model returns no (batch, seq_len, vocab) ``logits`` (an encoder with a task head,
            whose span or class logits are not a next-token distribution).
    """
    if ids.dim() != 2 or ids.shape[1] < 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"held-out ids must be (num_sequences, seq_len >= 2) integers, got {tuple(ids.shape)} {ids.dtype}")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[0], batch_size):
                batch = ids[start:start + batch_size].to(device)
                logits = getattr(model(input_ids=batch), "logits", None)
                if logits is None or logits.dim() != 3:
                    verb = "score" if " and " in needed_by else "scores"
                    raise ValueError(f"{type(model).__name__} returns no next-token logits, and the budget's {needed_by} "
                                     f"{verb} a causal LM's loss: set sensitivity_sequences=0 and subset_check=False "
                                     "(kronlm compress --sensitivity-sequences 0 --no-subset-check) to price the modules "
                                     "by output error alone")
                targets = batch[:, 1:]
                total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
                count += targets.numel()
    finally:
        model.train(training)
    return total / count


def _same_choices(a: BudgetAllocation, b: BudgetAllocation) -> bool:
    return [c.option for c in a.choices] == [c.option for c in b.choices]


def choose_by_held_out(
    model: nn.Module,
    statistics: dict[str, ModuleCalibration],
    target_params: int,
    allocation: BudgetAllocation,
    pricing: Pricing,
    held_out: torch.Tensor,
    *,
    settings: BudgetSettings,
    batch_size: int = 4,
    progress: bool = True,
) -> BudgetAllocation:
    """The allocation with the lowest held-out NLL among ``allocation`` (every offered family) and
    the same budget allocated with each family alone (module docstring).

    Args:
        model: the dense model (each allocation is applied in place and taken back:
            :func:`compressed_in_place`).
        statistics: the statistics the allocation was priced on (its fitted factors are reused).
        target_params: the budget, parameters of the whole model.
        allocation: the allocation over every family of ``settings.families``.
        pricing: the pricing behind it (the single-family allocations reuse it).
        held_out: (num_sequences, seq_len) int64 calibration ids the statistics were not computed on.
        settings: the budget settings (``init``, ``check_rounds``, ...).
        batch_size: sequences per forward pass.
        progress: tqdm bars of the single-family allocations.

    Returns:
        The kept allocation, with ``held_out_nll`` ({family set: nats per token, or None when a
        family alone cannot reach the budget}) and ``decided_by`` filled in.

    Raises:
        ValueError: see :func:`held_out_nll`.
    """
    full = ",".join(allocation.families)
    candidates: dict[str, BudgetAllocation | None] = {full: allocation}
    for family in allocation.families:
        try:
            candidates[family] = allocate_budget(model, statistics, target_params, settings=settings, pricing=pricing,
                                                 families=(family,), progress=progress)
        except ValueError:  # this family alone cannot reach the budget (its smallest options are too large)
            candidates[family] = None
    scores: dict[str, float | None] = {}
    measured: list[tuple[BudgetAllocation, float]] = []
    for label, candidate in candidates.items():
        if candidate is None:
            scores[label] = None
            continue
        same = next((nll for other, nll in measured if _same_choices(other, candidate)), None)
        if same is None:
            with compressed_in_place(model, candidate.to_config(init=settings.init), statistics):
                same = held_out_nll(model, held_out, batch_size)
        measured.append((candidate, same))
        scores[label] = same
    best = min((label for label, nll in scores.items() if nll is not None), key=lambda label: scores[label])
    kept = candidates[best]
    kept.held_out_nll = scores
    kept.measured_nll = scores[best]
    tokens = held_out.shape[0] * (held_out.shape[1] - 1)
    kept.decided_by = (f"held-out NLL on {held_out.shape[0]} calibration sequences ({tokens:,} tokens scored): kept "
                       + ("every family" if best == full else f"{best} alone"))
    return kept


__all__ = ["choose_by_held_out", "compressed_in_place", "held_out_nll"]
