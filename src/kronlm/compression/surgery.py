"""Model surgery: swap the dense modules a config selects for Kronecker modules initialised from
the pretrained weights (docs/method.md, "The Kronecker-factored linear map"; docs/method.md, "Initialisation from the pretrained weights").

This module changes modules only. Making the result a Hugging Face model that saves and loads as
a compressed model (its config class, the plan in ``config.json``) is
:func:`kronlm.modeling.compress`, which calls :func:`compress_modules`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from kronlm.compression.calibration import ModuleCalibration, collect_calibration
from kronlm.compression.config import CompressionConfig, KroneckerTarget
from kronlm.compression.report import CompressionReport, ModuleReport, count_parameters
from kronlm.decompose.activation_aware import corrected_target
from kronlm.decompose.initializers import get_initializer
from kronlm.decompose.lowrank import KroneckerLowRankFactors, kronecker_lowrank_factors, output_error
from kronlm.decompose.shapes import choose_factor_shapes, resolve_factor_shapes
from kronlm.decompose.vanloan import KroneckerFactors
from kronlm.layers import (
    KroneckerEmbedding,
    KroneckerLinear,
    KroneckerLowRankLinear,
    KroneckerTiedLMHead,
    dense_weight,
    is_factorable,
)


@dataclass(frozen=True)
class FactorChoice:
    """Which Kronecker module one dense module becomes.

    Attributes:
        name: dotted module name.
        kind: "linear" (``nn.Linear`` / ``Conv1D``) or "embedding".
        weight_shape: (out, in), or (vocab, dim) for an embedding.
        a_shape, b_shape: factor shapes (rows, cols).
        target: the config rule that selected the module (rank, init, learnable scalars).
    """

    name: str
    kind: str
    weight_shape: tuple[int, int]
    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    target: KroneckerTarget

    @property
    def rank(self) -> int:
        """Number of Kronecker terms R."""
        return self.target.rank

    @property
    def init(self) -> str:
        """The initialiser's registered name."""
        return self.target.init

    @property
    def lowrank_rank(self) -> int:
        """Rank k of the low-rank part (``KroneckerLowRankLinear``), 0 for none."""
        return self.target.lowrank_rank


def fit_key(a_shape, b_shape, rank: int, lowrank_rank: int, init: str, svd_solver: str) -> tuple:
    """Key of a fitted option in ``ModuleCalibration.fitted``."""
    return (tuple(a_shape), tuple(b_shape), int(rank), int(lowrank_rank), init, svd_solver)


def fit_factors(
    weight: torch.Tensor,
    a_shape: tuple[int, int],
    b_shape: tuple[int, int],
    rank: int,
    *,
    lowrank_rank: int = 0,
    init: str = "activation_aware",
    svd_solver: str = "auto",
    calibration: ModuleCalibration | None = None,
    name: str = "weight",
) -> KroneckerFactors | KroneckerLowRankFactors:
    """The factors of one module: a registered initialiser, or the joint Kronecker + low-rank fit.

    Factors already fitted on the same statistics for the same option (``calibration.fitted``,
    filled by the budget allocation's error check) are returned as they are; new fits are stored
    there. With a ``cross_moment`` (sequential calibration) the activation-aware fits target
    ``corrected_target``; ``relative_error`` is always against ``weight``. The fit runs on the CPU,
    where calibration statistics are kept, whatever device ``weight`` is on (a model on a GPU runs
    its calibration passes there); the factors come back on the CPU, and ``load_factors`` copies
    them to the layer's device.

    Args:
        weight: (out, in) dense weight (``nn.Linear`` orientation), on any device.
        a_shape, b_shape: (m1, n1), (m2, n2).
        rank: Kronecker terms R.
        lowrank_rank: rank k of the low-rank part; 0 for a plain Kronecker sum.
        init: registered initialiser ("activation_aware" / "van_loan" with ``lowrank_rank``).
        svd_solver: SVD method of the initialiser.
        calibration: the module's statistics, for initialisers that need them.
        name: module name for error messages.

    Raises:
        ValueError: see the initialiser and ``kronecker_lowrank_factors``; an activation-aware
            fit without statistics.
    """
    weight = weight.detach().cpu()
    key = fit_key(a_shape, b_shape, rank, lowrank_rank, init, svd_solver)
    cache = getattr(calibration, "fitted", None)
    if cache is not None and key in cache:
        return cache[key]
    if not lowrank_rank:
        factors = get_initializer(init)(weight, a_shape, b_shape, rank, svd_solver=svd_solver, calibration=calibration, name=name)
    else:
        covariance = cross = None
        if get_initializer(init).needs_calibration:
            if calibration is None:
                raise ValueError(f"{name}: initialiser {init!r} needs calibration data; pass calibration= to compress")
            covariance = calibration.inputs.covariance()
            if covariance is None:
                raise ValueError(f"{name}: a Kronecker + low-rank fit needs the full input second moment (raise max_full_dim)")
            cross = getattr(calibration, "cross_moment", None)
        target = weight if cross is None else corrected_target(weight, covariance, cross).to(weight.dtype)
        factors = kronecker_lowrank_factors(target, a_shape, b_shape, rank, lowrank_rank, covariance=covariance, name=name)
        W = weight.detach().double()
        norm = W.norm().item()
        factors.relative_error = (W - factors.to_dense().double()).norm().item() / norm if norm > 0 else 0.0
    if cache is not None:
        cache[key] = factors
    return factors


def balance_factors(model: nn.Module) -> int:
    """Store the Kronecker terms of every factored linear layer of ``model`` with each term's
    scale split evenly between its two factors (``kronlm.decompose.balance_terms``), in place; no
    weight changes. ``compress`` already stores factors so; this brings a student saved by an
    earlier kronlm (whose activation-aware and pruning inits left one factor far larger) to the
    same starting point for distillation. Truncated-SVD terms, low-rank parts and embeddings keep
    their split (``balances_terms``). Returns the number of layers rebalanced."""
    layers = [m for m in model.modules() if isinstance(m, (KroneckerLinear, KroneckerLowRankLinear)) and m.balances_terms]
    for layer in layers:
        layer.balance_()
    return len(layers)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def module_name(model: nn.Module, module: nn.Module) -> str | None:
    """The dotted name of ``module`` inside ``model``, or None."""
    for name, mod in model.named_modules():
        if mod is module:
            return name
    return None


def plan_compression(model: nn.Module, config: CompressionConfig) -> list[FactorChoice]:
    """Decide the factors of every module ``config`` selects, without touching weights.

    Returns:
        One :class:`FactorChoice` per selected module, in model order.

    Raises:
        ValueError: a pattern that matches no module, a matched module that is not Linear,
            Conv1D or Embedding (or already a Kronecker module), shapes that do not divide the
            weight, or R above the rank of the rearranged matrix; messages name the module and the
            numbers.
    """
    choices: list[FactorChoice] = []
    used = [False] * len(config.targets)
    for name, module in model.named_modules():
        if not name:
            continue
        target = config.target_for(name)
        if target is None:
            continue
        used[config.targets.index(target)] = True
        if isinstance(module, (KroneckerLinear, KroneckerLowRankLinear, KroneckerEmbedding, KroneckerTiedLMHead)):
            raise ValueError(f"{name}: already a Kronecker module; compress the dense model instead")
        if not is_factorable(module):
            raise ValueError(f"{name}: pattern {target.modules} matched a {type(module).__name__}, which kronlm cannot factor (Linear, Conv1D, Embedding only)")
        rows, cols = dense_weight(module).shape
        if target.a_shape is None and target.b_shape is None:
            shape = choose_factor_shapes(rows, cols, target.compression_ratio, target.rank, name=name)
            a_shape, b_shape = shape.a_shape, shape.b_shape
        else:
            a_shape, b_shape = resolve_factor_shapes((rows, cols), target.a_shape, target.b_shape, name=name)
        max_rank = min(a_shape[0] * a_shape[1], b_shape[0] * b_shape[1])
        if target.rank > max_rank:
            raise ValueError(
                f"{name}: rank R={target.rank} exceeds the rank of the rearranged ({a_shape[0] * a_shape[1]}, "
                f"{b_shape[0] * b_shape[1]}) matrix, {max_rank}"
            )
        kind = "embedding" if isinstance(module, nn.Embedding) else "linear"
        if target.lowrank_rank:
            if kind != "linear":
                raise ValueError(f"{name}: a low-rank part (lowrank_rank={target.lowrank_rank}) is for linear layers, not a {type(module).__name__}")
            if target.lowrank_rank > min(rows, cols):
                raise ValueError(f"{name}: low rank k={target.lowrank_rank} exceeds min(out, in) = {min(rows, cols)} of the ({rows}, {cols}) weight")
        choices.append(FactorChoice(name, kind, (rows, cols), tuple(a_shape), tuple(b_shape), target))
    unused = [t.modules for t, hit in zip(config.targets, used) if not hit]
    if unused:
        raise ValueError(f"compression target {unused[0]} matches no module of {type(model).__name__}")
    return choices


def empty_kronecker_module(dense: nn.Module, choice: FactorChoice) -> nn.Module:
    """An uninitialised Kronecker module replacing ``dense``, on its device and dtype."""
    weight = dense_weight(dense)
    kw = {"device": weight.device, "dtype": weight.dtype}
    rows, cols = choice.weight_shape
    if choice.kind == "embedding":
        return KroneckerEmbedding(rows, cols, choice.a_shape, choice.b_shape, choice.rank, padding_idx=dense.padding_idx, **kw)
    if choice.lowrank_rank:
        return KroneckerLowRankLinear(cols, rows, choice.a_shape, choice.b_shape, choice.rank, choice.lowrank_rank, bias=dense.bias is not None, **kw)
    return KroneckerLinear(
        cols, rows, choice.a_shape, choice.b_shape, choice.rank,
        bias=dense.bias is not None, learnable_scales=choice.target.learnable_scales, **kw,
    )


def calibration_for(
    model: nn.Module, choices: list[FactorChoice], input_ids: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> dict[str, ModuleCalibration]:
    """Run the dense model on calibration token ids and collect the input statistics of every
    chosen module whose initialiser needs them (``collect_calibration``).

    Args:
        input_ids: (num_sequences, seq_len) calibration tokens.

    Raises:
        ValueError: an initialiser that needs statistics on an embedding (only linear layers have
            input statistics).
    """
    wanted = [c for c in choices if get_initializer(c.init).needs_calibration]
    if not wanted:
        return {}
    for c in wanted:
        if c.kind != "linear":
            raise ValueError(f"{c.name}: initialiser {c.init!r} needs input statistics, which only linear layers have")
    factors = {c.name: (c.a_shape[1], c.b_shape[1]) for c in wanted}
    return collect_calibration(model, [c.name for c in wanted], input_ids, batch_size=batch_size, input_factors=factors, progress=progress)


def check_calibration_ids(calibration: Any, what: str = "calibration", model: nn.Module | None = None) -> torch.Tensor:
    """``calibration`` itself when it is token ids: a 2-D integer tensor (num_sequences, seq_len),
    every id a row of ``model``'s input embedding when a model is given.

    Raises:
        ValueError: anything else (named with its type or shape; statistics already collected
            go through ``statistics=`` instead), or ids outside the model's vocabulary (the
            largest id and the embedding's row count named: text tokenized for another model).
    """
    if not isinstance(calibration, torch.Tensor):
        hint = "; pass statistics already collected as statistics=" if isinstance(calibration, Mapping) else ""
        raise ValueError(f"{what} must be token ids, an int64 tensor (num_sequences, seq_len), got {type(calibration).__name__}{hint}")
    if calibration.dim() != 2 or calibration.dtype.is_floating_point or calibration.dtype.is_complex or calibration.dtype == torch.bool:
        raise ValueError(f"{what} must be token ids, an int64 tensor (num_sequences, seq_len), got {calibration.dtype} of shape "
                         f"{tuple(calibration.shape)}")
    embedding = model.get_input_embeddings() if model is not None and hasattr(model, "get_input_embeddings") else None
    rows = getattr(embedding, "num_embeddings", None)
    if rows is not None and calibration.numel() and (int(calibration.max()) >= rows or int(calibration.min()) < 0):
        raise ValueError(f"{what} token ids run from {int(calibration.min())} to {int(calibration.max())}, but "
                         f"{type(model).__name__}'s input embedding has {rows:,} rows: tokenize the text with the model's own "
                         "tokenizer")
    return calibration


def fit_module(choice: FactorChoice, old: nn.Module, new: nn.Module, stats: ModuleCalibration | None, svd_solver: str) -> float:
    """Fit the factors of one chosen module from its dense weight, load them and the bias into
    ``new``, and return the relative Frobenius error (NaN on the meta device: nothing fitted).

    Raises:
        ValueError: an initialiser that needs statistics without them, a non-finite dense weight
            or non-finite factors (module and numbers named).
    """
    weight = dense_weight(old)
    if weight.is_meta:
        return float("nan")
    init = get_initializer(choice.init)
    if init.needs_calibration and stats is None:
        raise ValueError(f"{choice.name}: initialiser {choice.init!r} needs calibration data; pass calibration= to compress")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{choice.name}: the dense weight {tuple(weight.shape)} holds NaN or inf values; refusing to factor it")
    factors = fit_factors(weight, choice.a_shape, choice.b_shape, choice.rank, lowrank_rank=choice.lowrank_rank, init=choice.init,
                          svd_solver=svd_solver, calibration=stats, name=choice.name)
    tensors = [("A", factors.A), ("B", factors.B)]
    tensors += [("U", factors.U), ("V", factors.V)] if choice.lowrank_rank else [("scales", factors.scales)]
    for label, tensor in tensors:
        if not torch.isfinite(tensor).all():
            raise ValueError(
                f"{choice.name}: initialiser {choice.init!r} produced non-finite factor {label} "
                f"(the weight's largest magnitude is {weight.abs().max().item():.3g}); refusing to save it"
            )
    new.load_factors(factors)
    if getattr(old, "bias", None) is not None:
        new.bias.copy_(old.bias)
    return factors.relative_error


def relative_output_error(weight: torch.Tensor, new: nn.Module, stats: ModuleCalibration | None) -> float | None:
    """tr(ΔW C ΔWᵀ) / tr(W C Wᵀ) for the dense (out, in) ``weight``, the fitted module ``new`` and
    the (in, in) input second moment C of ``stats``: the share of the output's energy on the
    calibration inputs that the fit loses. None without statistics (or with partial traces only),
    on the meta device, or for an embedding. Computed on the CPU, beside C."""
    covariance = stats.inputs.covariance() if stats is not None else None
    if covariance is None or weight.is_meta or isinstance(new, KroneckerEmbedding):
        return None
    weight = weight.detach().cpu().double()
    dense = output_error(weight, covariance)
    return output_error(weight - new.to_dense().detach().cpu().double(), covariance) / dense if dense > 0 else None


def check_tied_head_not_targeted(model: nn.Module, choices: list[FactorChoice]) -> tuple[nn.Module | None, str | None]:
    """(the LM head, its name) of ``model``; refuses a plan that targets a head tied to the input
    embedding (factor the embedding instead).

    Raises:
        ValueError: the targeted head is tied to the input embedding (named).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = module_name(model, head) if head is not None else None
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if any(c.name == head_name for c in choices) and isinstance(inputs, nn.Embedding) and head.weight is inputs.weight:
        raise ValueError(f"{head_name}: the LM head is tied to the input embedding; factor the embedding instead")
    return head, head_name


@torch.no_grad()
def compress_modules(
    model: nn.Module,
    config: CompressionConfig,
    *,
    calibration: torch.Tensor | None = None,
    statistics: Mapping[str, ModuleCalibration] | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> CompressionReport:
    """Replace the modules ``config`` selects with Kronecker modules, in place.

    Stages: plan (:func:`plan_compression`), calibrate (:func:`calibration_for`, when token ids
    are given and an initialiser needs statistics), then per module fit (:func:`fit_module`) and
    swap: an ``nn.Linear`` / ``Conv1D`` becomes a ``KroneckerLinear`` (``KroneckerLowRankLinear``
    when ``lowrank_rank`` > 0), an ``nn.Embedding`` a ``KroneckerEmbedding``; biases are copied. A
    head tied to a factored embedding follows ``config.lm_head`` ("tied": it reuses the factors;
    "dense": it keeps the pretrained matrix, untied). On the meta device no factors are computed:
    parameter counts from a configuration alone.

    Args:
        model: a Hugging Face ``PreTrainedModel`` (GPT-2, BERT, Llama-family, ...) or any module.
        config: the ``CompressionConfig`` (or a preset's).
        calibration: calibration token ids, an int64 tensor (num_sequences, seq_len), for
            initialisers that need activation statistics (``activation_aware``): the dense model
            is run on them first.
        statistics: instead, statistics already collected on such ids: {module name:
            ``ModuleCalibration``}, read in model order after every earlier module was replaced
            (a ``kronlm.compression.sequential.SequentialCalibration`` collects each block's
            statistics from the partially compressed model that way).
        batch_size: sequences per forward pass while calibrating.
        progress: show a tqdm bar over modules.

    Returns:
        A ``CompressionReport`` (per module: shape, factors, R, params before/after, relative
        reconstruction error; totals with and without the LM head).

    Raises:
        ValueError: see :func:`plan_compression` and :func:`fit_module`; also calibration that is
            not token ids, both ``calibration`` and ``statistics``, or a targeted LM head that is
            tied to the input embedding.
    """
    start = time.perf_counter()
    if calibration is not None and statistics is not None:
        raise ValueError("give calibration token ids or statistics collected on them, not both")
    choices = plan_compression(model, config)
    report = CompressionReport(config=config.to_dict())
    report.params_before = count_parameters(model)
    report.params_before_no_head = count_parameters(model, exclude_lm_head=True)
    head, head_name = check_tied_head_not_targeted(model, choices)
    if calibration is not None:
        statistics = calibration_for(model, choices, check_calibration_ids(calibration, model=model), batch_size, progress)

    for choice in tqdm(choices, desc="compress", unit="module", disable=not progress):
        t0 = time.perf_counter()
        old = model.get_submodule(choice.name)
        weight = dense_weight(old)
        new = empty_kronecker_module(old, choice)
        stats = statistics.get(choice.name) if statistics is not None else None
        error = fit_module(choice, old, new, stats, config.svd_solver)
        tied = head is not None and choice.kind == "embedding" and getattr(head, "weight", None) is old.weight
        set_module(model, choice.name, new)
        if tied:
            _replace_tied_head(model, head, head_name, new, config.lm_head, weight)
            report.lm_head = config.lm_head
        report.modules.append(
            ModuleReport(
                name=choice.name, kind=choice.kind, weight_shape=choice.weight_shape,
                a_shape=choice.a_shape, b_shape=choice.b_shape, rank=choice.rank,
                init=choice.init, params_before=sum(p.numel() for p in old.parameters()),
                params_after=sum(p.numel() for p in new.parameters()),
                relative_error=error, seconds=time.perf_counter() - t0, lowrank=choice.lowrank_rank,
                output_error=relative_output_error(weight, new, stats),
            )
        )

    report.params_after = count_parameters(model)
    report.params_after_no_head = count_parameters(model, exclude_lm_head=True)
    report.seconds = time.perf_counter() - start
    return report


def _replace_tied_head(model: nn.Module, head: nn.Module, head_name: str, embedding: KroneckerEmbedding, mode: str, weight: torch.Tensor) -> None:
    if mode == "tied":
        set_module(model, head_name, KroneckerTiedLMHead(embedding, bias=getattr(head, "bias", None)))
    else:
        dense = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device=weight.device, dtype=weight.dtype)
        if not weight.is_meta:
            dense.weight.copy_(weight)
            if head.bias is not None:
                dense.bias.copy_(head.bias)
        set_module(model, head_name, dense)
    # transformers re-ties the head to the embedding on load while this flag is set.
    config = getattr(model, "config", None)
    if config is not None:
        for cfg in {id(c): c for c in (config, config.get_text_config())}.values():
            cfg.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = {}


__all__ = [
    "FactorChoice",
    "calibration_for",
    "check_calibration_ids",
    "check_tied_head_not_targeted",
    "compress_modules",
    "empty_kronecker_module",
    "fit_factors",
    "fit_key",
    "fit_module",
    "module_name",
    "plan_compression",
    "set_module",
]
