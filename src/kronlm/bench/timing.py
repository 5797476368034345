"""Wall-clock timing with warm-up and medians, dense and Kronecker interleaved so both see the same
machine load."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Repeated wall-clock measurements of one callable.

    Attributes:
        times_s: seconds of each timed call (after warm-up), in run order.
    """

    times_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        """Median seconds per call."""
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        """Fastest call, seconds."""
        return min(self.times_s)


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    warmup: int = 2,
    repeats: int = 7,
    inner: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, Timing]:
    """Time several callables round-robin: call 1 of each, then call 2 of each, ...

    Interleaving keeps a burst of load from another process from landing on one contender only,
    so ratios between them stay fair on a shared machine. Each timed sample is ``inner``
    back-to-back calls (for calls too short for ``time.perf_counter``), divided by ``inner``.

    Args:
        fns: name -> zero-argument callable.
        warmup: untimed rounds first (allocator, caches, lazy init, torch.compile).
        repeats: timed rounds; report ``Timing.median_s``.
        inner: calls per timed sample.
        device: a CUDA device to synchronise before reading the clock; None or CPU: no sync.

    Returns:
        name -> ``Timing`` (seconds per call).

    Raises:
        ValueError: no callables, or warmup < 0, repeats < 1, inner < 1.
    """
    if not fns:
        raise ValueError("time_interleaved: no callables to time")
    if warmup < 0 or repeats < 1 or inner < 1:
        raise ValueError(f"time_interleaved: need warmup >= 0, repeats >= 1, inner >= 1, got {warmup}, {repeats}, {inner}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) / inner)
    return {name: Timing(tuple(ts)) for name, ts in samples.items()}


def calls_for(fn: Callable[[], object], target_s: float = 0.02, max_calls: int = 1000) -> int:
    """How many back-to-back calls of ``fn`` take about ``target_s`` seconds (at least 1).

    Used to pick ``inner`` for ``time_interleaved`` so that each sample is long enough for the
    clock and short enough for the benchmark budget. Calls ``fn`` once (untimed) and once timed.
    """
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    return max(1, min(max_calls, int(target_s / one)))
