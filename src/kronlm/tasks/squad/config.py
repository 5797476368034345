"""Settings of one SQuAD fine-tuning or task-distillation run, YAML/JSON round-trippable.

:class:`SquadTrainConfig` is :class:`kronlm.distill.config.TaskTrainConfig` (the fields of any
labelled-task run, mapped onto the one training loop by ``training_config``) plus the windowing
and span-decoding settings of extractive question answering; ``configs/squad-*.yaml`` are files
of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kronlm.distill.config import TaskTrainConfig
from kronlm.tasks.squad.data import SQUAD_VERSIONS

__all__ = ["SquadTrainConfig"]


@dataclass
class SquadTrainConfig(TaskTrainConfig):
    """Hyper-parameters of a ``kronlm squad`` stage (teacher fine-tuning or student distillation).

    The fields of :class:`~kronlm.distill.config.TaskTrainConfig` keep their meaning, with two
    SQuAD readings: an "example" of ``max_train_examples`` / ``val_fraction`` is a *question*
    (its windows go wherever it goes), while ``batch_size`` / ``eval_batch_size`` count
    *windows* (features), the rows the model sees. ``max_length`` is the window length in tokens
    (question, context and special tokens).

    Attributes:
        doc_stride: context tokens shared by consecutive windows of a long context (run_qa.py's
            ``doc_stride``, default 128).
        max_answer_length: longest answer span decoded, in tokens (default 30).
        n_best_size: start and end candidates per window in span decoding (default 20).
        version: "1.1" (every question has an answer) or "2.0" (unanswerable questions and the
            no-answer threshold, chosen on the held-out training questions).

    Raises:
        ValueError: a value out of range or an unknown key, naming it (errors start with
            "squad config").
    """

    max_length: int = 384
    batch_size: int = 16
    epochs: float = 2.0
    doc_stride: int = 128
    max_answer_length: int = 30
    n_best_size: int = 20
    version: str = "1.1"

    config_name = "squad config"

    def validate(self) -> None:
        """The checks of :class:`TaskTrainConfig` plus the SQuAD fields'."""
        super().validate()
        for name in ("max_answer_length", "n_best_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.doc_stride, bool) or not isinstance(self.doc_stride, int) or not 0 <= self.doc_stride < self.max_length:
            raise ValueError(f"doc_stride must be an integer in [0, max_length={self.max_length}) tokens, got {self.doc_stride!r}")
        self.version = str(self.version)
        if self.version not in SQUAD_VERSIONS:
            raise ValueError(f"version must be one of {', '.join(SQUAD_VERSIONS)}, got {self.version!r}")
