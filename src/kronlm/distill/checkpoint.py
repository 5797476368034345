"""Training checkpoints in safetensors + JSON, written atomically, verified on load.

A checkpoint holds full (unsharded) states whatever the process layout that wrote it (one
process, DDP, or FSDP, whose shards :mod:`kronlm.distill.distributed` gathers), so any layout
with the same number of processes resumes it. It is a folder ``<out_dir>/checkpoints/step-0000100/``
holding

- ``model.safetensors``: the model's state dict (tied tensors stored once, aliases in metadata);
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's per-parameter state tensors
  (AdamW's ``step``, ``exp_avg``, ``exp_avg_sq``) flattened as ``state.<param index>.<name>``, and
  its param groups (learning rates, betas, ...) as JSON;
- ``scheduler.json``: the learning-rate scheduler's state dict;
- ``rng.safetensors``: Python, NumPy, torch CPU and CUDA generator states of every process, one
  row per process rank;
- ``trainer_state.json``: step, tokens seen, data position, best validation metric, the
  training config and the run's fingerprint (:mod:`kronlm.distill.fingerprint`: digests of the
  data, the teacher and the starting student, and the settings that change the result);
- ``manifest.json``, written last: the size in bytes and SHA-256 of the other six files, so
  ``trainer_state.json`` is covered like the weights.

Why not Accelerate's ``save_state`` / ``load_state`` (checked in accelerate 1.15.0, the
installed version): resuming must not execute code from a file, and Accelerate cannot promise
that. ``accelerate/checkpointing.py`` line 340 (``load_custom_state``) reads every object
registered with ``register_for_checkpointing`` -- the way to store the trainer's progress and
data position -- with ``load(..., weights_only=False)``, i.e. full pickle; its RNG files
(``random_states_<rank>.pkl``) are pickles that ``accelerate/utils/other.py`` lines 460-483
(``load``) can only read with ``weights_only=True`` by allow-listing ``codecs.encode`` and NumPy's
``_reconstruct`` as unpickling globals, and any caller's ``load_kwargs`` may switch
``weights_only`` off; under FSDP with sharded state dicts it reads
``torch.distributed.checkpoint``'s ``.metadata`` file, which torch 2.13 opens with
``pickle.load`` (``torch/distributed/checkpoint/filesystem.py`` line 930). It also writes in
place (a kill mid-write leaves a half checkpoint that ``load_state`` would read), keeps no
checksums, and its FSDP checkpoints depend on the layout that wrote them, whereas these resume
DDP <-> FSDP. ``skip_first_batches`` is not needed: the data order is computed from
(seed, epoch, step) (:mod:`kronlm.distill.data_order`). ``ProjectConfiguration(total_limit=...)``
prunes by age only; :func:`prune_checkpoints` does the same but also spares the best checkpoint
and the one ``latest`` names.

Nothing here is pickled. The folder is assembled under a temporary name and swapped in
(:func:`kronlm.utils.atomic.atomic_dir`); only then is the ``latest`` pointer file rewritten
(atomically), so a run killed while writing leaves the previous checkpoint as latest. Every file
is checked against the manifest (size, SHA-256) before it is used, and ``trainer_state.json`` is
range-checked (:func:`check_trainer_state`): a step of -5 or a best step after the checkpoint's
step is refused naming the file, the key and the value. :func:`load_resumable_checkpoint` falls
back from a damaged latest checkpoint to the newest earlier one that verifies, and
:func:`clean_interrupted_writes` removes the temporary folders a killed run left.

Checkpoints of format 1 (before ``manifest.json``; ``trainer_state.json`` then held the manifest
of the other five files) still load; their ``trainer_state.json`` is range-checked but has no
checksum, and they record no run fingerprint.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from kronlm.utils.atomic import (
    atomic_dir,
    atomic_path,
    clean_interrupted_writes,
    remove_stale_locks,
)
from kronlm.utils.files import (
    file_sha256,
    read_json,
    read_text,
)

CHECKPOINTS_DIRNAME = "checkpoints"
LATEST_FILENAME = "latest"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_META_FILE = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
RNG_FILE = "rng.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "kronlm.checkpoint/2"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_DATA_FILES = (MODEL_FILE, OPTIMIZER_FILE, OPTIMIZER_META_FILE, SCHEDULER_FILE, RNG_FILE)
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint folder that is damaged or inconsistent: a file whose size or SHA-256 differs
    from the manifest, an unparsable file, or a ``trainer_state.json`` value out of range. The
    message names the file (and the key and value)."""


@dataclass
class Checkpoint:
    """The contents of one checkpoint folder, as loaded by :func:`load_checkpoint`.

    Attributes:
        path: the checkpoint folder.
        model_state: student state dict (name -> tensor on CPU), tied names restored; empty when
            loaded with ``model_and_optimizer=False``.
        optimizer_state: a ``torch.optim.Optimizer.state_dict()``-shaped dict (empty likewise).
        scheduler_state: a ``torch.optim.lr_scheduler.LRScheduler.state_dict()``-shaped dict.
        rng_state: name -> tensor with one row per process rank (see :func:`capture_rng_state`).
        trainer_state: the JSON written by the trainer (``step``, ``tokens_seen``, ``config``, ...).
    """

    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    rng_state: dict[str, torch.Tensor]
    trainer_state: dict[str, Any]

    @property
    def step(self) -> int:
        """Optimizer steps completed when the checkpoint was written."""
        return int(self.trainer_state["step"])

    @property
    def format_version(self) -> int:
        """1: ``trainer_state.json`` without checksum and run fingerprint; 2: the current format."""
        return int(self.trainer_state.get("format_version", 1))


# ------------------------------------------------------------------------------------------------
# folder layout


def checkpoints_dir(out_dir: str | Path) -> Path:
    """``<out_dir>/checkpoints``."""
    return Path(out_dir) / CHECKPOINTS_DIRNAME


def step_dirname(step: int) -> str:
    """Folder name of the checkpoint after ``step`` optimizer steps: ``step-0000100``."""
    return f"step-{step:07d}"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoint folders under ``<out_dir>/checkpoints``, sorted by step.

    Temporary folders of interrupted writes (``.step-....tmp``) are not listed.
    """
    root = checkpoints_dir(out_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The folder the ``latest`` pointer names, or None when no checkpoint was completed.

    Raises:
        FileNotFoundError: ``latest`` names a folder that does not exist.
        ValueError: ``latest`` does not hold a checkpoint folder name.
    """
    pointer = checkpoints_dir(out_dir) / LATEST_FILENAME
    if not pointer.is_file():
        return None
    name = read_text(pointer, what="checkpoint pointer").strip()
    if not _STEP_DIR.match(name):
        raise ValueError(f"{pointer}: expected a checkpoint folder name like step-0000100, got {name[:60]!r}")
    path = pointer.parent / name
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {name}, but the folder {path} does not exist")
    return path


# ------------------------------------------------------------------------------------------------
# model state


def model_state_to_safetensors(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a state dict into unique contiguous CPU tensors plus ``alias -> kept name`` metadata.

    Tied parameters (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) are the same tensor
    under two names; safetensors refuses shared storage, so each is stored once.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state_dict.items():
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors, aliases


def save_model_state(state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write a state dict to one safetensors file (tied tensors once, aliases in its metadata)."""
    tensors, aliases = model_state_to_safetensors(state_dict)
    metadata = {"format": "pt", "kronlm_aliases": json.dumps(aliases)}
    save_file(tensors, str(path), metadata=metadata)


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict written by :func:`save_model_state`, restoring tied names.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable safetensors file (names the file).
    """
    tensors, metadata = _read_safetensors(path)
    aliases = json.loads(metadata.get("kronlm_aliases", "{}"))
    for alias, kept in aliases.items():
        tensors[alias] = tensors[kept]
    return tensors


# ------------------------------------------------------------------------------------------------
# optimizer state


def optimizer_state_to_safetensors(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten ``optimizer.state_dict()`` into tensors and JSON.

    Args:
        state_dict: ``{"state": {param index: {name: tensor or number}}, "param_groups": [...]}``.

    Returns:
        ``(tensors, meta)``: tensors named ``state.<index>.<name>`` (CPU, contiguous), and a JSON
        dict with the param groups and any non-tensor per-parameter values.

    Raises:
        ValueError: a param-group or state value is neither a tensor nor JSON-serialisable.
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if "." in name:
                raise ValueError(f"optimizer state name {name!r} of parameter {index} contains a dot")
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = _json_checked(value, f"optimizer state {index}.{name}")
    groups = [_json_checked(dict(group), f"optimizer param group {i}") for i, group in enumerate(state_dict["param_groups"])]
    meta = {"format_version": FORMAT_VERSION, "param_groups": groups, "state_scalars": scalars}
    return tensors, meta


def optimizer_state_from_safetensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_state_to_safetensors`; returns a dict for ``load_state_dict``.

    Raises:
        ValueError: a tensor name does not have the ``state.<index>.<name>`` form.
    """
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit():
            raise ValueError(f"optimizer tensor {key!r} is not named state.<index>.<name>")
        state.setdefault(int(parts[1]), {})[parts[2]] = tensor
    for index, values in meta.get("state_scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# ------------------------------------------------------------------------------------------------
# RNG state


def capture_rng_state(device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """This process's generator states as fixed-shape tensors (so they can be gathered over ranks).

    Returns:
        ``python_state`` int64 (625,): Python ``random``'s Mersenne-Twister words and position;
        ``python_gauss`` float64 (2,): [has cached gaussian, its value];
        ``numpy_keys`` int64 (624,), ``numpy_meta`` float64 (3,): NumPy's legacy global state
        (position, has gaussian, cached gaussian);
        ``torch_cpu`` uint8 (5056,): ``torch.get_rng_state()``;
        ``torch_cuda`` uint8: the generator of ``device`` when it is a CUDA device.
    """
    version, words, gauss = random.getstate()
    if version != 3:
        raise ValueError(f"unsupported Python random state version {version} (expected 3)")
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    if np_kind != "MT19937":
        raise ValueError(f"unsupported NumPy random state {np_kind!r} (expected MT19937)")
    state = {
        "python_state": torch.tensor(words, dtype=torch.int64),
        "python_gauss": torch.tensor([0.0 if gauss is None else 1.0, 0.0 if gauss is None else gauss], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_meta": torch.tensor([np_pos, np_has_gauss, np_gauss], dtype=torch.float64),
        "torch_cpu": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, torch.Tensor], rank: int = 0, device: torch.device | None = None) -> None:
    """Restore the generators from one row (``rank``) of a gathered :func:`capture_rng_state` dict.

    Raises:
        ValueError: the saved state has fewer rows than ``rank + 1``, or a CUDA state is needed
            but missing.
    """
    rows = state["torch_cpu"].shape[0]
    if rank >= rows:
        raise ValueError(f"{RNG_FILE} holds the RNG state of {rows} processes, but this is process {rank}")
    words = tuple(int(w) for w in state["python_state"][rank].tolist())
    has_gauss, gauss = state["python_gauss"][rank].tolist()
    random.setstate((3, words, gauss if has_gauss else None))
    np_pos, np_has_gauss, np_gauss = state["numpy_meta"][rank].tolist()
    np.random.set_state(
        ("MT19937", state["numpy_keys"][rank].numpy().astype(np.uint32), int(np_pos), int(np_has_gauss), float(np_gauss))
    )
    torch.set_rng_state(state["torch_cpu"][rank].clone())
    if device is not None and device.type == "cuda":
        if "torch_cuda" not in state:
            raise ValueError(f"{RNG_FILE} has no CUDA generator state, but the run uses {device}")
        torch.cuda.set_rng_state(state["torch_cuda"][rank].clone(), device)


# ------------------------------------------------------------------------------------------------
# save / load


def save_checkpoint(
    out_dir: str | Path,
    *,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    rng_state: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
) -> Path:
    """Write ``<out_dir>/checkpoints/step-XXXXXXX/`` atomically, then point ``latest`` at it.

    Call on the main process only, with full (gathered) states.

    Args:
        step: optimizer steps completed.
        model_state: student state dict.
        optimizer_state: ``optimizer.state_dict()``.
        scheduler_state: ``scheduler.state_dict()`` (must be JSON-serialisable).
        rng_state: gathered :func:`capture_rng_state` tensors, one row per rank.
        trainer_state: JSON-serialisable progress; ``step`` and ``format_version`` are added.
            It must pass :func:`check_trainer_state`.

    Returns:
        The checkpoint folder.

    Raises:
        ValueError: a scheduler/optimizer/trainer value cannot be stored as JSON, or the trainer
            state is out of range (a checkpoint that could not be resumed is never written).
        OSError: the folder cannot be written (the previous checkpoint stays latest).
    """
    root = checkpoints_dir(out_dir)
    final = root / step_dirname(step)
    opt_tensors, opt_meta = optimizer_state_to_safetensors(optimizer_state)
    scheduler_json = _json_checked(dict(scheduler_state), "scheduler state")
    state = _json_checked(dict(trainer_state, step=step, format_version=FORMAT_VERSION), "trainer state")
    check_trainer_state(state, final / TRAINER_STATE_FILE, folder_step=step)
    with atomic_dir(final) as tmp:
        save_model_state(model_state, tmp / MODEL_FILE)
        save_file(opt_tensors, str(tmp / OPTIMIZER_FILE), metadata={"format": "pt"})
        _write_json_plain(tmp / OPTIMIZER_META_FILE, opt_meta)
        _write_json_plain(tmp / SCHEDULER_FILE, scheduler_json)
        save_file({k: v.contiguous() for k, v in rng_state.items()}, str(tmp / RNG_FILE), metadata={"format": "pt"})
        _write_json_plain(tmp / TRAINER_STATE_FILE, state)
        files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)}
                 for name in (*_DATA_FILES, TRAINER_STATE_FILE)}
        _write_json_plain(tmp / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "step": step, "files": files})
    with atomic_path(root / LATEST_FILENAME) as tmp_pointer:
        tmp_pointer.write_text(final.name + "\n")
    return final


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu", model_and_optimizer: bool = True) -> Checkpoint:
    """Read and verify one checkpoint folder.

    ``manifest.json`` lists every other file with its size and SHA-256; each is checked before
    it is used, ``trainer_state.json`` included, and the trainer state is then range-checked
    (:func:`check_trainer_state`). A format-1 folder (no ``manifest.json``) is checked against the
    manifest its ``trainer_state.json`` holds, which covers the other five files only.

    Args:
        path: a ``step-XXXXXXX`` folder (or an ``out_dir``, meaning its latest checkpoint).
        map_location: device for the loaded tensors.
        model_and_optimizer: False leaves ``model_state`` and ``optimizer_state`` empty (their
            files are then checked for presence and size only, not read): under FSDP only
            process 0 reads the weights and broadcasts them.

    Raises:
        FileNotFoundError: the folder or one of its files is missing (names it).
        ValueError: a file is truncated, corrupt (checksum mismatch) or unparsable, or a trainer
            state value is out of range (:class:`CheckpointError`; names the file, key, value).
    """
    path = Path(path)
    if not _STEP_DIR.match(path.name) and (path / CHECKPOINTS_DIRNAME).is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"{path}: no completed checkpoint ({checkpoints_dir(path) / LATEST_FILENAME} is missing)")
        path = latest
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint folder not found")
    state_file = path / TRAINER_STATE_FILE
    # Parsing JSON runs no code, so the state is read first: a garbled file is named as such.
    trainer_state = read_json(state_file)
    if not isinstance(trainer_state, dict) or "step" not in trainer_state:
        raise CheckpointError(f"{state_file}: not a kronlm trainer state (no 'step')")
    manifest_file = path / MANIFEST_FILE
    if manifest_file.is_file() or trainer_state.get("format_version") != 1:
        where = manifest_file
        manifest = read_json(manifest_file)
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise CheckpointError(f"{manifest_file}: not a kronlm checkpoint manifest (expected format {MANIFEST_FORMAT!r} with a files mapping)")
        expected_names = {*_DATA_FILES, TRAINER_STATE_FILE}
    else:  # format 1: trainer_state.json holds the manifest of the other files
        where = state_file
        files = trainer_state.get("files")
        if not isinstance(files, dict):
            raise CheckpointError(f"{state_file}: not a kronlm trainer state (no 'files' manifest)")
        expected_names = set(_DATA_FILES)
    unlisted = sorted(expected_names - set(files))
    if unlisted:
        raise CheckpointError(f"{where}: the manifest does not list {unlisted[0]}")
    skipped = () if model_and_optimizer else (MODEL_FILE, OPTIMIZER_FILE)
    for name, expected in sorted(files.items()):
        if name not in expected_names:
            raise CheckpointError(f"{where}: lists {name!r}, which is not a checkpoint file")
        if not isinstance(expected, dict) or not isinstance(expected.get("bytes"), int) or not isinstance(expected.get("sha256"), str):
            raise CheckpointError(f"{where}: entry {name!r} needs integer bytes and a sha256 string")
        file = path / name
        if not file.is_file():
            raise FileNotFoundError(f"{file}: checkpoint file missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{file}: checkpoint file truncated or altered ({size} bytes, expected {expected['bytes']})")
        if name not in skipped and file_sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: checkpoint file corrupt (SHA-256 does not match the manifest)")
    match = _STEP_DIR.match(path.name)
    check_trainer_state(trainer_state, state_file, folder_step=int(match.group(1)) if match else None)
    model_state: dict[str, torch.Tensor] = {}
    optimizer_state: dict[str, Any] = {}
    if model_and_optimizer:
        model_state = load_model_state(path / MODEL_FILE)
        opt_tensors, _ = _read_safetensors(path / OPTIMIZER_FILE)
        optimizer_state = optimizer_state_from_safetensors(opt_tensors, read_json(path / OPTIMIZER_META_FILE))
    scheduler_state = read_json(path / SCHEDULER_FILE)
    rng_state, _ = _read_safetensors(path / RNG_FILE)
    if str(map_location) != "cpu":
        model_state = {k: v.to(map_location) for k, v in model_state.items()}
    return Checkpoint(path, model_state, optimizer_state, scheduler_state, rng_state, trainer_state)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# key -> (check, requirement in words); checked when the key is present.
_STATE_RULES: dict[str, tuple[Any, str]] = {
    "format_version": (lambda v: v in READABLE_VERSIONS, f"one of {', '.join(map(str, READABLE_VERSIONS))}"),
    "step": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "tokens_seen": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "epoch": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "step_in_epoch": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "blocks_per_step": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "train_examples": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "sampler_seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "world_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "max_steps": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "validations_since_best": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "train_seconds": (lambda v: _is_finite_number(v) and v >= 0, "a finite number >= 0"),
    "val_history": (lambda v: isinstance(v, list) and all(isinstance(e, dict) and _is_int(e.get("step")) and e["step"] >= 1 for e in v),
                    "a list of {\"step\": integer >= 1, ...} records"),
    "best_step": (lambda v: v is None or (_is_int(v) and v >= 1), "null or an integer >= 1"),
    "best_val": (lambda v: v is None or _is_finite_number(v), "null or a finite number"),
    "best_val_ppl": (lambda v: v is None or _is_finite_number(v), "null or a finite number"),
    "val_metric": (lambda v: v is None or isinstance(v, str), "null or a metric name"),
    "greater_is_better": (lambda v: isinstance(v, bool), "true or false"),
    "stopped_early": (lambda v: isinstance(v, bool), "true or false"),
    "length_grouped": (lambda v: isinstance(v, bool), "true or false"),
    "distributed_type": (lambda v: isinstance(v, str), "a string"),
    "param_groups": (lambda v: isinstance(v, list) and all(isinstance(g, str) for g in v), "a list of group names"),
    "config": (lambda v: isinstance(v, dict), "a mapping"),
    "run": (lambda v: isinstance(v, dict), "a mapping"),
}


def check_trainer_state(state: dict[str, Any], file: str | Path, *, folder_step: int | None = None) -> None:
    """Range-check a trainer state, so a damaged or hand-edited one is refused before it is used.

    Every known key that is present must hold a value of its type and range (``step`` and
    ``tokens_seen`` integers >= 0, ``world_size`` >= 1, ``best_val`` finite or null, ...), and
    together they must agree: ``step`` equals the folder's step, ``best_step`` and ``step`` are at
    most ``max_steps``, ``best_step`` and every ``val_history`` step at most ``step``, and ``epoch`` x steps per epoch +
    ``step_in_epoch`` equals ``step`` (steps per epoch = ``train_examples // blocks_per_step``).

    Args:
        state: the parsed ``trainer_state.json``.
        file: its path (named in messages).
        folder_step: the step in the folder's name (``step-0000100`` -> 100), or None.

    Raises:
        CheckpointError: names the file, the key and the value, e.g. ``.../trainer_state.json:
        step = -5 is out of range (an integer >= 0)``.
    """
    for key, (ok, requirement) in _STATE_RULES.items():
        if key in state and not ok(state[key]):
            raise CheckpointError(f"{file}: {key} = {state[key]!r} is out of range ({requirement})")
    if "step" not in state:
        raise CheckpointError(f"{file}: no 'step'")
    step = state["step"]
    if folder_step is not None and step != folder_step:
        raise CheckpointError(f"{file}: step = {step} but the folder is {step_dirname(folder_step)}")
    if state.get("best_step") is not None and state["best_step"] > step:
        raise CheckpointError(f"{file}: best_step = {state['best_step']} is after the checkpoint's step {step}")
    late = [v["step"] for v in state.get("val_history", []) if v["step"] > step]
    if late:
        raise CheckpointError(f"{file}: val_history has a validation at step {late[0]}, after the checkpoint's step {step}")
    if state.get("max_steps") is not None and step > state["max_steps"]:
        raise CheckpointError(f"{file}: step = {step} exceeds max_steps = {state['max_steps']}")
    if all(k in state for k in ("epoch", "step_in_epoch", "train_examples", "blocks_per_step")):
        per_epoch = state["train_examples"] // state["blocks_per_step"]
        if per_epoch >= 1 and (state["epoch"] * per_epoch + state["step_in_epoch"] != step or state["step_in_epoch"] >= per_epoch):
            raise CheckpointError(
                f"{file}: epoch = {state['epoch']} and step_in_epoch = {state['step_in_epoch']} do not give step {step} "
                f"({per_epoch} steps per epoch)"
            )


def resume_candidates(out_dir: str | Path) -> tuple[list[Path], list[str]]:
    """The checkpoint folders a resume may use, in the order to try them, and problems met.

    The folder ``latest`` names comes first, then the earlier ones, newest first. Folders newer
    than the one ``latest`` names are never used (they belong to a run that was resumed from an
    earlier checkpoint). When ``latest`` is unreadable or names a missing folder, every folder is
    a candidate, newest first, and the problem is returned.

    Returns:
        ``(folders, problems)``: problems are one-line descriptions.
    """
    found = list_checkpoints(out_dir)
    problems = []
    try:
        latest = latest_checkpoint(out_dir)
    except (ValueError, OSError) as exc:
        problems.append(str(exc))
        latest = None
    if latest is not None:
        latest_step = int(_STEP_DIR.match(latest.name).group(1))
        found = [(s, p) for s, p in found if s <= latest_step]
    return [p for _, p in sorted(found, reverse=True)], problems


def load_resumable_checkpoint(
    out_dir: str | Path, *, model_and_optimizer: bool = True, map_location: str | torch.device = "cpu"
) -> tuple[Checkpoint, list[str]]:
    """Load the newest checkpoint of a run folder that verifies, falling back past damaged ones.

    Args:
        out_dir: the run folder (holding ``checkpoints/``).
        model_and_optimizer / map_location: as :func:`load_checkpoint`.

    Returns:
        ``(checkpoint, skipped)``: ``skipped`` says, one line each, which newer checkpoints (or
        the ``latest`` pointer) were unusable and why; empty when the latest one loaded.

    Raises:
        FileNotFoundError: no checkpoint folder at all under ``out_dir/checkpoints``.
        CheckpointError: there are checkpoints but none verifies (each is named with its reason).
    """
    candidates, problems = resume_candidates(out_dir)
    if not candidates:
        detail = f" ({problems[0]})" if problems else ""
        raise FileNotFoundError(f"{out_dir}: no completed checkpoint under {checkpoints_dir(out_dir)}{detail}")
    skipped = list(problems)
    for folder in candidates:
        try:
            return load_checkpoint(folder, model_and_optimizer=model_and_optimizer, map_location=map_location), skipped
        except (ValueError, OSError) as exc:
            skipped.append(f"{folder.name} is unusable: {_first_line(exc)}")
    raise CheckpointError(f"{checkpoints_dir(out_dir)}: no checkpoint verifies: {'; '.join(skipped)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def remove_interrupted_writes(out_dir: str | Path, *, exports: tuple[str, ...] = ("best", "final")) -> list[Path]:
    """Remove what a killed run left in its folder: temporary checkpoint folders (``.step-*.tmp``),
    temporary ``latest`` pointers and exports (``.best.*.tmp``), stale lock files, and the
    ``.<name>.old`` folders of an interrupted swap (put back when nothing replaced them).

    Temporaries of a folder whose lock a live process holds are left alone.

    Args:
        out_dir: the run folder.
        exports: the export folders (and files) of ``out_dir`` whose temporaries are removed.

    Returns:
        The paths removed (or put back).
    """
    out_dir = Path(out_dir)
    removed = clean_interrupted_writes(checkpoints_dir(out_dir))
    names = (*exports, "training_config.yaml")
    removed += clean_interrupted_writes(out_dir, names=names)
    return removed


def prune_checkpoints(out_dir: str | Path, keep: int, *, protect_steps: tuple[int, ...] = ()) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoint folders, sparing ``protect_steps`` and latest.

    Also removes folders newer than the one ``latest`` names (left by a run that a resume
    continued from an earlier checkpoint) and leftover temporary folders of interrupted writes.
    Returns the deleted folders.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    found = list_checkpoints(out_dir)
    latest = latest_checkpoint(out_dir)
    removed = []
    if latest is not None:
        # Folders after the one `latest` names belong to a timeline a resume abandoned (it fell
        # back to an earlier checkpoint); this run writes those steps anew.
        latest_step = int(_STEP_DIR.match(latest.name).group(1))
        for step, folder in found:
            if step > latest_step:
                shutil.rmtree(folder)
                removed.append(folder)
        found = [(step, folder) for step, folder in found if step <= latest_step]
    spared = {step for step, _ in found[-keep:]} | set(protect_steps)
    for step, folder in found:
        if step in spared or (latest is not None and folder == latest):
            continue
        shutil.rmtree(folder)
        removed.append(folder)
    root = checkpoints_dir(out_dir)
    for leftover in root.glob(".step-*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    remove_stale_locks(root, ".step-*.lock")
    return removed


# ------------------------------------------------------------------------------------------------
# helpers


def _read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None


def _json_checked(value: Any, what: str) -> Any:
    """Round-trip ``value`` through JSON so tuples become lists and unstorable values are caught."""
    try:
        return json.loads(json.dumps(value, allow_nan=True))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} cannot be stored as JSON ({exc})") from None


def _write_json_plain(path: Path, obj: Any) -> None:
    # Inside an atomic_dir the whole folder is the unit of atomicity; a plain write suffices.
    path.write_text(json.dumps(obj, indent=2) + "\n")


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "capture_rng_state",
    "check_trainer_state",
    "checkpoints_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_state",
    "load_resumable_checkpoint",
    "optimizer_state_from_safetensors",
    "optimizer_state_to_safetensors",
    "prune_checkpoints",
    "remove_interrupted_writes",
    "restore_rng_state",
    "resume_candidates",
    "save_checkpoint",
    "save_model_state",
    "step_dirname",
]
