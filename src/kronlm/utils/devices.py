"""Which device a model runs on: ``auto`` resolved, and a device this machine lacks refused before
any model is loaded (torch would otherwise fail later, deep inside the first ``.to``)."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device ``device`` names, checked against this machine.

    Args:
        device: ``"auto"`` or None (a CUDA GPU when torch sees one, else the CPU), ``"cpu"``,
            ``"cuda"``, ``"cuda:N"``, or any other name torch parses (``"mps"``, ``"xpu"``).

    Returns:
        The ``torch.device``.

    Raises:
        ValueError: a name torch does not parse, CUDA asked for where torch sees no CUDA GPU (a
            CPU build of torch, or no GPU visible), or a CUDA index beyond the GPUs visible (the
            count named).
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {str(device)!r} is not a device name torch knows (cpu, cuda, cuda:N, mps, ...): {exc}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a build without CUDA")
            raise ValueError(f"device {str(device)!r}: torch sees no CUDA GPU on this machine ({build})")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA GPU{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})")
    return resolved
