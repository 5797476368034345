"""Teacher hidden states at every block boundary, computed once and kept on disk.

Block-wise distillation (:mod:`kronlm.distill.blockwise`) trains each compressed transformer block
to map the hidden states entering a teacher block to the ones leaving it. Those boundaries,
``h_0`` (the embedding output, the input of block 0) to ``h_L`` (the raw output of the last
block, before the final norm), are computed here in one pass of the teacher over the training
tokens and written to one safetensors file, tensor ``h.{l:03d}`` of shape (sequences, tokens, hidden)
in bfloat16 or float16, with a JSON manifest that names what made it: a fingerprint of the
teacher's weights and config, a SHA-256 of the token ids, the dtype. A later run (or the next
block of the same run) reuses the file only when all of these match.

The file is written as it is computed, batch by batch, at known offsets of a pre-sized file
(safetensors has no streaming writer; the format is an 8-byte header length, a JSON header of
dtypes, shapes and byte ranges, then the raw tensors), so memory holds one batch, not the cache.
Readers use ``safetensors.safe_open``. The size is printed before writing and a disk that cannot
hold it is refused up front.

The keyword arguments a block receives from its model (attention mask, rotary position
embeddings, position ids) are captured from block 0 during the same pass
(:func:`capture_block_kwargs`), so any architecture whose blocks are called with a hidden state
and keyword arguments works (Llama, GPT-2, BERT, ...).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from kronlm.compression.truncate import find_block_list
from kronlm.distill.fingerprint import model_fingerprint, tokens_fingerprint
from kronlm.utils.atomic import (
    atomic_path,
    clean_interrupted_writes,
    folder_lock,
    write_json,
)
from kronlm.utils.files import read_json

CACHE_FORMAT = "kronlm.hidden_cache/1"
CACHE_FILE = "hidden.safetensors"
MANIFEST_FILE = "hidden.json"
CACHE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_SAFETENSORS_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def boundary_name(index: int) -> str:
    """The tensor name of boundary ``index`` (0 = the input of block 0)."""
    return f"h.{index:03d}"


class _BlockKwargs(Exception):
    """Raised by the capture hook to stop the forward pass once block 0's arguments are known."""


def capture_block_kwargs(model: nn.Module, input_ids: torch.Tensor) -> dict[str, Any]:
    """The keyword arguments the model passes to its first block for ``input_ids`` (batch, seq).

    Runs the base model until block 0 is called (``use_cache=False``), records its keyword
    arguments (attention mask, position embeddings, position ids, ...) and stops. Every block of
    the stack receives the same ones for inputs of that shape.

    Raises:
        ValueError: the model has no recognisable block list (see ``find_block_list``).
    """
    _, blocks = find_block_list(model)
    captured: dict[str, Any] = {}

    def hook(module, args, kwargs):
        captured.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _BlockKwargs

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model.base_model(input_ids=input_ids, use_cache=False)
    except _BlockKwargs:
        pass
    finally:
        handle.remove()
    captured.pop("use_cache", None)
    captured.pop("past_key_values", None)
    captured.pop("cache", None)
    return captured


def block_output(output: Any) -> torch.Tensor:
    """The hidden state a block returns (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass(frozen=True)
class CacheKey:
    """What a hidden-state cache was computed from.

    Attributes:
        teacher: :func:`kronlm.distill.fingerprint.model_fingerprint` of the teacher.
        tokens: :func:`kronlm.distill.fingerprint.tokens_fingerprint` of the (sequences, seq_len) token ids.
        dtype: the storage dtype name ("bfloat16", "float16", "float32").
    """

    teacher: str
    tokens: str
    dtype: str

    def to_dict(self) -> dict[str, str]:
        """JSON form."""
        return {"teacher": self.teacher, "tokens": self.tokens, "dtype": self.dtype}


class HiddenStateCache:
    """A written cache: ``boundary(l)`` reads h_l as a (sequences, seq_len, hidden) tensor.

    Args:
        folder: the cache folder (``hidden.safetensors`` and ``hidden.json``).

    Raises:
        FileNotFoundError: no cache in ``folder``.
        ValueError: a manifest that is not a kronlm cache, or a file whose size differs from the
            manifest (truncated), named.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.manifest = read_json(self.folder / MANIFEST_FILE)
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != CACHE_FORMAT:
            raise ValueError(f"{self.folder / MANIFEST_FILE}: not a kronlm hidden-state cache (format {CACHE_FORMAT})")
        path = self.folder / CACHE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: hidden-state cache file missing")
        if path.stat().st_size != self.manifest.get("bytes"):
            raise ValueError(f"{path}: {path.stat().st_size} bytes, the manifest says {self.manifest.get('bytes')} (truncated cache)")
        self.num_boundaries = int(self.manifest["boundaries"])
        self.shape = tuple(self.manifest["shape"])

    @property
    def key(self) -> CacheKey:
        """What the cache was computed from."""
        return CacheKey(**self.manifest["key"])

    def boundary(self, index: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """h_index as a (sequences, seq_len, hidden) tensor of ``dtype``, read into memory.

        Raises:
            IndexError: ``index`` outside 0 .. num_boundaries - 1.
            ValueError: the file cannot be read (named).
        """
        if not 0 <= index < self.num_boundaries:
            raise IndexError(f"hidden-state cache {self.folder} has boundaries 0..{self.num_boundaries - 1}, not {index}")
        try:
            with safe_open(str(self.folder / CACHE_FILE), framework="pt") as handle:
                return handle.get_tensor(boundary_name(index)).to(dtype)
        except SafetensorError as exc:
            raise ValueError(f"{self.folder / CACHE_FILE}: unreadable hidden-state cache ({exc})") from None

    def check(self, key: CacheKey) -> None:
        """Refuse a cache made from another teacher, other tokens or another dtype.

        Raises:
            ValueError: names what differs.
        """
        mine = self.key
        differs = [f"{name} {getattr(mine, name)[:12]} != {getattr(key, name)[:12]}" for name in ("teacher", "tokens", "dtype")
                   if getattr(mine, name) != getattr(key, name)]
        if differs:
            raise ValueError(f"hidden-state cache {self.folder} was made for another run ({'; '.join(differs)}); "
                             "delete it or point --cache-dir elsewhere")


def _header(names: list[str], shape: tuple[int, ...], dtype: torch.dtype) -> tuple[bytes, int]:
    per = int(torch.tensor([], dtype=dtype).element_size())
    for dim in shape:
        per *= dim
    header = {name: {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(shape), "data_offsets": [i * per, (i + 1) * per]}
              for i, name in enumerate(names)}
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data on 8 bytes
    return raw, per


def build_hidden_cache(
    teacher: nn.Module,
    input_ids: torch.Tensor,
    folder: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    batch_size: int = 4,
    progress: bool = True,
) -> HiddenStateCache:
    """Run the teacher over ``input_ids`` and write every block boundary's hidden states.

    An existing cache in ``folder`` made from the same teacher, tokens and dtype is reused
    without running the teacher.

    Args:
        teacher: a Hugging Face model with one stack of blocks (its LM head is not run).
        input_ids: (sequences, seq_len) token ids.
        folder: where ``hidden.safetensors`` and ``hidden.json`` go.
        dtype: storage dtype, "bfloat16" (default), "float16" or "float32".
        batch_size: sequences per teacher forward pass.
        progress: tqdm bar.

    Returns:
        The :class:`HiddenStateCache`.

    Raises:
        ValueError: an unknown dtype, input ids that are not (sequences, seq_len), a teacher
            without a block list, or a cache in ``folder`` made for another run.
        OSError: the disk cannot hold the cache (the message gives both sizes in bytes);
            another process is writing the cache (``FolderBusyError``).
    """
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype must be one of {', '.join(CACHE_DTYPES)}, got {dtype!r}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (sequences, seq_len), got shape {tuple(input_ids.shape)}")
    folder = Path(folder)
    key = CacheKey(model_fingerprint(teacher), tokens_fingerprint(input_ids), dtype)
    # One writer per cache folder (two runs sharing a --cache-dir do not both compute it); a
    # killed writer's partial file (gigabytes) is removed first.
    with folder_lock(folder.absolute()):
        clean_interrupted_writes(folder, names=(CACHE_FILE, MANIFEST_FILE))
        if (folder / MANIFEST_FILE).is_file():
            cache = HiddenStateCache(folder)
            cache.check(key)
            return cache
        return _write_cache(teacher, input_ids, folder, key, batch_size, progress)


def _write_cache(teacher: nn.Module, input_ids: torch.Tensor, folder: Path, key: CacheKey, batch_size: int,
                 progress: bool) -> HiddenStateCache:
    dtype = key.dtype
    _, blocks = find_block_list(teacher)
    hidden = teacher.config.get_text_config().hidden_size
    shape = (input_ids.shape[0], input_ids.shape[1], hidden)
    torch_dtype = CACHE_DTYPES[dtype]
    names = [boundary_name(i) for i in range(len(blocks) + 1)]
    header, per_tensor = _header(names, shape, torch_dtype)
    total = 8 + len(header) + per_tensor * len(names)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    tqdm.write(f"hidden-state cache: {len(names)} boundaries x {shape} {dtype} = {total / 1e9:.2f} GB in {folder}")
    if total > free:
        raise OSError(f"hidden-state cache needs {total:,} bytes but {folder} has {free:,} free; use fewer tokens, "
                      "float16/bfloat16, or another --cache-dir")
    row_bytes = per_tensor // shape[0]
    captured: list[torch.Tensor | None] = [None] * len(names)

    def keep_input(index: int):
        def hook(module, args, kwargs):
            captured[index] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    def keep_output(module, args, output):
        captured[-1] = block_output(output).detach()

    handles = [block.register_forward_pre_hook(keep_input(i), with_kwargs=True) for i, block in enumerate(blocks)]
    handles.append(blocks[-1].register_forward_hook(keep_output))
    was_training = teacher.training
    teacher.eval()
    data_start = 8 + len(header)
    try:
        with atomic_path(folder / CACHE_FILE) as tmp, open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(header)) + header)
            fh.truncate(total)
            bar = tqdm(total=shape[0] * shape[1], unit="tok", unit_scale=True, desc="teacher hidden states", disable=not progress)
            with torch.no_grad():
                for start in range(0, shape[0], batch_size):
                    batch = input_ids[start : start + batch_size]
                    teacher.base_model(input_ids=batch, use_cache=False)
                    for i, tensor in enumerate(captured):
                        rows = tensor.to("cpu", torch_dtype).contiguous()
                        fh.seek(data_start + i * per_tensor + start * row_bytes)
                        fh.write(rows.view(torch.uint8).numpy().tobytes())
                    bar.update(batch.numel())
            bar.close()
            fh.flush()
    finally:
        for handle in handles:
            handle.remove()
        teacher.train(was_training)
    write_json(folder / MANIFEST_FILE, {"format": CACHE_FORMAT, "key": key.to_dict(), "boundaries": len(names),
                                        "shape": list(shape), "bytes": total})
    return HiddenStateCache(folder)


__all__ = [
    "CACHE_DTYPES",
    "CacheKey",
    "HiddenStateCache",
    "block_output",
    "boundary_name",
    "build_hidden_cache",
    "capture_block_kwargs",
]
