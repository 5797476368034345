"""The one training loop of kronlm: LM recovery distillation, task fine-tuning and task distillation.

One loop for one CPU, one GPU, or several processes (DDP or FSDP under ``accelerate launch``,
DDP under ``torchrun``), built on Hugging Face Accelerate: gradient accumulation, mixed
precision, gradient clipping, sharding and TensorBoard logging come from
:class:`accelerate.Accelerator`. :class:`Trainer` holds the run in small parts a reader can take
one at a time: :meth:`~Trainer.setup` (accelerator, data, model, optimizer, resume),
:meth:`~Trainer.train_step` (one optimizer step, with a hard stop on a NaN / inf loss or gradient
norm before the optimizer touches the weights), :meth:`~Trainer.validate` (the metric that picks
``best/`` and drives early stopping), :meth:`~Trainer.save_checkpoint` and
:meth:`~Trainer.export`; :meth:`~Trainer.run` strings them together and :func:`train` is the
one-call form. The pieces live next to this module:

- :mod:`kronlm.distill.optim`: AdamW parameter groups, warm-up + cosine schedule (Krony-PT,
  docs/method.md, "Recovery objectives");
- :mod:`kronlm.distill.data_order`: the deterministic, resumable data order (a pure function of
  seed, epoch and step, optionally length-grouped), split across processes, so ``resume=True``
  continues to the same losses and weights as an uninterrupted run;
- :mod:`kronlm.distill.distributed`: the accelerator, the supported process layouts, and the
  full (unsharded) model and optimizer states that checkpoints hold, under FSDP too;
- :mod:`kronlm.distill.checkpoint`: checkpoints in safetensors + JSON (and why not Accelerate's
  ``save_state``); :mod:`kronlm.distill.resume`: writing them, and on resume choosing, checking
  and restoring one (:class:`~kronlm.distill.resume.CheckpointManager`);
- :mod:`kronlm.distill.validators` / :mod:`kronlm.distill.exporters`: validators and exporters.

Extension points (every one defaults to today's LM-distillation behaviour):

- **data**: ``train_data`` / ``val_data`` are token tensors (N, block_size) or any map-style
  dataset (a list of example dicts too); ``collate_fn`` turns a list of examples into a batch
  dict of tensors (default: stacking, for fixed-length blocks; a padding collator for
  variable-length examples); ``lengths`` (tokens per training example) makes each step hold
  examples of similar length. Batches must be dicts; their tensors are moved to the device.
- **objective**: ``objective(model, teacher, batch) -> LossOutput`` (``.total``: 0-dim loss with
  grad; ``.terms``: detached 0-dim values, logged one by one), optionally with a
  ``needs_teacher`` attribute. Default: :class:`~kronlm.distill.objective.DistillationObjective`
  of ``config.recipe`` (which also handles sequence-classifier logits and labels).
- **validator**: a :class:`~kronlm.distill.validators.Validator` (metric name, direction,
  ``validator(model, accelerator) -> metrics``). Default with ``val_data``: perplexity for a
  model with an LM head, the held-out distillation loss for an encoder.
- **exporter**: ``exporter(model, folder, summary) -> folder`` writes ``best/`` and ``final/``;
  default :class:`~kronlm.distill.exporters.ModelExporter` (``kronlm.save`` with the tokenizer and
  ``summary``); None writes nothing.
- **count_tokens**: tokens of a batch, for the tokens/s throughput (default :func:`batch_tokens`).

A block-wise distillation (one transformer block at a time on cached teacher hidden states) is
then: ``model`` = a module wrapping the block, ``train_data`` / ``val_data`` = datasets of
``{"inputs": (T, d), "targets": (T, d)}``, ``objective`` = an MSE returning ``LossOutput``,
``validator`` = a held-out MSE (``greater_is_better = False``), ``exporter=None``; optimizer
groups, schedule, clipping, NaN stop, checkpoints and resume are the ones here.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm

from kronlm.distill.checkpoint import Checkpoint, latest_checkpoint, remove_interrupted_writes
from kronlm.distill.config import TrainingConfig
from kronlm.distill.data_order import (
    as_dataset,
    epoch_indices,
    epoch_loader,
    process_share,
    split_data,
)
from kronlm.distill.distributed import (
    check_distributed_setup,
    fill_from_process_0,
    full_student,
    grad_norm_value,
    is_sharded,
    make_accelerator,
    meta_copy,
    place_teacher,
    tied_aliases,
)
from kronlm.distill.exporters import ModelExporter
from kronlm.distill.fingerprint import RunFingerprint
from kronlm.distill.objective import DistillationObjective
from kronlm.distill.optim import build_optimizer, build_scheduler, optimizer_param_names
from kronlm.distill.resume import CheckpointManager, ResumeMismatch, run_fingerprint
from kronlm.distill.validators import (
    DistillationLossValidator,
    PerplexityValidator,
    Validator,
)
from kronlm.modeling.loading import has_lm_head
from kronlm.utils.atomic import folder_lock

Exporter = Callable[[nn.Module, Path, dict[str, Any]], Path]
# Validation results that count things rather than measure the model; not logged as scalars.
_COUNTS = ("tokens", "blocks", "examples")
_DEFAULT = object()


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the run stopped before the update."""


@dataclass
class TrainResult:
    """What a training run did.

    Attributes:
        steps: optimizer steps completed in total (including those before a resume).
        start_step: the step this call started from (0, or the resumed checkpoint's step).
        tokens_seen: training tokens consumed in total, over all processes.
        losses: total loss of every step run in this call (mean over processes and micro-batches).
        loss_terms: the per-term losses of every step run in this call.
        val_metric: the validator's metric name: ``"ppl"`` (validation perplexity; models with an
            LM head), ``"distill_loss"`` (the objective on held-out blocks; encoders such as
            ``BertModel``), a task metric (``"accuracy"``, ...); None without validation.
        greater_is_better: the direction of ``val_metric``.
        val_history: every validation pass of the run, those before a resume included (they are
            kept in the checkpoints): ``{"step", <the validator's metrics>}``, e.g.
            ``{"step", "loss", "ppl", "tokens"}`` for ``"ppl"``.
        best_val / best_step: best validation metric so far and its step (None without a finite
            validation value).
        best_val_ppl: ``best_val`` when the metric is perplexity, else None.
        stopped_early: the run stopped before ``max_steps`` (``early_stopping_patience``).
        time_limited: this call stopped before ``max_steps`` at ``max_minutes``; a resumed run
            continues from there.
        train_examples: training examples (blocks) the data order draws from.
        seconds: wall time of this call, in seconds.
        total_seconds: wall time of the whole run up to now, in seconds: this call's plus, after a
            resume, the time the run had spent up to the checkpoint it resumed from (the time
            between that checkpoint and an interruption is lost with the interruption).
        final_dir / best_dir: the exported models (None when not written).
        last_checkpoint: the newest checkpoint folder (None when none was written).
    """

    steps: int
    start_step: int
    tokens_seen: int
    losses: list[float] = field(default_factory=list)
    loss_terms: list[dict[str, float]] = field(default_factory=list)
    val_history: list[dict[str, float]] = field(default_factory=list)
    val_metric: str | None = "ppl"
    greater_is_better: bool = False
    best_val: float | None = None
    best_step: int | None = None
    stopped_early: bool = False
    time_limited: bool = False
    train_examples: int = 0
    seconds: float = 0.0
    total_seconds: float = 0.0
    final_dir: Path | None = None
    best_dir: Path | None = None
    last_checkpoint: Path | None = None

    @property
    def best_val_ppl(self) -> float | None:
        return self.best_val if self.val_metric == "ppl" else None


@dataclass
class StepStats:
    """One optimizer step, reduced over processes and micro-batches.

    Attributes:
        loss: total loss; terms: unweighted per-term losses; tokens: tokens of the step over all
        processes; grad_norm: global gradient L2 norm before clipping; lrs: learning rate of
        each param group; seconds: wall time of the step.
    """

    loss: float
    terms: dict[str, float]
    tokens: int
    grad_norm: float
    lrs: dict[str, float]
    seconds: float


def batch_tokens(batch: dict[str, Any]) -> torch.Tensor | int:
    """Tokens in a batch, for throughput: the ones of ``attention_mask`` (batch, seq) when present,
    else the elements of ``input_ids``, else batch x positions of the first tensor with 2 or more
    dimensions (cached hidden states (batch, seq, hidden)), else 0."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    if "input_ids" in batch:
        return batch["input_ids"].numel()
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value.shape[0] * value.shape[1]
    return 0


def _hparams(config: TrainingConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """TensorBoard accepts only scalars and strings as hyper-parameters."""

    out = {}
    for key, value in {**config.to_dict(), **extra}.items():
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
        else:
            out[key] = json.dumps(value)
    return out


class Trainer:
    """One training run: ``Trainer(...).run(resume=...)`` -> :class:`TrainResult`.

    Args:
        model: the model to train in place (a Hugging Face model, possibly kronlm-compressed or
            truncated, or any ``nn.Module`` the objective knows how to call). Under FSDP it is
            sharded in place: afterwards each process holds its shard; the full weights are in
            ``out_dir/final``.
        config: the run's settings (optimizer, schedule, batch geometry, validation, checkpoints).
        train_data: token blocks (N, block_size) int64 or a map-style dataset of examples.
        out_dir: run folder: ``checkpoints/``, ``best/``, ``final/``, ``logs/``,
            ``training_config.yaml``.
        teacher: the frozen reference model, or None when the objective needs none. It is put in
            eval mode with ``requires_grad=False``, moved to the device, never wrapped or sharded.
        val_data: held-out *training* data for the default validator (never the test split).
        objective / validator / collate_fn / lengths / exporter / count_tokens: the extension
            points of the module docstring (None = the defaults; ``exporter=None`` exports
            nothing).
        tokenizer: saved next to the exported models by the default exporter.
        summary: entries added to every exported ``training_summary.json`` (default exporter).
        accelerator: an existing ``accelerate.Accelerator`` (default: :func:`make_accelerator`).
        desc: progress-bar label and TensorBoard project name.
        run_settings: settings outside ``config`` that change the result, recorded in every
            checkpoint and compared on resume (the command line passes ``--data``,
            ``--max-tokens``, ``--val-fraction``, ...); JSON values.
        check_student: on resume, also refuse a student whose weights differ from the starting
            point the run recorded (the command line, which reloads ``--student``, sets it; the
            Python API by default accepts any model of the right architecture, since the
            checkpoint replaces its weights).

    A run records a :class:`~kronlm.distill.fingerprint.RunFingerprint` (SHA-256 of the training
    and validation data, of the teacher, of the student before its first step, and
    ``run_settings``) in each checkpoint; ``run(resume=True)`` refuses different inputs or
    result-changing config fields (all but :data:`~kronlm.distill.config.RESUME_FREE_FIELDS`)
    with a :class:`ResumeMismatch` naming each difference, and falls back from a damaged latest
    checkpoint to the newest earlier one that verifies, saying so.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainingConfig,
        train_data: Any,
        out_dir: str | os.PathLike,
        *,
        teacher: nn.Module | None = None,
        val_data: Any = None,
        objective: Callable | None = None,
        validator: Validator | None = None,
        collate_fn: Callable[[list[Any]], dict[str, Any]] | None = None,
        lengths: Sequence[int] | None = None,
        exporter: Exporter | None | object = _DEFAULT,
        count_tokens: Callable[[dict[str, Any]], torch.Tensor | int] = batch_tokens,
        tokenizer=None,
        summary: dict[str, Any] | None = None,
        accelerator=None,
        desc: str = "distill",
        run_settings: dict[str, Any] | None = None,
        check_student: bool = False,
    ):
        self.model, self.config, self.out_dir, self.teacher = model, config, Path(out_dir), teacher
        self.run_settings, self.check_student = dict(run_settings or {}), check_student
        self.fingerprint: RunFingerprint | None = None
        self.train_data, self.val_data, self.lengths = train_data, val_data, lengths
        self.objective, self.validator, self.collate_fn = objective, validator, collate_fn
        self.exporter = ModelExporter(tokenizer, summary) if exporter is _DEFAULT else exporter
        self.count_tokens, self.accelerator, self.desc = count_tokens, accelerator, desc
        self.result: TrainResult | None = None
        self.validations_since_best = 0
        self._seconds_before = 0.0  # wall seconds the run spent before the checkpoint it resumed from
        self._progress = None

    # ------------------------------------------------------------------------------------ setup

    def setup(self, *, resume: bool = False) -> None:
        """Check the inputs, place the models, build optimizer and schedule, restore a checkpoint.

        Raises:
            ValueError: inconsistent inputs (an objective needing a teacher without one, too
                little data for one step, an unsupported process layout such as DeepSpeed, ...).
            ResumeMismatch: ``resume`` with other data, teacher, starting student (with
                ``check_student``), data order or result-changing settings than the checkpoint's.
            CheckpointError: ``resume`` where no checkpoint verifies (each one named, with why).
            FileNotFoundError: ``resume`` without a completed checkpoint in ``out_dir``.
        """
        self._setup_accelerator()
        self._setup_objective()
        self._setup_data()
        self._setup_validator()
        self.checkpoints = CheckpointManager(self.accelerator, self.out_dir, sharded=self.sharded, say=self._say_early)
        self.fingerprint = run_fingerprint(self.accelerator, train_data=self.train_data, train_set=self.train_set,
                                           val_data=self.val_data, val_set=self.val_set, teacher=self.teacher, student=self.model,
                                           run_settings=self.run_settings)
        self._setup_model()
        checkpoint = self._read_checkpoint() if resume else None
        self.prepared, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.result = TrainResult(steps=0, start_step=0, tokens_seen=0, train_examples=len(self.train_set),
                                  val_metric=self.validator.name if self.validator else None,
                                  greater_is_better=bool(self.validator and self.validator.greater_is_better))
        if checkpoint is not None:
            self._restore(checkpoint)
        self._start_logging()

    def _setup_accelerator(self) -> None:
        config = self.config
        self.accelerator = self.accelerator or make_accelerator(config, self.out_dir)
        if self.accelerator.gradient_accumulation_steps != config.grad_accum_steps:
            raise ValueError(
                f"the accelerator accumulates {self.accelerator.gradient_accumulation_steps} micro-batches but the "
                f"config {config.grad_accum_steps}; set it with --grad-accum / grad_accum_steps, not with "
                "accelerate launch --gradient_accumulation_steps"
            )
        check_distributed_setup(self.accelerator)
        self.sharded = is_sharded(self.accelerator)
        self.device = self.accelerator.device
        self.world = self.accelerator.num_processes

    def _setup_objective(self) -> None:
        default = self.objective is None
        if default:
            self.objective = DistillationObjective(self.config.loss_weights_resolved(), layer_map=self.config.layer_map)
        needs_teacher = getattr(self.objective, "needs_teacher", self.teacher is not None)
        if needs_teacher and self.teacher is None:
            what = f"recipe {self.config.recipe!r} distils" if default else f"the objective {type(self.objective).__name__} learns"
            raise ValueError(f"{what} from a teacher, but no teacher was given")
        if not needs_teacher:
            self.teacher = None

    def _setup_data(self) -> None:
        config = self.config
        train_set = as_dataset(self.train_data, config.block_size, "training")
        if train_set is None:
            raise ValueError("the training data is empty")
        self.train_set = train_set
        self.val_set = as_dataset(self.val_data, config.block_size, "validation")
        self.per_step = config.micro_batch_size * config.grad_accum_steps * self.world
        self.steps_per_epoch = len(train_set) // self.per_step
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training data has {len(train_set)} blocks, fewer than one optimizer step needs "
                f"(micro_batch_size {config.micro_batch_size} x grad_accum_steps {config.grad_accum_steps} "
                f"x {self.world} processes = {self.per_step})"
            )
        if self.lengths is not None and len(self.lengths) != len(train_set):
            raise ValueError(f"lengths has {len(self.lengths)} entries for {len(train_set)} training examples")
        self.max_steps = config.max_steps or math.ceil((config.epochs or 1.0) * self.steps_per_epoch)

    def _setup_validator(self) -> None:
        if self.validator is not None or self.val_set is None:
            return
        config = self.config
        if has_lm_head(self.model):
            self.validator = PerplexityValidator(self.val_set, config.micro_batch_size, config.eval_batches)
            return
        if self.teacher is None:
            raise ValueError(
                f"{type(self.model).__name__} has no LM head, so it is validated by the distillation loss, "
                "which needs a teacher; give one or drop the validation data"
            )
        self.validator = DistillationLossValidator(self.teacher, self.objective, self.val_set,
                                                   config.micro_batch_size, config.eval_batches)

    def _setup_model(self) -> None:
        accelerator, model = self.accelerator, self.model
        set_seed(self.config.seed, device_specific=True)
        if self.teacher is not None:
            place_teacher(accelerator, self.teacher)
        if self.sharded:
            # FSDP places (and shards) the model itself, never whole on one device.
            fill_from_process_0(accelerator, model, torch.device("cpu"))
        else:
            model.to(self.device)
        model.train()
        self.optimizer = build_optimizer(model, self.config)
        self.scheduler = build_scheduler(self.optimizer, self.config, self.max_steps)
        self.group_names = [group["name"] for group in self.optimizer.param_groups]
        self.param_names = optimizer_param_names(model, self.optimizer)
        self.aliases = tied_aliases(model)
        # Under FSDP process 0 exports through an empty copy taken before sharding (see full_student).
        self.shell = meta_copy(model) if self.sharded and accelerator.is_main_process and self.exporter else None

    def _read_checkpoint(self) -> Checkpoint:
        """The checkpoint to resume from, checked against this run's inputs and settings."""
        checkpoint = self.checkpoints.read()
        self.checkpoints.check_compatible(checkpoint, config=self.config, world=self.world, train_examples=len(self.train_set),
                                          fingerprint=self.fingerprint, check_student=self.check_student,
                                          precision=self.accelerator.mixed_precision)
        return checkpoint

    def _say_early(self, message: str) -> None:
        # Before the progress bar exists.
        if self.accelerator.is_main_process:
            tqdm.write(message)

    def _restore(self, checkpoint: Checkpoint) -> None:
        state, result = checkpoint.trainer_state, self.result
        self.checkpoints.restore(checkpoint, model=self.prepared, optimizer=self.optimizer, scheduler=self.scheduler,
                                 param_names=self.param_names, device=self.device)
        if state.get("max_steps") != self.max_steps:
            # A longer (or shorter) run re-times the cosine: keep only the schedule's position.
            self.scheduler = build_scheduler(self.optimizer, self.config, self.max_steps, completed_steps=checkpoint.step)
        result.steps = result.start_step = checkpoint.step
        result.tokens_seen = int(state["tokens_seen"])
        if state.get("val_metric", "ppl") == result.val_metric:  # checkpoints from before val_metric are "ppl"
            result.best_val = state.get("best_val", state.get("best_val_ppl"))
            result.best_step = state.get("best_step")
            self.validations_since_best = int(state.get("validations_since_best", 0))
        result.stopped_early = bool(state.get("stopped_early", False))
        # Checkpoints from before these keys have neither: the history and the clock restart here.
        result.val_history = [dict(v) for v in state.get("val_history", [])]
        self._seconds_before = float(state.get("train_seconds", 0.0))

    def _start_logging(self) -> None:
        accelerator, config, result = self.accelerator, self.config, self.result
        if accelerator.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            config.to_file(self.out_dir / "training_config.yaml")
        accelerator.init_trackers(
            self.desc,
            config=_hparams(config, {"max_steps_resolved": self.max_steps, "num_processes": self.world,
                                     "tokens_per_step": self.per_step * config.block_size,
                                     "distributed_type": accelerator.distributed_type.value}),
        )
        self._progress = tqdm(total=self.max_steps, initial=result.start_step, desc=self.desc, unit="step",
                              disable=not accelerator.is_main_process, dynamic_ncols=True)
        self.say(
            f"training {self.max_steps - result.start_step} steps from step {result.start_step}: {self.per_step} "
            f"examples of up to {config.block_size} tokens per step on {self.world} process(es) "
            f"({accelerator.distributed_type.value}), {self.steps_per_epoch} steps per epoch, "
            f"mixed precision {accelerator.mixed_precision}"
        )

    def say(self, message: str) -> None:
        """Print one line on the main process, above the progress bar."""
        if self.accelerator.is_main_process:
            self._progress.write(message)

    # ------------------------------------------------------------------------------------ loop

    def run(self, *, resume: bool = False) -> TrainResult:
        """Set up, train to ``max_steps`` (or an early stop), export ``final/``; see :func:`train`.

        Process 0 holds ``out_dir``'s lock for the whole run (a second run writing the same
        folder is refused at once, :class:`kronlm.utils.atomic.FolderBusyError`) and first removes
        what a killed run left there (temporary checkpoint and export folders, stale locks).
        """
        self._setup_accelerator()
        main = self.accelerator.is_main_process
        with folder_lock(self.out_dir.absolute()) if main else contextlib.nullcontext():
            if main:
                removed = remove_interrupted_writes(self.out_dir)
                if removed:
                    tqdm.write(f"removed {len(removed)} leftover(s) of an interrupted run in {self.out_dir}: "
                               + ", ".join(p.name for p in removed))
            return self._run(resume)

    def _run(self, resume: bool) -> TrainResult:
        started = self._started = time.perf_counter()
        self.setup(resume=resume)
        try:
            step, smoothed = self.result.steps, None
            while step < self.max_steps and not (self.result.stopped_early or self.result.time_limited):
                epoch, offset = divmod(step, self.steps_per_epoch)
                batches = self.epoch_batches(epoch, offset)
                for _ in range(offset, self.steps_per_epoch):
                    stats = self.train_step(batches, step + 1)
                    step += 1
                    smoothed = self._record(step, stats, smoothed)
                    if self._after_step(step):
                        break
            self.finish()
        finally:
            self.close()
        self.result.seconds = time.perf_counter() - started
        self.result.total_seconds = self._seconds_before + self.result.seconds
        return self.result

    def epoch_batches(self, epoch: int, offset: int) -> Iterator[dict[str, Any]]:
        """This process's micro-batches of ``epoch`` from its step ``offset`` on, in training order."""
        config = self.config
        indices = epoch_indices(len(self.train_set), epoch, config.seed, self.per_step, self.lengths)
        mine = process_share(indices, offset, config.micro_batch_size, config.grad_accum_steps, self.world,
                             self.accelerator.process_index)
        return iter(epoch_loader(self.train_set, mine, config.micro_batch_size, config.seed, epoch, self.collate_fn))

    def train_step(self, batches: Iterator[dict[str, Any]], step: int) -> StepStats:
        """Optimizer step ``step`` (1-based): forward/backward of ``grad_accum_steps`` micro-batches,
        clipping, the finiteness check, the update.

        Raises:
            TrainingDiverged: the loss, a loss term or the gradient norm is NaN / inf; the
                weights are left as they were and the last checkpoint untouched.
            ValueError: a batch that is not a dict.
        """
        accelerator, config, device = self.accelerator, self.config, self.device
        started = time.perf_counter()
        total = torch.zeros((), device=device)
        terms: dict[str, torch.Tensor] = {}
        tokens = torch.zeros((), device=device)
        grad_norm = torch.zeros((), device=device)
        for _ in range(config.grad_accum_steps):
            batch = self._to_device(next(batches))
            with accelerator.accumulate(self.prepared):
                with accelerator.autocast():
                    out = self.objective(self.prepared, self.teacher, batch)
                accelerator.backward(out.total)
                total += out.total.detach().float()
                for name, value in out.terms.items():
                    terms[name] = terms.get(name, 0.0) + value.detach().float()
                tokens += self.count_tokens(batch)
                if accelerator.sync_gradients:
                    max_norm = config.grad_clip if config.grad_clip is not None else float("inf")
                    grad_norm = accelerator.clip_grad_norm_(self.prepared.parameters(), max_norm)
        names = sorted(terms)
        local = torch.stack([total, *(terms[n] for n in names)]) / config.grad_accum_steps
        reduced = accelerator.reduce(local, reduction="mean")
        loss = reduced[0].item()
        step_terms = {n: reduced[i + 1].item() for i, n in enumerate(names)}
        norm = grad_norm_value(grad_norm)
        self._check_finite(step, loss, step_terms, norm)
        lrs = {name: group["lr"] for name, group in zip(self.group_names, self.optimizer.param_groups)}
        self.optimizer.step()
        if not accelerator.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = int(accelerator.reduce(tokens, reduction="sum").item())
        return StepStats(loss, step_terms, tokens, norm, lrs, time.perf_counter() - started)

    def _to_device(self, batch: Any) -> dict[str, Any]:
        if not isinstance(batch, dict):
            raise ValueError(f"a training batch must be a dict of tensors, got {type(batch).__name__}; "
                             "give a collate_fn that returns one")
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _check_finite(self, step: int, loss: float, terms: dict[str, float], grad_norm: float) -> None:
        if math.isfinite(loss) and math.isfinite(grad_norm) and all(map(math.isfinite, terms.values())):
            return
        try:
            last = latest_checkpoint(self.out_dir)
        except (ValueError, OSError):
            last = None
        detail = "".join(f", {n}={v:.6g}" for n, v in terms.items())
        raise TrainingDiverged(
            f"non-finite loss at step {step}: total={loss:.6g}{detail}, grad norm={grad_norm:.6g}; "
            f"stopped before the update, last good checkpoint: {last if last is not None else 'none'}"
        )

    def _record(self, step: int, stats: StepStats, smoothed: float | None) -> float:
        result = self.result
        result.steps = step
        result.tokens_seen += stats.tokens
        result.losses.append(stats.loss)
        result.loss_terms.append(stats.terms)
        tps = stats.tokens / stats.seconds if stats.seconds > 0 else float("nan")
        smoothed = tps if smoothed is None else 0.9 * smoothed + 0.1 * tps
        self.accelerator.log(
            {"train/loss": stats.loss, **{f"train/{n}": v for n, v in stats.terms.items()},
             **{f"train/lr/{n}": v for n, v in stats.lrs.items()}, "train/grad_norm": stats.grad_norm,
             "train/tokens_per_s": tps, "train/tokens_seen": result.tokens_seen},
            step=step,
        )
        self._progress.set_postfix(loss=f"{stats.loss:.4f}", tok_s=f"{smoothed:,.0f}", refresh=False)
        self._progress.update(1)
        return smoothed

    def _after_step(self, step: int) -> bool:
        """Validate, stop early, checkpoint as the config says; True when the run is over."""
        config = self.config
        last = step == self.max_steps
        if self.validator is not None and (step % config.eval_every == 0 or last):
            self.validate(step)
            patience = config.early_stopping_patience
            if patience is not None and not last and self.validations_since_best >= patience:
                self.result.stopped_early = True
                self.say(f"step {step}: no better validation {self.result.val_metric} in {patience} "
                         f"validations, stopping early (best at step {self.result.best_step})")
        limit = config.max_minutes
        if limit is not None and not last and not self.result.stopped_early and time.perf_counter() - self._started >= 60 * limit:
            self.result.time_limited = True
            self.say(f"step {step}: time limit of {limit:g} minutes reached, stopping")
            if self.validator is not None and step % config.eval_every != 0:
                self.validate(step)
        stop = last or self.result.stopped_early or self.result.time_limited
        if step % config.save_every == 0 or stop:
            self.save_checkpoint(step)
        return stop

    # ------------------------------------------------------------------------------------ validate

    def validate(self, step: int) -> dict[str, float]:
        """Run the validator; a new best is exported to ``out_dir/best``. Returns its metrics."""
        validator, result = self.validator, self.result
        metrics = validator(self.prepared, self.accelerator)
        if validator.key not in metrics:
            raise ValueError(f"{type(validator).__name__} returned {sorted(metrics)}, without its metric {validator.key!r}")
        value = float(metrics[validator.key])
        result.val_history.append({"step": step, "tokens_seen": result.tokens_seen, **metrics})
        self.accelerator.log({f"val/{k}": v for k, v in metrics.items() if k not in _COUNTS}, step=step)
        improved = validator.improves(value, result.best_val)
        best = "" if result.best_val is None else f" (best {result.best_val:.4f} at step {result.best_step})"
        self.say(f"step {step}: validation {validator.name} {value:.4f}" + (" (best)" if improved else best))
        if not improved:
            self.validations_since_best += 1
            return metrics
        result.best_val, result.best_step = value, step
        self.validations_since_best = 0
        summary = {"step": step, "tokens_seen": result.tokens_seen, "recipe": self.config.recipe,
                   "val_metric": validator.name, "val": value, "val_metrics": metrics}
        if "loss" in metrics:
            summary["val_loss"] = metrics["loss"]
        if validator.name == "ppl":
            summary["val_ppl"] = value
        result.best_dir = self.export(self.out_dir / "best", summary)
        return metrics

    # ------------------------------------------------------------------------------------ checkpoint

    def save_checkpoint(self, step: int) -> None:
        """Write the step-``step`` checkpoint (:class:`~kronlm.distill.resume.CheckpointManager`); a collective."""
        path = self.checkpoints.save(step, model=self.prepared, optimizer=self.optimizer, scheduler=self.scheduler,
                                     aliases=self.aliases, param_names=self.param_names, device=self.device,
                                     trainer_state=self._trainer_state(step), keep=self.config.keep_checkpoints,
                                     protect_step=self.result.best_step)
        if path is not None:
            self.result.last_checkpoint = path

    def _trainer_state(self, step: int) -> dict[str, Any]:
        result = self.result
        return {
            "tokens_seen": result.tokens_seen,
            "epoch": step // self.steps_per_epoch,
            "step_in_epoch": step % self.steps_per_epoch,
            "blocks_per_step": self.per_step,
            "train_examples": len(self.train_set),
            "sampler_seed": self.config.seed,
            "length_grouped": self.lengths is not None,
            "world_size": self.world,
            "distributed_type": self.accelerator.distributed_type.value,
            "precision": self.accelerator.mixed_precision,  # what mixed_precision resolved to: "no" or "bf16"
            "max_steps": self.max_steps,
            "val_history": result.val_history,
            "train_seconds": self._seconds_before + time.perf_counter() - self._started,
            "val_metric": result.val_metric,
            "greater_is_better": result.greater_is_better,
            "best_val": result.best_val,
            "best_val_ppl": result.best_val_ppl,
            "best_step": result.best_step,
            "validations_since_best": self.validations_since_best,
            "stopped_early": result.stopped_early,
            "param_groups": self.group_names,
            "config": self.config.to_dict(),
            "run": self.fingerprint.to_dict(),
        }

    # ------------------------------------------------------------------------------------ export

    def export(self, folder: Path, summary: dict[str, Any]) -> Path | None:
        """Write the current model to ``folder`` with the exporter (None without one); a collective
        under FSDP: every process gathers, process 0 writes."""
        if self.exporter is None:
            return None
        with full_student(self.accelerator, self.prepared, self.shell, self.aliases) as plain:
            if self.accelerator.is_main_process:
                self.exporter(plain, folder, summary)
        self.accelerator.wait_for_everyone()
        return folder

    def finish(self) -> None:
        """Export ``out_dir/final`` (the model after the last step) with the run's summary."""
        result = self.result
        result.final_dir = self.export(
            self.out_dir / "final",
            {"step": result.steps, "tokens_seen": result.tokens_seen, "recipe": self.config.recipe,
             "best_step": result.best_step, "val_metric": result.val_metric, "best_val": result.best_val,
             "best_val_ppl": result.best_val_ppl, "stopped_early": result.stopped_early,
             "time_limited": result.time_limited, "seconds": time.perf_counter() - self._started,
             "total_seconds": self._seconds_before + time.perf_counter() - self._started,
             "val": result.val_history[-1] if result.val_history else None, "val_history": result.val_history},
        )
        if result.best_step is not None and self.exporter is not None:
            result.best_dir = self.out_dir / "best"

    def close(self) -> None:
        """Close the progress bar and the trackers (not the process group, which belongs to whoever
        launched the processes; the CLI ends it when it exits)."""
        if self._progress is not None:
            self._progress.close()
        for tracker in self.accelerator.trackers if self.accelerator is not None else []:
            tracker.finish()
        if self.accelerator is not None:
            self.accelerator.trackers = []
            if getattr(self, "prepared", None) is not None:
                # Under mixed precision prepare() wrapped the student's forward in autocast; the caller
                # gets back a model that computes in its own precision, as a loaded copy does.
                self.accelerator.unwrap_model(self.prepared, keep_fp32_wrapper=False)


def train(
    student: nn.Module,
    teacher: nn.Module | None,
    blocks_or_datasets: Any,
    config: TrainingConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    accelerator=None,
    tokenizer=None,
    **extensions: Any,
) -> TrainResult:
    """Train ``student`` against ``teacher`` with the recipe of ``config``; checkpoint, validate, export.

    Args:
        student: a causal LM or an encoder (Hugging Face ``PreTrainedModel``, possibly
            kronlm-compressed or layer-truncated); trained in place. A student with an LM head is
            validated by perplexity; one without (``BertModel`` in KroneckerBERT's general
            distillation) by the objective's loss on the validation blocks. Under FSDP it is
            sharded in place: afterwards each process holds its shard (``DTensor`` parameters);
            the full weights are in ``out_dir/final``.
        teacher: the frozen reference model (same tokenizer); None for recipe ``ce``. It is put in
            eval mode with ``requires_grad=False``, moved to the device, never wrapped in DDP or
            sharded (under FSDP every process holds the whole teacher).
        blocks_or_datasets: a ``TokenBlocks`` (``.train``/``.val`` int64 tensors (N, block_size)),
            a dict ``{"train", "val"}`` or a pair ``(train, val)`` of such tensors or map-style
            datasets yielding {"input_ids": (T,), "attention_mask": (T,)}. ``val`` may be None;
            it must be held-out training data, never the test split.
        config: the run's settings.
        out_dir: run folder: ``checkpoints/``, ``best/``, ``final/``, ``logs/``.
        resume: continue from ``out_dir/checkpoints/latest`` (model, optimizer, scheduler, RNG,
            data position, best so far), reproducing the losses of an uninterrupted run. The
            checkpoint may come from a DDP or an FSDP run with the same number of processes. A
            damaged latest checkpoint is named and the newest earlier one that verifies is used;
            other data, another teacher or result-changing settings are refused
            (:class:`ResumeMismatch`).
        accelerator: an existing ``accelerate.Accelerator`` (default: :func:`make_accelerator`).
            One process, DDP, FSDP2, or FSDP1 with ``use_orig_params``.
        tokenizer: saved next to the exported students when given.
        **extensions: keyword arguments of :class:`Trainer` (``objective``, ``validator``,
            ``collate_fn``, ``lengths``, ``exporter``, ``count_tokens``, ``summary``, ``desc``,
            ``run_settings``, ``check_student``).

    Returns:
        A :class:`TrainResult`.

    Raises:
        TrainingDiverged: the loss or gradient norm of a step is NaN / inf; no update is applied
            and the last checkpoint stays as it was.
        ValueError: inconsistent inputs (a recipe needing a teacher without one, too little data
            for one step, an unsupported process layout such as DeepSpeed, ...);
            :class:`ResumeMismatch`: ``resume`` with other inputs than the checkpoint's run;
            :class:`~kronlm.distill.checkpoint.CheckpointError`: ``resume`` where no checkpoint
            verifies (each named with its reason).
        FileNotFoundError: ``resume`` without a completed checkpoint in ``out_dir``.
        kronlm.utils.atomic.FolderBusyError: another process is training into ``out_dir``.
    """
    train_data, val_data = split_data(blocks_or_datasets)
    trainer = Trainer(student, config, train_data, out_dir, teacher=teacher, val_data=val_data,
                      tokenizer=tokenizer, accelerator=accelerator, **extensions)
    return trainer.run(resume=resume)


__all__ = ["ResumeMismatch", "StepStats", "TrainResult", "Trainer", "TrainingDiverged", "batch_tokens", "train"]
