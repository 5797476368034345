"""GLUE as a task family of the task pipeline, dev evaluation, and :func:`run_glue`.

:class:`GlueFamily` answers what :class:`kronlm.tasks.pipeline.TaskFamily` asks: GLUE-format
TSV files or the Hugging Face ``glue`` dataset (:mod:`.data`), padded batches of similar length,
sequence classifiers (:mod:`.heads`) and the task's dev metrics (:mod:`.metrics`). Every stage
trains with the one training loop of :mod:`kronlm.distill.trainer`: the teacher with
cross-entropy on the labels (MSE for STS-B), the student with KroneckerBERT's task ILKD
(:class:`~kronlm.distill.objective.DistillationObjective` on classifier logits and labels).
:func:`run_glue` is the whole ``kronlm glue`` run as one call.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from kronlm.compression.config import CompressionConfig
from kronlm.modeling import load
from kronlm.modeling.loading import load_tokenizer
from kronlm.tasks import student as task_student
from kronlm.tasks.glue.config import GlueTrainConfig
from kronlm.tasks.glue.data import (
    GlueBatchCollator,
    GlueExamples,
    default_glue_dir,
    encode_examples,
    encoded_lengths,
    load_glue_split,
    load_hf_glue_split,
)
from kronlm.tasks.glue.heads import (
    build_classifier,
    check_classifier,
    classifier_head_name,
)
from kronlm.tasks.glue.metrics import compute_metrics, predictions_from_logits
from kronlm.tasks.glue.tasks import GlueTask, get_task
from kronlm.tasks.pipeline import TaskFamily, TaskSplits, run_task_pipeline
from kronlm.tasks.results import TaskReport
from kronlm.tasks.student import resolve_compression

__all__ = [
    "GlueFamily",
    "evaluate_classifier",
    "make_classifier_student",
    "resolve_compression",
    "run_glue",
]

_MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    rows: list[dict[str, Any]],
    collator: GlueBatchCollator,
    task: GlueTask,
    *,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, float], torch.Tensor]:
    """Score ``model`` on encoded examples with the task's metrics (:func:`.metrics.compute_metrics`).

    The model is moved to ``device`` and put in eval mode.

    Returns:
        ({metric: value}, logits (examples, num_labels) float32 on the CPU).

    Raises:
        ValueError: no example, or logits that do not fit the task.
    """
    if not rows:
        raise ValueError(f"{task.name}: no evaluation example")
    model.to(device)
    model.eval()
    outputs = []
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collator(rows[i : i + batch_size]).items() if k in _MODEL_KEYS}
        outputs.append(model(**batch).logits.float().cpu())
    logits = torch.cat(outputs)
    preds = predictions_from_logits(logits, task)
    return compute_metrics(task, preds, [r["labels"] for r in rows]), logits


def make_classifier_student(teacher: PreTrainedModel, config: CompressionConfig, *, progress: bool = False):
    """Compress a copy of a fine-tuned classifier, its head copied, not compressed
    (:func:`kronlm.tasks.student.make_student`); returns (student, compression report).

    Raises:
        ValueError: the teacher has no classification head, the config selects the head, or the
            factor shapes do not divide a selected matrix.
    """
    return task_student.make_student(teacher, config, classifier_head_name(teacher), progress=progress)


class GlueFamily(TaskFamily):
    """One GLUE task for :func:`kronlm.tasks.pipeline.run_task_pipeline`.

    Args:
        task: a :class:`GlueTask` or its name ("sst2", "SST-2", ...).
        tokenizer: the tokenizer of teacher and student (its pad token pads the batches).
        data_dir: folder holding ``<TASK>/{train,dev}.tsv``; None = ``<data dir>/glue``
            (:func:`.data.default_glue_dir`).
        hf_dataset: read the Hugging Face ``glue`` dataset instead of TSV files.

    Raises:
        ValueError: unknown task, or a tokenizer without a pad token.
    """

    family = "glue"
    greater_is_better = True

    def __init__(self, task: GlueTask | str, tokenizer, *, data_dir: str | os.PathLike | None = None,
                 hf_dataset: bool = False):
        self.task = task if isinstance(task, GlueTask) else get_task(task)
        self.name, self.main_metric = self.task.name, self.task.main_metric
        self.tokenizer = tokenizer
        self.data_dir, self.hf_dataset = data_dir, hf_dataset
        self.collator = GlueBatchCollator(tokenizer.pad_token_id, regression=self.task.is_regression)
        self._examples: dict[str, GlueExamples] = {}

    def examples(self, split: str) -> GlueExamples:
        """The raw examples of "train" or "dev" (read once).

        Raises:
            FileNotFoundError / ValueError: see :func:`.data.load_glue_split`.
        """
        if split not in self._examples:
            if self.hf_dataset:
                self._examples[split] = load_hf_glue_split(self.task, split)
            else:
                self._examples[split] = load_glue_split(self.task, split, self.data_dir or default_glue_dir())
        return self._examples[split]

    def load_splits(self, config: GlueTrainConfig) -> TaskSplits:
        train = self.examples("train")
        if config.max_train_examples is not None:
            train = train.subset(config.max_train_examples, config.seed)
        train, held_out = train.hold_out(config.val_fraction, config.seed)
        dev = self.examples("dev")
        if getattr(config, "max_dev_examples", None) is not None:
            dev = dev.subset(config.max_dev_examples, config.seed)

        def encode(examples: GlueExamples) -> list[dict[str, Any]]:
            return encode_examples(examples, self.tokenizer, config.max_length)

        return TaskSplits(
            train=encode(train), val=None if held_out is None else encode(held_out), dev=encode(dev),
            sources={"train": train.source, "val": None if held_out is None else held_out.source, "dev": dev.source},
            val_examples=0 if held_out is None else len(held_out),
        )

    def collate_fn(self) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        return self.collator

    def lengths(self, examples: list[dict[str, Any]]) -> list[int]:
        return encoded_lengths(examples)

    def new_model(self, spec: str, seed: int) -> PreTrainedModel:
        return build_classifier(spec, self.task, pad_token_id=self.tokenizer.pad_token_id, seed=seed)

    def load_model(self, folder: str | Path) -> PreTrainedModel:
        model = load(folder, auto_class=AutoModelForSequenceClassification)
        check_classifier(model, self.task)
        return model

    def head_name(self, model: nn.Module) -> str:
        return classifier_head_name(model)

    def eval_tokens(self, eval_set: list[dict[str, Any]]) -> int:
        return sum(encoded_lengths(eval_set))

    def evaluate(self, model: nn.Module, eval_set: list[dict[str, Any]], config: GlueTrainConfig,
                 device: torch.device) -> dict[str, float]:
        return evaluate_classifier(model, eval_set, self.collator, self.task, batch_size=config.eval_batch_size,
                                   device=device)[0]


def run_glue(
    task: GlueTask | str,
    out_dir: str | os.PathLike,
    *,
    model: str | None = None,
    teacher: str | os.PathLike | None = None,
    config: GlueTrainConfig | None = None,
    teacher_config: GlueTrainConfig | None = None,
    student: CompressionConfig | str | None = None,
    student_init: str | os.PathLike | None = None,
    general_distill: str | os.PathLike | None = None,
    layer_map: list[int] | None = None,
    task_kd: bool = True,
    data_dir: str | os.PathLike | None = None,
    hf_dataset: bool = False,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> TaskReport:
    """Fine-tune a teacher on a GLUE task and optionally distil a compressed or truncated student.

    The Python form of ``kronlm glue`` (KroneckerBERT; docs/tasks.md): teacher fine-tuning
    (or a fine-tuned ``teacher``) -> compression of the teacher with ``student`` -> optional
    stage-1 weights (``general_distill``) -> task distillation -> ``report.{json,md}``. Instead
    of ``student``, ``student_init`` names a compressed or truncated *pretrained* model folder
    (KnGPT2 / DistilGPT2 style decoder students), which gets the teacher's head. Each
    stage chooses its checkpoint on ``val_fraction`` of the training examples by the task's
    main metric; dev is evaluated (final and best model) and reported only.

    Args:
        task: the GLUE task ("sst2", ...).
        out_dir: run folder (layout: :mod:`kronlm.tasks.pipeline`).
        model: pretrained model to fine-tune as the teacher (hub id, folder or alias such as
            ``minilm``); or
        teacher: a fine-tuned teacher folder (``OUT/teacher`` of an earlier run).
        config: student settings (and teacher settings without ``teacher_config``); default
            :class:`GlueTrainConfig` ().
        teacher_config: teacher fine-tuning settings.
        student: compression of the student: a :class:`CompressionConfig`, a config file or a
            preset name; None = teacher only (or ``student_init``).
        student_init: a pretrained student folder (``kronlm compress`` / ``kronlm truncate`` of
            the teacher's base model, possibly recovered by ``kronlm distill``) instead of ``student``.
        general_distill: a stage-1 folder (``kronlm distill`` of the compressed encoder).
        layer_map: teacher layer of each student layer for the layer-wise terms of a shallower
            student (e.g. the kept blocks of a truncated one); None = identity.
        task_kd: False = the student learns from the labels only (CE), not from the teacher.
        data_dir: folder with ``<TASK>/{train,dev}.tsv``; None = ``$KRONLM_DATA_DIR/glue``.
        hf_dataset: read the Hugging Face ``glue`` dataset instead.
        resume: continue each stage from its latest checkpoint in ``out_dir``.
        log: where progress lines go.

    Returns:
        The :class:`GlueReport` (= :class:`kronlm.tasks.results.TaskReport`) written to
        ``out_dir``.

    Raises:
        ValueError: unknown task, bad settings or data, a teacher whose head does not fit the task.
        FileNotFoundError: missing data files or folders (named).
    """
    glue_task = task if isinstance(task, GlueTask) else get_task(task)
    config = config or GlueTrainConfig()
    compression, name = resolve_compression(student) if student is not None else (None, None)
    if model is None and teacher is None:
        raise ValueError("give model (to fine-tune a teacher) or teacher (a fine-tuned one)")
    family = GlueFamily(glue_task, load_tokenizer(str(teacher or model)), data_dir=data_dir, hf_dataset=hf_dataset)
    return run_task_pipeline(
        family, out_dir, config=config, teacher_config=teacher_config, model=model, teacher=teacher,
        compression=compression, compression_name=name, student_init=student_init, general_distill=general_distill,
        layer_map=layer_map, task_kd=task_kd, resume=resume, log=log,
    )
