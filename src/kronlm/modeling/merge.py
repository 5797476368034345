"""Merge a compressed model back into a plain dense model of its base architecture.

Every ``KroneckerLinear`` becomes the dense module the base architecture has at that name (an
``nn.Linear``, or GPT-2's ``Conv1D`` with its (in, out) storage), every ``KroneckerEmbedding`` an
``nn.Embedding``, and a Kronecker LM head tied to the embedding a dense head tied to the merged
embedding again. The result is an ordinary Hugging Face model of the base class
(``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...) that any tool loads without kronlm; its logits
equal the compressed model's up to float32 rounding (the merged weight Σ_r s_r A_r ⊗ B_r is formed
once, in the factors' dtype). This is peft's ``merge_and_unload`` for Kronecker layers.

A PEFT model (LoRA adapters on Kronecker or dense layers, :mod:`kronlm.modeling.adapters`) merges
the same way: each adapted layer becomes base + Σ_active scaling·B·A, which is not a Kronecker
product, so the result is the dense base architecture with the adapters folded in. PEFT itself
is not imported: adapter layers are recognised by their ``base_layer`` / ``get_delta_weight``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from kronlm.compression.surgery import set_module
from kronlm.layers import (
    KRONECKER_MODULES,
    KroneckerEmbedding,
    KroneckerLinear,
    KroneckerTiedLMHead,
    dense_weight,
    is_conv1d,
)
from kronlm.modeling.plan import KroneckerPlan, base_model_type


def _base_class(model: PreTrainedModel) -> type:
    # kronlm's Kronecker classes subclass the base class directly (modeling.registry).
    cls = type(model)
    return cls.__bases__[0] if cls.__name__.startswith("Kronecker") else cls


def _dense_config(model: PreTrainedModel, plan: KroneckerPlan | None, base_cls: type):
    data: dict[str, Any] = model.config.to_dict()
    data.pop("kronlm", None)
    data.pop("auto_map", None)  # points at the compressed folder's code files
    model_type = base_model_type(data.get("model_type", ""))
    data["model_type"] = model_type
    data["architectures"] = [base_cls.__name__]
    if plan is not None and plan.lm_head is not None and plan.lm_head.mode == "tied":
        data["tie_word_embeddings"] = True  # the merged head is the merged embedding again
    config_cls = CONFIG_MAPPING[model_type]
    data.pop("transformers_version", None)
    return config_cls.from_dict(data)


def is_adapter_layer(module: nn.Module) -> bool:
    """True for a PEFT adapter layer that wraps a base layer and can give its weight update (LoRA)."""
    return hasattr(module, "base_layer") and callable(getattr(module, "get_delta_weight", None))


def _adapter_delta(layer: nn.Module, name: str) -> torch.Tensor | None:
    # Σ over the active, unmerged adapters of the (out, in) weight update.
    if getattr(layer, "disable_adapters", False):
        return None
    if any(getattr(layer, "lora_bias", {}).get(a, False) for a in layer.active_adapters):
        raise ValueError(f"{name}: merging LoRA adapters with lora_bias is not supported")
    total = None
    for adapter in layer.active_adapters:
        if adapter not in getattr(layer, "lora_A", {}) or adapter in getattr(layer, "merged_adapters", ()):
            continue
        delta = layer.get_delta_weight(adapter)
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.t()  # stored (in, out) like the Conv1D it adapts
        total = delta if total is None else total + delta
    return total


def _layer_weight(module: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in) or (vocab, dim), bias) of a Kronecker, dense or adapter-wrapped layer."""
    if is_adapter_layer(module):
        weight, bias = _layer_weight(module.get_base_layer(), name)
        delta = _adapter_delta(module, name)
        return (weight if delta is None else weight + delta.to(weight.dtype)), bias
    if isinstance(module, KRONECKER_MODULES):  # every Kronecker module kind has to_dense()
        return module.to_dense(), getattr(module, "bias", None)
    if isinstance(module, (nn.Linear, nn.Embedding)) or is_conv1d(module):
        return dense_weight(module).detach(), getattr(module, "bias", None)
    raise ValueError(f"{name}: cannot merge a {type(module).__name__}")


def _dense_state(model: nn.Module, skeleton: nn.Module | None) -> dict[str, torch.Tensor]:
    state = {}
    layers: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer in layers):
            continue  # inside an adapter wrapper: merged with it
        if is_adapter_layer(module) or isinstance(module, KRONECKER_MODULES):
            layers[name] = module
    heads = {name: m for name, m in model.named_modules() if isinstance(m, KroneckerTiedLMHead)}
    skip = tuple(f"{name}." for name in (*layers, *heads))
    for key, tensor in model.state_dict().items():
        if not key.startswith(skip):
            state[key] = tensor
    with torch.no_grad():
        for name, module in layers.items():
            weight, bias = _layer_weight(module, name)
            if skeleton is not None and is_conv1d(skeleton.get_submodule(name)):
                weight = weight.t()  # Conv1D stores (in, out)
            state[f"{name}.weight"] = weight.contiguous()
            if bias is not None:
                state[f"{name}.bias"] = bias.detach()
        for name, head in heads.items():
            state[f"{name}.weight"] = state[f"{_name_of(model, head.embedding)}.weight"]
            if head.bias is not None:
                state[f"{name}.bias"] = head.bias.detach()
    return state


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Turn every Kronecker module back into its dense module; return a plain model.

    For a Hugging Face model compressed by kronlm, a new model of the base class (built from the
    config without the ``kronlm`` plan, ``model_type`` and ``architectures`` restored) holding the
    merged weights, on the same device and dtype; the input model is left as it was. A PEFT model
    (``PeftModel`` with LoRA adapters, on Kronecker or dense layers) gives the same, with each
    active adapter's scaling·B·A added to its layer's dense weight. For any other module (a plain
    ``nn.Module`` holding Kronecker layers), the layers are replaced in place by ``nn.Linear`` /
    ``nn.Embedding`` and the module is returned.

    Args:
        model: a compressed model, or a PEFT model around one.

    Returns:
        The dense model (eval mode when the input was).

    Raises:
        ValueError: the merged state does not fit the base architecture (names the tensors).
    """
    if callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config"):
        model = model.get_base_model()  # PeftModel: its adapter layers are merged below
    if not isinstance(model, PreTrainedModel):
        for name, module in list(model.named_modules()):
            if isinstance(module, KroneckerLinear):
                set_module(model, name, module.to_linear())
            elif isinstance(module, KroneckerEmbedding):
                set_module(model, name, module.to_embedding())
        return model
    data = getattr(model.config, "kronlm", None)
    plan = KroneckerPlan.from_dict(data) if data else None
    base_cls = _base_class(model)
    config = _dense_config(model, plan, base_cls)
    with torch.device("meta"):
        skeleton = base_cls(config)
    first = next(model.parameters())
    # Building the dense model draws initial weights that are overwritten at once; keep the
    # caller's RNG stream untouched by that.
    with torch.random.fork_rng(devices=[]):
        dense = base_cls._from_config(config, dtype=first.dtype)
    dense.to(first.device)
    state = _dense_state(model, skeleton)
    result = dense.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k in dict(dense.named_parameters())]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"merging into {base_cls.__name__}: missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]}"
        )
    if getattr(config, "tie_word_embeddings", False):
        dense.tie_weights()
    dense.train(model.training)
    return dense


__all__ = ["is_adapter_layer", "merge_and_unload"]
