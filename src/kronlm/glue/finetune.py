"""The GLUE training loop (teacher fine-tuning and student task distillation) and dev evaluation.

:func:`train_classifier` is one plain loop for both: shuffled batches of encoded examples, a loss
callable, AdamW with the parameter groups and the warm-up + cosine schedule of
:mod:`kronlm.distill.optim`, gradient clipping, a hard stop on a non-finite loss, and checkpoints
in the safetensors + JSON format of :mod:`kronlm.distill.checkpoint`. The LM recovery loop
(:func:`kronlm.distill.train`) is not reused as a whole because it is built around token blocks
and perplexity validation; its optimizer, schedule and checkpoint pieces are.

The model that is reported is the one after the last step: GLUE test labels are private and the
dev split is the reported one, so no checkpoint is chosen on dev.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from kronlm.distill.losses import sequence_classification_loss
from kronlm.glue.config import GlueTrainConfig
from kronlm.glue.data import GlueBatchCollator
from kronlm.glue.metrics import compute_metrics, predictions_from_logits
from kronlm.glue.tasks import GlueTask

__all__ = ["LengthGroupedBatches", "TrainSummary", "evaluate_classifier", "finetune_loss", "train_classifier"]

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]

_MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class TrainSummary:
    """What :func:`train_classifier` did.

    Attributes:
        steps: optimizer steps run.
        examples: training examples the run drew from.
        losses: total loss of every step.
        terms: per-step unweighted loss terms (distillation runs), else empty dicts.
        seconds: wall time of the loop, in seconds.
        last_checkpoint: the last checkpoint folder written.
    """

    steps: int = 0
    examples: int = 0
    losses: list[float] = field(default_factory=list)
    terms: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    last_checkpoint: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the per-step lists are kept)."""
        return {"steps": self.steps, "examples": self.examples, "losses": self.losses, "terms": self.terms,
                "seconds": self.seconds, "last_checkpoint": None if self.last_checkpoint is None else str(self.last_checkpoint)}


class LengthGroupedBatches:
    """Batches of examples of similar length, in a new random order every epoch.

    Each epoch shuffles the examples, cuts the order into chunks of ``batch_size * 50``, sorts
    every chunk by token length, cuts it into batches and shuffles the batches (the idea of
    transformers' ``LengthGroupedSampler``). Padding then costs little: on SST-2, whose training
    phrases are mostly a few words, it cuts the padded tokens per batch several times over.

    Args:
        rows: encoded examples (their "input_ids" lengths are used).
        batch_size: examples per batch (the last batch of a chunk may be smaller).
        generator: the seeded torch generator that orders the epochs.
    """

    def __init__(self, rows: list[dict[str, Any]], batch_size: int, generator: torch.Generator):
        self.lengths = [len(r["input_ids"]) for r in rows]
        self.batch_size = batch_size
        self.generator = generator

    def __len__(self) -> int:
        chunk = self.batch_size * 50
        n = len(self.lengths)
        return sum(math.ceil(min(chunk, n - i) / self.batch_size) for i in range(0, n, chunk))

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        chunk = self.batch_size * 50
        batches = []
        for i in range(0, len(order), chunk):
            part = sorted(order[i : i + chunk], key=lambda j: self.lengths[j])
            batches.extend(part[k : k + self.batch_size] for k in range(0, len(part), self.batch_size))
        for b in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[b]


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in _MODEL_KEYS if k in batch}


def finetune_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Supervised loss of a classifier on its labels (cross-entropy, or MSE for regression).

    Args:
        batch: "input_ids" / "attention_mask" (batch, seq), optional "token_type_ids", "labels" (batch,).

    Returns:
        (0-dim loss with grad, {"ce": value}).
    """
    logits = model(**_model_inputs(batch)).logits
    loss = sequence_classification_loss(logits, batch["labels"])
    return loss, {"ce": float(loss.detach())}


def train_classifier(
    model: nn.Module,
    rows: list[dict[str, Any]],
    collator: GlueBatchCollator,
    config: GlueTrainConfig,
    out_dir: str | Path,
    *,
    loss_fn: LossFn = finetune_loss,
    device: str | torch.device = "cpu",
    desc: str = "glue",
    progress: bool = True,
) -> TrainSummary:
    """Train ``model`` in place on encoded examples; checkpoint to ``out_dir/checkpoints``.

    Args:
        model: a sequence classifier (``*ForSequenceClassification``, possibly compressed).
        rows: :func:`kronlm.glue.data.encode_examples` output.
        collator: pads rows into batches.
        config: run settings; ``max_steps`` or ``epochs`` x ceil(len(rows) / batch_size) steps.
        out_dir: run folder; checkpoints (model, AdamW state, schedule, RNG, progress) go to
            ``out_dir/checkpoints/step-XXXXXXX`` every ``save_every`` steps and after the last.
        loss_fn: ``loss_fn(model, batch) -> (loss, terms)``; default :func:`finetune_loss`.
        device: where to train.

    Returns:
        :class:`TrainSummary`.

    Raises:
        ValueError: no training example.
        kronlm.distill.TrainingDiverged: a non-finite loss or gradient norm (no update applied).
    """
    from kronlm.distill.checkpoint import (
        capture_rng_state,
        prune_checkpoints,
        save_checkpoint,
    )
    from kronlm.distill.optim import build_optimizer, build_scheduler
    from kronlm.distill.trainer import TrainingDiverged

    if not rows:
        raise ValueError("no training example")
    out_dir = Path(out_dir)
    steps_per_epoch = math.ceil(len(rows) / config.batch_size)
    max_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    max_steps = max(max_steps, 2)  # the warm-up + cosine schedule needs at least two steps
    tcfg = config.training_config(max_steps)
    torch.manual_seed(config.seed)
    model.to(device)
    model.train()
    if config.freeze_word_embeddings:
        embedding = model.get_input_embeddings()
        if isinstance(embedding, nn.Embedding):
            embedding.weight.requires_grad_(False)
    optimizer = build_optimizer(model, tcfg)
    scheduler = build_scheduler(optimizer, tcfg, max_steps)
    generator = torch.Generator().manual_seed(config.seed)
    if config.group_by_length:
        loader = DataLoader(rows, batch_sampler=LengthGroupedBatches(rows, config.batch_size, generator), collate_fn=collator)
    else:
        loader = DataLoader(rows, batch_size=config.batch_size, shuffle=True, generator=generator, collate_fn=collator)
    summary = TrainSummary(examples=len(rows))
    start = time.perf_counter()
    bar = tqdm(total=max_steps, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    step = 0
    try:
        while step < max_steps:
            for batch in loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                loss, terms = loss_fn(model, batch)
                loss.backward()
                max_norm = config.grad_clip if config.grad_clip is not None else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
                value = float(loss.detach())
                if not math.isfinite(value) or not math.isfinite(grad_norm):
                    raise TrainingDiverged(f"{desc}: non-finite loss {value} or gradient norm {grad_norm} at step {step + 1}; stopped before the update")
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                summary.steps = step
                summary.losses.append(value)
                summary.terms.append({k: float(v) for k, v in terms.items()})
                bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                bar.update(1)
                last = step == max_steps
                if last or (config.save_every and step % config.save_every == 0):
                    rng = {k: v.unsqueeze(0) for k, v in capture_rng_state(torch.device(device)).items()}
                    summary.last_checkpoint = save_checkpoint(
                        out_dir, step=step, model_state={k: v.detach().cpu() for k, v in model.state_dict().items()},
                        optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(), rng_state=rng,
                        trainer_state={"max_steps": max_steps, "examples": len(rows), "epoch": step / steps_per_epoch,
                                       "loss": value, "config": config.to_dict()},
                    )
                    prune_checkpoints(out_dir, config.keep_checkpoints)
                if last:
                    break
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - start
    model.eval()
    return summary


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    rows: list[dict[str, Any]],
    collator: GlueBatchCollator,
    task: GlueTask,
    *,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, float], torch.Tensor]:
    """Score ``model`` on encoded examples (a dev split) with the task's metrics.

    Returns:
        ({metric: value}, logits (examples, num_labels) float32 on the CPU).

    Raises:
        ValueError: no example, or logits that do not fit the task.
    """
    if not rows:
        raise ValueError(f"{task.name}: no evaluation example")
    model.to(device)
    model.eval()
    outputs = []
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collator(rows[i : i + batch_size]).items()}
        outputs.append(model(**_model_inputs(batch)).logits.float().cpu())
    logits = torch.cat(outputs)
    preds = predictions_from_logits(logits, task)
    return compute_metrics(task, preds, [r["labels"] for r in rows]), logits
