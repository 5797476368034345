"""Checks of a saved model folder, before and after transformers reads it, so every problem names
its file and tensor.

Before loading, :func:`check_folder_files` checks the folder's entries (no symlink out, no device
or FIFO), reads ``config.json`` and checks its sizes (:func:`check_config_values`: integers in a
sane range, head counts that divide, as many layers as the weights hold, no more parameters than
the weights could fill), so a hostile config never builds a model that hangs or divides by zero,
and reads the safetensors headers (``safetensors.safe_open``, which refuses truncated files, bad
offsets and unknown dtypes).
After loading, :func:`check_loading_info` reads transformers' own report
(``from_pretrained(..., output_loading_info=True)``) and turns a missing, unexpected or reshaped
tensor into an error: transformers itself only warns and re-initialises, which for a compressed
model would silently give garbage.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from transformers import GenerationConfig
from transformers.activations import ACT2FN
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from kronlm.modeling.integrity import check_folder_entries, inside
from kronlm.modeling.plan import PREFIX
from kronlm.utils.files import read_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# Integer sizes of a config: key -> (smallest, largest) accepted. The bounds are far beyond every
# released model (about 130 layers, 128 heads, hidden 25,600, vocabulary 262k, 10M positions) and
# far below what would hang or exhaust memory while the model is built.
INT_FIELDS: dict[str, tuple[int, int]] = {
    "num_hidden_layers": (1, 4096), "n_layer": (1, 4096),
    "num_attention_heads": (1, 4096), "n_head": (1, 4096), "num_key_value_heads": (1, 4096),
    "hidden_size": (1, 1 << 18), "n_embd": (1, 1 << 18),
    "intermediate_size": (1, 1 << 20), "n_inner": (1, 1 << 20), "head_dim": (1, 1 << 16),
    "vocab_size": (1, 1 << 24), "max_position_embeddings": (1, 1 << 26), "n_positions": (1, 1 << 26), "n_ctx": (1, 1 << 26),
    "type_vocab_size": (0, 1 << 16),
}
# Keys transformers allows to be null (they then default to another size).
NULLABLE_FIELDS = frozenset({"num_key_value_heads", "n_inner", "head_dim"})
# Activation names, looked up in transformers' ACT2FN when the model is built.
ACTIVATION_FIELDS = ("hidden_act", "activation_function")
# Keys of the folder, not of the config class (kronlm's load guard, remote-code map).
_FOLDER_KEYS = ("model_type", "auto_map", "transformers_weights")
GENERATION_CONFIG_NAME = "generation_config.json"
# Float settings that must be finite numbers.
FLOAT_FIELDS = ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "initializer_range")
# A config may describe at most this many times more parameters than its weights hold (a
# compressed model's dense config against its factors), plus a slack for tiny models.
MAX_PARAMS_PER_STORED = 1000
_PARAMS_SLACK = 10_000_000
# Block lists of the transformers architectures: "model.layers.3.", "transformer.h.3.", "encoder.layer.3.".
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")


@dataclass
class FolderContents:
    """What :func:`check_folder_files` found in a model folder.

    Attributes:
        folder: the folder.
        config: the parsed ``config.json``.
        tensor_files: tensor name -> the safetensors file (relative name) that holds it.
        shapes: tensor name -> its shape, from the headers.
    """

    folder: Path
    config: dict[str, Any]
    tensor_files: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def file_of(self, tensor: str) -> Path:
        """The file that holds ``tensor`` (the single weights file when it holds none)."""
        return self.folder / self.tensor_files.get(tensor, WEIGHTS_NAME if not self.tensor_files else sorted(set(self.tensor_files.values()))[0])


def read_safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header, without reading tensor data.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a truncated file, a header that is not a valid safetensors header (not JSON,
            overlapping or out-of-range byte ranges, an unknown dtype); the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
    except SafetensorError as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: truncated or corrupt safetensors file ({detail})") from None


def _first(config: dict[str, Any], *keys: str) -> Any:
    return next((config[k] for k in keys if config.get(k) is not None), None)


def check_config_values(config: Any, path: str | os.PathLike = CONFIG_NAME) -> dict[str, Any]:
    """Check the sizes of a model config before a model is built from it.

    Every key of :data:`INT_FIELDS` present must be an integer (not a bool, float or string) in
    its range (null only for :data:`NULLABLE_FIELDS`); :data:`FLOAT_FIELDS` must be finite
    numbers; ``model_type`` a string, ``architectures`` a list of strings, the activation one
    transformers knows; the hidden size a multiple of the attention heads (when no
    ``head_dim`` is given) and the attention heads a multiple of the key/value heads. Then the
    config class transformers has for the model type is built from it, so that its own checks
    (field types, RoPE settings, ...) fail here, naming the file.

    Args:
        config: the parsed ``config.json``.
        path: the file, for messages.

    Returns:
        ``config``.

    Raises:
        ValueError: names the file, the key and the value, e.g. ``config.json: num_hidden_layers =
            'two' is not an integer``.
    """
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a model config (a JSON {type(config).__name__}, not an object with a model_type)")
    if "model_type" not in config:
        raise ValueError(f"{path}: not a model config (no model_type)")
    if not isinstance(config["model_type"], str) or not config["model_type"]:
        raise ValueError(f"{path}: model_type = {config['model_type']!r} is not a model type name")
    names = config.get("architectures")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise ValueError(f"{path}: architectures = {names!r} is not a list of class names")
    for key, (low, high) in INT_FIELDS.items():
        if key not in config or (config[key] is None and key in NULLABLE_FIELDS):
            continue
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path}: {key} = {value!r} is not an integer")
        if not low <= value <= high:
            raise ValueError(f"{path}: {key} = {value:,} is out of range (an integer from {low} to {high:,})")
    for key in FLOAT_FIELDS:
        value = config.get(key)
        if key in config and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise ValueError(f"{path}: {key} = {value!r} is not a finite number")
    heads = _first(config, "num_attention_heads", "n_head")
    hidden = _first(config, "hidden_size", "n_embd")
    if heads is not None and hidden is not None and config.get("head_dim") is None and hidden % heads:
        raise ValueError(f"{path}: hidden size {hidden} is not a multiple of num_attention_heads = {heads}")
    kv_heads = config.get("num_key_value_heads")
    if heads is not None and kv_heads is not None and heads % kv_heads:
        raise ValueError(f"{path}: num_attention_heads = {heads} is not a multiple of num_key_value_heads = {kv_heads}")
    for key in ACTIVATION_FIELDS:
        value = config.get(key)
        if key in config and (not isinstance(value, str) or value not in ACT2FN):
            raise ValueError(f"{path}: {key} = {value!r} is not an activation transformers knows")
    _check_with_transformers(config, path)
    return config


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text.split(". Errors:")[0][:300]


def _check_with_transformers(config: dict[str, Any], path: str | os.PathLike) -> None:
    # transformers validates its config classes' fields when they are built (types, RoPE
    # settings, layer types), raising its own exception types with several lines; built here, the
    # error names the file. Model types transformers does not know are left to the loader.
    model_type = config["model_type"]
    base = model_type[len(PREFIX):] if model_type.startswith(PREFIX) else model_type
    if base not in CONFIG_MAPPING:
        return
    try:
        CONFIG_MAPPING[base].from_dict({k: v for k, v in config.items() if k not in _FOLDER_KEYS})
    except Exception as exc:  # huggingface_hub's StrictDataclass errors, TypeError, ValueError, ...
        raise ValueError(f"{path}: {_last_line(exc)}") from None


def check_generation_config(folder: str | os.PathLike) -> None:
    """Check a folder's ``generation_config.json`` (when it has one) as transformers will read it.

    Raises:
        ValueError: not a JSON object, or a value ``GenerationConfig`` refuses (the file named).
    """
    path = Path(folder) / GENERATION_CONFIG_NAME
    if not path.is_file():
        return
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a generation config (a JSON {type(data).__name__}, not an object)")
    try:
        GenerationConfig.from_dict(data).validate()
    except Exception as exc:  # ValueError, TypeError or transformers' own
        raise ValueError(f"{path}: {_last_line(exc)}") from None


def _estimated_params(config: dict[str, Any]) -> int | None:
    # A dense decoder or encoder of the config's sizes: embedding + per layer attention and MLP.
    hidden = _first(config, "hidden_size", "n_embd")
    layers = _first(config, "num_hidden_layers", "n_layer")
    if hidden is None or layers is None:
        return None
    inner = _first(config, "intermediate_size", "n_inner") or 4 * hidden
    vocab = config.get("vocab_size") or 0
    return vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * inner)


def check_config_against_weights(contents: FolderContents) -> None:
    """Refuse a config that describes more layers than the weights hold, or vastly more
    parameters than they could fill (a hostile ``num_hidden_layers: 1000000000`` would otherwise
    build for hours before the missing tensors are noticed).

    Raises:
        ValueError: names ``config.json``, the key and both counts.
    """
    path = contents.folder / CONFIG_NAME
    config = contents.config
    layers = _first(config, "num_hidden_layers", "n_layer")
    found = {int(m.group(1)) for name in contents.shapes for m in [_LAYER_INDEX.search(name)] if m}
    if layers is not None and found and layers > max(found) + 1:
        key = "num_hidden_layers" if config.get("num_hidden_layers") is not None else "n_layer"
        raise ValueError(f"{path}: {key} = {layers:,}, but the weights hold {max(found) + 1} layers")
    stored = sum(math.prod(shape) for shape in contents.shapes.values())
    estimate = _estimated_params(config)
    if estimate is not None and estimate > MAX_PARAMS_PER_STORED * stored + _PARAMS_SLACK:
        raise ValueError(f"{path}: the config describes a model of about {estimate:,} parameters, but the weights hold "
                         f"{stored:,} numbers; refusing to build it")


def read_folder_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The checked ``config.json`` of a local model folder: its entries checked
    (:func:`~kronlm.modeling.integrity.check_folder_entries`) and its values
    (:func:`check_config_values`). Cheap: no weights are read.

    Raises:
        FileNotFoundError: no folder, or no ``config.json`` (named).
        ValueError: a symlink out of the folder, a device or FIFO, a config that is not UTF-8 JSON
            or holds a bad value (named).
    """
    folder = Path(folder)
    if not folder.is_dir():
        previous = folder.with_name(f".{folder.name}.old")
        hint = f" (an interrupted save left the previous model at {previous}; the next save to this path puts it back)" if previous.is_dir() else ""
        raise FileNotFoundError(f"{folder}: model folder not found{hint}")
    check_folder_entries(folder)
    config_path = folder / CONFIG_NAME
    config = check_config_values(read_json(config_path), config_path)
    check_generation_config(folder)
    return config


def check_folder_files(folder: str | os.PathLike) -> FolderContents:
    """Check that a model folder has a readable config and complete safetensors weights.

    Checks: the folder's entries (no symlink leading out, no device or FIFO); ``config.json``
    exists, parses, names a ``model_type`` and holds sane sizes (:func:`check_config_values`,
    :func:`check_config_against_weights`); the weights
    (``model.safetensors``, or ``model.safetensors.index.json`` and its shards) lie inside the
    folder (no shard path or symlink leading out), exist and have valid headers; every tensor
    the index lists is in the shard it names. A folder that holds only a pickled
    ``pytorch_model.bin`` is refused: kronlm never unpickles weights.

    Raises:
        FileNotFoundError: the folder, the config or a weights file is missing (named).
        ValueError: a symlink out of the folder, a device or FIFO, a corrupt config or one with a
            bad value, a truncated or corrupt weights file, or an index that lists a tensor its
            shard does not hold (named).
    """
    folder = Path(folder)
    config = read_folder_config(folder)
    contents = FolderContents(folder, config)
    single, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
    if index.is_file():
        index_data = read_json(index)
        weight_map = index_data.get("weight_map") if isinstance(index_data, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no weight_map")
        for shard in sorted(set(weight_map.values())):
            if not isinstance(shard, str):
                raise ValueError(f"{index}: shard names must be strings, got {shard!r}")
            for name, shape in read_safetensors_shapes(inside(folder, shard, "shard")).items():
                contents.tensor_files[name], contents.shapes[name] = shard, shape
        missing = sorted(set(weight_map) - set(contents.shapes))
        if missing:
            raise ValueError(f"{index}: lists tensor {missing[0]} in {weight_map[missing[0]]}, which does not hold it")
        check_config_against_weights(contents)
        return contents
    if not single.is_file():
        if (folder / "pytorch_model.bin").is_file():
            raise ValueError(
                f"{folder}: holds only pytorch_model.bin, a pickled checkpoint kronlm does not load "
                "(loading it could run code); convert it to safetensors with a tool you trust"
            )
        raise FileNotFoundError(f"{single}: weights file not found (nor {INDEX_NAME})")
    inside(folder, WEIGHTS_NAME, "weights file")
    for name, shape in read_safetensors_shapes(single).items():
        contents.tensor_files[name], contents.shapes[name] = WEIGHTS_NAME, shape
    check_config_against_weights(contents)
    return contents


def check_loading_info(
    info: dict[str, Any],
    contents: FolderContents,
    *,
    strict: bool,
    required_prefixes: tuple[str, ...] = (),
) -> None:
    """Refuse a load that transformers completed by re-initialising or dropping tensors.

    Args:
        info: the dict ``from_pretrained(..., output_loading_info=True)`` returned
            (``missing_keys``, ``unexpected_keys``, ``mismatched_keys``).
        contents: the folder's :func:`check_folder_files` result (names files in messages).
        strict: the folder was saved from the class that loaded it, so every tensor must match;
            otherwise (a task head over a saved base model, a base model from a saved task
            model) only tensors under ``required_prefixes`` must be present.
        required_prefixes: module name prefixes (with a trailing dot) whose tensors must load
            even when not strict: the Kronecker modules of a compressed model.

    Raises:
        ValueError: a tensor saved with another shape than the config needs, a required tensor
            missing, or (strict) a tensor in the file that the model does not have; the message
            names the file, the tensor and the shapes.
    """
    for name, saved_shape, model_shape in sorted(info.get("mismatched_keys") or (), key=lambda t: t[0]):
        raise ValueError(
            f"{contents.file_of(name)}: tensor {name} has shape {tuple(saved_shape)}, the config needs {tuple(model_shape)}"
        )

    def required(name: str) -> bool:
        return strict or any(name.startswith(p) or f".{p}" in f".{name}" for p in required_prefixes)

    missing = sorted(n for n in info.get("missing_keys") or () if required(n))
    if missing:
        raise ValueError(
            f"{contents.file_of(missing[0])}: tensor {missing[0]} of the model is missing from the weights "
            f"({len(missing)} missing in all)"
        )
    unexpected = sorted(info.get("unexpected_keys") or ())
    if strict and unexpected:
        raise ValueError(
            f"{contents.file_of(unexpected[0])}: tensor {unexpected[0]} (shape {contents.shapes.get(unexpected[0])}) "
            f"is not part of the model the config describes ({len(unexpected)} such tensors)"
        )


__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "WEIGHTS_NAME",
    "FolderContents",
    "check_config_against_weights",
    "check_config_values",
    "check_folder_files",
    "check_generation_config",
    "check_loading_info",
    "read_folder_config",
    "read_safetensors_shapes",
]
