"""Integrity of saved model folders: a checksum manifest, finite weights, files that stay inside.

``kronlm.save`` (and a compressed model's ``save_pretrained``) records the size and SHA-256 of
every file it writes in ``kronlm_manifest.json``; loading verifies them, so flipped bytes, swapped
tensors or a relabelled dtype are refused naming the file instead of changing the logits. Weights
that are NaN or infinite are refused before saving and after loading, naming the tensor. Every
file a folder holds or points to (the index's shards, a symlinked ``model.safetensors`` or
``generation_config.json``) must lie inside the folder and be a regular file (no device, no FIFO).

A folder without a manifest (written by another tool, or by kronlm before manifests existed)
loads without checksum verification; the other checks still apply.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kronlm.utils.files import (
    file_sha256,
    read_json,
    special_file_kind,
)
from kronlm.utils.outputs import (
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    write_manifest,
)


def inside(folder: str | os.PathLike, relative: str | os.PathLike, what: str = "file") -> Path:
    """``folder / relative``, refusing a path (or a symlink) that leads outside ``folder``.

    Raises:
        ValueError: an absolute path, ``..`` components or a symlink whose target is not in the
            folder (the message names both).
    """
    folder = Path(folder)
    candidate = folder / relative
    root = folder.resolve()
    target = candidate.resolve()
    if Path(relative).is_absolute() or (target != root and root not in target.parents):
        raise ValueError(f"{folder}: {what} {str(relative)!r} points outside the model folder (to {target}); refusing to read it")
    return candidate


def check_folder_entries(folder: str | os.PathLike) -> None:
    """Refuse a model folder with an entry kronlm or transformers might open that is not a plain
    file or folder inside it: a symlink leading outside the folder (listed in the manifest or not:
    ``generation_config.json -> /dev/zero``), a device, a FIFO or a socket.

    Only the folder's own entries are checked (transformers reads nothing from subfolders of a
    local model folder).

    Raises:
        ValueError: names the entry and what it is or where it points.
    """
    folder = Path(folder)
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            inside(folder, entry.name, "weights file" if entry.suffix == ".safetensors" else "file")
        special = special_file_kind(entry)
        if special is not None:
            raise ValueError(f"{entry}: is {special}, not a regular file; refusing to read the model folder")


def verify_manifest(folder: str | os.PathLike, *, hashes: bool = True) -> dict[str, Any] | None:
    """Check every file the folder's manifest lists: present, same size, same SHA-256.

    Args:
        folder: a saved model folder.
        hashes: also compare SHA-256 (reads every byte once; sizes only when False).

    Returns:
        The manifest, or None when the folder has none.

    Raises:
        FileNotFoundError: a listed file is missing (named).
        ValueError: a malformed manifest, a listed path outside the folder, or a file whose size
            or SHA-256 differs from the one recorded when the model was saved (named).
    """
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return None
    manifest = read_json(path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: not a kronlm manifest (expected format {MANIFEST_FORMAT!r} with a files mapping)")
    for name, entry in files.items():
        file = inside(folder, name, "manifest entry")
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or not isinstance(entry.get("sha256"), str):
            raise ValueError(f"{path}: entry {name!r} needs integer bytes and a sha256 string")
        if not file.is_file():
            raise FileNotFoundError(f"{file}: listed in {MANIFEST_FILE} but missing")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise ValueError(f"{file}: {size} bytes, but {entry['bytes']} when the model was saved (truncated or replaced)")
        if hashes and file_sha256(file) != entry["sha256"]:
            raise ValueError(f"{file}: SHA-256 differs from the one recorded when the model was saved (the file was changed or is corrupt)")
    return manifest


def check_finite(model: nn.Module, what: str = "model") -> None:
    """Refuse NaN or infinite values in any floating-point tensor of ``model.state_dict()``
    (parameters and persistent buffers; masks kept as non-persistent buffers may hold -inf).

    Raises:
        ValueError: names the first such tensor and how many of its entries are bad.
    """
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point() or tensor.is_meta:
                continue
            bad = (~torch.isfinite(tensor)).sum().item()
            if bad:
                raise ValueError(f"{what}: tensor {name} {tuple(tensor.shape)} holds {bad} NaN or infinite values")


__all__ = ["MANIFEST_FILE", "check_finite", "check_folder_entries", "inside", "verify_manifest", "write_manifest"]
