"""``kronlm.compress``: compress a model and make it a Hugging Face model that saves and loads
compressed (peft's ``get_peft_model`` for Kronecker factors).

:func:`compress` takes a model and a config and returns the model, compressed in place. The config
says what to do: a :class:`~kronlm.compression.CompressionConfig` (a preset is
``kronlm.get_preset(name)``, a per-module plan is one target per module) runs the module surgery
(:func:`kronlm.compression.compress_modules`); a :class:`~kronlm.compression.BudgetConfig` first
chooses the factors per module under a parameter budget (:func:`compress_to_budget`, the one code
path of ``kronlm compress --budget``, benchmarks included). Either way the plan is recorded in
``config.kronlm`` (:class:`~kronlm.modeling.plan.KroneckerPlan`), the model and config switch to
kronlm's registered Kronecker classes, and the report is ``model.compression_report``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from transformers import PreTrainedModel

from kronlm.compression.budget import (
    BudgetAllocation,
    BudgetConfig,
    Pricing,
    allocate_budget,
    budget_candidates,
    budget_statistics,
    price_modules,
)
from kronlm.compression.budget.subset_check import choose_by_held_out, held_out_nll
from kronlm.compression.budget.tie_break import break_ties
from kronlm.compression.calibration import ModuleCalibration
from kronlm.compression.config import CompressionConfig
from kronlm.compression.report import count_parameters
from kronlm.compression.sequential import SequentialCalibration
from kronlm.compression.surgery import check_calibration_ids, compress_modules, set_module
from kronlm.modeling.gguf_checkpoint import forget_gguf_quantizer
from kronlm.modeling.metadata import attach_report, compression_report
from kronlm.modeling.plan import KroneckerPlan
from kronlm.modeling.registry import adopt_kronecker_classes


def compress(
    model: nn.Module,
    config: CompressionConfig | BudgetConfig,
    *,
    calibration: torch.Tensor | None = None,
    statistics: Mapping[str, ModuleCalibration] | None = None,
    held_out: torch.Tensor | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> nn.Module:
    """Replace the modules ``config`` selects with Kronecker modules, in place; return the model.

    Each selected ``nn.Linear`` / ``Conv1D`` becomes a ``KroneckerLinear`` (or
    ``KroneckerLowRankLinear``) and each ``nn.Embedding`` a ``KroneckerEmbedding``, initialised
    from the pretrained weight by the target's initialiser (docs/method.md, "Initialisation from
    the pretrained weights"). A Hugging Face model then carries the plan in ``config.kronlm`` and
    kronlm's Kronecker classes (``model_type`` ``kronecker_<type>``), so ``model.save_pretrained``
    / ``kronlm.save`` write a folder that ``from_pretrained`` loads back compressed. The
    :class:`~kronlm.compression.CompressionReport` (per module: shape, factors, R, parameters
    before/after, relative error) is ``model.compression_report``; after a budget its
    ``allocation`` is the :class:`~kronlm.compression.BudgetAllocation`.

    Args:
        model: a ``PreTrainedModel`` (GPT-2, BERT, Llama-family, ...) or any module.
        config: a ``CompressionConfig`` (``kronlm.get_preset(name)`` for the papers' presets) or a
            ``BudgetConfig`` (a parameter budget; needs ``calibration``).
        calibration: calibration token ids, an int64 tensor (num_sequences, seq_len), e.g. from
            ``kronlm.compression.calibration_input_ids``. The dense model is run on them for
            initialisers that need activation statistics (``activation_aware``) and to price a
            budget.
        statistics: instead of ``calibration``, statistics already collected on such ids
            ({module name: ``ModuleCalibration``}, ``collect_calibration`` /
            ``budget_statistics``), e.g. to compress several copies from one calibration.
        held_out: for a ``BudgetConfig`` over several families, token ids of the subset check
            that ``calibration`` does not hold (default: the last ``held_out_sequences`` rows of
            ``calibration``; :func:`compress_to_budget`).
        batch_size: sequences per forward pass while calibrating.
        progress: show tqdm bars.

    Returns:
        ``model`` itself, compressed.

    Raises:
        ValueError: patterns that match nothing or a module kronlm cannot factor, factor shapes
            that do not divide a weight, calibration that is not token ids or is missing,
            non-finite weights or factors, a budget that cannot be met (each message names the
            module and the numbers).
    """
    if isinstance(config, BudgetConfig):
        compress_to_budget(model, config, calibration, held_out=held_out, statistics=statistics, batch_size=batch_size,
                           progress=progress)
        return model
    if not isinstance(config, CompressionConfig):
        raise ValueError(f"config must be a CompressionConfig or a BudgetConfig, got {type(config).__name__}")
    previous = compression_report(model)
    report = compress_modules(model, config, calibration=calibration, statistics=statistics, batch_size=batch_size, progress=progress)
    if previous is not None:  # compressed twice: keep the first call's modules in the report
        report.modules = previous.modules + report.modules
        report.params_before = previous.params_before
        report.params_before_no_head = previous.params_before_no_head
        report.lm_head = report.lm_head or previous.lm_head
    if isinstance(model, PreTrainedModel):
        forget_gguf_quantizer(model)
        model.config.kronlm = KroneckerPlan.from_model(model, report).to_dict()
        adopt_kronecker_classes(model)
    attach_report(model, report)
    return model


def compress_to_budget(
    model: nn.Module,
    config: BudgetConfig,
    calibration: torch.Tensor | None,
    *,
    held_out: torch.Tensor | None = None,
    statistics: dict[str, ModuleCalibration] | None = None,
    pricing: Pricing | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> BudgetAllocation:
    """Compress ``model`` in place to the budget of ``config``; return the allocation.

    The one budget path (``kronlm.compress(model, BudgetConfig(...))`` and ``kronlm compress
    --budget`` call it): calibrate the candidate modules (``budget_statistics``), price and
    allocate (``allocate_budget``, docs/compression.md); with more than one family (and
    ``config.subset_check``) keep the allocation with the lowest held-out NLL among it and each
    family's own (:func:`~kronlm.compression.budget.subset_check.choose_by_held_out`), then, with
    ``config.tie_break_modules``, try its closest per-module swaps to another family
    (:func:`~kronlm.compression.budget.tie_break.break_ties`); then
    :func:`compress` with the allocation's config on the dense statistics or, with
    ``config.sequential`` (the default, "weight"), on a
    :class:`~kronlm.compression.SequentialCalibration` over the same ids. When the subset check
    ran, the sequential fit is measured on its held-out ids and replaced by the dense-statistics
    fit if its NLL is higher (``allocation.decided_by`` says which was kept). The allocation is
    attached to ``model.compression_report`` (and so saved in ``kronlm_compression.json``).

    Args:
        model: dense causal LM (changed in place).
        config: the target (``target_fraction`` or ``target_params``), candidate ``modules`` and
            settings.
        calibration: (num_sequences, seq_len) int64 token ids; may be None only when
            ``statistics`` is given and ``config.sequential`` is None (not the default). When the subset check runs
            and ``held_out`` is None, its last ``config.held_out_sequences`` rows are held out of
            the pricing for the check.
        held_out: (num_sequences, seq_len) int64 ids for the subset check instead, none of them
            in ``calibration`` (required with ``statistics`` when the check runs).
        statistics, pricing: ``budget_statistics`` / ``price_modules`` results already computed
            on the same ids, candidates and settings (a benchmark allocating several budgets from
            one calibration passes them; give each call its own copy of ``pricing``, which the
            check updates).
        batch_size: sequences per forward pass while calibrating.
        progress: tqdm bars.

    Returns:
        The :class:`~kronlm.compression.BudgetAllocation`.

    Raises:
        ValueError: no target in ``config``, calibration that is not token ids or is missing, too
            few calibration sequences to hold some out (both counts named), ``statistics``
            without ``held_out`` when the subset check runs, a model without next-token logits
            (an encoder with a task head) while the sensitivity pass or the subset check is on;
            see ``allocate_budget`` and :func:`compress`.
    """
    target = config.target_for(count_parameters(model))
    needs_logits = [what for what, on in (
        (f"sensitivity pass (sensitivity_sequences={config.sensitivity_sequences})", statistics is None and config.sensitivity_sequences > 0),
        ("subset check (subset_check=True)", config.checks_subsets)) if on]
    probe = calibration if calibration is not None else held_out
    if needs_logits and probe is not None:
        check_calibration_ids(probe, model=model)
        _check_next_token_logits(model, probe, needs_logits)
    if statistics is None or config.sequential:
        if calibration is None and statistics is not None:
            raise ValueError(f"sequential calibration (sequential={config.sequential!r}, the default) runs the partially compressed "
                             "model on calibration token ids (num_sequences, seq_len): give them, or sequential=None to fit on "
                             "the given statistics alone")
        if calibration is None:
            raise ValueError("a budget needs calibration token ids (num_sequences, seq_len) to measure sensitivities on")
        check_calibration_ids(calibration, model=model)
    if config.checks_subsets and held_out is None:
        if statistics is not None:
            raise ValueError("the subset check needs held_out ids that the given statistics were not computed on "
                             "(or subset_check=False)")
        calibration, held_out = split_held_out(calibration, config.held_out_sequences)
    if statistics is None:
        names = budget_candidates(model, config.modules)
        statistics = budget_statistics(model, calibration, names, sensitivity_sequences=config.sensitivity_sequences,
                                       batch_size=batch_size, progress=progress)
    if pricing is None:
        pricing = price_modules(model, statistics, settings=config, progress=progress)
    allocation = allocate_budget(model, statistics, target, settings=config, pricing=pricing, progress=progress)
    if config.checks_subsets:
        check_calibration_ids(held_out, model=model)
        allocation = choose_by_held_out(model, statistics, target, allocation, pricing, held_out, settings=config,
                                        batch_size=batch_size, progress=progress)
        if config.tie_break_modules:
            allocation = break_ties(model, statistics, allocation, pricing, held_out, settings=config, batch_size=batch_size,
                                   progress=progress)
    plan = allocation.to_config(init=config.init)
    if not config.sequential:
        compress(model, plan, statistics=statistics, progress=progress)
    else:
        names = [c.name for c in allocation.choices if c.option.family != "dense"]
        # The check measured the allocations fitted on the dense statistics; keep the dense modules
        # aside (not a copy of the model) so the sequential fit can be given up if it measures worse.
        dense = {name: model.get_submodule(name) for name in names} if config.checks_subsets else None
        fitted = SequentialCalibration(model, names, calibration, batch_size=batch_size, target=config.sequential, progress=progress)
        compress(model, plan, statistics=fitted, progress=progress)
        del fitted
        if dense is not None:
            _keep_the_better_fit(model, dense, plan, statistics, allocation, held_out, config.sequential, batch_size)
    compression_report(model).allocation = allocation
    return allocation


def _check_next_token_logits(model: nn.Module, ids: torch.Tensor, needs: list[str]) -> None:
    """Fail before any calibration pass when ``model`` returns no (batch, seq_len, vocab)
    ``logits`` on the first two tokens of ``ids`` (eval mode, no random numbers drawn): the budget
    settings in ``needs`` score the next-token loss of a causal LM.

    Raises:
        ValueError: naming the model class and the settings that need a causal LM.
    """
    held_out_nll(model, ids[:1, :2], needed_by=" and ".join(needs))


def _keep_the_better_fit(model: nn.Module, dense: dict[str, nn.Module], plan: CompressionConfig,
                         statistics: Mapping[str, ModuleCalibration], allocation: BudgetAllocation, held_out: torch.Tensor,
                         target: str, batch_size: int) -> None:
    """After a sequential fit of the allocation the subset check kept: measure it on the check's
    held-out ids and, if its NLL is above the dense-statistics fit the check measured, put the
    dense modules (``dense``, {name: module}) back and fit them on the dense statistics instead
    (same plan, so the same parameters). Says which in ``allocation.decided_by``."""
    measured = allocation.measured_nll
    sequential = held_out_nll(model, held_out, batch_size)
    kept = "the sequential fit"
    if sequential > measured:
        for name, module in dense.items():
            set_module(model, name, module)
        report = compress_modules(model, plan, statistics=statistics, progress=False)
        compression_report(model).modules = report.modules
        kept = "the dense-statistics fit"
    allocation.decided_by += (f"; sequential calibration ({target}): held-out NLL {sequential:.4f} against {measured:.4f} "
                              f"on the dense model's statistics, kept {kept}")


def split_held_out(calibration: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the sequences to price on, the last ``count`` held out for the subset check).

    Raises:
        ValueError: ``calibration`` has ``count`` sequences or fewer (both numbers named).
    """
    rows = calibration.shape[0]
    if rows <= count:
        raise ValueError(f"the budget's subset check holds out the last {count} calibration sequences, which leaves none of the "
                         f"{rows} given to price on: give more than {count} sequences, fewer held_out_sequences, or "
                         "subset_check=False (a single family needs no check)")
    return calibration[:-count], calibration[-count:]


def budget_allocation(model: nn.Module) -> BudgetAllocation | None:
    """The budget allocation behind a model compressed to a ``BudgetConfig``, or None."""
    report = compression_report(model)
    allocation = getattr(report, "allocation", None)
    return allocation if isinstance(allocation, BudgetAllocation) else None


__all__ = ["budget_allocation", "compress", "compress_to_budget", "split_held_out"]
