"""Fingerprints of what a training run is made of: the models, the data and the settings.

A resumed run (``kronlm distill --resume``, :meth:`kronlm.distill.trainer.Trainer.run` with
``resume=True``) must continue the *same* run, or its final weights silently differ from an
uninterrupted one. The checkpoint therefore records a :class:`RunFingerprint`: SHA-256 digests of
the training and validation data actually used (the token ids after ``--max-tokens`` and
``--val-fraction`` were applied, not a file's size and mtime), of the teacher's weights and config,
of the student's weights *before* training, and the settings that change the result. A resume
computes the same from the inputs it is given and refuses any difference, naming it
(:func:`compare_fingerprints`). The teacher hidden-state cache of block-wise distillation
(:mod:`kronlm.distill.hidden_cache`) is keyed by the same model and token digests.

Cost: SHA-256 reads every byte once, about 0.5-1 s per GB on one core (SmolLM2-135M in float32,
0.54 GB, takes about 1 s); hashing goes through ``hashlib`` on the tensors' memory, without copies
beyond a device-to-CPU transfer.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

# Digests are shown with this many hex digits in messages (48 bits: no accidental collision).
SHORT = 12


def _tensor_bytes(tensor: torch.Tensor) -> memoryview | bytes:
    """The raw bytes of a tensor (moved to the CPU, made contiguous), without a copy when possible."""
    data = tensor.detach().to("cpu").contiguous()
    if data.numel() == 0:
        return b""
    if data.dim() == 0:
        data = data.reshape(1)
    return memoryview(data.view(torch.uint8).numpy())


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over a model's config and every tensor of its state dict (names, shapes, dtypes, bytes).

    Identifies a teacher or a student's starting point for caches and resumed runs: any changed
    weight changes it. Reads every parameter once (about 1 s for 135M float32 parameters on one
    core). The digest of a model is the same whatever device it is on.

    Args:
        model: any ``nn.Module``; a Hugging Face model's ``config.to_json_string`` is hashed too.

    Returns:
        64 hex digits.

    Raises:
        RuntimeError: a tensor on the meta device (no weights to hash).
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        digest.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.is_meta:
            raise RuntimeError(f"cannot fingerprint {type(model).__name__}: tensor {name} is on the meta device")
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def tokens_fingerprint(input_ids: torch.Tensor) -> str:
    """SHA-256 of token ids (any integer dtype; hashed as int64) and their shape.

    Args:
        input_ids: integer tensor of any shape, e.g. (blocks, block_size).

    Returns:
        64 hex digits.
    """
    ids = input_ids.detach().to("cpu", torch.int64).contiguous()
    digest = hashlib.sha256(f"{tuple(ids.shape)}".encode())
    digest.update(_tensor_bytes(ids))
    return digest.hexdigest()


def _update(digest: Any, value: Any, where: str) -> None:
    """Feed one example (nested dicts, lists, tensors, arrays, scalars) into ``digest``."""
    if isinstance(value, torch.Tensor):
        digest.update(f"T{tuple(value.shape)}{value.dtype}".encode())
        digest.update(_tensor_bytes(value))
    elif isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        digest.update(f"A{array.shape}{array.dtype}".encode())
        digest.update(memoryview(array).cast("B") if array.size else b"")
    elif isinstance(value, Mapping):
        digest.update(b"{")
        for key in sorted(value, key=str):
            digest.update(f"{key!s}:".encode())
            _update(digest, value[key], where)
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _update(digest, item, where)
        digest.update(b"]")
    elif value is None or isinstance(value, (bool, int, float, str, bytes, np.generic)):
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    else:
        raise ValueError(f"cannot fingerprint {where}: an example holds a {type(value).__name__}; "
                         "give the dataset a 'fingerprint' attribute (a string naming its content)")


def data_fingerprint(data: Any, what: str = "data") -> str | None:
    """SHA-256 of the examples a run trains (or validates) on.

    - a tensor (token blocks (N, block_size)): :func:`tokens_fingerprint`;
    - an object with a ``fingerprint`` attribute (a string, or a method returning one): that,
      for datasets too large to hash cheaply (block-wise distillation's hidden-state pairs name
      the teacher cache, the block and the input mode instead);
    - any other map-style dataset (a list of example dicts too): every example, in order, with
      its keys, tensor shapes, dtypes and bytes.

    Args:
        data: the data, or None.
        what: named in errors ("training data", "validation data").

    Returns:
        64 hex digits (or the dataset's own fingerprint), None for None.

    Raises:
        ValueError: an example holds something other than tensors, arrays, numbers, strings,
            lists or dicts (named).
    """
    if data is None:
        return None
    if isinstance(data, torch.Tensor):
        return tokens_fingerprint(data) if not data.is_floating_point() else _tensor_digest(data)
    own = getattr(data, "fingerprint", None)
    if callable(own):
        own = own()
    if isinstance(own, str):
        return own
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise ValueError(f"cannot fingerprint {what}: {type(data).__name__} is neither a tensor nor a map-style dataset")
    digest = hashlib.sha256(f"dataset:{len(data)}".encode())
    for index in range(len(data)):
        _update(digest, data[index], f"{what} example {index}")
    return digest.hexdigest()


def _tensor_digest(tensor: torch.Tensor) -> str:
    digest = hashlib.sha256()
    _update(digest, tensor, "tensor")
    return digest.hexdigest()


@dataclass
class RunFingerprint:
    """What a training run is made of, as recorded in its checkpoints' ``trainer_state.json``.

    Attributes:
        train_data: :func:`data_fingerprint` of the training examples actually used.
        val_data: the same for the validation examples (None without).
        teacher: :func:`model_fingerprint` of the teacher (None without one).
        student_start: :func:`model_fingerprint` of the student before its first step (None when
            not recorded).
        settings: settings outside the training config that change the result, as the caller
            names them (the command line's ``--data``, ``--max-tokens``, ``--val-fraction``, ...);
            JSON values.
    """

    train_data: str | None
    val_data: str | None = None
    teacher: str | None = None
    student_start: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "run fingerprint") -> RunFingerprint:
        """Read the JSON form.

        Raises:
            ValueError: not a mapping, an unknown key, or a digest that is not a string or null
                (names ``where`` and the key).
        """
        if not isinstance(data, dict):  # ValueError: a bad file's content, reported as one line by the CLI
            raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")  # noqa: TRY004
        unknown = sorted(set(data) - {"train_data", "val_data", "teacher", "student_start", "settings"})
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r}")
        for key in ("train_data", "val_data", "teacher", "student_start"):
            value = data.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{where}: {key} = {value!r} is not a digest string or null")
        settings = data.get("settings", {})
        if not isinstance(settings, dict):
            raise ValueError(f"{where}: settings = {settings!r} is not a mapping")  # noqa: TRY004
        return cls(data.get("train_data"), data.get("val_data"), data.get("teacher"), data.get("student_start"), dict(settings))


def _short(digest: str | None) -> str:
    return "none" if digest is None else digest[:SHORT]


def _same(a: Any, b: Any) -> bool:
    # JSON turns tuples into lists and may turn 1.0 into 1; compare the JSON forms, NaN equal to NaN.
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def compare_fingerprints(saved: RunFingerprint, current: RunFingerprint, *, check_student: bool = True) -> list[str]:
    """The differences between a checkpoint's run fingerprint and the current inputs, in words.

    Args:
        saved: the checkpoint's fingerprint.
        current: the fingerprint of the inputs given now.
        check_student: compare the student's starting point too (a caller that passes an arbitrary
            model on resume, whose weights the checkpoint replaces anyway, sets False).

    Returns:
        One phrase per difference, e.g. ``"training data differ (sha256 1a2b3c4d5e6f in the
        checkpoint, 9f8e7d6c5b4a now)"``, ``"--max-tokens 1000 -> 2000"``; empty when the same.
    """
    out = []
    changed_settings = []
    for key in sorted(set(saved.settings) | set(current.settings)):
        old, new = saved.settings.get(key), current.settings.get(key)
        if not _same(old, new):
            changed_settings.append(f"{key} {old!r} -> {new!r}")
    for key, label in (("train_data", "training data"), ("val_data", "validation data")):
        old, new = getattr(saved, key), getattr(current, key)
        if old != new:
            cause = "" if changed_settings else ": their content changed"
            out.append(f"{label} differ (sha256 {_short(old)} in the checkpoint, {_short(new)} now{cause})")
    if saved.teacher != current.teacher:
        out.append(f"teacher differs (weights/config sha256 {_short(saved.teacher)} in the checkpoint, {_short(current.teacher)} now)")
    if check_student and saved.student_start is not None and saved.student_start != current.student_start:
        out.append(f"starting student differs (weights/config sha256 {_short(saved.student_start)} in the checkpoint, "
                   f"{_short(current.student_start)} now)")
    return changed_settings + out


__all__ = [
    "RunFingerprint",
    "compare_fingerprints",
    "data_fingerprint",
    "model_fingerprint",
    "tokens_fingerprint",
]
