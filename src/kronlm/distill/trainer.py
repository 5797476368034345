"""The recovery training loop: distil a compressed or truncated student from its teacher.

One loop for one CPU, one GPU, or several processes (DDP under ``accelerate launch`` or
``torchrun``), built on Hugging Face Accelerate: gradient accumulation, mixed precision,
gradient clipping and TensorBoard logging come from :class:`accelerate.Accelerator`. What this
module adds:

- AdamW with separate parameter groups for Kronecker factors, Krony-PT's per-term scalars and the
  rest (no weight decay on biases, norm weights and scalars), and a linear warm-up followed by a
  cosine decay to ``min_lr`` (Krony-PT, SPEC §4);
- a deterministic, resumable data order (each epoch a seeded permutation of the training blocks,
  split across processes), so ``resume=True`` continues to the same losses as an uninterrupted
  run;
- checkpoints in safetensors + JSON (:mod:`kronlm.distill.checkpoint`), the best student by
  validation perplexity in ``out_dir/best`` and the final one in ``out_dir/final``;
- a hard stop on a NaN / inf loss or gradient norm, before the optimizer touches the weights.

The loss itself is :class:`kronlm.distill.objective.DistillationObjective`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
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
from kronlm.utils.io import atomic_dir, write_json

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
        val_history: ``{"step", "loss", "ppl", "tokens"}`` of every validation pass in this call.
        best_val_ppl / best_step: best validation perplexity so far (None without validation).
        final_dir / best_dir: the exported students (None when not written).
        last_checkpoint: the newest checkpoint folder (None when none was written).
    """

    steps: int
    start_step: int
    tokens_seen: int
    losses: list[float] = field(default_factory=list)
    loss_terms: list[dict[str, float]] = field(default_factory=list)
    val_history: list[dict[str, float]] = field(default_factory=list)
    best_val_ppl: float | None = None
    best_step: int | None = None
    final_dir: Path | None = None
    best_dir: Path | None = None
    last_checkpoint: Path | None = None


# ------------------------------------------------------------------------------------------------
# accelerator


def resolve_mixed_precision(mode: str) -> str:
    """Map ``"auto"`` to ``"bf16"`` when a CUDA device supports bfloat16, else ``"no"``.

    Raises:
        ValueError: ``mode`` is not one of "no", "bf16", "auto".
    """
    if mode == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if mode not in ("no", "bf16"):
        raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'auto', got {mode!r}")
    return mode


def make_accelerator(config: TrainingConfig, out_dir: str | os.PathLike):
    """The :class:`accelerate.Accelerator` a run of ``config`` uses.

    Gradient accumulation over ``config.grad_accum_steps`` micro-batches, mixed precision from
    :func:`resolve_mixed_precision`, TensorBoard logs under ``config.log_dir`` (default
    ``out_dir/logs``). On a machine without an accelerator device, a multi-process launch
    (``WORLD_SIZE`` > 1, e.g. ``torchrun`` on CPU) runs as CPU DDP over gloo; accelerate would
    otherwise treat each process as a separate single-process run. Create it before loading data
    so ``accelerator.main_process_first()`` can order the tokenisation.

    Raises:
        ValueError: ``ACCELERATE_*`` settings from ``accelerate launch`` that contradict the
            config (raised by accelerate).
    """
    from accelerate import Accelerator

    has_device = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        gradient_accumulation_steps=config.grad_accum_steps,
        mixed_precision=resolve_mixed_precision(config.mixed_precision),
        log_with="tensorboard",
        project_dir=str(config.log_dir or Path(out_dir) / "logs"),
        cpu=multi_process and not has_device,
    )


# ------------------------------------------------------------------------------------------------
# optimizer and schedule


def _kronecker_types() -> tuple[type, ...]:
    from kronlm.layers import KroneckerEmbedding, KroneckerLinear

    return (KroneckerLinear, KroneckerEmbedding)


def build_param_groups(model: nn.Module, config: TrainingConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups for ``model``.

    Groups (empty ones are left out), each with ``name``, ``params``, ``lr``, ``weight_decay``:

    - ``kronecker``: factors ``A`` (R, m1, n1) and ``B`` (R, m2, n2) of every ``KroneckerLinear``
      / ``KroneckerEmbedding``; ``lr_kronecker`` (default ``lr``), ``weight_decay``;
    - ``scalars``: Krony-PT's per-term ``scales`` (R,); ``lr_scalars`` (default ``lr``), no decay;
    - ``decay``: every other trainable tensor with 2 or more dimensions (weights, embeddings,
      LM head); ``lr``, ``weight_decay``;
    - ``no_decay``: every other trainable tensor with fewer than 2 dimensions (biases, LayerNorm /
      RMSNorm weights); ``lr``, no decay.

    With ``config.freeze_uncompressed`` every parameter outside the first two groups is set to
    ``requires_grad=False`` and left out. Tied parameters appear once.

    Raises:
        ValueError: ``freeze_uncompressed`` on a student without Kronecker layers, or no
            trainable parameter at all.
    """
    kronecker, scalars = set(), set()
    for module in model.modules():
        if isinstance(module, _kronecker_types()):
            for name, param in module.named_parameters(recurse=False):
                if name in ("A", "B"):
                    kronecker.add(id(param))
                elif name == "scales":
                    scalars.add(id(param))
    if config.freeze_uncompressed and not kronecker:
        raise ValueError("freeze_uncompressed is set, but the student has no Kronecker layers to train")
    buckets: dict[str, list[nn.Parameter]] = {"kronecker": [], "scalars": [], "decay": [], "no_decay": []}
    for _, param in model.named_parameters():
        if config.freeze_uncompressed and id(param) not in kronecker and id(param) not in scalars:
            param.requires_grad_(False)
            continue
        if not param.requires_grad:
            continue
        if id(param) in kronecker:
            buckets["kronecker"].append(param)
        elif id(param) in scalars:
            buckets["scalars"].append(param)
        elif param.ndim >= 2:
            buckets["decay"].append(param)
        else:
            buckets["no_decay"].append(param)
    settings = {
        "kronecker": (config.lr_kronecker or config.lr, config.weight_decay),
        "scalars": (config.lr_scalars or config.lr, 0.0),
        "decay": (config.lr, config.weight_decay),
        "no_decay": (config.lr, 0.0),
    }
    groups = [
        {"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
        for name, params in buckets.items()
        if params
    ]
    if not groups:
        raise ValueError("the student has no trainable parameters (all have requires_grad=False)")
    return groups


def build_optimizer(model: nn.Module, config: TrainingConfig) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay) over :func:`build_param_groups`, ``config.betas`` / ``eps``.

    Krony-PT's settings are the config defaults: betas (0.9, 0.95), weight decay 0.1.

    Raises:
        ValueError: as :func:`build_param_groups`.
    """
    return torch.optim.AdamW(
        build_param_groups(model, config), lr=config.lr, betas=tuple(config.betas), eps=config.eps
    )


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig, max_steps: int, *, completed_steps: int = 0):
    """Linear warm-up over ``warmup_steps``, then a half cosine down to ``min_lr / lr`` of each peak.

    The multiplier applied before optimizer step ``s`` (0-based) is ``s / warmup_steps`` during the
    warm-up and ``r + (1 - r) · ½(1 + cos(π (s - warmup) / (max_steps - warmup)))`` after it, with
    ``r = min_lr / lr`` (transformers' ``get_cosine_with_min_lr_schedule_with_warmup``).
    ``completed_steps`` > 0 positions the schedule after that many steps (the param groups must
    then carry ``initial_lr``, as a loaded optimizer state does).

    Raises:
        ValueError: ``warmup_steps`` is not smaller than ``max_steps``.
    """
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    if config.warmup_steps >= max_steps:
        raise ValueError(f"warmup_steps ({config.warmup_steps}) must be smaller than max_steps ({max_steps})")
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, config.warmup_steps, max_steps, min_lr_rate=config.min_lr / config.lr,
        last_epoch=completed_steps - 1,
    )


# ------------------------------------------------------------------------------------------------
# data


def _split_data(blocks_or_datasets: Any) -> tuple[Any, Any]:
    """(train, val) from a TokenBlocks-like object, a dict or a pair; val may be None."""
    if hasattr(blocks_or_datasets, "train"):
        return blocks_or_datasets.train, getattr(blocks_or_datasets, "val", None)
    if isinstance(blocks_or_datasets, dict):
        unknown = sorted(set(blocks_or_datasets) - {"train", "val"})
        if unknown or "train" not in blocks_or_datasets:
            raise ValueError(f"data dict must have a 'train' and optionally a 'val' entry, got keys {sorted(blocks_or_datasets)}")
        return blocks_or_datasets["train"], blocks_or_datasets.get("val")
    if isinstance(blocks_or_datasets, (tuple, list)) and len(blocks_or_datasets) == 2:
        return blocks_or_datasets[0], blocks_or_datasets[1]
    raise ValueError(
        "data must be a TokenBlocks (with .train/.val), a dict {'train', 'val'} or a pair (train, val), "
        f"got {type(blocks_or_datasets).__name__}"
    )


def _as_dataset(data: Any, block_size: int, what: str) -> Dataset | None:
    """Wrap a (N, block_size) token tensor in a BlockDataset; pass datasets through."""
    if data is None:
        return None
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{what} blocks must be an integer tensor (N, block_size), got {data.dtype} {tuple(data.shape)}")
        if data.shape[1] != block_size:
            raise ValueError(f"{what} blocks have {data.shape[1]} tokens each but block_size is {block_size}")
        if data.shape[0] == 0:
            return None
        from kronlm.data.blocks import BlockDataset

        return BlockDataset(data.long())
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise ValueError(f"{what} data must be a token tensor or a map-style dataset, got {type(data).__name__}")
    return data if len(data) > 0 else None


def epoch_indices(num_blocks: int, epoch: int, seed: int, per_step: int) -> list[int]:
    """The block indices of one epoch in training order: a permutation seeded by (seed, epoch).

    Args:
        num_blocks: training blocks N.
        epoch: 0-based epoch.
        seed: the run's seed.
        per_step: blocks per optimizer step over all processes
            (micro_batch_size x grad_accum_steps x processes).

    Returns:
        ``(N // per_step) * per_step`` distinct indices in [0, N); the remainder is dropped, a
        different one every epoch. Step ``s`` uses entries ``[s * per_step, (s + 1) * per_step)``.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_blocks, generator=generator)
    usable = (num_blocks // per_step) * per_step
    return order[:usable].tolist()


def process_share(indices: list[int], start_step: int, micro_batch_size: int, grad_accum_steps: int,
                  num_processes: int, process_index: int) -> list[int]:
    """The blocks one process trains on, in order, from optimizer step ``start_step`` of an epoch.

    Within a step of ``per_step = micro_batch_size * grad_accum_steps * num_processes`` blocks,
    micro-batch ``a`` of process ``p`` is the ``(a * num_processes + p)``-th run of
    ``micro_batch_size`` blocks. Every process thus sees a disjoint share, and with
    ``num_processes * grad_accum_steps`` fixed the blocks of each step do not depend on how they
    are split over processes (2 processes x 2 accumulation steps = 1 process x 4).
    """
    per_step = micro_batch_size * grad_accum_steps * num_processes
    out = []
    for step_start in range(start_step * per_step, len(indices), per_step):
        for a in range(grad_accum_steps):
            first = step_start + (a * num_processes + process_index) * micro_batch_size
            out.extend(indices[first:first + micro_batch_size])
    return out


def _epoch_loader(dataset: Dataset, indices: list[int], micro_batch_size: int, seed: int, epoch: int) -> DataLoader:
    # A private generator: iterating a DataLoader otherwise draws a seed from the global torch RNG,
    # which would shift dropout masks between a resumed and an uninterrupted run.
    generator = torch.Generator().manual_seed(seed + epoch)
    return DataLoader(dataset, batch_size=micro_batch_size, sampler=indices, generator=generator, num_workers=0)


# ------------------------------------------------------------------------------------------------
# validation


@torch.no_grad()
def evaluate_perplexity(model: nn.Module, dataset: Dataset, accelerator, micro_batch_size: int, max_batches: int | None = None) -> dict[str, float]:
    """Token-level validation perplexity of a causal LM on fixed-length blocks.

    Every block of ``dataset`` ({"input_ids": (T,), "attention_mask": (T,)}) is scored on its
    next-token predictions (T - 1 per full block); ppl = exp(Σ nll / Σ scored tokens). The first
    ``max_batches`` micro-batches (all when None), in order, are split round-robin over processes
    and the sums reduced, so every process returns the same value.

    Args:
        model: the (possibly DDP-wrapped) causal LM; evaluated unwrapped, in eval mode, then put
            back in its previous mode.
        dataset: map-style validation dataset of fixed-length blocks.
        accelerator: the run's accelerator (device, process split, autocast, reduction).
        micro_batch_size: blocks per forward pass.
        max_batches: cap on micro-batches (all processes together); None = all.

    Returns:
        {"loss": mean nll (nats / token), "ppl": perplexity, "tokens": scored tokens}.

    Raises:
        ValueError: no position could be scored (blocks of one token, or all masked).
    """
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    num_batches = math.ceil(len(dataset) / micro_batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    nll = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for b in range(accelerator.process_index, num_batches, accelerator.num_processes):
        items = [dataset[i] for i in range(b * micro_batch_size, min((b + 1) * micro_batch_size, len(dataset)))]
        input_ids = torch.stack([item["input_ids"] for item in items]).to(accelerator.device)
        mask = torch.stack([item["attention_mask"] for item in items]).to(accelerator.device)
        with accelerator.autocast():
            logits = unwrapped(input_ids=input_ids, attention_mask=mask).logits
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # log-softmax over the vocabulary needs more than 8 mantissa bits
        scored = (mask[:, 1:] * mask[:, :-1]).bool()
        token_nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
        ).view_as(scored)
        nll += token_nll[scored].double().sum()
        count += scored.sum()
    totals = accelerator.reduce(torch.stack([nll, count]), reduction="sum")
    unwrapped.train(was_training)
    if totals[1].item() == 0:
        raise ValueError("validation data has no scored tokens")
    loss = (totals[0] / totals[1]).item()
    return {"loss": loss, "ppl": math.exp(loss), "tokens": int(totals[1].item())}


# ------------------------------------------------------------------------------------------------
# export


def _is_kronlm_compressed(model: nn.Module) -> bool:
    return any(isinstance(m, _kronecker_types()) for m in model.modules())


def export_student(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer=None, summary: dict | None = None) -> Path:
    """Save a student so ``kronlm eval out_dir`` (and ``from_pretrained``) loads it; atomic.

    A kronlm compressed model (one with Kronecker layers) is written with ``kronlm.save``, anything
    else with ``save_pretrained``; the tokenizer (if given) and ``summary`` as
    ``training_summary.json`` go alongside. The folder is assembled under a temporary name and
    swapped in, replacing a previous ``out_dir``.

    Returns:
        ``out_dir``.

    Raises:
        OSError: the folder cannot be written.
    """
    import kronlm

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if _is_kronlm_compressed(model) and hasattr(kronlm, "save"):
            kronlm.save(model, tmp)
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if summary is not None:
            write_json(tmp / "training_summary.json", summary)
    return out_dir


# ------------------------------------------------------------------------------------------------
# the loop


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
        student: a causal LM (Hugging Face ``PreTrainedModel``, possibly kronlm-compressed or
            layer-truncated); trained in place.
        teacher: the frozen reference model (same tokenizer); None for recipe ``ce``. It is put in
            eval mode with ``requires_grad=False``, moved to the device, never wrapped in DDP.
        blocks_or_datasets: a ``TokenBlocks`` (``.train``/``.val`` int64 tensors (N, block_size)),
            a dict ``{"train", "val"}`` or a pair ``(train, val)`` of such tensors or map-style
            datasets yielding {"input_ids": (T,), "attention_mask": (T,)}. ``val`` may be None;
            it must be held-out training data, never the test split.
        config: the run's settings.
        out_dir: run folder: ``checkpoints/``, ``best/``, ``final/``, ``logs/``.
        resume: continue from ``out_dir/checkpoints/latest`` (model, optimizer, scheduler, RNG,
            data position), reproducing the losses of an uninterrupted run.
        accelerator: an existing ``accelerate.Accelerator`` (default: :func:`make_accelerator`).
        tokenizer: saved next to the exported students when given.

    Returns:
        A :class:`TrainResult`.

    Raises:
        TrainingDiverged: the loss or gradient norm of a step is NaN / inf; no update is applied
            and the last checkpoint stays as it was.
        ValueError: inconsistent inputs (a recipe needing a teacher without one, too little data
            for one step, a resume with a different data order, ...).
        FileNotFoundError: ``resume`` without a completed checkpoint in ``out_dir``.
    """
    from accelerate.utils import DistributedType, set_seed

    out_dir = Path(out_dir)
    accelerator = accelerator or make_accelerator(config, out_dir)
    if accelerator.gradient_accumulation_steps != config.grad_accum_steps:
        raise ValueError(
            f"the accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches, "
            f"the config {config.grad_accum_steps}"
        )
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(
            f"{accelerator.distributed_type.value} is not supported: kronlm's checkpoints hold a full, "
            "unsharded optimizer state; launch with DDP (accelerate launch --multi_gpu, or torchrun)"
        )
    device = accelerator.device
    world = accelerator.num_processes

    objective = _build_objective(config)
    if objective.needs_teacher and teacher is None:
        raise ValueError(f"recipe {config.recipe!r} distils from a teacher, but no teacher was given")
    if not objective.needs_teacher:
        teacher = None

    train_raw, val_raw = _split_data(blocks_or_datasets)
    train_set = _as_dataset(train_raw, config.block_size, "training")
    val_set = _as_dataset(val_raw, config.block_size, "validation")
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

    set_seed(config.seed, device_specific=True)
    if teacher is not None:
        teacher.requires_grad_(False)
        teacher.eval()
        teacher.to(device)
    student.to(device)
    student.train()
    optimizer = build_optimizer(student, config)
    scheduler = build_scheduler(optimizer, config, max_steps)
    group_names = [group["name"] for group in optimizer.param_groups]

    start_step, tokens_seen = 0, 0
    best_val_ppl, best_step = None, None
    if resume:
        path = latest_checkpoint(out_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no completed checkpoint under {out_dir / 'checkpoints'}")
        ckpt = load_checkpoint(path)
        _check_resume_compatible(ckpt.trainer_state, config, world, path)
        student.load_state_dict(ckpt.model_state, strict=True)
        optimizer.load_state_dict(ckpt.optimizer_state)
        scheduler.load_state_dict(ckpt.scheduler_state)
        if ckpt.trainer_state.get("max_steps") != max_steps:
            # A longer (or shorter) run re-times the cosine: keep only the schedule's position.
            scheduler = build_scheduler(optimizer, config, max_steps, completed_steps=ckpt.step)
        restore_rng_state(ckpt.rng_state, accelerator.process_index, device)
        start_step = ckpt.step
        tokens_seen = int(ckpt.trainer_state["tokens_seen"])
        best_val_ppl = ckpt.trainer_state.get("best_val_ppl")
        best_step = ckpt.trainer_state.get("best_step")
        del ckpt

    model, optimizer = accelerator.prepare(student, optimizer)
    result = TrainResult(steps=start_step, start_step=start_step, tokens_seen=tokens_seen,
                         best_val_ppl=best_val_ppl, best_step=best_step)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        config.save(out_dir / "training_config.yaml")
    accelerator.init_trackers(
        TRACKER_PROJECT,
        config=_hparams(config, {"max_steps_resolved": max_steps, "num_processes": world,
                                 "tokens_per_step": per_step * config.block_size}),
    )
    progress = tqdm(total=max_steps, initial=start_step, desc="distill", unit="step",
                    disable=not accelerator.is_main_process, dynamic_ncols=True)

    def say(message: str) -> None:
        if accelerator.is_main_process:
            progress.write(message)

    say(
        f"training {max_steps - start_step} steps from step {start_step}: {per_step} blocks x "
        f"{config.block_size} tokens per step on {world} process(es), {steps_per_epoch} steps per epoch, "
        f"mixed precision {accelerator.mixed_precision}"
    )

    def save(step: int) -> None:
        rng = {k: v.unsqueeze(0).to(device) for k, v in capture_rng_state(device).items()}
        rng = {k: v.cpu() for k, v in accelerator.gather(rng).items()}
        model_state = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            trainer_state = {
                "tokens_seen": result.tokens_seen,
                "epoch": step // steps_per_epoch,
                "step_in_epoch": step % steps_per_epoch,
                "blocks_per_step": per_step,
                "sampler_seed": config.seed,
                "world_size": world,
                "max_steps": max_steps,
                "best_val_ppl": result.best_val_ppl,
                "best_step": result.best_step,
                "param_groups": group_names,
                "config": config.to_dict(),
            }
            result.last_checkpoint = save_checkpoint(
                out_dir, step=step, model_state=model_state, optimizer_state=optimizer.state_dict(),
                scheduler_state=scheduler.state_dict(), rng_state=rng, trainer_state=trainer_state,
            )
            protect = (result.best_step,) if result.best_step is not None else ()
            prune_checkpoints(out_dir, config.keep_checkpoints, protect_steps=protect)
        accelerator.wait_for_everyone()

    def validate(step: int) -> None:
        metrics = evaluate_perplexity(model, val_set, accelerator, config.micro_batch_size, config.eval_batches)
        result.val_history.append({"step": step, **metrics})
        accelerator.log({"val/loss": metrics["loss"], "val/ppl": metrics["ppl"]}, step=step)
        improved = result.best_val_ppl is None or metrics["ppl"] < result.best_val_ppl
        say(f"step {step}: validation loss {metrics['loss']:.4f}, ppl {metrics['ppl']:.3f}"
            + (" (best)" if improved else f" (best {result.best_val_ppl:.3f} at step {result.best_step})"))
        if improved:
            result.best_val_ppl, result.best_step = metrics["ppl"], step
            if accelerator.is_main_process:
                result.best_dir = export_student(
                    accelerator.unwrap_model(model), out_dir / "best", tokenizer=tokenizer,
                    summary={"step": step, "tokens_seen": result.tokens_seen, "val_loss": metrics["loss"],
                             "val_ppl": metrics["ppl"], "recipe": config.recipe},
                )
            accelerator.wait_for_everyone()

    try:
        step = start_step
        smoothed_tps = None
        while step < max_steps:
            epoch, offset = divmod(step, steps_per_epoch)
            indices = epoch_indices(len(train_set), epoch, config.seed, per_step)
            mine = process_share(indices, offset, config.micro_batch_size, config.grad_accum_steps, world,
                                 accelerator.process_index)
            batches = iter(_epoch_loader(train_set, mine, config.micro_batch_size, config.seed, epoch))
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
                grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
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
        unwrapped = accelerator.unwrap_model(model)
        if accelerator.is_main_process:
            result.final_dir = export_student(
                unwrapped, out_dir / "final", tokenizer=tokenizer,
                summary={"step": result.steps, "tokens_seen": result.tokens_seen, "recipe": config.recipe,
                         "best_step": result.best_step, "best_val_ppl": result.best_val_ppl,
                         "val": result.val_history[-1] if result.val_history else None},
            )
            if result.best_step is not None:
                result.best_dir = out_dir / "best"
        accelerator.wait_for_everyone()
    finally:
        progress.close()
        # Only the trackers: accelerator.end_training() would also destroy the process group,
        # which belongs to whoever launched the processes (the CLI ends it when it exits).
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.trackers = []
    return result


__all__ = [
    "TrainResult",
    "TrainingDiverged",
    "build_optimizer",
    "build_param_groups",
    "build_scheduler",
    "epoch_indices",
    "evaluate_perplexity",
    "export_student",
    "make_accelerator",
    "process_share",
    "resolve_mixed_precision",
    "train",
]
