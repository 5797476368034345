"""``kronlm.compress``: compress a model and make it a Hugging Face model that saves and loads
compressed (peft's ``get_peft_model`` for Kronecker factors).

:func:`compress` runs the module surgery (:func:`kronlm.compression.compress_modules`), records the
plan in ``config.kronlm`` (:class:`~kronlm.modeling.plan.KroneckerPlan`), switches the model and
config to kronlm's registered Kronecker classes and attaches the report as
``model.compression_report``. :func:`compress_to_budget` does the same after choosing the
factors per module under a parameter budget.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from kronlm.compression.budget import DEFAULT_B_SHAPES, BudgetAllocation, plan_budget
from kronlm.compression.calibration import ModuleCalibration
from kronlm.compression.config import CompressionConfig
from kronlm.compression.surgery import compress_modules
from kronlm.modeling.gguf_checkpoint import forget_gguf_quantizer
from kronlm.modeling.metadata import attach_report, compression_report
from kronlm.modeling.plan import KroneckerPlan
from kronlm.modeling.registry import adopt_kronecker_classes


def compress(
    model: nn.Module,
    config: CompressionConfig,
    *,
    calibration: torch.Tensor | dict[str, ModuleCalibration] | None = None,
    calibration_batch_size: int = 4,
    progress: bool = True,
) -> nn.Module:
    """Replace the modules ``config`` selects with Kronecker modules, in place; return the model.

    Each selected ``nn.Linear`` / ``Conv1D`` becomes a ``KroneckerLinear`` and each
    ``nn.Embedding`` a ``KroneckerEmbedding``, initialised from the pretrained weight by the
    target's initialiser (SPEC §2, §3). A Hugging Face model then carries the plan in
    ``config.kronlm`` and kronlm's Kronecker classes (``model_type`` ``kronecker_<type>``), so
    ``model.save_pretrained`` / ``kronlm.save`` write a folder that ``from_pretrained`` loads back
    compressed. The :class:`~kronlm.compression.CompressionReport` (per module: shape, factors, R,
    parameters before/after, relative error) is ``model.compression_report``.

    Args:
        model: a ``PreTrainedModel`` (GPT-2, BERT, Llama-family, ...) or any module.
        config: a ``CompressionConfig`` (``kronlm.get_preset(name)`` for the papers' presets).
        calibration: calibration token ids (num_sequences, seq_len) or statistics already
            collected, for initialisers that need activation statistics (``activation_aware``).
        calibration_batch_size: sequences per forward pass while calibrating.
        progress: show tqdm bars.

    Returns:
        ``model`` itself, compressed.

    Raises:
        ValueError: patterns that match nothing or a module kronlm cannot factor, factor shapes
            that do not divide a weight, a missing calibration, non-finite weights or factors
            (each message names the module and the numbers).
    """
    previous = compression_report(model)
    report = compress_modules(model, config, calibration=calibration, calibration_batch_size=calibration_batch_size, progress=progress)
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
    target_params: int,
    calibration: torch.Tensor,
    *,
    modules: list[str] | None = None,
    sensitivity_sequences: int = 16,
    batch_size: int = 4,
    b_shapes: tuple[tuple[int, int], ...] = DEFAULT_B_SHAPES,
    init: str = "activation_aware",
    progress: bool = True,
) -> nn.Module:
    """Choose factors per module under a parameter budget, then :func:`compress` with them.

    See :func:`kronlm.compression.budget.plan_budget` for the arguments and the method (estimated
    NLL increase of every candidate from calibration statistics, Lagrangian allocation). The
    :class:`~kronlm.compression.budget.BudgetAllocation` is ``model.compression_report.allocation``.

    Args:
        model: dense causal LM.
        target_params: parameters allowed for the whole model.
        calibration: (num_sequences, seq_len) token ids.

    Returns:
        ``model`` itself, compressed.

    Raises:
        ValueError: see ``plan_budget`` and :func:`compress`.
    """
    config, stats, allocation = plan_budget(
        model, target_params, calibration, modules=modules, sensitivity_sequences=sensitivity_sequences,
        batch_size=batch_size, b_shapes=b_shapes, init=init, progress=progress,
    )
    compress(model, config, calibration=stats, progress=progress)
    compression_report(model).allocation = allocation
    return model


def budget_allocation(model: nn.Module) -> BudgetAllocation | None:
    """The budget allocation behind a model compressed by :func:`compress_to_budget`, or None."""
    report = compression_report(model)
    allocation = getattr(report, "allocation", None)
    return allocation if isinstance(allocation, BudgetAllocation) else None


__all__ = ["budget_allocation", "compress", "compress_to_budget"]
