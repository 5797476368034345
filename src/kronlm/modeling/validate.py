"""Checks of a saved model folder, before and after transformers reads it, so every problem names
its file and tensor.

Before loading, :func:`check_folder_files` reads ``config.json`` and the safetensors headers
(``safetensors.safe_open``, which refuses truncated files, bad offsets and unknown dtypes).
After loading, :func:`check_loading_info` reads transformers' own report
(``from_pretrained(..., output_loading_info=True)``) and turns a missing, unexpected or reshaped
tensor into an error: transformers itself only warns and re-initialises, which for a compressed
model would silently give garbage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from kronlm.modeling.integrity import inside
from kronlm.utils.io import read_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


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


def check_folder_files(folder: str | os.PathLike) -> FolderContents:
    """Check that a model folder has a readable config and complete safetensors weights.

    Checks: ``config.json`` exists, parses and names a ``model_type``; the weights
    (``model.safetensors``, or ``model.safetensors.index.json`` and its shards) lie inside the
    folder (no shard path or symlink leading out), exist and have valid headers; every tensor
    the index lists is in the shard it names. A folder that holds only a pickled
    ``pytorch_model.bin`` is refused: kronlm never unpickles weights.

    Raises:
        FileNotFoundError: the folder, the config or a weights file is missing (named).
        ValueError: a corrupt config, a truncated or corrupt weights file, or an index that lists
            a tensor its shard does not hold (named).
    """
    folder = Path(folder)
    if not folder.is_dir():
        previous = folder.with_name(f".{folder.name}.old")
        hint = f" (an interrupted save left the previous model at {previous}; the next save to this path puts it back)" if previous.is_dir() else ""
        raise FileNotFoundError(f"{folder}: model folder not found{hint}")
    config_path = folder / CONFIG_NAME
    config = read_json(config_path)
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"{config_path}: not a model config (no model_type)")
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
    "check_folder_files",
    "check_loading_info",
    "read_safetensors_shapes",
]
