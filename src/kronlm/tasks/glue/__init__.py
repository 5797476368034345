"""GLUE fine-tuning and task distillation (KroneckerBERT; docs/tasks.md).

Modules: :mod:`.tasks` (task table), :mod:`.data` (TSV / ``datasets`` readers, the held-out
split, batching), :mod:`.metrics` (dev metrics), :mod:`.heads` (sequence classifiers),
:mod:`.config` (run settings), :mod:`.family` (GLUE as a family of the task pipeline, dev
evaluation, :func:`run_glue`). The training loop is :mod:`kronlm.distill.trainer`, the stages and
the report are :mod:`kronlm.tasks.pipeline` / :mod:`kronlm.tasks.results`. The
command is ``kronlm glue``.
"""

from kronlm.tasks.glue.config import GlueTrainConfig
from kronlm.tasks.glue.data import (
    GlueBatchCollator,
    GlueExamples,
    encode_examples,
    encoded_lengths,
    load_glue_split,
    load_hf_glue_split,
    read_glue_tsv,
)
from kronlm.tasks.glue.family import (
    GlueFamily,
    evaluate_classifier,
    make_classifier_student,
    resolve_compression,
    run_glue,
)
from kronlm.tasks.glue.heads import (
    build_classifier,
    check_classifier,
    classifier_head,
    classifier_head_name,
)
from kronlm.tasks.glue.metrics import compute_metrics, predictions_from_logits
from kronlm.tasks.glue.tasks import GLUE_TASKS, GlueTask, get_task
from kronlm.tasks.results import ModelResult, read_report, write_report
from kronlm.tasks.results import TaskReport as GlueReport
from kronlm.tasks.student import general_distill, load_general_distilled

__all__ = [
    "GLUE_TASKS",
    "GlueBatchCollator",
    "GlueExamples",
    "GlueFamily",
    "GlueReport",
    "GlueTask",
    "GlueTrainConfig",
    "ModelResult",
    "build_classifier",
    "check_classifier",
    "classifier_head",
    "classifier_head_name",
    "compute_metrics",
    "encode_examples",
    "encoded_lengths",
    "evaluate_classifier",
    "general_distill",
    "get_task",
    "load_general_distilled",
    "load_glue_split",
    "load_hf_glue_split",
    "make_classifier_student",
    "predictions_from_logits",
    "read_glue_tsv",
    "read_report",
    "resolve_compression",
    "run_glue",
    "write_report",
]
