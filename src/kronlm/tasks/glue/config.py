"""Settings of one GLUE fine-tuning or task-distillation run, YAML/JSON round-trippable.

:class:`GlueTrainConfig` is :class:`kronlm.distill.config.TaskTrainConfig` (the fields of any
labelled-task run, mapped onto the one training loop by ``training_config``) under GLUE's name;
``configs/glue-*.yaml`` are files of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kronlm.distill.config import TaskTrainConfig

__all__ = ["GlueTrainConfig"]


@dataclass
class GlueTrainConfig(TaskTrainConfig):
    """Hyper-parameters of a ``kronlm glue`` stage (teacher fine-tuning or student distillation).

    The fields, their meaning and their checks are :class:`~kronlm.distill.config.TaskTrainConfig`'s,
    plus one; errors start with "glue config".

    Attributes:
        max_dev_examples: evaluate on a seeded random subset of this many dev examples (smoke
            runs; seeded by ``seed``, the same subset for every model of a run); None = the whole
            dev split, as reported figures need.

    Raises:
        ValueError: a value out of range or an unknown key, naming it.
    """

    max_dev_examples: int | None = None

    config_name = "glue config"

    def validate(self) -> None:
        """The checks of :class:`TaskTrainConfig` plus ``max_dev_examples``'s."""
        super().validate()
        value = self.max_dev_examples
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"max_dev_examples must be a positive integer or null, got {value!r}")
