"""Checkpoints and resume of one training run, kept out of the training loop
(docs/reliability.md, "What `kronlm distill --resume` guarantees").

A :class:`CheckpointManager` writes a step's checkpoint (every process's RNG, the full model and
optimizer states gathered under FSDP too, the trainer's progress and the run's fingerprint), and
on resume finds the newest checkpoint that verifies, refuses one from a run with other inputs or
result-changing settings (:class:`ResumeMismatch`, each difference named), and puts its states
back. :func:`run_fingerprint` computes what a run is made of (data, teacher, starting student,
settings). The files themselves are :mod:`kronlm.distill.checkpoint`'s.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from torch import nn

from kronlm.distill.checkpoint import (
    TRAINER_STATE_FILE,
    Checkpoint,
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    load_resumable_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from kronlm.distill.config import DATA_ORDER_FIELDS, RESUME_FREE_FIELDS, TrainingConfig
from kronlm.distill.distributed import (
    gather_model_state,
    gather_optimizer_state,
    restore_model_state,
    restore_optimizer_state,
)
from kronlm.distill.fingerprint import (
    RunFingerprint,
    compare_fingerprints,
    data_fingerprint,
    model_fingerprint,
)

# The trainer_state.json keys a checkpoint must hold to be resumed by the trainer.
TRAINER_KEYS = ("tokens_seen", "config")


class ResumeMismatch(ValueError):
    """``resume`` was asked with other inputs than the checkpoint's run: other data, another
    teacher or starting student, or settings that change the result; the message names each."""


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and key == "blockwise":
            out.update(_flatten(value, f"{key}."))
        else:
            out[prefix + key] = value
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"lr 0.001 -> 0.002"`` for every config field that differs and changes the result (data
    order fields are reported separately; ``RESUME_FREE_FIELDS`` may change)."""
    old, new = _flatten(saved), _flatten(current)
    out = []
    for key in new:
        if key in RESUME_FREE_FIELDS or key in DATA_ORDER_FIELDS or key not in old:
            continue  # a field the checkpoint's kronlm did not have keeps its default meaning
        if json.dumps(old[key], sort_keys=True) != json.dumps(new[key], sort_keys=True):
            out.append(f"{key} {old[key]!r} -> {new[key]!r}")
    return out


def run_fingerprint(accelerator, *, train_data: Any, train_set: Any, val_data: Any, val_set: Any, teacher: nn.Module | None,
                    student: nn.Module, run_settings: dict[str, Any]) -> RunFingerprint:
    """Digests of the data, the teacher and the starting student, computed by process 0 (which
    alone is sure to hold the student's weights under FSDP) and sent to the others. Token tensors
    are hashed as given; other data as the dataset the loop reads."""
    fingerprint = None
    if accelerator.is_main_process:
        fingerprint = RunFingerprint(
            train_data=data_fingerprint(train_data if isinstance(train_data, torch.Tensor) else train_set, "training data"),
            val_data=data_fingerprint(val_data if isinstance(val_data, torch.Tensor) else val_set, "validation data"),
            teacher=None if teacher is None else model_fingerprint(teacher),
            student_start=model_fingerprint(student),
            settings=json.loads(json.dumps(run_settings, default=str)),
        ).to_dict()
    fingerprint = broadcast_object_list([fingerprint])[0]
    return RunFingerprint.from_dict(fingerprint)


def require_trainer_keys(checkpoint: Checkpoint) -> None:
    """Refuse a checkpoint that the trainer did not write.

    Raises:
        CheckpointError: a key of :data:`TRAINER_KEYS` is missing (file and key named).
    """
    for key in TRAINER_KEYS:
        if key not in checkpoint.trainer_state:
            raise CheckpointError(f"{checkpoint.path / TRAINER_STATE_FILE}: no {key!r}; not written by the trainer")


class CheckpointManager:
    """The checkpoints of one run in ``out_dir``, for every process of ``accelerator``.

    Args:
        accelerator: the run's ``accelerate.Accelerator``.
        out_dir: the run folder (``checkpoints/`` inside).
        sharded: FSDP: only process 0 reads the full weights; they reach the others after sharding.
        say: prints one line on the main process (before the progress bar exists).
    """

    def __init__(self, accelerator, out_dir: str | Path, *, sharded: bool, say: Callable[[str], None]):
        self.accelerator, self.out_dir, self.sharded, self.say = accelerator, Path(out_dir), sharded, say

    def read(self) -> Checkpoint:
        """The newest checkpoint that verifies: process 0 chooses (reading and checking every
        file), the others load the same folder. A damaged newer one is named and skipped.

        Raises:
            FileNotFoundError: no completed checkpoint in ``out_dir``.
            CheckpointError: none verifies (each named, with why).
        """
        accelerator = self.accelerator
        checkpoint, choice = None, None
        if accelerator.is_main_process:
            try:
                checkpoint, skipped = load_resumable_checkpoint(self.out_dir)
                require_trainer_keys(checkpoint)
                choice = ("ok", str(checkpoint.path), skipped)
            except (FileNotFoundError, CheckpointError) as exc:
                choice = (type(exc).__name__, str(exc), [])
        kind, detail, skipped = broadcast_object_list([choice])[0]
        if kind == "FileNotFoundError":
            raise FileNotFoundError(f"--resume: {detail}")
        if kind != "ok":
            raise CheckpointError(detail)
        for line in skipped:
            self.say(f"--resume: {line}")
        if skipped:
            self.say(f"--resume: resuming from {detail}, the newest checkpoint that verifies")
        if checkpoint is None:
            # Under FSDP only process 0 reads the weights; it broadcasts them after sharding.
            checkpoint = load_checkpoint(detail, model_and_optimizer=not self.sharded)
        return checkpoint

    def check_compatible(self, checkpoint: Checkpoint, *, config: TrainingConfig, world: int, train_examples: int,
                         fingerprint: RunFingerprint, check_student: bool, precision: str | None = None) -> None:
        """Refuse to continue a run with other inputs than it started with (names each difference).
        The run's starting point stays the one it was started from: ``fingerprint.student_start``
        is set to the recorded one. ``precision`` is what this run's ``mixed_precision`` resolved
        to ("no" or "bf16"): where the checkpoint recorded its own, the resolved precisions are
        compared instead of the settings, so ``auto`` and the precision it chose are the same run.

        Raises:
            ResumeMismatch: another data order (order fields, processes, examples), other
                result-changing settings (a precision included), or other data, teacher or (with
                ``check_student``) starting student.
        """
        saved, path = checkpoint.trainer_state, checkpoint.path
        saved_config = saved.get("config", {})
        changed = [
            f"{name} {saved_config.get(name)!r} -> {getattr(config, name)!r}"
            for name in DATA_ORDER_FIELDS
            if saved_config.get(name) != getattr(config, name)
        ]
        if saved.get("world_size") != world:
            changed.append(f"number of processes {saved.get('world_size')} -> {world}")
        if saved.get("train_examples", train_examples) != train_examples:
            changed.append(f"training examples {saved['train_examples']} -> {train_examples}")
        problems = [f"the data order would change ({'; '.join(changed)})"] if changed else []
        current = config.to_dict()
        recorded_precision = saved.get("precision")
        compare_resolved = recorded_precision is not None and precision is not None
        if compare_resolved:  # the setting itself may differ ("auto" against what it picked)
            del current["mixed_precision"]
        settings = config_differences(saved_config, current)
        if compare_resolved and recorded_precision != precision:
            settings.append(f"training precision {recorded_precision!r} -> {precision!r} (mixed_precision "
                            f"{saved_config.get('mixed_precision')!r} -> {config.mixed_precision!r} on this machine)")
        if settings:
            problems.append(f"settings differ ({'; '.join(settings)})")
        if "run" in saved:
            recorded = RunFingerprint.from_dict(saved["run"], f"{path / TRAINER_STATE_FILE}: run")
            problems += compare_fingerprints(recorded, fingerprint, check_student=check_student)
            fingerprint.student_start = recorded.student_start
        else:
            self.say(f"--resume: {path} was written before kronlm recorded a run's inputs; its data, teacher "
                     "and starting student cannot be compared with these")
        if problems:
            raise ResumeMismatch(
                f"cannot resume from {path}: {'; '.join(problems)}; use the same inputs and settings, "
                "or start a new run in another folder"
            )

    def restore(self, checkpoint: Checkpoint, *, model: nn.Module, optimizer, scheduler, param_names, device) -> None:
        """Put the checkpoint's model, optimizer, scheduler and this process's RNG states back."""
        accelerator = self.accelerator
        restore_model_state(accelerator, model, checkpoint.model_state)
        restore_optimizer_state(accelerator, model, optimizer, checkpoint.optimizer_state, param_names)
        scheduler.load_state_dict(checkpoint.scheduler_state)
        restore_rng_state(checkpoint.rng_state, accelerator.process_index, device)

    def save(self, step: int, *, model: nn.Module, optimizer, scheduler, aliases, param_names, device,
             trainer_state: dict[str, Any], keep: int, protect_step: int | None) -> Path | None:
        """Write the step-``step`` checkpoint (full states, every process's RNG) and prune older
        ones to ``keep``, never ``protect_step`` (the best); a collective. Returns the folder on
        process 0, None on the others."""
        accelerator = self.accelerator
        rng = {k: v.unsqueeze(0).to(device) for k, v in capture_rng_state(device).items()}
        rng = {k: v.cpu() for k, v in accelerator.gather(rng).items()}
        model_state = gather_model_state(accelerator, model, aliases)
        optimizer_state = gather_optimizer_state(accelerator, model, optimizer, param_names)
        path = None
        if accelerator.is_main_process:
            path = save_checkpoint(
                self.out_dir, step=step, model_state=model_state, optimizer_state=optimizer_state,
                scheduler_state=scheduler.state_dict(), rng_state=rng, trainer_state=trainer_state,
            )
            prune_checkpoints(self.out_dir, keep, protect_steps=(protect_step,) if protect_step is not None else ())
        accelerator.wait_for_everyone()
        return path


__all__ = [
    "TRAINER_KEYS",
    "CheckpointManager",
    "ResumeMismatch",
    "config_differences",
    "require_trainer_keys",
    "run_fingerprint",
]
