"""``compress``: replace the modules a config selects with Kronecker modules initialised from the
pretrained weights (SPEC §2, §3)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from kronlm.compress.config import CompressionConfig
from kronlm.compress.plan import (
    PLAN_VERSION,
    build_empty,
    dense_weight,
    is_conv1d,
    set_module,
)
from kronlm.compress.report import CompressionReport, ModuleReport, count_parameters
from kronlm.decompose.initializers import get_initializer
from kronlm.decompose.shapes import choose_factor_shapes, resolve_factor_shapes
from kronlm.layers import KroneckerEmbedding, KroneckerLinear, KroneckerTiedLMHead


def _is_supported(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding)) or is_conv1d(module)


def plan_compression(model: nn.Module, config: CompressionConfig) -> dict[str, dict[str, Any]]:
    """Decide the factors of every module ``config`` selects, without touching weights.

    Returns:
        {module name: {"kind", "out", "in", "a_shape", "b_shape", "rank", "bias",
        "learnable_scales", "init", "padding_idx"}} in model order.

    Raises:
        ValueError: a pattern that matches no module, a matched module that is not Linear,
            Conv1D or Embedding, shapes that do not divide the weight, or R above the rank of the
            rearranged matrix; messages name the module and the numbers.
    """
    plan: dict[str, dict[str, Any]] = {}
    used = [False] * len(config.targets)
    for name, module in model.named_modules():
        if not name:
            continue
        target = config.target_for(name)
        if target is None:
            continue
        used[config.targets.index(target)] = True
        if isinstance(module, (KroneckerLinear, KroneckerEmbedding, KroneckerTiedLMHead)):
            raise ValueError(f"{name}: already a Kronecker module; compress the dense model instead")
        if not _is_supported(module):
            raise ValueError(f"{name}: pattern {target.modules} matched a {type(module).__name__}, which kronlm cannot factor (Linear, Conv1D, Embedding only)")
        rows, cols = dense_weight(module).shape
        if target.a_shape is None and target.b_shape is None:
            choice = choose_factor_shapes(rows, cols, target.compression_ratio, target.rank, name=name)
            a_shape, b_shape = choice.a_shape, choice.b_shape
        else:
            a_shape, b_shape = resolve_factor_shapes((rows, cols), target.a_shape, target.b_shape, name=name)
        max_rank = min(a_shape[0] * a_shape[1], b_shape[0] * b_shape[1])
        if target.rank > max_rank:
            raise ValueError(
                f"{name}: rank R={target.rank} exceeds the rank of the rearranged ({a_shape[0] * a_shape[1]}, "
                f"{b_shape[0] * b_shape[1]}) matrix, {max_rank}"
            )
        get_initializer(target.init)  # fail on a typo before any work is done
        is_embedding = isinstance(module, nn.Embedding)
        plan[name] = {
            "kind": "embedding" if is_embedding else "linear",
            "out": rows,
            "in": cols,
            "a_shape": list(a_shape),
            "b_shape": list(b_shape),
            "rank": target.rank,
            "bias": (not is_embedding) and module.bias is not None,
            "learnable_scales": target.learnable_scales and not is_embedding,
            "init": target.init,
            "padding_idx": module.padding_idx if is_embedding else None,
        }
    unused = [t.modules for t, hit in zip(config.targets, used) if not hit]
    if unused:
        raise ValueError(f"compression target {unused[0]} matches no module of {type(model).__name__}")
    return plan


def _find_name(model: nn.Module, module: nn.Module) -> str | None:
    for name, mod in model.named_modules():
        if mod is module:
            return name
    return None


@torch.no_grad()
def compress(
    model: nn.Module,
    config: CompressionConfig,
    *,
    calibration: torch.Tensor | dict[str, Any] | None = None,
    calibration_batch_size: int = 4,
    progress: bool = True,
) -> CompressionReport:
    """Replace the modules ``config`` selects with Kronecker modules, in place.

    Each selected ``nn.Linear`` / ``Conv1D`` becomes a ``KroneckerLinear`` and each
    ``nn.Embedding`` a ``KroneckerEmbedding``, initialised from the pretrained weight by the
    target's initialiser; biases are copied. When the factored embedding is tied to the LM head,
    the head follows ``config.lm_head`` ("tied": it reuses the factors; "dense": it keeps the
    pretrained matrix, untied). On a model built on the meta device (architecture only) no
    factors are computed: use it to count parameters from a configuration alone.

    Afterwards the model's class and config are switched to kronlm's registered subclasses
    (``model_type`` ``kronecker_<type>``) and ``config.kronlm`` holds the plan, so
    ``model.save_pretrained`` / ``kronlm.save`` write a folder that
    ``AutoModelForCausalLM.from_pretrained`` loads back compressed.

    Args:
        model: a Hugging Face ``PreTrainedModel`` (GPT-2, BERT, Llama-family, ...) or any module.
        config: the ``CompressionConfig`` (or a preset's).
        calibration: for initialisers that need activation statistics (``activation_aware``):
            either calibration token ids (num_sequences, seq_len) — the dense model is run on them
            first and the statistics of every such module are collected
            (``kronlm.compress.calibration.collect_calibration``) — or statistics already
            collected, {module name: ``ModuleCalibration``}.
        calibration_batch_size: sequences per forward pass while calibrating.
        progress: show a tqdm bar over modules.

    Returns:
        A ``CompressionReport`` (per module: shape, factors, R, params before/after, relative
        reconstruction error; totals with and without the LM head).

    Raises:
        ValueError: see ``plan_compression``; also an initialiser that needs calibration data
            that was not given, or a targeted LM head that is tied to the embedding.
    """
    start = time.perf_counter()
    plan = plan_compression(model, config)
    report = CompressionReport(config=config.to_dict())
    report.params_before = count_parameters(model)
    report.params_before_no_head = count_parameters(model, exclude_lm_head=True)

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = _find_name(model, head) if head is not None else None
    if head_name in plan and head is not None and isinstance(model.get_input_embeddings(), nn.Embedding) and head.weight is model.get_input_embeddings().weight:
        raise ValueError(f"{head_name}: the LM head is tied to the input embedding; factor the embedding instead")
    head_plan = None
    if isinstance(calibration, torch.Tensor):
        calibration = _calibrate(model, plan, calibration, calibration_batch_size, progress)

    for name, entry in tqdm(plan.items(), desc="compress", unit="module", disable=not progress):
        t0 = time.perf_counter()
        old = model.get_submodule(name)
        weight = dense_weight(old)
        new = build_empty(entry, device=weight.device, dtype=weight.dtype)
        error = float("nan")
        if not weight.is_meta:
            init = get_initializer(entry["init"])
            stats = (calibration or {}).get(name)
            if getattr(init, "needs_calibration", False) and stats is None:
                raise ValueError(f"{name}: initialiser {entry['init']!r} needs calibration data; pass calibration= to compress")
            factors = init(weight, tuple(entry["a_shape"]), tuple(entry["b_shape"]), entry["rank"], svd=config.svd, calibration=stats, name=name)
            new.load_factors(factors)
            if entry["bias"]:
                new.bias.copy_(old.bias)
            error = factors.relative_error
        tied = head is not None and entry["kind"] == "embedding" and getattr(head, "weight", None) is old.weight
        set_module(model, name, new)
        if tied:
            head_plan = {"module": head_name, "mode": config.lm_head, "embedding": name, "bias": getattr(head, "bias", None) is not None}
            if config.lm_head == "tied":
                set_module(model, head_name, KroneckerTiedLMHead(new, bias=getattr(head, "bias", None)))
            else:
                dense = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device=weight.device, dtype=weight.dtype)
                if not weight.is_meta:
                    dense.weight.copy_(weight)
                    if head.bias is not None:
                        dense.bias.copy_(head.bias)
                set_module(model, head_name, dense)
            _untie_config(model)
            report.lm_head = config.lm_head
        before = sum(p.numel() for p in old.parameters())
        report.modules.append(
            ModuleReport(
                name=name, kind=entry["kind"], weight_shape=(entry["out"], entry["in"]),
                a_shape=tuple(entry["a_shape"]), b_shape=tuple(entry["b_shape"]), rank=entry["rank"],
                init=entry["init"], params_before=before, params_after=sum(p.numel() for p in new.parameters()),
                relative_error=error, seconds=time.perf_counter() - t0,
            )
        )

    report.params_after = count_parameters(model)
    report.params_after_no_head = count_parameters(model, exclude_lm_head=True)
    if hasattr(model, "config"):
        from kronlm.models.gguf import forget_gguf_quantizer
        from kronlm.models.registry import adopt_kronecker_classes

        forget_gguf_quantizer(model)

        model.config.kronlm = {"version": PLAN_VERSION, "modules": plan, "lm_head": head_plan, "compression": config.to_dict()}
        adopt_kronecker_classes(model)
    report.seconds = time.perf_counter() - start
    return report


def _calibrate(model: nn.Module, plan: dict[str, dict[str, Any]], input_ids: torch.Tensor, batch_size: int, progress: bool) -> dict[str, Any]:
    from kronlm.compress.calibration import collect_calibration

    names = [name for name, entry in plan.items() if getattr(get_initializer(entry["init"]), "needs_calibration", False)]
    if not names:
        return {}
    for name in names:
        if plan[name]["kind"] != "linear":
            raise ValueError(f"{name}: initialiser {plan[name]['init']!r} needs input statistics, which only linear layers have")
    factors = {name: (plan[name]["a_shape"][1], plan[name]["b_shape"][1]) for name in names}
    return collect_calibration(model, names, input_ids, batch_size=batch_size, input_factors=factors, progress=progress)


def _untie_config(model: nn.Module) -> None:
    # transformers re-ties the head to the embedding on load while this flag is set.
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = {}
