"""Training by distillation (docs/recovery.md; the objectives: docs/method.md, "Recovery objectives"): loss terms, model tracing, recipes, objective, the one
training engine (config, optimizer, data order, checkpoints, validators, exporters, the loop)
that LM recovery, task fine-tuning and task distillation all run, and the task pipeline
(teacher -> compressed student -> report) that task families such as GLUE plug into.

Public API is re-exported here, one block per module; add new modules' exports as new blocks
and extend ``__all__`` with them.
"""

from kronlm.distill.blockwise import BlockwiseResult, distill_blockwise
from kronlm.distill.capture import ModelTrace, is_causal_model, trace
from kronlm.distill.checkpoint import (
    Checkpoint,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_resumable_checkpoint,
    save_checkpoint,
)
from kronlm.distill.config import LossRecipeMixin, TaskTrainConfig, TrainingConfig
from kronlm.distill.distributed import make_accelerator
from kronlm.distill.exporters import ModelExporter, export_student
from kronlm.distill.fingerprint import (
    RunFingerprint,
    data_fingerprint,
    model_fingerprint,
    tokens_fingerprint,
)
from kronlm.distill.local import LocalResult, distill_local
from kronlm.distill.losses import (
    attention_kl,
    attention_score_mse,
    causal_lm_ce,
    check_layer_map,
    embedding_mse,
    hidden_cosine,
    hidden_mse,
    logit_kd,
    sequence_classification_loss,
)
from kronlm.distill.objective import (
    DistillationObjective,
    LossOutput,
    uniform_layer_map,
)
from kronlm.distill.optim import build_optimizer, build_param_groups, build_scheduler
from kronlm.distill.recipes import RECIPES, LossWeights, get_recipe
from kronlm.distill.resume import CheckpointManager, config_differences, run_fingerprint
from kronlm.distill.stages import (
    DEFAULT_RECIPE,
    DEFAULT_RECOVER_TOKENS,
    RECOVER_VAL_FRACTION,
    RecoveryConfig,
    RecoveryResult,
    default_recovery_config,
    recover,
    recovery_folder,
)
from kronlm.distill.text_runs import (
    RUN_OUTPUTS,
    check_student_and_teacher,
    distill_on_text,
    distillation_settings,
    load_student_and_teacher,
    looks_like_test_split,
    run_distillation,
    single_stage,
    teacher_reason,
)
from kronlm.distill.trainer import (
    ResumeMismatch,
    StepStats,
    Trainer,
    TrainingDiverged,
    TrainResult,
    batch_tokens,
    train,
)
from kronlm.distill.validators import (
    DistillationLossValidator,
    PerplexityValidator,
    Validator,
    evaluate_distillation_loss,
    evaluate_perplexity,
    evaluation_mode,
)

__all__ = [
    # blockwise and local
    "BlockwiseResult",
    "LocalResult",
    "distill_blockwise",
    "distill_local",
    # capture
    "ModelTrace",
    "is_causal_model",
    "trace",
    # losses
    "attention_kl",
    "attention_score_mse",
    "causal_lm_ce",
    "check_layer_map",
    "embedding_mse",
    "hidden_cosine",
    "hidden_mse",
    "logit_kd",
    "sequence_classification_loss",
    # objective
    "DistillationObjective",
    "LossOutput",
    "uniform_layer_map",
    # recipes
    "RECIPES",
    "LossWeights",
    "get_recipe",
    # checkpoint
    "Checkpoint",
    "CheckpointError",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_resumable_checkpoint",
    "save_checkpoint",
    # config
    "LossRecipeMixin",
    "TaskTrainConfig",
    "TrainingConfig",
    # distributed
    "make_accelerator",
    # export
    "ModelExporter",
    "export_student",
    # fingerprint
    "RunFingerprint",
    "data_fingerprint",
    "model_fingerprint",
    "tokens_fingerprint",
    # optim
    "build_optimizer",
    "build_param_groups",
    "build_scheduler",
    # resume
    "CheckpointManager",
    "config_differences",
    "run_fingerprint",
    # stages (kronlm.recover)
    "DEFAULT_RECIPE",
    "DEFAULT_RECOVER_TOKENS",
    "RECOVER_VAL_FRACTION",
    "RecoveryConfig",
    "RecoveryResult",
    "default_recovery_config",
    "recover",
    "recovery_folder",
    # runs from model and data specs (kronlm distill)
    "RUN_OUTPUTS",
    "check_student_and_teacher",
    "distill_on_text",
    "distillation_settings",
    "load_student_and_teacher",
    "looks_like_test_split",
    "run_distillation",
    "single_stage",
    "teacher_reason",
    # trainer
    "ResumeMismatch",
    "StepStats",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "batch_tokens",
    "train",
    # validation
    "DistillationLossValidator",
    "PerplexityValidator",
    "Validator",
    "evaluate_distillation_loss",
    "evaluate_perplexity",
    "evaluation_mode",
]
