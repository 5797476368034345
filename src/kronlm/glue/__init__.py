"""GLUE fine-tuning and task distillation (KroneckerBERT, SPEC §1, §4, §5).

Modules: :mod:`tasks` (task table), :mod:`data` (TSV / ``datasets`` readers, batching),
:mod:`metrics` (dev metrics), :mod:`heads` (sequence classifiers), :mod:`config` (run
settings), :mod:`finetune` (training loop, evaluation), :mod:`task_distill` (student, the two
distillation stages), :mod:`report` (result table). The command is ``kronlm glue``.
"""

from kronlm.glue.config import GlueTrainConfig
from kronlm.glue.data import (
    GlueBatchCollator,
    GlueExamples,
    encode_examples,
    load_glue_split,
    load_hf_glue_split,
    read_glue_tsv,
)
from kronlm.glue.finetune import (
    TrainSummary,
    evaluate_classifier,
    finetune_loss,
    train_classifier,
)
from kronlm.glue.heads import (
    build_classifier,
    check_classifier,
    classifier_head,
    classifier_head_name,
)
from kronlm.glue.metrics import compute_metrics, predictions_from_logits
from kronlm.glue.report import GlueReport, ModelResult, read_report, write_report
from kronlm.glue.task_distill import (
    count_embedding_linear_parameters,
    general_distill,
    load_general_distilled,
    make_student,
    task_distillation_loss,
)
from kronlm.glue.tasks import GLUE_TASKS, GlueTask, get_task

__all__ = [
    "GLUE_TASKS",
    "GlueBatchCollator",
    "GlueExamples",
    "GlueReport",
    "GlueTask",
    "GlueTrainConfig",
    "ModelResult",
    "TrainSummary",
    "build_classifier",
    "check_classifier",
    "classifier_head",
    "classifier_head_name",
    "compute_metrics",
    "count_embedding_linear_parameters",
    "encode_examples",
    "evaluate_classifier",
    "finetune_loss",
    "general_distill",
    "get_task",
    "load_general_distilled",
    "load_glue_split",
    "load_hf_glue_split",
    "make_student",
    "predictions_from_logits",
    "read_glue_tsv",
    "read_report",
    "task_distillation_loss",
    "train_classifier",
    "write_report",
]
