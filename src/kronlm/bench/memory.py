"""Peak memory of one call: CUDA allocator peak on a GPU, the process's peak resident set on CPU."""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable

import torch

try:
    import resource
except ImportError:  # pragma: no cover - not a Unix system
    resource = None

_HWM = re.compile(r"VmHWM:\s+(\d+)\s+kB")


def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            match = _HWM.search(fh.read())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _release_free_heap() -> None:
    # glibc keeps freed small-block heap resident; hand it back so the reset level is the live set.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_vm_hwm() -> bool:
    # Writing "5" to clear_refs resets VmHWM to the current RSS (Linux >= 4.0, proc(5)).
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[int, int, str]:
    """Run ``fn`` once and return (peak bytes, bytes at the start, method name).

    peak - start is what the call added on top of what was already resident (activations,
    workspaces, the KV cache); the start level includes the weights of every model loaded.

    Methods:
        "cuda max_memory_allocated": on a CUDA device, the allocator's peak of live tensors
            during the call (``torch.cuda.reset_peak_memory_stats`` first); weights included.
        "peak RSS (VmHWM after clear_refs)": on CPU under Linux, the process's resident-set
            high-water mark, reset just before the call through ``/proc/self/clear_refs`` (after
            ``malloc_trim`` returns freed heap to the system); it counts the whole process
            (weights, Python, libraries), not only tensors.
        "ru_maxrss (process lifetime)": fallback where the reset is not allowed; the peak since
            the process started, so only the largest model measured is meaningful.

    Raises:
        RuntimeError: no way to read memory on this platform.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device)), int(start), "cuda max_memory_allocated"
    _release_free_heap()
    if _reset_vm_hwm() and _vm_hwm_bytes() is not None:
        start = _vm_hwm_bytes()
        fn()
        return int(_vm_hwm_bytes()), int(start), "peak RSS (VmHWM after clear_refs)"
    if resource is None:  # pragma: no cover - non-Unix
        raise RuntimeError("peak_memory: neither /proc/self/status nor the resource module is available")
    start = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    fn()
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, start, "ru_maxrss (process lifetime)"
