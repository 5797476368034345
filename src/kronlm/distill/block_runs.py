"""What the block-by-block recovery modes share: calling one block as its model does, one engine
run per block with a ``done.json`` that a resumed run checks, and the student's exports.

Local reconstruction (:mod:`kronlm.distill.local`) and block-wise distillation
(:mod:`kronlm.distill.blockwise`) both walk the student's blocks in order, train what is
compressed in each block with one run of the training engine, and record the finished block in
``blocks/block-NNN/done.json`` together with a *run key* (the teacher, the tokens, the starting
student and every setting that changes a block's result), so that ``resume=True`` loads finished
blocks, refuses a folder written by another run, and continues.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kronlm.compression.truncate import find_block_list
from kronlm.distill.hidden_cache import HiddenStateCache, block_output, build_hidden_cache
from kronlm.distill.validators import evaluate_perplexity
from kronlm.utils.atomic import atomic_dir, write_json
from kronlm.utils.files import read_json

BLOCK_STATE_FILE = "block.safetensors"
DONE_FILE = "done.json"


class BlockStep(nn.Module):
    """One transformer block called as its model calls it: (batch, T, d) -> (batch, T, d).

    Args:
        block: the block module (trained in place).
        block_kwargs: the keyword arguments its model passes (attention mask, position
            embeddings, ...), captured for one sequence so they broadcast over any batch
            (:func:`kronlm.distill.hidden_cache.capture_block_kwargs`).
    """

    def __init__(self, block: nn.Module, block_kwargs: dict[str, Any]):
        super().__init__()
        self.block = block
        self.block_kwargs = block_kwargs

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs: (batch, T, d) hidden states -> the block's output hidden states (batch, T, d)."""
        kwargs = {k: move_to(v, inputs.device) for k, v in self.block_kwargs.items()}
        return block_output(self.block(inputs, **kwargs))


def move_to(value: Any, device: torch.device) -> Any:
    """A tensor, or a tuple of them (rotary position embeddings), on ``device``; anything else as is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(move_to(v, device) for v in value)
    return value


@torch.no_grad()
def propagate(block: nn.Module, block_kwargs: dict[str, Any], inputs: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """The block's outputs for ``inputs`` (N, T, d), in eval mode, batch by batch: (N, T, d) on the CPU."""
    step = BlockStep(block, block_kwargs)
    was_training = block.training
    block.eval()
    out = torch.empty(inputs.shape, dtype=torch.float32)
    for start in range(0, inputs.shape[0], batch_size):
        out[start : start + batch_size] = step(inputs[start : start + batch_size].to(device).float()).float().cpu()
    block.train(was_training)
    return out


class BlockStateExporter:
    """Engine exporter of a block run: writes the block's trainable tensors to
    ``folder/block.safetensors`` (with the run summary), never a whole model.

    The model the engine trains must hold the block as ``model.block``.
    """

    def __init__(self, names: list[str]):
        self.names = names

    def __call__(self, model: nn.Module, folder: Path, summary: dict[str, Any]) -> Path:
        state = {n: p.detach().to("cpu").contiguous() for n, p in model.block.named_parameters() if n in self.names}
        with atomic_dir(folder) as tmp:
            save_file(state, str(tmp / BLOCK_STATE_FILE), metadata={"format": "pt"})
            write_json(tmp / "summary.json", summary)
        return folder


def load_block_state(block: nn.Module, path: Path) -> None:
    """Copy the tensors of a ``block.safetensors`` into ``block``'s parameters.

    Raises:
        ValueError: the file names a tensor the block does not have.
    """
    state = load_file(str(path))
    params = dict(block.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise ValueError(f"{path}: tensor {missing[0]} is not a parameter of this block")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


@dataclass
class BlockRecord:
    """What one block's run did (the run summaries of the block modes).

    Attributes:
        index: block index.
        trained: False for a block without compressed modules (skipped).
        tensors: trainable tensors.
        steps, tokens, seconds: optimizer steps, training tokens seen, wall-clock seconds.
        first_loss, last_loss: training loss of the first and last step.
        best_val, best_step: the held-out metric that chose the block's state, and its step.
        chosen: "best", "final" (the engine run's exports) or "refit" (local mode: the closed-form
            refit, when the gradient epochs left the block farther from the teacher's output).
        error_before, error_refit, error_after: local mode, the block's held-out relative output
            error Σ||block(x) - h||² / Σ||h||² before anything, after the closed-form refits and at
            the end; None in block-wise mode or without held-out sequences.
    """

    index: int
    trained: bool
    tensors: int = 0
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    first_loss: float | None = None
    last_loss: float | None = None
    best_val: float | None = None
    best_step: int | None = None
    chosen: str = ""
    error_before: float | None = None
    error_refit: float | None = None
    error_after: float | None = None


def check_student(student: nn.Module, teacher: nn.Module) -> tuple[nn.ModuleList, nn.ModuleList]:
    """The student's and the teacher's block lists, after checking that the student is a
    compressed copy of the teacher.

    Raises:
        ValueError: different depths or hidden sizes, or a tensor whose shape differs between the
            two (an uncompressed module must keep the teacher's shape); a model without a block list.
    """
    _, student_blocks = find_block_list(student)
    _, teacher_blocks = find_block_list(teacher)
    if len(student_blocks) != len(teacher_blocks):
        raise ValueError(f"block-by-block recovery needs the student's depth to equal the teacher's: "
                         f"{len(student_blocks)} student blocks, {len(teacher_blocks)} teacher blocks")
    student_shapes = {n: tuple(p.shape) for n, p in student.named_parameters()}
    teacher_shapes = {n: tuple(p.shape) for n, p in teacher.named_parameters()}
    for name, shape in teacher_shapes.items():
        if name in student_shapes and student_shapes[name] != shape:
            raise ValueError(f"the student is not a compressed version of the teacher: {name} is {student_shapes[name]} "
                             f"in the student and {shape} in the teacher")
    if getattr(student.config, "hidden_size", None) != getattr(teacher.config, "hidden_size", None):
        raise ValueError("the student is not a compressed version of the teacher: their hidden sizes differ")
    return student_blocks, teacher_blocks


def split_blocks(blocks: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(train, val) int64 token blocks (N, block_size) of a ``TokenBlocks`` or ``{"train", "val"}``
    dict; val is None when absent or empty.

    Raises:
        ValueError: anything else, or train ids that are not a 2-D tensor.
    """
    if hasattr(blocks, "train"):
        train_ids, val_ids = blocks.train, getattr(blocks, "val", None)
    elif isinstance(blocks, dict) and "train" in blocks:
        train_ids, val_ids = blocks["train"], blocks.get("val")
    else:
        raise ValueError(f"blocks must be a TokenBlocks or a dict with 'train' (and 'val'), got {type(blocks).__name__}")
    if not isinstance(train_ids, torch.Tensor) or train_ids.dim() != 2:
        raise ValueError("block-by-block recovery needs token blocks: an integer tensor (sequences, block_size)")
    if val_ids is not None and val_ids.shape[0] == 0:
        val_ids = None
    return train_ids.long(), None if val_ids is None else val_ids.long()


def validation_ppl(model: nn.Module, val_blocks: torch.Tensor | None, accelerator, batch_size: int) -> float | None:
    """Perplexity on the held-out blocks, the measure the end-to-end engine validates with (so the
    modes compare); None without held-out blocks."""
    if val_blocks is None:
        return None
    dataset = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in val_blocks]
    return evaluate_perplexity(model, dataset, accelerator, batch_size)["ppl"]


def run_key(cache_key: dict[str, Any], config_settings: dict[str, Any], student: str, run_settings: dict[str, Any] | None) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote a finished block: the teacher and
    tokens (``cache_key``: ``{"teacher", "tokens", "dtype"}``), the starting student's weight
    digest, the settings that change a block's result, and the command's ``run_settings``."""
    return {"cache": cache_key, "config": config_settings, "student": student,
            "settings": json.loads(json.dumps(run_settings or {}, default=str))}


def run_key_differences(saved: Any, current: dict[str, Any]) -> list[str]:
    """What differs between a finished block's run key and this run's, in words. Keys a block
    written by an earlier kronlm lacks (``student``, ``settings``) are not compared."""
    if not isinstance(saved, dict):
        return ["no run key"]
    out = []
    cache, now = saved.get("cache", {}), current["cache"]
    for key, label in (("teacher", "teacher"), ("tokens", "tokens"), ("dtype", "cache dtype")):
        if cache.get(key) != now.get(key):
            out.append(f"{label} {str(cache.get(key))[:12]} -> {str(now.get(key))[:12]}")
    if "student" in saved and saved["student"] != current["student"]:
        out.append(f"starting student {str(saved['student'])[:12]} -> {current['student'][:12]}")
    old_config, new_config = saved.get("config", {}), current["config"]
    for key in sorted(set(old_config) | set(new_config)):
        if json.dumps(old_config.get(key), sort_keys=True) != json.dumps(new_config.get(key), sort_keys=True):
            out.append(f"{key} {old_config.get(key)!r} -> {new_config.get(key)!r}")
    if "settings" in saved and saved["settings"] != current["settings"]:
        keys = sorted(k for k in set(saved["settings"]) | set(current["settings"])
                      if saved["settings"].get(k) != current["settings"].get(k))
        out += [f"{k} {saved['settings'].get(k)!r} -> {current['settings'].get(k)!r}" for k in keys]
    return out


def pairs_fingerprint(key: dict[str, Any], index: int, split: str) -> str:
    """The data fingerprint of block ``index``'s training or validation pairs: a digest of the run
    key, the block and the split (the pairs are a function of those), so a resumed block run can
    check its data without hashing gigabytes of hidden states."""
    text = json.dumps({"run": key, "block": index, "split": split}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def block_folder(out_dir: Path, index: int) -> Path:
    """``out_dir/blocks/block-NNN``: the engine run of block ``index``."""
    return out_dir / "blocks" / f"block-{index:03d}"


def refuse_earlier_runs(out_dir: Path, count: int) -> None:
    """Refuse a fresh (not resumed) run in a folder where an unfinished block run already started,
    before any finished block is loaded into the student.

    Raises:
        ValueError: names the block folder.
    """
    for index in range(count):
        folder = block_folder(out_dir, index)
        if not (folder / DONE_FILE).is_file() and folder.is_dir() and any(folder.iterdir()):
            raise ValueError(f"{folder}: holds an earlier run; pass --resume to continue it or choose another --out")


def finished_block(block: nn.Module, folder: Path, key: dict[str, Any]) -> BlockRecord | None:
    """Load a block finished by an earlier run of the same key into ``block``; None when the block
    has not finished.

    Raises:
        ValueError: the block was finished by a run with another teacher, tokens, starting student
            or settings (each difference named).
    """
    done = folder / DONE_FILE
    if not done.is_file():
        return None
    record = read_json(done)
    differences = run_key_differences(record.get("run") if isinstance(record, dict) else None, key)
    if differences:
        raise ValueError(f"{done}: written by a run with another teacher, other tokens or other settings "
                         f"({'; '.join(differences)}); start a new run (another --out) instead of --resume")
    load_block_state(block, folder / record["chosen"] / BLOCK_STATE_FILE)
    return BlockRecord(**record["record"])


def finish_block(folder: Path, key: dict[str, Any], chosen: str, record: BlockRecord) -> None:
    """Write the block's ``done.json`` (its run key, the exported state chosen, its record)."""
    write_json(folder / DONE_FILE, {"run": key, "chosen": chosen, "record": dataclasses.asdict(record)})


def copy_model(source: Path, target: Path) -> Path:
    """Copy the files of a saved model folder to ``target`` (atomically); ``target``."""
    if source.resolve() == target.resolve():
        return target
    with atomic_dir(target) as tmp:
        for path in sorted(source.iterdir()):
            if path.is_file():
                (tmp / path.name).write_bytes(path.read_bytes())
    return target


def block_run_config(config, index: int, n_train: int):
    """The ``TrainingConfig`` of block ``index``'s engine run: logs in a per-block folder, no
    freezing (the block's trainable tensors are chosen by the caller), and a warm-up shorter than
    the run when the run's length comes from ``epochs`` over ``n_train`` sequences (a config's
    warm-up is given for a whole recovery, a block may hold fewer steps)."""
    changes = {"log_dir": str(Path(config.log_dir) / f"block-{index:03d}") if config.log_dir else None, "freeze_uncompressed": False}
    if config.max_steps is None:
        per_step = config.micro_batch_size * config.grad_accum_steps
        steps = max(int(math.ceil((config.epochs or 1) * (n_train // per_step))), 1)
        changes["warmup_steps"] = min(config.warmup_steps, steps - 1)
    return config.replace(**changes)


class StageClock:
    """The time budget of a block-mode stage: ``max_minutes`` (None = no limit) counted from the
    moment the clock is made, before the teacher cache is built, so that the cache is paid from the
    stage's budget (the minutes a user gives are the minutes the stage takes), and shared out over
    the blocks still to train (``to_train``: block indices in walking order).
    """

    def __init__(self, max_minutes: float | None, to_train: list[int]):
        self.max_minutes = max_minutes
        self.to_train = list(to_train)
        self.started = time.perf_counter()

    def seconds(self) -> float:
        """Seconds since the stage started."""
        return time.perf_counter() - self.started

    def block_minutes(self, index: int) -> float | None:
        """Minutes block ``index`` may spend: what is left, divided among it and the blocks after it
        that still train (see :func:`split_minutes`); None without a budget."""
        return split_minutes(self.max_minutes, self.seconds(), len([i for i in self.to_train if i >= index]))


def stage_teacher_cache(teacher: nn.Module, train_ids: torch.Tensor, val_ids: torch.Tensor | None, config, out_dir: Path,
                        progress: bool) -> tuple[HiddenStateCache, torch.Tensor]:
    """Build (or reuse) the teacher's hidden states at every block boundary for a block-mode stage.

    Args:
        train_ids: (n_train, block_size) token ids; val_ids: (n_val, block_size) or None. Both are
            cached, training rows first, so ``cache.boundary(i)[:n_train]`` are the training rows.
        config: the stage's ``TrainingConfig``; ``config.blockwise.cache_dir`` (default
            ``out_dir/teacher_cache``) and ``cache_dtype`` say where and how the states are kept.

    Returns:
        The cache and ``all_ids``, (n_train + n_val, block_size).

    Raises:
        OSError: the disk cannot hold the cache (see :func:`kronlm.distill.hidden_cache.build_hidden_cache`).
    """
    settings = config.blockwise
    cache_dir = Path(settings.cache_dir) if settings.cache_dir else out_dir / "teacher_cache"
    all_ids = train_ids if val_ids is None else torch.cat([train_ids, val_ids])
    cache = build_hidden_cache(teacher, all_ids, cache_dir, dtype=settings.cache_dtype, batch_size=config.micro_batch_size,
                               progress=progress)
    return cache, all_ids


def split_minutes(total: float | None, spent_seconds: float, remaining_blocks: int) -> float | None:
    """A stage's time budget (``total`` minutes; None = no limit) shared out over its blocks: the
    minutes still left, divided evenly among the blocks still to train (so a block that finishes
    early leaves its time to the next ones); at least 1 second each."""
    if total is None or remaining_blocks <= 0:
        return None
    left = max(total * 60.0 - spent_seconds, 0.0)
    return max(left / remaining_blocks, 1.0) / 60.0


__all__ = [
    "BLOCK_STATE_FILE",
    "DONE_FILE",
    "BlockRecord",
    "BlockStateExporter",
    "BlockStep",
    "StageClock",
    "block_folder",
    "block_run_config",
    "check_student",
    "copy_model",
    "finish_block",
    "finished_block",
    "load_block_state",
    "move_to",
    "pairs_fingerprint",
    "propagate",
    "refuse_earlier_runs",
    "run_key",
    "run_key_differences",
    "split_blocks",
    "split_minutes",
    "stage_teacher_cache",
    "validation_ppl",
]
