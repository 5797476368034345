"""The deterministic, resumable data order of a training run.

Each epoch is a permutation of the training examples (token blocks, or variable-length task
examples) seeded by (seed, epoch), cut to whole optimizer steps and split across processes so
that the examples of a step do not depend on how many processes share it. With example lengths
given, the examples of each step are of similar length (less padding; the idea of transformers'
``LengthGroupedSampler``), still as a pure function of (seed, epoch). A run resumed at step ``s``
therefore sees exactly the examples an uninterrupted run would have seen, and draws no number
from the global RNGs to get them: the order is computed from indices, not replayed from a
sampler, so resuming needs no ``accelerate.skip_first_batches``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from kronlm.data.blocks import BlockDataset


def split_data(blocks_or_datasets: Any) -> tuple[Any, Any]:
    """(train, val) from a TokenBlocks-like object (``.train`` / ``.val``), a dict or a pair.

    ``val`` may be None.

    Raises:
        ValueError: a dict with keys other than "train" / "val" or without "train", or any other
            type (names the type).
    """
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


def as_dataset(data: Any, block_size: int, what: str) -> Dataset | None:
    """Wrap an int64 / int32 token tensor (N, block_size) in a ``BlockDataset``; pass datasets through.

    Args:
        data: a token tensor, a map-style dataset (anything with ``__getitem__`` and ``__len__``,
            a list of example dicts too), or None.
        block_size: tokens per block the run expects.
        what: "training" or "validation", for error messages.

    Returns:
        The dataset, or None when ``data`` is None or empty.

    Raises:
        ValueError: a tensor that is not integer (N, block_size), or an object that is neither a
            tensor nor a map-style dataset.
    """
    if data is None:
        return None
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{what} blocks must be an integer tensor (N, block_size), got {data.dtype} {tuple(data.shape)}")
        if data.shape[1] != block_size:
            raise ValueError(f"{what} blocks have {data.shape[1]} tokens each but block_size is {block_size}")
        if data.shape[0] == 0:
            return None

        return BlockDataset(data.long())
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise ValueError(f"{what} data must be a token tensor or a map-style dataset, got {type(data).__name__}")
    return data if len(data) > 0 else None


def epoch_indices(num_blocks: int, epoch: int, seed: int, per_step: int,
                  lengths: Sequence[int] | None = None, group_steps: int = 50) -> list[int]:
    """The example indices of one epoch in training order, a pure function of (seed, epoch).

    Args:
        num_blocks: training examples N.
        epoch: 0-based epoch.
        seed: the run's seed.
        per_step: examples per optimizer step over all processes
            (micro_batch_size x grad_accum_steps x processes).
        lengths: tokens of each example (N entries); None = no length grouping. With lengths, the
            permutation is cut into chunks of ``group_steps`` steps, each chunk is sorted by length
            (stable) and cut into steps, and the steps are shuffled, so each step holds examples of
            similar length while every example is still used once per epoch.
        group_steps: steps per sorted chunk (transformers' ``LengthGroupedSampler`` uses 50
            batches).

    Returns:
        ``(N // per_step) * per_step`` distinct indices in [0, N); the remainder is dropped, a
        different one every epoch. Step ``s`` uses entries ``[s * per_step, (s + 1) * per_step)``.

    Raises:
        ValueError: ``lengths`` does not have N entries.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_blocks, generator=generator)
    usable = (num_blocks // per_step) * per_step
    order = order[:usable].tolist()
    if lengths is None:
        return order
    if len(lengths) != num_blocks:
        raise ValueError(f"lengths has {len(lengths)} entries for {num_blocks} training examples")
    chunk = per_step * group_steps
    steps = []
    for start in range(0, usable, chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        steps.extend(part[k:k + per_step] for k in range(0, len(part), per_step))
    return [i for s in torch.randperm(len(steps), generator=generator).tolist() for i in steps[s]]


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


def epoch_loader(dataset: Dataset, indices: list[int], micro_batch_size: int, seed: int, epoch: int,
                 collate_fn: Callable[[list[Any]], Any] | None = None) -> DataLoader:
    """Micro-batches of ``micro_batch_size`` examples of ``dataset``, in the order of ``indices``.

    ``collate_fn`` turns a list of examples into a batch (e.g. a padding collator for
    variable-length examples); None = ``torch.utils.data.default_collate``, which stacks token
    blocks into {"input_ids": (micro_batch_size, T), "attention_mask": (micro_batch_size, T)}.
    No worker processes.
    """
    # A private generator: iterating a DataLoader otherwise draws a seed from the global torch RNG,
    # which would shift dropout masks between a resumed and an uninterrupted run.
    generator = torch.Generator().manual_seed(seed + epoch)
    return DataLoader(dataset, batch_size=micro_batch_size, sampler=indices, generator=generator, num_workers=0,
                      collate_fn=collate_fn)


__all__ = ["as_dataset", "epoch_indices", "epoch_loader", "process_share", "split_data"]
