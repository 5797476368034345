"""Validation during a training run, over one or several processes, and the metric that picks ``best/``.

A :class:`Validator` scores the model on held-out *training* data (never a test or reported
split) and names the metric that chooses the best checkpoint and drives early stopping. The two
defaults of :mod:`kronlm.distill.trainer`:

- :class:`PerplexityValidator`: a student with an LM head, by perplexity
  (:func:`evaluate_perplexity`, lower is better);
- :class:`DistillationLossValidator`: a bare encoder (KroneckerBERT's general distillation of
  ``BertModel``) has no token predictions, so it is validated by the distillation objective
  itself on the held-out blocks (:func:`evaluate_distillation_loss`, lower is better).

Task runs plug in their own (``kronlm.tasks.glue.ClassifierValidator``: the task's main metric,
higher is better); a block-wise run would plug in a held-out MSE.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType
from torch import nn
from torch.utils.data import Dataset


def _is_sharded(accelerator) -> bool:

    return accelerator.distributed_type == DistributedType.FSDP


def _my_batches(dataset: Dataset, accelerator, micro_batch_size: int, max_batches: int | None, *, at_least_one: bool = False):
    """This process's share of the first ``max_batches`` micro-batches, round-robin.

    Yields ``(batch, counted)``: batch = {"input_ids", "attention_mask"} (b, T) on the device;
    ``counted`` False marks a filler pass (batch 0 again) whose result the caller discards.
    Under FSDP the forward pass is a collective, so every process runs the same number of passes;
    ``at_least_one`` also gives a process without a batch of its own one filler pass.
    """
    sharded = _is_sharded(accelerator)
    num_batches = math.ceil(len(dataset) / micro_batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    world, rank = accelerator.num_processes, accelerator.process_index
    passes = 0
    for r in range(math.ceil(num_batches / world)):
        b = r * world + rank
        counted = b < num_batches
        if not counted:
            if not sharded and not (at_least_one and passes == 0):
                break
            b = 0
        items = [dataset[i] for i in range(b * micro_batch_size, min((b + 1) * micro_batch_size, len(dataset)))]
        passes += 1
        yield {key: torch.stack([item[key] for item in items]).to(accelerator.device) for key in ("input_ids", "attention_mask")}, counted


@contextlib.contextmanager
def evaluation_mode(model: nn.Module, accelerator) -> Iterator[nn.Module]:
    """The model to run a validation forward pass on, in eval mode; its mode is restored on exit.

    A DDP wrapper is bypassed (its forward would synchronise buffers), so each process may run
    any number of passes; an FSDP model is yielded as it is, whose forward is a collective: every
    process must then run the same number of passes.
    """
    net = model if _is_sharded(accelerator) else accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


@torch.no_grad()
def evaluate_perplexity(model: nn.Module, dataset: Dataset, accelerator, micro_batch_size: int, max_batches: int | None = None) -> dict[str, float]:
    """Token-level validation perplexity of a causal LM on fixed-length blocks.

    Every block of ``dataset`` ({"input_ids": (T,), "attention_mask": (T,)}) is scored on its
    next-token predictions (T - 1 per full block); ppl = exp(Σ nll / Σ scored tokens). The first
    ``max_batches`` micro-batches (all when None), in order, are split round-robin over processes
    and the sums reduced, so every process returns the same value.

    Under FSDP the forward pass is a collective (each layer's weights are gathered from all
    processes), so every process runs the same number of passes: a process whose share is
    shorter scores micro-batch 0 again and discards the result.

    Args:
        model: the causal LM as prepared by the accelerator. A DDP wrapper is bypassed (its
            forward would synchronise buffers); an FSDP model is called as it is.
        dataset: map-style validation dataset of fixed-length blocks.
        accelerator: the run's accelerator (device, process split, autocast, reduction).
        micro_batch_size: blocks per forward pass.
        max_batches: cap on micro-batches (all processes together); None = all.

    Returns:
        {"loss": mean nll (nats / token), "ppl": perplexity, "tokens": scored tokens}. The model
        is put back in the mode (train / eval) it had.

    Raises:
        ValueError: no position could be scored (blocks of one token, or all masked).
    """
    nll = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    with evaluation_mode(model, accelerator) as net:
        for batch, counted in _my_batches(dataset, accelerator, micro_batch_size, max_batches):
            input_ids, mask = batch["input_ids"], batch["attention_mask"]
            with accelerator.autocast():
                logits = net(input_ids=input_ids, attention_mask=mask).logits
            if not counted:
                continue
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()  # log-softmax over the vocabulary needs more than 8 mantissa bits
            scored = (mask[:, 1:] * mask[:, :-1]).bool()
            token_nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
            ).view_as(scored)
            nll += token_nll[scored].double().sum()
            count += scored.sum()
    totals = accelerator.reduce(torch.stack([nll, count]), reduction="sum")
    if totals[1].item() == 0:
        raise ValueError("validation data has no scored tokens")
    loss = (totals[0] / totals[1]).item()
    return {"loss": loss, "ppl": math.exp(loss), "tokens": int(totals[1].item())}


@torch.no_grad()
def evaluate_distillation_loss(
    model: nn.Module,
    teacher: nn.Module,
    objective,
    dataset: Dataset,
    accelerator,
    micro_batch_size: int,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Mean distillation loss of the student against the teacher on held-out blocks.

    The validation metric of students without an LM head. Every micro-batch of ``dataset``
    ({"input_ids": (T,), "attention_mask": (T,)}) is scored with the training ``objective`` (the
    same weighted terms, e.g. embedding + attention-score + hidden MSE for
    ``ilkd-kroneckerbert``); the result is the block-weighted mean over batches, reduced over
    processes, so every process returns the same value. Batches are split round-robin over
    processes as in :func:`evaluate_perplexity`, with the same FSDP rule; a process with no batch
    at all runs batch 0 once and discards it, under any layout, so that every process knows the
    term names and reduces a tensor of the same length.

    Args:
        model: the student as prepared by the accelerator (a DDP wrapper is bypassed).
        teacher: the frozen teacher.
        objective: a :class:`kronlm.distill.objective.DistillationObjective`.
        dataset: map-style validation dataset of fixed-length blocks.
        accelerator: the run's accelerator.
        micro_batch_size: blocks per forward pass.
        max_batches: cap on micro-batches (all processes together); None = all.

    Returns:
        {"loss": mean weighted loss, "blocks": blocks scored, plus one "term/<name>" entry per
        loss term}. The model is put back in the mode it had.

    Raises:
        ValueError: the dataset is empty; everything the objective raises.
    """
    if len(dataset) == 0:
        raise ValueError("validation data is empty")
    sums: dict[str, torch.Tensor] = {}
    blocks = 0
    names: list[str] = []
    with evaluation_mode(model, accelerator) as net:
        for batch, counted in _my_batches(dataset, accelerator, micro_batch_size, max_batches, at_least_one=True):
            with accelerator.autocast():
                out = objective(net, teacher, batch)
            names = ["total", *sorted(out.terms)]
            if not counted:
                continue
            n = batch["input_ids"].shape[0]
            values = {"total": out.total, **out.terms}
            for name in names:
                sums[name] = sums.get(name, 0.0) + values[name].detach().double() * n
            blocks += n
    local = [torch.as_tensor(sums.get(name, 0.0), dtype=torch.float64, device=accelerator.device) for name in names]
    local.append(torch.tensor(float(blocks), dtype=torch.float64, device=accelerator.device))
    totals = accelerator.reduce(torch.stack(local), reduction="sum")
    count = totals[-1].item()
    metrics = {"loss": (totals[0] / count).item(), "blocks": int(count)}
    metrics.update({f"term/{name}": (totals[i] / count).item() for i, name in enumerate(names) if i > 0})
    return metrics


class Validator:
    """Scores a model on held-out training data and names the metric that picks ``best/``.

    Subclasses set the three attributes and implement ``__call__``.

    Attributes:
        name: the metric's name in logs, results and checkpoints ("ppl", "distill_loss", "accuracy").
        key: the entry of the returned dict that holds it.
        greater_is_better: True for accuracy-like metrics, False for losses and perplexity.

    ``__call__(model, accelerator) -> dict[str, float]`` runs on every process with the model as
    the accelerator prepared it (see :func:`evaluation_mode`) and must return the same values on
    every process (reduce over processes, or let every process score all the data).
    """

    name: str = "val"
    key: str = "val"
    greater_is_better: bool = False

    def __call__(self, model: nn.Module, accelerator) -> dict[str, float]:
        raise NotImplementedError

    def improves(self, value: float, best: float | None) -> bool:
        """Whether ``value`` is a new best over ``best`` (None = no best yet); NaN / inf never is."""
        if not math.isfinite(value):
            return False
        if best is None:
            return True
        return value > best if self.greater_is_better else value < best


class PerplexityValidator(Validator):
    """Validation perplexity of a causal LM on held-out blocks (:func:`evaluate_perplexity`).

    Returns {"loss", "ppl", "tokens"}; ``best/`` is the lowest ``ppl``.
    """

    name, key, greater_is_better = "ppl", "ppl", False

    def __init__(self, dataset: Dataset, micro_batch_size: int, max_batches: int | None = None):
        self.dataset, self.micro_batch_size, self.max_batches = dataset, micro_batch_size, max_batches

    def __call__(self, model: nn.Module, accelerator) -> dict[str, float]:
        return evaluate_perplexity(model, self.dataset, accelerator, self.micro_batch_size, self.max_batches)


class DistillationLossValidator(Validator):
    """The distillation objective on held-out blocks (:func:`evaluate_distillation_loss`).

    Returns {"loss", "blocks", "term/<name>"...}; ``best/`` is the lowest ``loss``, reported as
    metric "distill_loss".
    """

    name, key, greater_is_better = "distill_loss", "loss", False

    def __init__(self, teacher: nn.Module, objective: Any, dataset: Dataset, micro_batch_size: int,
                 max_batches: int | None = None):
        self.teacher, self.objective = teacher, objective
        self.dataset, self.micro_batch_size, self.max_batches = dataset, micro_batch_size, max_batches

    def __call__(self, model: nn.Module, accelerator) -> dict[str, float]:
        return evaluate_distillation_loss(model, self.teacher, self.objective, self.dataset, accelerator,
                                          self.micro_batch_size, self.max_batches)


__all__ = [
    "DistillationLossValidator",
    "PerplexityValidator",
    "Validator",
    "evaluate_distillation_loss",
    "evaluate_perplexity",
    "evaluation_mode",
]
