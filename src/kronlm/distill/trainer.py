"""The recovery training loop: distil a compressed or truncated student from its teacher.

One loop for one CPU, one GPU, or several processes (DDP or FSDP under ``accelerate launch``,
DDP under ``torchrun``), built on Hugging Face Accelerate: gradient accumulation, mixed
precision, gradient clipping, sharding and TensorBoard logging come from
:class:`accelerate.Accelerator`. The pieces live next to this module:

- :mod:`kronlm.distill.optim`: AdamW parameter groups, warm-up + cosine schedule (Krony-PT,
  SPEC §4);
- :mod:`kronlm.distill.data_order`: the deterministic, resumable data order, split across
  processes, so ``resume=True`` continues to the same losses as an uninterrupted run;
- :mod:`kronlm.distill.distributed`: the accelerator, the supported process layouts, and the
  full (unsharded) model and optimizer states that checkpoints hold, under FSDP too;
- :mod:`kronlm.distill.checkpoint`: checkpoints in safetensors + JSON;
- :mod:`kronlm.distill.validation` / :mod:`kronlm.distill.export`: validation perplexity (or,
  for an encoder without an LM head, the held-out distillation loss), and the exported students
  (the best by that validation metric in ``out_dir/best``, the last in ``out_dir/final``).

This module holds the loop itself, with a hard stop on a NaN / inf loss or gradient norm before
the optimizer touches the weights. The loss is
:class:`kronlm.distill.objective.DistillationObjective`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from kronlm.distill.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from kronlm.distill.config import DATA_ORDER_FIELDS, TrainingConfig
from kronlm.distill.data_order import as_dataset, epoch_indices, epoch_loader, process_share, split_data
from kronlm.distill.distributed import (
    check_distributed_setup,
    fill_from_process_0,
    full_student,
    gather_model_state,
    gather_optimizer_state,
    grad_norm_value,
    is_sharded,
    make_accelerator,
    meta_copy,
    place_teacher,
    restore_model_state,
    restore_optimizer_state,
    tied_aliases,
)
from kronlm.distill.export import export_student
from kronlm.distill.optim import build_optimizer, build_scheduler, optimizer_param_names
from kronlm.distill.validation import evaluate_distillation_loss, evaluate_perplexity
from kronlm.models.loading import has_lm_head

TRACKER_PROJECT = "distill"


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the run stopped before the update."""


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        steps: optimizer steps completed in total (including those before a resume).
        start_step: the step this call started from (0, or the resumed checkpoint's step).
        tokens_seen: training tokens consumed in total, over all processes.
        losses: total loss of every step run in this call (mean over processes and micro-batches).
        loss_terms: the per-term losses of every step run in this call.
        val_metric: ``"ppl"`` (validation perplexity; students with an LM head) or
            ``"distill_loss"`` (the objective on held-out blocks; encoders such as ``BertModel``).
        val_history: every validation pass in this call: ``{"step", "loss", "ppl", "tokens"}``
            for ``"ppl"``, ``{"step", "loss", "blocks", "term/<name>"...}`` for ``"distill_loss"``.
        best_val / best_step: best (lowest) validation metric so far and its step (None without
            validation).
        best_val_ppl: ``best_val`` when the metric is perplexity, else None.
        final_dir / best_dir: the exported students (None when not written).
        last_checkpoint: the newest checkpoint folder (None when none was written).
    """

    steps: int
    start_step: int
    tokens_seen: int
    losses: list[float] = field(default_factory=list)
    loss_terms: list[dict[str, float]] = field(default_factory=list)
    val_history: list[dict[str, float]] = field(default_factory=list)
    val_metric: str = "ppl"
    best_val: float | None = None
    best_step: int | None = None
    final_dir: Path | None = None
    best_dir: Path | None = None
    last_checkpoint: Path | None = None

    @property
    def best_val_ppl(self) -> float | None:
        return self.best_val if self.val_metric == "ppl" else None


def _build_objective(config: TrainingConfig):
    from kronlm.distill.objective import DistillationObjective

    return DistillationObjective(config.loss_weights_resolved(), layer_map=config.layer_map)


def _hparams(config: TrainingConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """TensorBoard accepts only scalars and strings as hyper-parameters."""
    import json

    out = {}
    for key, value in {**config.to_dict(), **extra}.items():
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
        else:
            out[key] = json.dumps(value)
    return out


def _check_resume_compatible(saved: dict[str, Any], config: TrainingConfig, world_size: int, path: Path) -> None:
    saved_config = saved.get("config", {})
    changed = [
        f"{name} {saved_config.get(name)!r} -> {getattr(config, name)!r}"
        for name in DATA_ORDER_FIELDS
        if saved_config.get(name) != getattr(config, name)
    ]
    if saved.get("world_size") != world_size:
        changed.append(f"number of processes {saved.get('world_size')} -> {world_size}")
    if changed:
        raise ValueError(
            f"cannot resume from {path}: the data order would change ({'; '.join(changed)}); "
            "use the same settings or start a new run"
        )


def train(
    student: nn.Module,
    teacher: nn.Module | None,
    blocks_or_datasets: Any,
    config: TrainingConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    accelerator=None,
    tokenizer=None,
) -> TrainResult:
    """Train ``student`` against ``teacher`` with the recipe of ``config``; checkpoint, validate, export.

    Args:
        student: a causal LM or an encoder (Hugging Face ``PreTrainedModel``, possibly
            kronlm-compressed or layer-truncated); trained in place. A student with an LM head is
            validated by perplexity; one without (``BertModel`` in KroneckerBERT's general
            distillation) by the objective's loss on the validation blocks. Under FSDP it is sharded in place: afterwards
            each process holds its shard (``DTensor`` parameters); the full weights are in
            ``out_dir/final``.
        teacher: the frozen reference model (same tokenizer); None for recipe ``ce``. It is put in
            eval mode with ``requires_grad=False``, moved to the device, never wrapped in DDP or
            sharded (under FSDP every process holds the whole teacher).
        blocks_or_datasets: a ``TokenBlocks`` (``.train``/``.val`` int64 tensors (N, block_size)),
            a dict ``{"train", "val"}`` or a pair ``(train, val)`` of such tensors or map-style
            datasets yielding {"input_ids": (T,), "attention_mask": (T,)}. ``val`` may be None;
            it must be held-out training data, never the test split.
        config: the run's settings.
        out_dir: run folder: ``checkpoints/``, ``best/``, ``final/``, ``logs/``.
        resume: continue from ``out_dir/checkpoints/latest`` (model, optimizer, scheduler, RNG,
            data position), reproducing the losses of an uninterrupted run. The checkpoint may
            come from a DDP or an FSDP run with the same number of processes.
        accelerator: an existing ``accelerate.Accelerator`` (default: :func:`make_accelerator`).
            One process, DDP, FSDP2, or FSDP1 with ``use_orig_params``.
        tokenizer: saved next to the exported students when given.

    Returns:
        A :class:`TrainResult`.

    Raises:
        TrainingDiverged: the loss or gradient norm of a step is NaN / inf; no update is applied
            and the last checkpoint stays as it was.
        ValueError: inconsistent inputs (a recipe needing a teacher without one, too little data
            for one step, a resume with a different data order, an unsupported process layout
            such as DeepSpeed, ...).
        FileNotFoundError: ``resume`` without a completed checkpoint in ``out_dir``.
    """
    from accelerate.utils import set_seed

    out_dir = Path(out_dir)
    accelerator = accelerator or make_accelerator(config, out_dir)
    if accelerator.gradient_accumulation_steps != config.grad_accum_steps:
        raise ValueError(
            f"the accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches but the "
            f"config {config.grad_accum_steps}; set it with --grad-accum / grad_accum_steps, not with "
            "accelerate launch --gradient_accumulation_steps"
        )
    check_distributed_setup(accelerator)
    sharded = is_sharded(accelerator)
    device = accelerator.device
    world = accelerator.num_processes

    objective = _build_objective(config)
    if objective.needs_teacher and teacher is None:
        raise ValueError(f"recipe {config.recipe!r} distils from a teacher, but no teacher was given")
    if not objective.needs_teacher:
        teacher = None

    train_raw, val_raw = split_data(blocks_or_datasets)
    train_set = as_dataset(train_raw, config.block_size, "training")
    val_set = as_dataset(val_raw, config.block_size, "validation")
    if train_set is None:
        raise ValueError("the training data is empty")
    per_step = config.micro_batch_size * config.grad_accum_steps * world
    steps_per_epoch = len(train_set) // per_step
    if steps_per_epoch == 0:
        raise ValueError(
            f"the training data has {len(train_set)} blocks, fewer than one optimizer step needs "
            f"(micro_batch_size {config.micro_batch_size} x grad_accum_steps {config.grad_accum_steps} "
            f"x {world} processes = {per_step})"
        )
    max_steps = config.max_steps or math.ceil((config.epochs or 1.0) * steps_per_epoch)
    val_metric = "ppl" if has_lm_head(student) else "distill_loss"
    if val_metric == "distill_loss" and val_set is not None and teacher is None:
        raise ValueError(
            f"{type(student).__name__} has no LM head, so it is validated by the distillation loss, "
            "which needs a teacher; give one or drop the validation data"
        )

    set_seed(config.seed, device_specific=True)
    if teacher is not None:
        place_teacher(accelerator, teacher)
    if sharded:
        # FSDP places (and shards) the student itself, never whole on one device.
        fill_from_process_0(accelerator, student, torch.device("cpu"))
    else:
        student.to(device)
    student.train()
    optimizer = build_optimizer(student, config)
    scheduler = build_scheduler(optimizer, config, max_steps)
    group_names = [group["name"] for group in optimizer.param_groups]
    param_names = optimizer_param_names(student, optimizer)
    aliases = tied_aliases(student)
    # Under FSDP process 0 exports through an empty copy taken before sharding (see full_student).
    shell = meta_copy(student) if sharded and accelerator.is_main_process else None

    ckpt = None
    if resume:
        path = latest_checkpoint(out_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no completed checkpoint under {out_dir / 'checkpoints'}")
        # Under FSDP only process 0 reads the weights; it broadcasts them after sharding.
        ckpt = load_checkpoint(path, model_and_optimizer=accelerator.is_main_process or not sharded)
        _check_resume_compatible(ckpt.trainer_state, config, world, path)

    model, optimizer = accelerator.prepare(student, optimizer)
    start_step, tokens_seen = 0, 0
    best_val, best_step = None, None
    if ckpt is not None:
        restore_model_state(accelerator, model, ckpt.model_state)
        restore_optimizer_state(accelerator, model, optimizer, ckpt.optimizer_state, param_names)
        scheduler.load_state_dict(ckpt.scheduler_state)
        if ckpt.trainer_state.get("max_steps") != max_steps:
            # A longer (or shorter) run re-times the cosine: keep only the schedule's position.
            scheduler = build_scheduler(optimizer, config, max_steps, completed_steps=ckpt.step)
        restore_rng_state(ckpt.rng_state, accelerator.process_index, device)
        start_step = ckpt.step
        tokens_seen = int(ckpt.trainer_state["tokens_seen"])
        saved_metric = ckpt.trainer_state.get("val_metric", "ppl")
        if saved_metric == val_metric:  # checkpoints from before val_metric existed are "ppl"
            best_val = ckpt.trainer_state.get("best_val", ckpt.trainer_state.get("best_val_ppl"))
            best_step = ckpt.trainer_state.get("best_step")
        ckpt = None

    result = TrainResult(steps=start_step, start_step=start_step, tokens_seen=tokens_seen,
                         val_metric=val_metric, best_val=best_val, best_step=best_step)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        config.save(out_dir / "training_config.yaml")
    accelerator.init_trackers(
        TRACKER_PROJECT,
        config=_hparams(config, {"max_steps_resolved": max_steps, "num_processes": world,
                                 "tokens_per_step": per_step * config.block_size,
                                 "distributed_type": accelerator.distributed_type.value}),
    )
    progress = tqdm(total=max_steps, initial=start_step, desc="distill", unit="step",
                    disable=not accelerator.is_main_process, dynamic_ncols=True)

    def say(message: str) -> None:
        if accelerator.is_main_process:
            progress.write(message)

    say(
        f"training {max_steps - start_step} steps from step {start_step}: {per_step} blocks x "
        f"{config.block_size} tokens per step on {world} process(es) ({accelerator.distributed_type.value}), "
        f"{steps_per_epoch} steps per epoch, mixed precision {accelerator.mixed_precision}"
    )

    def export(folder: Path, summary: dict[str, Any]) -> Path:
        # A collective under FSDP: every process gathers, process 0 writes.
        with full_student(accelerator, model, shell, aliases) as plain:
            if accelerator.is_main_process:
                export_student(plain, folder, tokenizer=tokenizer, summary=summary)
        accelerator.wait_for_everyone()
        return folder

    def save(step: int) -> None:
        rng = {k: v.unsqueeze(0).to(device) for k, v in capture_rng_state(device).items()}
        rng = {k: v.cpu() for k, v in accelerator.gather(rng).items()}
        model_state = gather_model_state(accelerator, model, aliases)
        optimizer_state = gather_optimizer_state(accelerator, model, optimizer, param_names)
        if accelerator.is_main_process:
            trainer_state = {
                "tokens_seen": result.tokens_seen,
                "epoch": step // steps_per_epoch,
                "step_in_epoch": step % steps_per_epoch,
                "blocks_per_step": per_step,
                "sampler_seed": config.seed,
                "world_size": world,
                "distributed_type": accelerator.distributed_type.value,
                "max_steps": max_steps,
                "val_metric": result.val_metric,
                "best_val": result.best_val,
                "best_val_ppl": result.best_val_ppl,
                "best_step": result.best_step,
                "param_groups": group_names,
                "config": config.to_dict(),
            }
            result.last_checkpoint = save_checkpoint(
                out_dir, step=step, model_state=model_state, optimizer_state=optimizer_state,
                scheduler_state=scheduler.state_dict(), rng_state=rng, trainer_state=trainer_state,
            )
            protect = (result.best_step,) if result.best_step is not None else ()
            prune_checkpoints(out_dir, config.keep_checkpoints, protect_steps=protect)
        accelerator.wait_for_everyone()

    def validate(step: int) -> None:
        if val_metric == "ppl":
            metrics = evaluate_perplexity(model, val_set, accelerator, config.micro_batch_size, config.eval_batches)
            value, label = metrics["ppl"], "ppl"
        else:
            metrics = evaluate_distillation_loss(model, teacher, objective, val_set, accelerator,
                                                 config.micro_batch_size, config.eval_batches)
            value, label = metrics["loss"], "distillation loss"
        result.val_history.append({"step": step, **metrics})
        accelerator.log({f"val/{k}": v for k, v in metrics.items() if k not in ("tokens", "blocks")}, step=step)
        improved = result.best_val is None or value < result.best_val
        say(f"step {step}: validation loss {metrics['loss']:.4f}"
            + (f", ppl {value:.3f}" if val_metric == "ppl" else f" ({label})")
            + (" (best)" if improved else f" (best {result.best_val:.4f} at step {result.best_step})"))
        if improved:
            result.best_val, result.best_step = value, step
            result.best_dir = export(
                out_dir / "best",
                {"step": step, "tokens_seen": result.tokens_seen, "val_loss": metrics["loss"],
                 "val_metric": val_metric, "val": value, "recipe": config.recipe,
                 **({"val_ppl": value} if val_metric == "ppl" else {})},
            )

    try:
        step = start_step
        smoothed_tps = None
        while step < max_steps:
            epoch, offset = divmod(step, steps_per_epoch)
            indices = epoch_indices(len(train_set), epoch, config.seed, per_step)
            mine = process_share(indices, offset, config.micro_batch_size, config.grad_accum_steps, world,
                                 accelerator.process_index)
            batches = iter(epoch_loader(train_set, mine, config.micro_batch_size, config.seed, epoch))
            for _ in range(offset, steps_per_epoch):
                started = time.perf_counter()
                total = torch.zeros((), device=device)
                terms: dict[str, torch.Tensor] = {}
                tokens = torch.zeros((), device=device)
                grad_norm = torch.zeros((), device=device)
                for _ in range(config.grad_accum_steps):
                    batch = {k: v.to(device) for k, v in next(batches).items()}
                    with accelerator.accumulate(model):
                        with accelerator.autocast():
                            out = objective(model, teacher, batch)
                        accelerator.backward(out.total)
                        total += out.total.detach().float()
                        for name, value in out.terms.items():
                            terms[name] = terms.get(name, 0.0) + value.detach().float()
                        tokens += batch["attention_mask"].sum()
                        if accelerator.sync_gradients:
                            max_norm = config.grad_clip if config.grad_clip is not None else float("inf")
                            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
                names = sorted(terms)
                local = torch.stack([total, *(terms[n] for n in names)]) / config.grad_accum_steps
                stats = accelerator.reduce(local, reduction="mean")
                tokens = int(accelerator.reduce(tokens, reduction="sum").item())
                grad_norm = grad_norm_value(grad_norm)
                loss = stats[0].item()
                step_terms = {n: stats[i + 1].item() for i, n in enumerate(names)}
                if not math.isfinite(loss) or not math.isfinite(grad_norm) or not all(map(math.isfinite, step_terms.values())):
                    last = latest_checkpoint(out_dir)
                    detail = ", ".join(f"{n}={v:.6g}" for n, v in step_terms.items())
                    raise TrainingDiverged(
                        f"non-finite loss at step {step + 1}: total={loss:.6g}, {detail}, grad norm={grad_norm:.6g}; "
                        f"stopped before the update, last good checkpoint: {last if last is not None else 'none'}"
                    )
                lrs = {f"train/lr/{name}": group["lr"] for name, group in zip(group_names, optimizer.param_groups)}
                optimizer.step()
                if not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                result.steps = step
                result.tokens_seen += tokens
                result.losses.append(loss)
                result.loss_terms.append(step_terms)
                elapsed = time.perf_counter() - started
                tps = tokens / elapsed if elapsed > 0 else float("nan")
                smoothed_tps = tps if smoothed_tps is None else 0.9 * smoothed_tps + 0.1 * tps
                accelerator.log(
                    {"train/loss": loss, **{f"train/{n}": v for n, v in step_terms.items()}, **lrs,
                     "train/grad_norm": grad_norm, "train/tokens_per_s": tps, "train/tokens_seen": result.tokens_seen},
                    step=step,
                )
                progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{smoothed_tps:,.0f}", refresh=False)
                progress.update(1)
                last_step = step == max_steps
                if val_set is not None and (step % config.eval_every == 0 or last_step):
                    validate(step)
                if step % config.save_every == 0 or last_step:
                    save(step)
                if last_step:
                    break
        result.final_dir = export(
            out_dir / "final",
            {"step": result.steps, "tokens_seen": result.tokens_seen, "recipe": config.recipe,
             "best_step": result.best_step, "val_metric": val_metric, "best_val": result.best_val,
             "best_val_ppl": result.best_val_ppl,
             "val": result.val_history[-1] if result.val_history else None},
        )
        if result.best_step is not None:
            result.best_dir = out_dir / "best"
    finally:
        progress.close()
        # Only the trackers: accelerator.end_training() would also destroy the process group,
        # which belongs to whoever launched the processes (the CLI ends it when it exits).
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.trackers = []
    return result


__all__ = ["TrainResult", "TrainingDiverged", "train"]
