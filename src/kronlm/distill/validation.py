"""Validation perplexity of the student during a recovery run, over one or several processes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset


def _is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


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
    sharded = _is_sharded(accelerator)
    net = model if sharded else accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    num_batches = math.ceil(len(dataset) / micro_batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    world, rank = accelerator.num_processes, accelerator.process_index
    rounds = math.ceil(num_batches / world)
    nll = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for r in range(rounds):
        b = r * world + rank
        counted = b < num_batches
        if not counted:
            if not sharded:
                break
            b = 0
        items = [dataset[i] for i in range(b * micro_batch_size, min((b + 1) * micro_batch_size, len(dataset)))]
        input_ids = torch.stack([item["input_ids"] for item in items]).to(accelerator.device)
        mask = torch.stack([item["attention_mask"] for item in items]).to(accelerator.device)
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


__all__ = ["evaluate_perplexity"]
