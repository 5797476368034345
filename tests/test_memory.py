"""release_memory hands freed heap pages back to the operating system (glibc)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from kronlm.utils.memory import release_memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm; malloc_trim is glibc's")
def test_freed_heap_pages_go_back_to_the_system():
    # 3,000 tensors of 64 KiB (below glibc's mmap threshold, so they live in the heap), every 50th
    # kept: the heap cannot shrink from its top, and ~190 MB of free pages stay resident until trimmed.
    tensors = [torch.ones(16384) for _ in range(3000)]
    kept = tensors[::50]
    del tensors
    before = _rss_bytes()
    trimmed = release_memory()
    after = _rss_bytes()
    if not trimmed:
        pytest.skip("this C library has no malloc_trim")
    assert before - after > 100 * 2**20, (before, after)
    assert all(float(t.sum()) == 16384 for t in kept)  # what is still referenced is untouched
