"""One distillation run from model and data specs: what ``kronlm distill`` does, for the command
line and the benchmarks alike (docs/recovery.md).

The stages of a run, each a function: :func:`teacher_reason` (whether the settings need a
teacher), :func:`load_student_and_teacher` (load both and check that they fit the tokens and each
other), :func:`distillation_settings` (what a resumed run must keep the same), then
:func:`run_distillation`, which sends the blocks to the mode the config names: staged recovery
(:func:`~kronlm.distill.stages.recover`), local reconstruction
(:func:`~kronlm.distill.local.distill_local`), block-wise distillation
(:func:`~kronlm.distill.blockwise.distill_blockwise`) or end-to-end training
(:func:`~kronlm.distill.trainer.train`). :func:`distill_on_text` strings them together.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from torch import nn

from kronlm.data.blocks import TokenBlocks, build_blocks
from kronlm.distill.blockwise import BlockwiseResult, distill_blockwise
from kronlm.distill.config import TrainingConfig
from kronlm.distill.distributed import make_accelerator
from kronlm.distill.local import LocalResult, distill_local
from kronlm.distill.objective import DistillationObjective
from kronlm.distill.stages import RecoveryConfig, RecoveryResult, recover
from kronlm.distill.trainer import TrainResult, train
from kronlm.modeling.loading import has_lm_head, load_model, load_tokenizer
from kronlm.utils.outputs import claim_run_folder

# What a run replaces inside its folder: an input there would be destroyed.
RUN_OUTPUTS = ("best", "final", "checkpoints", "logs", "training_config.yaml", "teacher_cache")
# A data file whose name marks it as a test split ("wiki.test.raw", "test.txt", "ptb-test.txt").
_TEST_SPLIT_NAME = re.compile(r"(^|[._\-])test([._\-]|$)", re.IGNORECASE)


def looks_like_test_split(data: str | os.PathLike) -> bool:
    """True when a data file's name marks it as a test split: checkpoints are chosen on training
    data only (docs/protocols.md, "Checkpoints are chosen on held-out training data")."""
    return bool(_TEST_SPLIT_NAME.search(Path(str(data)).name))


def teacher_reason(config: TrainingConfig, staged: bool) -> str | None:
    """What needs a teacher in a run of ``config`` ("block-wise distillation learns", "recipe 'kd'
    distils", ...), or None when it trains without one (recipe ``ce`` end to end)."""
    if staged:
        return "staged recovery learns"
    if config.mode in ("blockwise", "local"):
        return {"blockwise": "block-wise distillation learns", "local": "local reconstruction learns"}[config.mode]
    if DistillationObjective(config.loss_weights_resolved()).needs_teacher:
        return f"recipe {config.recipe!r} distils"
    return None


def _context_length(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_student_and_teacher(student: nn.Module, teacher: nn.Module | None, tokenizer, block_size: int) -> None:
    """Refuse models that cannot train on these blocks or learn from each other.

    Raises:
        ValueError: blocks longer than a model's context, a tokenizer larger than a vocabulary, a
            language model against an encoder, or two vocabularies (each named with the numbers).
    """
    for role, model in (("student", student), ("teacher", teacher)):
        if model is None:
            continue
        limit = _context_length(model)
        if limit is not None and block_size > limit:
            raise ValueError(f"block size {block_size} exceeds the {role}'s context length {limit}")
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the {role}'s vocabulary only {model.config.vocab_size}")
    if teacher is not None and has_lm_head(teacher) != has_lm_head(student):
        kinds = {True: "a language model", False: "an encoder without an LM head"}
        raise ValueError(
            f"the student ({type(student).__name__}) is {kinds[has_lm_head(student)]} but the teacher "
            f"({type(teacher).__name__}) is {kinds[has_lm_head(teacher)]}; distil like from like"
        )
    if teacher is not None and teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError(
            f"student vocabulary {student.config.vocab_size} differs from teacher vocabulary {teacher.config.vocab_size}"
        )


def load_student_and_teacher(student: str, teacher: str | None, tokenizer, block_size: int) -> tuple[nn.Module, nn.Module | None]:
    """Load the student and (when given) the teacher by spec and check them
    (:func:`check_student_and_teacher`).

    Raises:
        ValueError: see :func:`check_student_and_teacher` and ``load_model``.
    """
    student_model = load_model(student)
    teacher_model = load_model(teacher) if teacher is not None else None
    check_student_and_teacher(student_model, teacher_model, tokenizer, block_size)
    return student_model, teacher_model


def distillation_settings(data: str | os.PathLike, *, data_config: str | None, text_field: str, max_tokens: int | None,
                          val_fraction: float, streaming: bool) -> dict[str, Any]:
    """The data settings a run records in every checkpoint and a resume must keep (the token
    digests also catch a changed file behind the same name; models are compared by weights)."""
    return {"--data": str(data), "--data-config": data_config, "--text-field": text_field,
            "--max-tokens": max_tokens, "--val-fraction": val_fraction, "--streaming": bool(streaming)}


def single_stage(config: TrainingConfig | RecoveryConfig) -> TrainingConfig | RecoveryConfig:
    """A recovery config of one stage as that stage's training config (it runs as that mode
    alone, in the run folder itself); anything else unchanged."""
    if isinstance(config, RecoveryConfig) and len(config.stages) == 1:
        return config.stages[0]
    return config


def run_distillation(
    student: nn.Module,
    teacher: nn.Module | None,
    blocks: TokenBlocks,
    config: TrainingConfig | RecoveryConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    accelerator=None,
    tokenizer=None,
    run_settings: dict[str, Any] | None = None,
) -> RecoveryResult | LocalResult | BlockwiseResult | TrainResult:
    """Train ``student`` (in place) in the mode ``config`` names: a ``RecoveryConfig`` of several
    stages runs :func:`~kronlm.distill.stages.recover`; a ``TrainingConfig`` (or a recovery config
    of one stage) with ``mode`` local, blockwise or end_to_end runs that mode alone. ``check_student`` is on end to end, as on the
    command line (a resume refuses another starting student).

    Returns:
        The mode's result (``RecoveryResult``, ``LocalResult``, ``BlockwiseResult``, ``TrainResult``).

    Raises:
        ValueError: see the mode's function.
    """
    config = single_stage(config)
    if isinstance(config, RecoveryConfig):
        return recover(student, teacher, blocks, config, out_dir, resume=resume, tokenizer=tokenizer, run_settings=run_settings)
    if config.mode == "local":
        return distill_local(student, teacher, blocks, config, out_dir, resume=resume, tokenizer=tokenizer, run_settings=run_settings)
    if config.mode == "blockwise":
        return distill_blockwise(student, teacher, blocks, config, out_dir, resume=resume, tokenizer=tokenizer,
                                 run_settings=run_settings)
    return train(student, teacher, blocks, config, out_dir, resume=resume, accelerator=accelerator, tokenizer=tokenizer,
                 run_settings=run_settings, check_student=True)


def distill_on_text(
    student: str,
    teacher: str | None,
    data: str | os.PathLike,
    config: TrainingConfig | RecoveryConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    max_tokens: int | None = None,
    val_fraction: float = 0.05,
    streaming: bool = False,
    data_config: str | None = None,
    data_dir: str | os.PathLike | None = None,
    text_field: str = "text",
    log=print,
) -> RecoveryResult | LocalResult | BlockwiseResult | TrainResult:
    """``kronlm distill`` in one call, in one process: claim ``out_dir``, tokenise ``data`` into
    blocks (the last ``val_fraction`` held out), load the models, run :func:`run_distillation`.

    Args:
        student, teacher: model specs (kronlm folder, hub id, folder or alias); ``teacher`` may be
            None only when nothing needs one (:func:`teacher_reason`).
        data: training text spec (never a test split).
        config: one ``TrainingConfig`` or the stages of a ``RecoveryConfig`` (one block size).
        out_dir: run folder (a new, empty or kronlm run folder).
        resume, max_tokens, val_fraction, streaming, data_config, data_dir, text_field: as the
            flags of ``kronlm distill``.
        log: where the one-line descriptions of the models and data go.

    Returns:
        The result of :func:`run_distillation`.

    Raises:
        ValueError: a teacher needed but not given, test-split data, a refused run folder; see
            :func:`load_student_and_teacher`, ``build_blocks`` and :func:`run_distillation`.
    """
    config = single_stage(config)
    first = config.stages[0] if isinstance(config, RecoveryConfig) else config
    reason = teacher_reason(first, isinstance(config, RecoveryConfig))
    if reason is not None and teacher is None:
        raise ValueError(f"{reason} from a teacher: give a teacher model")
    if looks_like_test_split(data):
        raise ValueError(f"{data!r} looks like a test split; train and select checkpoints on training data only")
    out_dir = str(claim_run_folder(out_dir, inputs=(student, teacher, data), replaced=RUN_OUTPUTS))
    accelerator = make_accelerator(first, out_dir)
    tokenizer = load_tokenizer(teacher if reason is not None else student)
    with accelerator.main_process_first():  # the main process fills the token cache, the others read it
        blocks = build_blocks(data, tokenizer, block_size=first.block_size, val_fraction=val_fraction, max_tokens=max_tokens,
                              min_tokens=max_tokens, name=data_config, data_dir=data_dir, text_field=text_field, streaming=streaming)
    student_model, teacher_model = load_student_and_teacher(student, teacher if reason is not None else None, tokenizer, first.block_size)
    log(f"data: {blocks.source}; {blocks.train.shape[0]:,} training and {blocks.val.shape[0]:,} validation blocks of {first.block_size} tokens")
    settings = distillation_settings(data, data_config=data_config, text_field=text_field, max_tokens=max_tokens,
                                     val_fraction=val_fraction, streaming=streaming)
    result = run_distillation(student_model, teacher_model, blocks, config, out_dir, resume=resume, accelerator=accelerator,
                              tokenizer=tokenizer, run_settings=settings)
    accelerator.end_training()
    return result


__all__ = [
    "RUN_OUTPUTS",
    "check_student_and_teacher",
    "distill_on_text",
    "distillation_settings",
    "load_student_and_teacher",
    "looks_like_test_split",
    "run_distillation",
    "single_stage",
    "teacher_reason",
]
