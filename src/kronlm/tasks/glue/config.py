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

    The fields, their meaning and their checks are :class:`~kronlm.distill.config.TaskTrainConfig`'s;
    errors start with "glue config".
    """

    config_name = "glue config"
