"""PEFT (LoRA) adapters on Kronecker layers. Needs the optional ``peft`` package (``pip install 'kronlm[peft]'``).

PEFT only adapts layer types it knows (``nn.Linear``, ``Conv1D``, ...): ``LoraConfig(target_modules=
["gate_proj"])`` on a compressed model raises "Target module KroneckerLinear(...) is not supported",
and ``target_modules="all-linear"`` silently skips every ``KroneckerLinear``. This module adds
:class:`KroneckerLoraLinear`, a LoRA layer for ``KroneckerLinear`` that follows PEFT's custom-module
conventions (https://huggingface.co/docs/peft/developer_guides/custom_models): the output is
base(x) + scaling · B(A(dropout(x))) (Hu et al. 2021, LoRA), with the Kronecker layer frozen and
unchanged. It is registered through ``LoraConfig._register_custom_module`` — PEFT's documented,
experimental hook, which its saved ``adapter_config.json`` does not remember — so use:

    from kronlm.modeling.adapters import get_peft_model, load_adapter
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    ... train ...; peft_model.save_pretrained("adapter/")
    reloaded = load_adapter(kronlm.load(folder), "adapter/")
    dense = kronlm.merge_and_unload(reloaded)      # base architecture, adapters folded in

or call :func:`register_kronecker_modules` on a ``LoraConfig`` before PEFT's own ``get_peft_model``
/ ``PeftModel.from_pretrained(model, path, config=config)``. With ``target_modules="all-linear"``
give it the model too (``register_kronecker_modules(config, model)``): PEFT expands
``"all-linear"`` to ``nn.Linear`` / ``Conv1D`` layers only and would skip every Kronecker layer
without a word, so without the model that config is refused.

Merging: scaling · B · A is a dense rank-r update, not a Kronecker product, so it cannot be folded
into the factors; ``peft_model.merge_and_unload()`` refuses with that explanation, and
``kronlm.merge_and_unload(peft_model)`` gives the dense base model with the update folded in.
IA3: PEFT offers no custom-module hook for IA3 (only for LoRA), so IA3 cannot target Kronecker layers.
"""

from __future__ import annotations

import os
from typing import Any

import peft
from peft import LoraConfig, PeftConfig, PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn
from transformers import PreTrainedModel

from kronlm.layers import KroneckerLinear, KroneckerLowRankLinear

ALL_LINEAR = "all-linear"
# Kronecker module types LoRA can wrap (each maps (..., in) -> (..., out) and has in/out_features).
ADAPTABLE_MODULES = (KroneckerLinear, KroneckerLowRankLinear)


class KroneckerLoraLinear(LoraLinear):
    """PEFT LoRA layer around a ``KroneckerLinear``: y = K(x) + scaling · lora_B(lora_A(dropout(x))).

    ``lora_A`` (r, in) and ``lora_B`` (out, r) are ordinary ``nn.Linear`` adapters (PEFT's state-dict
    names, so adapters save and load with PEFT's files); the Kronecker factors stay frozen. DoRA and
    the other LoRA variants that read the base weight are not supported (PEFT raises "Invalid or
    unsupported variant combination").

    Raises:
        ValueError: ``merge`` (see the module docstring).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0, lora_alpha: int = 1, **kwargs: Any) -> None:
        kwargs.pop("is_target_conv_1d_layer", None)
        super().__init__(base_layer, adapter_name, config, r=r, lora_alpha=lora_alpha, **kwargs)
        # PEFT sets config.fan_in_fan_out for the GPT-2 Conv1D layers of the same model; a
        # KroneckerLinear maps (..., in) -> (..., out) like nn.Linear whatever the config says.
        self.fan_in_fan_out = False

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        return base.in_features, base.out_features

    @property
    def lora_variants(self):
        return {(): None}

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Refused: a dense rank-r update does not fit into Kronecker factors.

        Raises:
            ValueError: always, naming ``kronlm.merge_and_unload`` as the way to a dense model.
        """
        raise ValueError(
            "cannot merge a LoRA adapter into a KroneckerLinear: scaling·B·A is a dense rank-r matrix, not a Kronecker "
            "product. kronlm.merge_and_unload(peft_model) returns the dense base model with the adapters folded in; "
            "or keep the adapter unmerged (the compressed model plus r·(in + out) numbers per layer)"
        )

    def __repr__(self) -> str:
        return "kronlm." + super().__repr__()


def register_kronecker_modules(config: PeftConfig, model: nn.Module | None = None) -> PeftConfig:
    """Let a ``LoraConfig`` adapt ``KroneckerLinear`` modules (``_register_custom_module``); returns it.

    Args:
        config: a ``LoraConfig``.
        model: the model it will adapt; needed when ``target_modules="all-linear"``, which is then
            expanded to every linear layer, Kronecker ones included (:func:`linear_module_names`).

    Raises:
        TypeError: a PEFT config other than ``LoraConfig`` (IA3 and the others have no custom-module hook).
        ValueError: ``target_modules="all-linear"`` without ``model`` (PEFT's own expansion skips
            every Kronecker layer; the message says what to call instead).
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"kronlm can adapt Kronecker layers with LoRA only: PEFT has no custom-module hook for {type(config).__name__}"
        )
    config._register_custom_module({cls: KroneckerLoraLinear for cls in ADAPTABLE_MODULES})
    target = getattr(config, "target_modules", None)
    if isinstance(target, str) and target.lower() == ALL_LINEAR:
        if model is None:
            raise ValueError(
                "target_modules='all-linear': PEFT expands it to nn.Linear and Conv1D layers only and would skip every "
                "KroneckerLinear without a word; call register_kronecker_modules(config, model) or "
                "kronlm.modeling.adapters.get_peft_model(model, config), which include the Kronecker layers"
            )
        config.target_modules = set(linear_module_names(model, config))
    return config


def linear_module_names(model: nn.Module, config: PeftConfig | None = None) -> list[str]:
    """Names of the modules ``target_modules="all-linear"`` means, Kronecker layers included.

    PEFT's own rule (``nn.Linear`` and ``Conv1D``, without the output head, and for a
    sequence-classification task without its classifier) extended to ``KroneckerLinear``.
    """
    model = model.get_base_model() if isinstance(model, PeftModel) else model
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, *ADAPTABLE_MODULES)) or type(m).__name__ == "Conv1D"]
    exclude = set()
    if isinstance(model, PreTrainedModel):
        head = model.get_output_embeddings()
        if head is not None:
            exclude |= {n for n, m in model.named_modules() if m is head}
        elif config is not None and getattr(config, "task_type", None) == peft.TaskType.SEQ_CLS:
            for attr in ("classifier", "score"):
                module = getattr(model, attr, None)
                exclude |= {n for n, m in model.named_modules() if module is not None and m is module}
    return [n for n in names if n not in exclude]


def prepare_config(config: PeftConfig, model: nn.Module) -> PeftConfig:
    """Register the Kronecker LoRA layer and expand ``"all-linear"`` to include ``KroneckerLinear``; returns ``config``.

    Raises:
        TypeError: see :func:`register_kronecker_modules`.
    """
    return register_kronecker_modules(config, model)


def get_peft_model(model: nn.Module, config: PeftConfig, **kwargs: Any) -> PeftModel:
    """``peft.get_peft_model`` for a (compressed) model, with Kronecker layers adaptable.

    Args:
        model: a Hugging Face model, compressed by kronlm or dense.
        config: a ``LoraConfig``; ``target_modules`` may name Kronecker modules (``"gate_proj"``) or be
            ``"all-linear"`` (every linear layer, Kronecker ones included, but not the LM head).
        **kwargs: passed to ``peft.get_peft_model``.

    Returns:
        The ``PeftModel``; only the adapters are trainable.

    Raises:
        TypeError: a non-LoRA config. ValueError: PEFT's own errors (no module matched, ...).
    """
    return peft.get_peft_model(model, prepare_config(config, model), **kwargs)


def load_adapter(model: nn.Module, adapter: str | os.PathLike, *, is_trainable: bool = False, **kwargs: Any) -> PeftModel:
    """``PeftModel.from_pretrained`` of an adapter saved from :func:`get_peft_model`, Kronecker layers included.

    Args:
        model: the (compressed) model the adapter was trained on, e.g. ``kronlm.load(folder)``.
        adapter: the folder ``peft_model.save_pretrained`` wrote.
        is_trainable: load the adapter for further training (default: inference).
        **kwargs: passed to ``PeftModel.from_pretrained``.

    Raises:
        ValueError / OSError: PEFT's errors for a missing or mismatched adapter.
    """
    config = register_kronecker_modules(PeftConfig.from_pretrained(str(adapter)), model)
    return PeftModel.from_pretrained(model, str(adapter), config=config, is_trainable=is_trainable, **kwargs)


__all__ = ["ADAPTABLE_MODULES", "ALL_LINEAR", "KroneckerLoraLinear", "get_peft_model", "linear_module_names", "load_adapter", "prepare_config", "register_kronecker_modules"]
