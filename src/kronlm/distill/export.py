"""Export of a trained student as a model folder that ``kronlm eval`` and ``from_pretrained`` load."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from kronlm.distill.optim import kronecker_module_types
from kronlm.utils.io import atomic_dir, write_json


def _is_kronlm_compressed(model: nn.Module) -> bool:
    return any(isinstance(m, kronecker_module_types()) for m in model.modules())


def export_student(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer=None, summary: dict | None = None) -> Path:
    """Save a student so ``kronlm eval out_dir`` (and ``from_pretrained``) loads it; atomic.

    A kronlm compressed model (one with Kronecker layers) is written with ``kronlm.save``, anything
    else with ``save_pretrained``; the tokenizer (if given) and ``summary`` as
    ``training_summary.json`` go alongside. The folder is assembled under a temporary name and
    swapped in, replacing a previous ``out_dir``. ``model`` must hold its full weights (not an
    FSDP shard; :func:`kronlm.distill.distributed.full_student` gives such a model).

    Returns:
        ``out_dir``.

    Raises:
        OSError: the folder cannot be written.
    """
    import kronlm

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if _is_kronlm_compressed(model) and hasattr(kronlm, "save"):
            kronlm.save(model, tmp)
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if summary is not None:
            write_json(tmp / "training_summary.json", summary)
    return out_dir


__all__ = ["export_student"]
