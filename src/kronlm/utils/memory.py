"""Giving memory back to the operating system between the stages of a long run."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc

import torch


@functools.lru_cache(maxsize=1)
def _libc_malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None)
    except OSError:
        return None


def release_memory() -> bool:
    """Collect garbage, empty the CUDA cache and return the C heap's free pages to the system.

    Why: a recovery stage frees gigabytes of captures and activations, but glibc keeps the freed
    pages of allocations below its (adaptive, up to 32 MB) mmap threshold in the process's heap,
    so the next stage, or a second run on the same machine, finds the memory still taken.
    ``malloc_trim(0)`` hands those pages back. Call it between stages, never inside a step.

    Returns:
        True when ``malloc_trim`` ran (glibc), False where the C library has none (macOS, musl):
        there the collection and the CUDA cache release still happen.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim = _libc_malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
