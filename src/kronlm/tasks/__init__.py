"""Downstream tasks: GLUE and SQuAD (extractive question answering) beside the language-model ones.

Both are families of the one task pipeline (:mod:`kronlm.tasks.pipeline`: teacher fine-tuning ->
a compressed (optionally stage-1) or pretrained compressed / truncated student -> task
distillation -> report), trained by :class:`kronlm.distill.Trainer`:
:mod:`kronlm.tasks.glue` (sequence classification, ``kronlm glue``) and :mod:`kronlm.tasks.squad`
(SQuAD v1.1 / v2.0: readers, windows, span decoding, the official metrics, ``kronlm squad``).
"""

from kronlm.tasks.pipeline import (
    TaskFamily,
    TaskMetricValidator,
    TaskSplits,
    TaskStudent,
    claim_task_folder,
    run_task_pipeline,
    train_task_model,
)
from kronlm.tasks.results import ModelResult, TaskReport, read_report, write_report
from kronlm.tasks.student import (
    copy_head,
    count_embedding_linear_parameters,
    general_distill,
    load_general_distilled,
    make_student,
    resolve_compression,
)

__all__ = [
    "ModelResult",
    "TaskFamily",
    "TaskMetricValidator",
    "TaskReport",
    "TaskSplits",
    "TaskStudent",
    "claim_task_folder",
    "copy_head",
    "count_embedding_linear_parameters",
    "general_distill",
    "load_general_distilled",
    "make_student",
    "read_report",
    "resolve_compression",
    "run_task_pipeline",
    "train_task_model",
    "write_report",
]
