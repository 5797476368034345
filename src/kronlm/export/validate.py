"""Check a saved model folder before transformers reads it, so every problem names its file.

transformers re-initialises weights that are missing from a checkpoint with a warning; for a
compressed model that would silently produce garbage. ``validate_folder`` reads only the JSON
files and the safetensors headers (no tensor data) and compares them with the architecture the
config describes, built on the meta device.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """Read and check the header of a safetensors file without loading tensors.

    Returns:
        {tensor name: {"dtype", "shape", "data_offsets"}} (the ``__metadata__`` entry removed).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is shorter than its header says (truncated), the header is not
            JSON, or a tensor's byte range does not fit its shape; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise ValueError(f"{path}: truncated safetensors file: header of {header_len} bytes, file has {size - 8} after the length")
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path}: corrupt safetensors header (not JSON)") from None
    header.pop("__metadata__", None)
    data_bytes = size - 8 - header_len
    end = 0
    for name, info in header.items():
        start, stop = info["data_offsets"]
        numel = 1
        for dim in info["shape"]:
            numel *= dim
        if stop - start != numel * _DTYPE_BYTES.get(info["dtype"], 0) and info["dtype"] in _DTYPE_BYTES:
            raise ValueError(f"{path}: tensor {name} has {stop - start} bytes but shape {info['shape']} of {info['dtype']}")
        end = max(end, stop)
    if end > data_bytes:
        raise ValueError(f"{path}: truncated safetensors file: tensors need {end} bytes of data, the file has {data_bytes}")
    return header


def _weight_headers(folder: Path) -> dict[str, tuple[str, dict]]:
    single, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
    if index.is_file():
        from kronlm.utils.io import read_json

        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no weight_map")
        out = {}
        for shard in sorted(set(weight_map.values())):
            for name, info in read_safetensors_header(folder / shard).items():
                out[name] = (shard, info)
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise ValueError(f"{index}: lists tensor {missing[0]} in {weight_map[missing[0]]}, which does not hold it")
        return out
    if not single.is_file():
        raise FileNotFoundError(f"{single}: weights file not found (nor {INDEX_NAME})")
    return {name: (WEIGHTS_NAME, info) for name, info in read_safetensors_header(single).items()}


def validate_folder(folder: str | os.PathLike, model_class=None) -> None:
    """Check that a saved model folder is complete and consistent with its config.

    Checks: ``config.json`` exists and parses; the weights (``model.safetensors`` or a sharded
    index) exist and are not truncated; for a kronlm model, every tensor the architecture needs
    is present with the right shape and no unknown tensor is there.

    Args:
        folder: the saved model folder.
        model_class: the class that will load it (default: from the config's Auto mapping).

    Raises:
        FileNotFoundError: a missing file (named).
        ValueError: a truncated or corrupt file, or a tensor missing, unexpected or of the wrong
            shape (the message names the file and the tensor).
    """
    from kronlm.utils.io import read_json

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: model folder not found")
    config_path = folder / "config.json"
    config_dict = read_json(config_path)
    if not isinstance(config_dict, dict) or "model_type" not in config_dict:
        raise ValueError(f"{config_path}: not a model config (no model_type)")
    headers = _weight_headers(folder)
    if not config_dict.get("kronlm"):
        return
    from transformers import AutoConfig, AutoModel

    from kronlm.models.registry import base_model_type, register_architecture, saved_model_class

    register_architecture(base_model_type(config_dict["model_type"]))
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{config_path}: inconsistent config ({str(exc).splitlines()[0]})") from None
    if model_class is None:
        model_class = saved_model_class(config_dict) or AutoModel._model_mapping[type(config)]
    with torch.device("meta"):
        try:
            model = model_class(config)
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"{config_path}: cannot build the model it describes ({str(exc).splitlines()[0]})") from None
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    saved = {name: (file, tuple(info["shape"])) for name, (file, info) in headers.items()}
    # A checkpoint written for the task model (prefix "model.") may be read by the base model, and the other way.
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and not any(k.startswith(prefix + ".") for k in expected) and any(k.startswith(prefix + ".") for k in saved):
        saved = {k[len(prefix) + 1 :]: v for k, v in saved.items() if k.startswith(prefix + ".")}
    elif prefix and any(k.startswith(prefix + ".") for k in expected) and not any(k.startswith(prefix + ".") for k in saved):
        saved = {f"{prefix}.{k}": v for k, v in saved.items()}
    # Loading into another class than the saved one (a task head over a base model) legitimately
    # leaves the new head missing; only the Kronecker modules must then be complete.
    strict = model_class.__name__ in (config_dict.get("architectures") or [])
    planned = tuple(n + "." for n in config_dict["kronlm"]["modules"])
    for name, shape in expected.items():
        if not strict and not any(name.startswith(p) or name.startswith(f"{prefix}.{p}") or (prefix and f"{prefix}.{name}".startswith(p)) for p in planned):
            continue
        if name in saved:
            file, saved_shape = saved[name]
            if saved_shape != shape:
                raise ValueError(f"{folder / file}: tensor {name} has shape {saved_shape}, the config needs {shape}")
        elif name not in tied and _is_persistent(model, name):
            files = sorted({f for f, _ in saved.values()})
            raise ValueError(f"{folder / files[0]}: tensor {name} (shape {shape}) is missing")


def _is_persistent(model, name: str) -> bool:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return attr not in getattr(module, "_non_persistent_buffers_set", set())
