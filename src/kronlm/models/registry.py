"""kronlm's Hugging Face integration: compressed models load with the ordinary Auto classes.

For each base architecture (``llama``, ``gpt2``, ``bert``, ...) kronlm defines a config subclass
with ``model_type = "kronecker_<type>"`` and, for every Auto class that knows the base config, a
model subclass (``KroneckerLlamaForCausalLM``, ...) whose ``__init__`` builds the base model and
then replaces the modules listed in ``config.kronlm`` with Kronecker modules. Registered with
``AutoConfig`` / ``AutoModel*``, this makes

    import kronlm
    AutoModelForCausalLM.from_pretrained(folder)

return the compressed model. ``from_pretrained`` of these classes first checks the folder (see
``kronlm.export.validate``), so a missing, truncated or inconsistent file is named in the error
instead of being silently re-initialised. Without ``import kronlm`` transformers does not know the
``kronecker_*`` model types and refuses the folder (it never loads it as a dense model).
"""

from __future__ import annotations

import os

from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedModel,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

PREFIX = "kronecker_"
AUTO_CLASSES = (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
DEFAULT_ARCHITECTURES = ("gpt2", "llama", "bert", "mistral", "qwen2", "qwen3")

_CONFIGS: dict[str, type] = {}  # base model_type -> Kronecker config class
_MODELS: dict[type, type] = {}  # base model class -> Kronecker model class


def kronecker_config_class(base_model_type: str) -> type:
    """The registered Kronecker config class for a base ``model_type`` (created on first use).

    Raises:
        ValueError: transformers has no config for ``base_model_type``.
    """
    if base_model_type in _CONFIGS:
        return _CONFIGS[base_model_type]
    if base_model_type not in CONFIG_MAPPING:
        raise ValueError(f"transformers has no model type {base_model_type!r} to build a Kronecker variant of")
    base = CONFIG_MAPPING[base_model_type]
    cls = type(
        f"Kronecker{base.__name__}",
        (base,),
        {"model_type": PREFIX + base_model_type, "__module__": __name__, "__doc__": f"{base.__name__} of a kronlm-compressed model."},
    )
    AutoConfig.register(cls.model_type, cls, exist_ok=True)
    _CONFIGS[base_model_type] = cls
    return cls


def kronecker_model_class(base_cls: type) -> type:
    """The Kronecker subclass of a Hugging Face model class (created and registered on first use)."""
    if base_cls in _MODELS:
        return _MODELS[base_cls]
    if base_cls in _MODELS.values():
        return base_cls
    config_cls = kronecker_config_class(base_cls.config_class.model_type)

    def __init__(self, config, *args, **kwargs):
        base_cls.__init__(self, config, *args, **kwargs)
        plan = getattr(config, "kronlm", None)
        if plan:
            from kronlm.compress.plan import apply_plan

            apply_plan(self, plan)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedModel.from_pretrained`` after ``validate_folder`` on a local folder.

        Raises:
            FileNotFoundError / ValueError: a missing, truncated or inconsistent file (named).
        """
        if pretrained_model_name_or_path is not None and os.path.isdir(pretrained_model_name_or_path):
            from kronlm.export.validate import validate_folder

            validate_folder(pretrained_model_name_or_path, model_class=cls)
        return super(model_cls, cls).from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    model_cls = type(
        f"Kronecker{base_cls.__name__}",
        (base_cls,),
        {
            "config_class": config_cls,
            "__init__": __init__,
            "from_pretrained": from_pretrained,
            "__module__": __name__,
            "__doc__": f"{base_cls.__name__} with modules replaced by Kronecker modules as listed in ``config.kronlm``.",
        },
    )
    _MODELS[base_cls] = model_cls
    for auto in AUTO_CLASSES:
        try:
            if auto._model_mapping[base_cls.config_class] is base_cls:
                auto.register(config_cls, model_cls, exist_ok=True)
        except KeyError:
            continue
    return model_cls


def register_architecture(base_model_type: str) -> None:
    """Register the Kronecker config and model classes of one base ``model_type`` with the Auto classes.

    Done at ``import kronlm`` for ``DEFAULT_ARCHITECTURES``; ``kronlm.load`` does it for any other
    architecture it meets. Call it yourself before ``AutoModel*.from_pretrained`` of a compressed
    model of another family.

    Raises:
        ValueError: an unknown model type.
    """
    kronecker_config_class(base_model_type)  # registers the config with AutoConfig
    base_config = CONFIG_MAPPING[base_model_type]
    for auto in AUTO_CLASSES:
        try:
            base_cls = auto._model_mapping[base_config]
        except KeyError:
            continue
        if isinstance(base_cls, (tuple, list)):
            base_cls = base_cls[0]
        kronecker_model_class(base_cls)


def base_model_type(model_type: str) -> str:
    """``kronecker_llama`` -> ``llama``; other types unchanged."""
    return model_type[len(PREFIX):] if model_type.startswith(PREFIX) else model_type


def adopt_kronecker_classes(model: PreTrainedModel) -> None:
    """Switch a compressed model's class and config class to their Kronecker subclasses, in place.

    Nothing about the weights changes; ``save_pretrained`` then writes ``model_type``
    ``kronecker_<type>`` and ``architectures`` ``["Kronecker<Class>"]``.
    """
    if not isinstance(model, PreTrainedModel):
        return
    model.__class__ = kronecker_model_class(type(model))
    _register_output_capture(model)
    config_cls = kronecker_config_class(base_model_type(model.config.model_type))
    if type(model.config) is not config_cls:
        model.config.__class__ = config_cls
    # Some loaders (GGUF) set model_type on the instance, which would shadow the class's.
    model.config.__dict__.pop("model_type", None)
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module is not model and module.config is not model.config:
            module.config.__class__ = config_cls


def _register_output_capture(model: PreTrainedModel) -> None:
    # transformers 5 looks up which outputs a model can record (hidden states, attentions) by its
    # class name, registered when a model is constructed. A class swapped in place was never
    # constructed, so without this output_hidden_states would silently return None.
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # transformers versions that record outputs without the registry
        return
    if not _CAN_RECORD_REGISTRY.get(model) and getattr(model, "_can_record_outputs", None):
        _CAN_RECORD_REGISTRY[model] = model._can_record_outputs


def saved_model_class(config_dict: dict) -> type | None:
    """The registered Kronecker class named by a saved config's ``architectures``, or None."""
    names = config_dict.get("architectures") or []
    for cls in _MODELS.values():
        if cls.__name__ in names:
            return cls
    return None


def register_defaults() -> None:
    """Register ``DEFAULT_ARCHITECTURES`` (called by ``import kronlm``)."""
    for model_type in DEFAULT_ARCHITECTURES:
        if model_type in CONFIG_MAPPING:
            register_architecture(model_type)


def is_kronecker_model(model: nn.Module) -> bool:
    """True for a model compressed by kronlm (its config carries a plan)."""
    return bool(getattr(getattr(model, "config", None), "kronlm", None))
