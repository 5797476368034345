"""Export of a trained model as a folder that ``kronlm eval`` and ``from_pretrained`` load.

The training loop calls an *exporter* ``exporter(model, folder, summary) -> folder`` for
``best/`` and ``final/``, on the main process, with a model that holds its full weights.
:class:`ModelExporter` (the default) writes a Hugging Face folder with :func:`kronlm.save`; a
run that trains something other than a whole model (one transformer block) passes its own
exporter, or None for none.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from kronlm.modeling import save


def export_student(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer=None, summary: dict | None = None) -> Path:
    """Save a student so ``kronlm eval out_dir`` (and ``from_pretrained``) loads it; atomic.

    ``kronlm.save``: ``save_pretrained`` (for a compressed model with its
    ``kronlm_compression.json``), the tokenizer (if given) and ``summary`` as
    ``training_summary.json``, assembled under a temporary name and swapped in, replacing a
    previous ``out_dir``. ``model`` must hold its full weights (not an FSDP shard;
    :func:`kronlm.distill.distributed.full_student` gives such a model).

    Returns:
        ``out_dir``.

    Raises:
        OSError: the folder cannot be written.
    """
    return save(model, out_dir, tokenizer=tokenizer, summary=summary)


class ModelExporter:
    """The default exporter: :func:`export_student` with a tokenizer and extra summary entries.

    Args:
        tokenizer: saved next to the model when given.
        summary: entries added to every ``training_summary.json`` (e.g. the task and the role of
            the run); the trainer's own entries (step, validation metric, ...) win on a clash.
    """

    def __init__(self, tokenizer=None, summary: dict[str, Any] | None = None):
        self.tokenizer = tokenizer
        self.summary = dict(summary or {})

    def __call__(self, model: nn.Module, folder: Path, summary: dict[str, Any]) -> Path:
        return export_student(model, folder, tokenizer=self.tokenizer, summary={**self.summary, **summary})


__all__ = ["ModelExporter", "export_student"]
