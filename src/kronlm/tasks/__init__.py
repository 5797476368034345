"""Downstream tasks: GLUE and SQuAD (extractive question answering) beside the language-model ones.

:mod:`kronlm.tasks.squad` holds the model-independent parts of SQuAD v1.1 / v2.0: the readers,
feature windows, span decoding and the official metrics.
:mod:`kronlm.tasks.glue` is GLUE as a family of the task pipeline (:mod:`kronlm.tasks.pipeline`:
teacher fine-tuning -> compression -> optional stage-1 weights -> task distillation -> report),
trained by :class:`kronlm.distill.Trainer`.
"""

from kronlm.tasks.pipeline import TaskFamily, TaskMetricValidator, TaskSplits, run_task_pipeline, train_task_model
from kronlm.tasks.report import ModelResult, TaskReport, read_report, write_report
from kronlm.tasks.student import count_embedding_linear_parameters, general_distill, load_general_distilled, make_student

__all__ = [
    "ModelResult",
    "TaskFamily",
    "TaskMetricValidator",
    "TaskReport",
    "TaskSplits",
    "count_embedding_linear_parameters",
    "general_distill",
    "load_general_distilled",
    "make_student",
    "read_report",
    "run_task_pipeline",
    "train_task_model",
    "write_report",
]
