"""kronlm's Hugging Face integration: compressed models load with the ordinary Auto classes.

For each base architecture (``llama``, ``gpt2``, ``bert``, ...) kronlm defines a config subclass
with ``model_type = "kronecker_<type>"`` and, for every Auto class that knows the base config, a
model subclass (``KroneckerLlamaForCausalLM``, ...) whose ``__init__`` builds the base model and
then replaces the modules listed in ``config.kronlm`` with Kronecker modules. Registered with
``AutoConfig`` / ``AutoModel*``, this makes

    import kronlm
    AutoModelForCausalLM.from_pretrained(folder)

return the compressed model. ``from_pretrained`` of these classes first checks the folder (see
``kronlm.modeling.folder_checks``) and, after loading, refuses a tensor that transformers would have
re-initialised, so a missing, truncated or inconsistent file is named in the error instead of
silently giving garbage. ``save_pretrained`` also writes ``kronlm_compression.json`` (the
compression config and report), so ``model.save_pretrained`` and ``kronlm.save`` write the same
folder, and the standalone modeling code with ``auto_map`` (:mod:`kronlm.modeling.remote_code`), so
``from_pretrained(folder, trust_remote_code=True)`` works where kronlm is not installed. kronlm
never runs that code: its registered classes take precedence over ``auto_map``.

The classes are module attributes of this module (created on first use, also when unpickling), so
compressed models pickle (``torch.save(model)``) and deep-copy like dense ones.
"""

from __future__ import annotations

import importlib.metadata as importlib_metadata
import math
import os
from typing import Any

import torch
import transformers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedModel,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from kronlm.layers import KroneckerEmbedding, KroneckerTiedLMHead
from kronlm.modeling.integrity import check_finite, verify_manifest, write_manifest
from kronlm.modeling.merge import merge_and_unload
from kronlm.modeling.metadata import (
    attach_report,
    compression_report,
    read_compression_file,
    write_compression_file,
)
from kronlm.modeling.plan import (
    PREFIX,
    KroneckerPlan,
    base_model_type,
    resolve_module_name,
)
from kronlm.modeling.remote_code import (
    drop_load_guard,
    is_kronlm_auto_map,
    write_remote_code,
)
from kronlm.modeling.folder_checks import CONFIG_NAME, check_folder_files, check_loading_info

try:  # transformers >= 5 records which outputs (hidden states, attentions) each class can return
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
except ImportError:  # versions that record outputs without the registry
    _CAN_RECORD_REGISTRY = None

AUTO_CLASSES = (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoModelForQuestionAnswering,
)
DEFAULT_ARCHITECTURES = ("gpt2", "llama", "bert", "mistral", "qwen2", "qwen3")

_CONFIGS: dict[str, type] = {}  # base model_type -> Kronecker config class
_MODELS: dict[type, type] = {}  # base model class -> Kronecker model class


def kronecker_config_class(model_type: str) -> type:
    """The registered Kronecker config class for a base ``model_type`` (created on first use).

    Raises:
        ValueError: transformers has no config for ``model_type``.
    """
    if model_type in _CONFIGS:
        return _CONFIGS[model_type]
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"transformers has no model type {model_type!r} to build a Kronecker variant of")
    base = CONFIG_MAPPING[model_type]

    def __init__(self, *args, **kwargs):
        # The load guard and kronlm's own auto_map belong to the folder, not to the config: both
        # are written afresh by every save.
        drop_load_guard(kwargs)
        if is_kronlm_auto_map(kwargs.get("auto_map")):
            del kwargs["auto_map"]
        base.__init__(self, *args, **kwargs)

    cls = type(
        f"Kronecker{base.__name__}",
        (base,),
        {"model_type": PREFIX + model_type, "__init__": __init__, "__module__": __name__,
         "__doc__": f"{base.__name__} of a kronlm-compressed model."},
    )
    AutoConfig.register(cls.model_type, cls, exist_ok=True)
    _CONFIGS[model_type] = cls
    globals()[cls.__name__] = cls  # importable by name, so that pickle finds it
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
        plan = plan_of_config(config)
        if plan is not None:
            plan.apply(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedModel.from_pretrained`` that checks the folder before and the tensors after.

        A local folder's config and safetensors headers are checked first; after loading, a
        tensor transformers would have re-initialised (missing, or saved with another shape) is
        refused, and so is an unexpected one when the folder was saved from this very class.
        The folder's ``kronlm_compression.json`` report is attached as ``model.compression_report``.

        Raises:
            FileNotFoundError / ValueError: a missing, truncated or inconsistent file or tensor
                (named).
        """
        return load_checked(super(model_cls, cls).from_pretrained, cls.__name__, pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained``, plus ``kronlm_compression.json`` (config and
        report) and ``kronlm_manifest.json`` (size and SHA-256 of every file).

        Raises:
            ValueError: a parameter or buffer holds NaN or infinite values (named); nothing is written.
        """
        check_finite(self, type(self).__name__)
        out = super(model_cls, self).save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return out
        plan = plan_of_config(self.config)
        base_type = base_model_type(self.config.model_type)
        write_remote_code(save_directory, base_type, CONFIG_MAPPING[base_type], base_model_classes(base_type), base_cls, kronlm_version())
        write_compression_file(save_directory, None if plan is None else plan.compression, compression_report(self))
        write_manifest(save_directory)
        return out

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """``PreTrainedModel.resize_token_embeddings`` that also resizes a ``KroneckerEmbedding``.

        See :func:`resize_kronecker_embeddings`; a dense input embedding is resized by transformers.
        """
        if not isinstance(self.get_input_embeddings(), KroneckerEmbedding):
            return base_cls.resize_token_embeddings(self, new_num_tokens, pad_to_multiple_of, mean_resizing)
        return resize_kronecker_embeddings(self, new_num_tokens, pad_to_multiple_of, mean_resizing)

    model_cls = type(
        f"Kronecker{base_cls.__name__}",
        (base_cls,),
        {
            "config_class": config_cls,
            "__init__": __init__,
            "from_pretrained": from_pretrained,
            "save_pretrained": save_pretrained,
            "resize_token_embeddings": resize_token_embeddings,
            "merge_and_unload": merge_and_unload,
            "__module__": __name__,
            "__doc__": f"{base_cls.__name__} with modules replaced by Kronecker modules as listed in ``config.kronlm``.",
        },
    )
    _MODELS[base_cls] = model_cls
    globals()[model_cls.__name__] = model_cls  # importable by name, so that pickle finds it
    for auto in AUTO_CLASSES:
        try:
            if auto._model_mapping[base_cls.config_class] is base_cls:
                auto.register(config_cls, model_cls, exist_ok=True)
        except KeyError:
            continue
    return model_cls


def base_model_classes(model_type: str) -> dict[str, type]:
    """Auto class name -> the base model class transformers maps ``model_type`` to, for :data:`AUTO_CLASSES`.

    Raises:
        ValueError: an unknown model type.
    """
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"transformers has no model type {model_type!r}")
    base_config = CONFIG_MAPPING[model_type]
    classes = {}
    for auto in AUTO_CLASSES:
        try:
            base_cls = auto._model_mapping[base_config]
        except KeyError:
            continue
        classes[auto.__name__] = base_cls[0] if isinstance(base_cls, (tuple, list)) else base_cls
    return classes


def kronlm_version() -> str:
    """The installed kronlm's version (written into the code files of saved folders)."""
    try:
        return importlib_metadata.version("kronlm")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def register_architecture(model_type: str) -> None:
    """Register the Kronecker config and model classes of one base ``model_type`` with the Auto classes.

    Done at ``import kronlm`` for ``DEFAULT_ARCHITECTURES``; ``kronlm.load`` does it for any other
    architecture it meets. Call it yourself before ``AutoModel*.from_pretrained`` of a compressed
    model of another family.

    Raises:
        ValueError: an unknown model type.
    """
    kronecker_config_class(model_type)  # registers the config with AutoConfig
    for base_cls in base_model_classes(model_type).values():
        kronecker_model_class(base_cls)


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
    if _CAN_RECORD_REGISTRY is None:
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


def plan_of_config(config: Any) -> KroneckerPlan | None:
    """The :class:`KroneckerPlan` stored under ``config.kronlm``, or None for a dense config.

    Raises:
        ValueError: a malformed plan (named).
    """
    data = getattr(config, "kronlm", None)
    if not data:
        return None
    return KroneckerPlan.from_dict(data)


def load_checked(load, class_name: str, path, *args, **kwargs):
    """Call ``load(path, *args, **kwargs)`` (a ``from_pretrained``) with kronlm's folder checks.

    For a local folder: :func:`~kronlm.modeling.folder_checks.check_folder_files` and the checksum
    manifest (:func:`~kronlm.modeling.integrity.verify_manifest`; ``verify_checksums=False`` in
    ``kwargs`` compares sizes only) first; after loading, no NaN or infinite weight, and :func:`~kronlm.modeling.folder_checks.check_loading_info` (strict when the folder was
    saved from the class called ``class_name``; otherwise the planned Kronecker modules must still be complete),
    and the folder's compression report is attached to the model. A hub id is loaded as
    transformers loads it. ``output_loading_info=True`` in ``kwargs`` returns (model, info) as
    transformers does.

    Raises:
        FileNotFoundError / ValueError: see the checks (each names the file or the tensor).
    """
    verify_checksums = kwargs.pop("verify_checksums", True)
    if path is None or not os.path.isdir(path):
        return load(path, *args, **kwargs)
    contents = check_folder_files(path)
    verify_manifest(path, hashes=verify_checksums)
    if contents.config.get("kronlm"):
        # Parsed here first so a malformed plan names its file (transformers would name nothing).
        try:
            KroneckerPlan.from_dict(contents.config["kronlm"])
        except ValueError as exc:
            raise ValueError(f"{os.path.join(path, CONFIG_NAME)}: {exc}") from None
    want_info = kwargs.pop("output_loading_info", False)
    # Mismatched shapes are reported by the check below, naming file and tensor.
    kwargs["ignore_mismatched_sizes"] = True
    model, info = load(path, *args, output_loading_info=True, **kwargs)
    plan = plan_of_config(model.config)
    strict = bool(class_name) and class_name in (contents.config.get("architectures") or [])
    check_loading_info(info, contents, strict=strict, required_prefixes=plan.module_prefixes() if plan else ())
    check_finite(model, str(path))
    _compression, report = read_compression_file(path)
    if report is not None:
        attach_report(model, report)
    return (model, info) if want_info else model


@torch.no_grad()
def resize_kronecker_embeddings(model: PreTrainedModel, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Module:
    """Resize a compressed model's ``KroneckerEmbedding`` (and its LM head) to a new vocabulary size, in place.

    The embedding's A factor (R, V/m2, d/n2) gains or loses rows (:meth:`KroneckerEmbedding.resized`);
    a tied Kronecker LM head follows it, a dense LM head gains rows equal to the mean of its old rows
    (or loses rows), its bias zeros. ``config.vocab_size`` and the plan in ``config.kronlm`` are
    updated, so the model saves and reloads with the new size. Mirrors
    ``PreTrainedModel.resize_token_embeddings`` (transformers), whose dense code cannot reshape factors.

    Args:
        model: a compressed model whose input embedding is a ``KroneckerEmbedding``.
        new_num_tokens: the new vocabulary size V'; None keeps V (only padding applies).
        pad_to_multiple_of: round V' up to a multiple of this.
        mean_resizing: new A rows are the mean of the old ones (new embedding rows are the mean of
            the old rows sharing their B row); False draws them from a normal with the old A's std.

    Returns:
        The new input embedding.

    Raises:
        ValueError: V' below 1 or not a multiple of the B factor's rows m2 (the message gives both
            numbers and the ``pad_to_multiple_of`` that fixes it).
    """
    old = model.get_input_embeddings()
    if new_num_tokens is None and pad_to_multiple_of is None:
        return old
    size = old.num_embeddings if new_num_tokens is None else int(new_num_tokens)
    if pad_to_multiple_of:
        size = math.ceil(size / pad_to_multiple_of) * pad_to_multiple_of
    m2 = old.b_shape[0]
    if size < 1 or size % m2:
        raise ValueError(
            f"resize_token_embeddings: the Kronecker embedding's B factor has {m2} rows, so the vocabulary size must be a "
            f"positive multiple of {m2}; got {size} (pass pad_to_multiple_of={m2})"
        )
    new = old.resized(size, mean_resizing=mean_resizing)
    model.set_input_embeddings(new)
    head = model.get_output_embeddings()
    if isinstance(head, KroneckerTiedLMHead):
        bias = None if head.bias is None else _resized_rows(head.bias.detach(), size, zero=True)
        model.set_output_embeddings(KroneckerTiedLMHead(new, bias=bias))
    elif isinstance(head, nn.Linear) and head.out_features == old.num_embeddings:
        dense = nn.Linear(head.in_features, size, bias=head.bias is not None, device=head.weight.device, dtype=head.weight.dtype)
        dense.weight.copy_(_resized_rows(head.weight.detach(), size, zero=not mean_resizing))
        if head.bias is not None:
            dense.bias.copy_(_resized_rows(head.bias.detach(), size, zero=True))
        model.set_output_embeddings(dense)
    model.config.get_text_config().vocab_size = size
    model.vocab_size = size
    data = getattr(model.config, "kronlm", None)
    if data:
        names = {id(m): n for n, m in model.named_modules()}
        for name, entry in data["modules"].items():
            if resolve_module_name(model, name) == names[id(new)]:
                entry["out"], entry["a_shape"] = size, [new.a_shape[0], new.a_shape[1]]
    return new


def _resized_rows(tensor: torch.Tensor, rows: int, *, zero: bool) -> torch.Tensor:
    # Keep the first rows; new rows are zero or the mean of the old ones.
    out = tensor.new_zeros((rows, *tensor.shape[1:]))
    keep = min(rows, tensor.shape[0])
    out[:keep] = tensor[:keep]
    if rows > keep and not zero:
        out[keep:] = tensor.mean(dim=0, keepdim=True)
    return out


def __getattr__(name: str):
    # Unpickling in a fresh process: create the Kronecker class the pickle names from its base class.
    base = getattr(transformers, name[len("Kronecker"):], None) if name.startswith("Kronecker") else None
    if isinstance(base, type) and issubclass(base, PreTrainedModel):
        return kronecker_model_class(base)
    if isinstance(base, type) and getattr(base, "model_type", None) in CONFIG_MAPPING and CONFIG_MAPPING[base.model_type] is base:
        return kronecker_config_class(base.model_type)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
