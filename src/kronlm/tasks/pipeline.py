"""The task pipeline of KroneckerBERT-style students (docs/tasks.md), for any task family.

teacher fine-tuning -> a student (the fine-tuned teacher compressed, with optional stage-1
weights; or a compressed / truncated *pretrained* model given as a folder, which gets the
teacher's task head) -> task distillation -> report, each training stage run by the one training loop
(:class:`kronlm.distill.trainer.Trainer`), resumable, with its checkpoint chosen on held-out
*training* examples:

- :class:`TaskFamily` is what the pipeline needs to know about a task: its data (splits, batching,
  example lengths), its model (a pretrained model with a new task head, a fine-tuned one, the
  head's name) and its metric (main metric, direction, evaluation). GLUE implements it in
  :class:`kronlm.tasks.glue.GlueFamily`, SQuAD (features, a span head, EM / F1 after span
  decoding) in :class:`kronlm.tasks.squad.SquadFamily`; the default objective
  (:class:`~kronlm.distill.objective.DistillationObjective`) handles classifier logits and
  start / end logits alike, and a family whose outputs are neither overrides
  :meth:`TaskFamily.objective`.
- :func:`train_task_model` runs one stage: the family's collator and lengths feed the loop, a
  :class:`TaskMetricValidator` on the held-out split picks ``best/`` (and any early stop).
- :func:`run_task_pipeline` runs the stages (:func:`fine_tune_teacher`, :class:`TaskStudent`,
  :func:`distil_task_student`) and writes ``report.{json,md}`` (:mod:`kronlm.tasks.results`).

No dev leakage: :meth:`TaskFamily.load_splits` holds out ``config.val_fraction`` of the training
examples (seeded, disjoint from those trained on); only they choose checkpoints (and any other
decision a family takes on data, such as SQuAD v2.0's no-answer threshold). The reported split
(GLUE dev, the SQuAD evaluation slice) is evaluated for the final and the best model and
reported, never used to choose.
With ``val_fraction`` 0 nothing is chosen: the model after the last step is used.

Layout of ``out_dir``: ``teacher-run/`` and ``student-run/`` (each a training run folder:
``checkpoints/``, ``best/``, ``final/``, ``logs/``), ``teacher/`` and ``student/`` (the chosen
models, with ``training_summary.json`` recording how they were trained and chosen), ``report.json``
and ``report.md``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from kronlm.compression.config import CompressionConfig
from kronlm.distill.checkpoint import latest_checkpoint
from kronlm.distill.config import TaskTrainConfig, TrainingConfig
from kronlm.distill.distributed import make_accelerator
from kronlm.distill.trainer import Trainer, TrainResult
from kronlm.distill.validators import Validator, evaluation_mode
from kronlm.modeling import SUMMARY_FILE, compression_report, save
from kronlm.tasks.results import ModelResult, TaskReport, write_report
from kronlm.tasks.student import (
    copy_head,
    count_embedding_linear_parameters,
    load_general_distilled,
    make_student,
)
from kronlm.utils.files import read_json
from kronlm.utils.outputs import claim_run_folder

__all__ = [
    "TaskFamily",
    "TaskMetricValidator",
    "TaskSplits",
    "TaskStudent",
    "check_task_students",
    "claim_task_folder",
    "distil_task_student",
    "fine_tune_teacher",
    "run_task_pipeline",
    "train_task_model",
]


@dataclass
class TaskSplits:
    """The data of one stage, encoded for the model.

    Attributes:
        train: training examples (a map-style dataset, e.g. a list of encoded example dicts).
        val: held-out training examples that choose the checkpoint (the family's evaluation
            set), or None (no choice; ``val_fraction`` 0).
        dev: the reported split (the family's evaluation set).
        sources: where each split came from: {"train", "val", "dev"} -> description.
        val_examples: examples in ``val``.
    """

    train: Sequence[Any]
    val: Any
    dev: Any
    sources: dict[str, str] = field(default_factory=dict)
    val_examples: int = 0


class TaskFamily(ABC):
    """One downstream task as :func:`run_task_pipeline` sees it.

    Attributes:
        family: the family's name ("glue"), recorded in summaries and reports.
        name: the task ("sst2").
        main_metric: the metric that chooses checkpoints and the report's retention ("accuracy").
        greater_is_better: its direction.
        tokenizer: the tokenizer of teacher and student (saved with the models).
        split_name: what the report calls the reported split ("dev").
    """

    family: str = "task"
    name: str
    main_metric: str
    greater_is_better: bool = True
    tokenizer: Any
    split_name: str = "dev"

    @abstractmethod
    def load_splits(self, config: TaskTrainConfig) -> TaskSplits:
        """Read, subset (``max_train_examples``), hold out ``val_fraction`` (seeded, disjoint) and encode."""

    @abstractmethod
    def collate_fn(self) -> Callable[[list[Any]], dict[str, torch.Tensor]]:
        """Turns a list of training examples into a batch dict of tensors (padding)."""

    def lengths(self, examples: Sequence[Any]) -> list[int] | None:
        """Tokens of each training example, for length-grouped steps; None = no grouping."""
        return None

    @abstractmethod
    def new_model(self, spec: str, seed: int) -> PreTrainedModel:
        """A pretrained model (hub id, folder, alias) with a newly initialised task head (seeded)."""

    @abstractmethod
    def load_model(self, folder: str | Path) -> PreTrainedModel:
        """A fine-tuned task model saved by :func:`kronlm.save`, checked against the task."""

    @abstractmethod
    def head_name(self, model: nn.Module) -> str:
        """The task head's module name (copied from the teacher, never compressed)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, eval_set: Any, config: TaskTrainConfig, device: torch.device) -> dict[str, float]:
        """The task's metrics of ``model`` on an evaluation set (``main_metric`` among them)."""

    def eval_tokens(self, eval_set: Any) -> int | None:
        """Tokens the model reads to evaluate ``eval_set`` (padding excluded), for the report's
        tokens/s; None = not counted."""
        return None

    def objective(self, config: TrainingConfig) -> Callable | None:
        """The loss of a stage whose recipe is ``config.recipe`` (``"ce"`` for a teacher); None =
        the trainer's default :class:`~kronlm.distill.objective.DistillationObjective`, which
        handles classifier logits and labels."""
        return None

    def prepare_model(self, model: nn.Module, config: TaskTrainConfig) -> None:
        """Before training: keep a dense word-embedding matrix fixed with ``freeze_word_embeddings``."""
        if config.freeze_word_embeddings:
            embedding = model.get_input_embeddings()
            if isinstance(embedding, nn.Embedding):
                embedding.weight.requires_grad_(False)


class TaskMetricValidator(Validator):
    """The family's main metric on the held-out training examples; every process scores them all.

    Returns the family's metrics plus "examples"; ``best/`` has the best ``main_metric``.
    """

    def __init__(self, family: TaskFamily, eval_set: Any, config: TaskTrainConfig, examples: int = 0):
        self.family, self.eval_set, self.config, self.examples = family, eval_set, config, examples
        self.name = self.key = family.main_metric
        self.greater_is_better = family.greater_is_better

    def __call__(self, model: nn.Module, accelerator) -> dict[str, float]:
        with evaluation_mode(model, accelerator) as net:
            metrics = self.family.evaluate(net, self.eval_set, self.config, accelerator.device)
        return {**metrics, "examples": self.examples}


def train_task_model(
    family: TaskFamily,
    model: nn.Module,
    splits: TaskSplits,
    config: TaskTrainConfig,
    out_dir: str | Path,
    *,
    role: str,
    teacher: nn.Module | None = None,
    task_kd: bool = True,
    resume: bool = False,
    summary: dict[str, Any] | None = None,
    accelerator=None,
    layer_map: list[int] | None = None,
) -> TrainResult:
    """Train ``model`` in place on one stage's data: fine-tune a teacher or distil a student.

    A teacher (``role="teacher"``) and a student without task KD are trained with recipe ``ce``
    (cross-entropy on the labels; MSE for a regression head); a student with ``task_kd`` with
    ``config.recipe`` against ``teacher``. With ``splits.val``, a :class:`TaskMetricValidator`
    chooses ``out_dir/best``. Checkpoints go to ``out_dir/checkpoints``; ``resume`` continues
    from the latest one when there is one (and starts afresh when there is none). ``layer_map``
    (student layer l learns from teacher layer ``layer_map[l]``) is needed by the layer-wise
    terms of a student shallower than its teacher.

    Returns:
        The :class:`~kronlm.distill.trainer.TrainResult` (``final_dir``, ``best_dir``, ...).

    Raises:
        ValueError: too few training examples, a distillation recipe without a teacher, ...
        kronlm.distill.TrainingDiverged: a non-finite loss or gradient norm (no update applied).
    """
    out_dir = Path(out_dir)
    recipe = config.recipe if role == "student" and task_kd else "ce"
    family.prepare_model(model, config)
    tcfg = config.training_config(len(splits.train), recipe=recipe)
    accelerator = accelerator or make_accelerator(tcfg, out_dir)
    if accelerator.num_processes != 1:
        tcfg = config.training_config(len(splits.train), accelerator.num_processes, recipe=recipe)
    if layer_map is not None and recipe != "ce":
        tcfg = tcfg.replace(layer_map=[int(i) for i in layer_map])
    validator = None if splits.val is None else TaskMetricValidator(family, splits.val, config, splits.val_examples)
    trainer = Trainer(
        model, tcfg, splits.train, out_dir, teacher=teacher, objective=family.objective(tcfg), validator=validator,
        collate_fn=family.collate_fn(), lengths=family.lengths(splits.train) if config.group_by_length else None,
        tokenizer=family.tokenizer, summary=summary, accelerator=accelerator, desc=role,
    )
    return trainer.run(resume=resume and latest_checkpoint(out_dir) is not None)


def run_task_pipeline(
    family: TaskFamily,
    out_dir: str | Path,
    *,
    config: TaskTrainConfig,
    teacher_config: TaskTrainConfig | None = None,
    model: str | None = None,
    teacher: str | Path | None = None,
    compression: CompressionConfig | None = None,
    compression_name: str | None = None,
    student_init: str | Path | None = None,
    general_distill: str | Path | None = None,
    layer_map: list[int] | None = None,
    task_kd: bool = True,
    resume: bool = False,
    settings: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> TaskReport:
    """Fine-tune a teacher (or take a fine-tuned one), optionally distil a student, report.

    Two kinds of student (:meth:`TaskStudent.build`): ``compression``, the fine-tuned teacher
    compressed with this config (KroneckerBERT), optionally with the encoder weights of a stage-1
    student (``general_distill``); or ``student_init``, a model folder compressed or truncated
    from the *pretrained* model (KnGPT2, DistilGPT2 / Li et al.), given the teacher's task head.

    Args:
        family: the task.
        out_dir: run folder (layout in the module docstring).
        config: settings of the student stage (and of the teacher's without ``teacher_config``);
            its ``max_length`` also encodes the reported split when the teacher is given.
        teacher_config: settings of teacher fine-tuning.
        model: a pretrained model to fine-tune as the teacher (hub id, folder or alias).
        teacher: a fine-tuned teacher folder instead (``out_dir/teacher`` of an earlier run).
        compression: compress the chosen teacher with this config into the student.
        compression_name: the student's name in the report (default ``compression.name``, or the
            ``student_init`` folder).
        student_init: a pretrained student folder instead of ``compression``.
        general_distill: a stage-1 folder whose encoder weights start a ``compression`` student.
        layer_map: student layer l learns from teacher layer ``layer_map[l]`` (layer-wise terms
            of a shallower student; None = identity).
        task_kd: False trains the student with CE on the labels only (the ablation).
        resume: continue each stage from its latest checkpoint (stages without one start afresh).
        settings: extra entries for the report's settings.
        log: where progress lines go.

    Returns:
        The :class:`~kronlm.tasks.results.TaskReport` written to ``out_dir``.

    Raises:
        ValueError: inconsistent arguments (:func:`check_task_students`); bad data or settings
            (from the family and the trainer).
        FileNotFoundError: missing data or model folders (named).
    """
    check_task_students(model, teacher, compression, student_init, general_distill, layer_map, task_kd)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher_config = teacher_config or config
    report_settings = {"task": family.name, "family": family.family, "torch_threads": torch.get_num_threads(),
                       "date": time.strftime("%Y-%m-%d"), **(settings or {})}
    if teacher is None:
        teacher_model, row = fine_tune_teacher(family, model, teacher_config, out_dir, resume, report_settings, log)
    else:
        teacher_model = family.load_model(teacher)
        splits = family.load_splits(config)
        row = _given_row(family, teacher_model, splits, config, Path(teacher))
        report_settings["data"] = splits.sources
    log(f"teacher {row.selection.get('reason', '')}: {family.name} {family.split_name} {row.metrics}")
    rows = [row]
    if compression is not None or student_init is not None:
        student = TaskStudent.build(family, teacher_model, config, compression, compression_name, student_init, general_distill)
        rows.append(distil_task_student(family, student, teacher_model, config, out_dir, layer_map=layer_map, task_kd=task_kd,
                                        resume=resume, report_settings=report_settings, log=log))
    report = TaskReport(family.name, family.split_name, family.main_metric, rows, report_settings)
    write_report(report, out_dir)
    return report


def check_task_students(model, teacher, compression, student_init, general_distill, layer_map, task_kd: bool) -> None:
    """Refuse inconsistent arguments of :func:`run_task_pipeline`.

    Raises:
        ValueError: neither or both of ``model`` / ``teacher``; both ``compression`` and
            ``student_init``; ``general_distill`` without ``compression``; ``task_kd=False`` or
            ``layer_map`` without a student.
    """
    if (model is None) == (teacher is None):
        raise ValueError("give model (a pretrained model to fine-tune as the teacher) or teacher (a fine-tuned "
                         "teacher folder), exactly one of the two")
    if compression is not None and student_init is not None:
        raise ValueError("give compression (compress the fine-tuned teacher) or student_init (a pretrained student "
                         "folder), not both")
    if compression is None and general_distill is not None:
        raise ValueError("general_distill needs a compression config: stage-1 weights go into the fine-tuned "
                         "teacher compressed with the same config")
    has_student = compression is not None or student_init is not None
    if not has_student and (not task_kd or layer_map is not None):
        raise ValueError("task_kd=False / layer_map need a student: give a compression config or student_init")


def fine_tune_teacher(family: TaskFamily, model: str, config: TaskTrainConfig, out_dir: Path, resume: bool,
                      report_settings: dict[str, Any], log: Callable[[str], None]) -> tuple[nn.Module, ModelResult]:
    """Stage 1 of :func:`run_task_pipeline`: fine-tune ``model`` with a new task head in
    ``out_dir/teacher-run``, save the chosen model to ``out_dir/teacher``; returns it and its row."""
    splits = family.load_splits(config)
    log(_describe_splits(family, splits))
    net = family.new_model(model, seed=config.seed)
    summary = {"task": family.name, "family": family.family, "role": "teacher", "base_model": str(model), "data": splits.sources,
               "config": config.to_dict()}
    result = train_task_model(family, net, splits, config, out_dir / "teacher-run", role="teacher", resume=resume, summary=summary)
    teacher_model, row = _trained_row(family, result, splits, config, "teacher", f"{model} fine-tuned")
    save(teacher_model, out_dir / "teacher", tokenizer=family.tokenizer, summary={**summary, **_row_summary(row, result)})
    report_settings["teacher_config"] = config.to_dict()
    report_settings["data"] = splits.sources
    return teacher_model, row


@dataclass
class TaskStudent:
    """The student of a task run before task distillation.

    Attributes:
        model: the student, with the teacher's task head.
        name: its name in the report.
        stages: what it went through so far (for the report's notes).
        compression: the config that compressed the teacher into it, or None.
        student_init: the pretrained student folder it came from, or None.
        report: its compression report (saved with it), or None.
    """

    model: nn.Module
    name: str
    stages: list[str]
    compression: CompressionConfig | None = None
    student_init: str | Path | None = None
    report: Any = None

    @classmethod
    def build(cls, family: TaskFamily, teacher: nn.Module, config: TaskTrainConfig, compression: CompressionConfig | None,
              compression_name: str | None, student_init: str | Path | None, general_distill: str | Path | None) -> TaskStudent:
        """The fine-tuned ``teacher`` compressed with ``compression`` (optionally with stage-1
        weights), or the pretrained ``student_init`` folder with the teacher's head."""
        head = family.head_name(teacher)
        stages = []
        if compression is not None:
            student, comp_report = make_student(teacher, compression, head)
            name = compression_name or compression.name or "compressed"
            if general_distill is not None:
                load_general_distilled(student, general_distill)
                stages.append(f"stage 1 from {general_distill}")
        else:
            student = family.new_model(str(student_init), seed=config.seed)
            copy_head(teacher, student, head)
            student.requires_grad_(True)
            comp_report = compression_report(student)
            name = compression_name or str(student_init)
            stages.append(f"initialised from {student_init} with the teacher's {head}")
        return cls(student, name, stages, compression, student_init, comp_report)


def distil_task_student(family: TaskFamily, student: TaskStudent, teacher: nn.Module, config: TaskTrainConfig, out_dir: Path, *,
                        layer_map: list[int] | None, task_kd: bool, resume: bool, report_settings: dict[str, Any],
                        log: Callable[[str], None]) -> ModelResult:
    """Stage 2 of :func:`run_task_pipeline`: task distillation of ``student`` from ``teacher`` in
    ``out_dir/student-run``, the chosen student saved to ``out_dir/student``; returns its row."""
    stages = list(student.stages)
    kind = "task ILKD" if config.recipe.startswith("ilkd") else "task KD"
    stages.append(f"{kind} ({config.recipe})" if task_kd else "task CE only")
    splits = family.load_splits(config)
    params_teacher = sum(p.numel() for p in teacher.parameters())
    params_student = sum(p.numel() for p in student.model.parameters())
    log(f"student: {params_teacher:,} -> {params_student:,} params; {', '.join(stages)}; " + _describe_splits(family, splits))
    summary = {"task": family.name, "family": family.family, "role": "student", "stages": stages, "data": splits.sources,
               "config": config.to_dict()}
    if student.compression is not None:
        summary["compression"] = student.compression.to_dict()
        report_settings["compression"] = student.compression.to_dict()
    else:
        summary["student_init"] = str(student.student_init)
        report_settings["student_init"] = str(student.student_init)
    if layer_map is not None:
        summary["layer_map"] = report_settings["layer_map"] = [int(i) for i in layer_map]
    result = train_task_model(family, student.model, splits, config, out_dir / "student-run", role="student", teacher=teacher,
                              task_kd=task_kd, resume=resume, summary=summary, layer_map=layer_map)
    student_model, row = _trained_row(family, result, splits, config, "student", student.name, notes="; ".join(stages))
    save(student_model, out_dir / "student", tokenizer=family.tokenizer, report=student.report,
         summary={**summary, **_row_summary(row, result)})
    log(f"student {row.selection['reason']}: {family.name} {family.split_name} {row.metrics}")
    report_settings["student_config"] = config.to_dict()
    return row


def claim_task_folder(out: str | Path, teacher: str | Path | None, inputs: tuple) -> str:
    """Check and mark a task run's folder before any work (:func:`kronlm.utils.outputs.claim_run_folder`):
    a new, empty or kronlm run folder that no input is, or lies inside; an input may sit in it
    (``teacher=OUT/teacher`` of an earlier run) but not where this run writes (``student``,
    ``student-run``, the report, and ``teacher``, ``teacher-run`` unless a teacher is given).

    Raises:
        FileExistsError: the folder is refused (the message names it and why).
    """
    replaced = ("student", "student-run", "report.json", "report.md") + (("teacher", "teacher-run") if teacher is None else ())
    return str(claim_run_folder(out, inputs=(teacher, *inputs), option="--out", replaced=replaced))


def _describe_splits(family: TaskFamily, splits: TaskSplits) -> str:
    val = f"{splits.val_examples:,} held out to choose the checkpoint" if splits.val is not None else "none held out"
    return f"{family.name}: {len(splits.train):,} training examples ({splits.sources.get('train', '?')}), {val}"


def _eval_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _timed_evaluate(family: TaskFamily, model: nn.Module, eval_set: Any, config: TaskTrainConfig,
                    device: torch.device) -> tuple[dict[str, float], float]:
    """(metrics, wall seconds of the evaluation)."""
    start = time.perf_counter()
    metrics = family.evaluate(model, eval_set, config, device)
    return metrics, time.perf_counter() - start


def _model_row(family: TaskFamily, model: nn.Module, role: str, name: str, metrics: dict[str, float],
               eval_set: Any, eval_seconds: float, **fields: Any) -> ModelResult:
    params = sum(p.numel() for p in model.parameters())  # tied tensors once
    return ModelResult(role, name, metrics, params,
                       count_embedding_linear_parameters(model, head_name=family.head_name(model)),
                       eval_seconds=eval_seconds, eval_tokens=family.eval_tokens(eval_set) or 0, **fields)


def _trained_row(family: TaskFamily, result: TrainResult, splits: TaskSplits, config: TaskTrainConfig, role: str,
                 name: str, notes: str = "") -> tuple[nn.Module, ModelResult]:
    """Evaluate the final and the best model on the reported split; choose the best by the held-out metric."""
    device = _eval_device()
    final = family.load_model(result.final_dir)
    metrics_final, seconds_final = _timed_evaluate(family, final, splits.dev, config, device)
    metric = f"held-out {result.val_metric}"
    if result.best_step is None:
        why = ("val_fraction 0: no held-out training examples" if splits.val is None
               else "no finite held-out metric")
        chosen, metrics, metrics_best, seconds = final, metrics_final, None, seconds_final
        selection = {"checkpoint": "final", "step": result.steps, "reason": f"final/ (step {result.steps}; {why})"}
    else:
        if result.best_step == result.steps:
            chosen, metrics_best, seconds = final, metrics_final, seconds_final
        else:
            chosen = family.load_model(result.best_dir)
            metrics_best, seconds = _timed_evaluate(family, chosen, splits.dev, config, device)
        metrics = metrics_best
        selection = {
            "checkpoint": "best", "step": result.best_step, "max_steps": result.steps, "metric": metric,
            "value": result.best_val, "val_examples": splits.val_examples,
            "reason": (f"best/ (step {result.best_step} of {result.steps}{', stopped early' if result.stopped_early else ''}: "
                       f"{metric} {result.best_val:.4f} on {splits.val_examples:,} held-out training examples)"),
        }
    row = _model_row(family, chosen, role, name, metrics, splits.dev, seconds, train_examples=len(splits.train),
                     train_steps=result.steps, train_seconds=result.total_seconds, train_tokens=result.tokens_seen,
                     notes=notes, selection=selection, metrics_final=metrics_final, metrics_best=metrics_best)
    return chosen, row


def _given_row(family: TaskFamily, model: nn.Module, splits: TaskSplits, config: TaskTrainConfig,
               folder: Path) -> ModelResult:
    """The row of a teacher fine-tuned earlier: its training record comes from its ``training_summary.json``."""
    metrics, seconds = _timed_evaluate(family, model, splits.dev, config, _eval_device())
    recorded = read_json(folder / SUMMARY_FILE) if (folder / SUMMARY_FILE).is_file() else {}
    run = recorded.get("run") or {}
    selection = dict(recorded.get("selection") or {})
    selection["checkpoint"] = "given"
    selection["reason"] = f"given ({folder}" + (f"; {selection['reason']}" if "reason" in selection else "") + ")"
    return _model_row(family, model, "teacher", str(folder), metrics, splits.dev, seconds,
                      train_examples=int(run.get("train_examples", 0)), train_steps=int(run.get("steps", 0)),
                      train_seconds=float(run.get("seconds", 0.0)), train_tokens=int(run.get("tokens_seen", 0)),
                      selection=selection)


def _row_summary(row: ModelResult, result: TrainResult) -> dict[str, Any]:
    """What ``training_summary.json`` of a chosen model records about its run and the choice."""
    return {
        "run": {"steps": result.steps, "seconds": result.total_seconds, "train_examples": row.train_examples,
                "tokens_seen": result.tokens_seen, "stopped_early": result.stopped_early,
                "first_losses": result.losses[:5], "last_losses": result.losses[-5:],
                "val_history": result.val_history},
        "selection": row.selection,
        "dev": {"chosen": row.metrics, "final": row.metrics_final, "best": row.metrics_best},
    }
