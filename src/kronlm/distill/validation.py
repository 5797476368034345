"""Validation of the student during a recovery run, over one or several processes.

A student with an LM head is validated by perplexity (:func:`evaluate_perplexity`); a bare encoder
(KroneckerBERT's general distillation of ``BertModel``) has no token predictions, so it is
validated by the distillation objective itself on the held-out blocks
(:func:`evaluate_distillation_loss`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset


def _is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

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


def _eval_mode(model: nn.Module, accelerator) -> tuple[nn.Module, bool]:
    # A DDP wrapper is bypassed (its forward would synchronise buffers); FSDP is called as it is.
    net = model if _is_sharded(accelerator) else accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    return net, was_training


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
    net, was_training = _eval_mode(model, accelerator)
    nll = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
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
    net.train(was_training)
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
    net, was_training = _eval_mode(model, accelerator)
    sums: dict[str, torch.Tensor] = {}
    blocks = 0
    names: list[str] = []
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
    net.train(was_training)
    count = totals[-1].item()
    metrics = {"loss": (totals[0] / count).item(), "blocks": int(count)}
    metrics.update({f"term/{name}": (totals[i] / count).item() for i, name in enumerate(names) if i > 0})
    return metrics


__all__ = ["evaluate_distillation_loss", "evaluate_perplexity"]
