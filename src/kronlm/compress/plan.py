"""The structural plan of a compressed model: which module becomes which Kronecker module.

The plan is plain JSON stored in the model's ``config.kronlm``; ``apply_plan`` rebuilds the
compressed architecture from it (with uninitialised factors) when a saved model is loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kronlm.layers import KroneckerEmbedding, KroneckerLinear, KroneckerTiedLMHead

PLAN_VERSION = 1


def is_conv1d(module: nn.Module) -> bool:
    """True for Hugging Face's ``Conv1D`` (GPT-2), which stores its weight (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear / Conv1D / Embedding in (out, in) or (vocab, dim) orientation."""
    return module.weight.t() if is_conv1d(module) else module.weight


def resolve_module_name(model: nn.Module, name: str) -> str | None:
    """Map a plan name onto ``model``, allowing for a base-model prefix present on one side only.

    A plan written for ``LlamaForCausalLM`` names ``model.layers.0.mlp.up_proj``; loaded into
    ``LlamaModel`` the same module is ``layers.0.mlp.up_proj`` (and the other way round).
    """
    names = dict(model.named_modules())
    if name in names:
        return name
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix:
        if name.startswith(prefix + ".") and name[len(prefix) + 1 :] in names:
            return name[len(prefix) + 1 :]
        if f"{prefix}.{name}" in names:
            return f"{prefix}.{name}"
    return None


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def build_empty(entry: dict[str, Any], device=None, dtype=None) -> nn.Module:
    """An uninitialised Kronecker module for one plan entry."""
    if entry["kind"] == "embedding":
        return KroneckerEmbedding(
            entry["out"], entry["in"], entry["a_shape"], entry["b_shape"], entry["rank"],
            padding_idx=entry.get("padding_idx"), device=device, dtype=dtype,
        )
    return KroneckerLinear(
        entry["in"], entry["out"], entry["a_shape"], entry["b_shape"], entry["rank"],
        bias=entry["bias"], learnable_scales=entry["learnable_scales"], device=device, dtype=dtype,
    )


def apply_plan(model: nn.Module, plan: dict[str, Any]) -> None:
    """Rebuild the compressed architecture of ``plan`` inside ``model`` (factors uninitialised).

    Each planned module is replaced by an empty Kronecker module on the device and dtype of the
    dense module it replaces (the meta device while ``from_pretrained`` builds the model); a tied
    Kronecker LM head is re-attached to its embedding.

    Raises:
        ValueError: unknown plan version, a planned module missing from the model, or a dense
            module whose shape differs from the plan's (the message names the module).
    """
    if plan.get("version") != PLAN_VERSION:
        raise ValueError(f"kronlm plan version {plan.get('version')!r} is not supported (expected {PLAN_VERSION})")
    embeddings: dict[str, KroneckerEmbedding] = {}
    for name, entry in plan["modules"].items():
        resolved = resolve_module_name(model, name)
        if resolved is None:
            raise ValueError(f"kronlm plan names module {name!r}, which {type(model).__name__} does not have")
        old = model.get_submodule(resolved)
        if isinstance(old, (KroneckerLinear, KroneckerEmbedding)):
            new = old
        else:
            weight = dense_weight(old)
            if tuple(weight.shape) != (entry["out"], entry["in"]):
                raise ValueError(
                    f"kronlm plan: module {name!r} has weight {tuple(weight.shape)} but the plan expects "
                    f"({entry['out']}, {entry['in']})"
                )
            new = build_empty(entry, device=weight.device, dtype=weight.dtype)
            set_module(model, resolved, new)
        if entry["kind"] == "embedding":
            embeddings[name] = new
    head = plan.get("lm_head")
    if head and head["mode"] == "tied":
        resolved = resolve_module_name(model, head["module"])
        if resolved is not None:  # a base model (no head) loaded from a causal-LM plan has none
            old = model.get_submodule(resolved)
            bias = getattr(old, "bias", None) if head.get("bias") else None
            set_module(model, resolved, KroneckerTiedLMHead(embeddings[head["embedding"]], bias=bias))
