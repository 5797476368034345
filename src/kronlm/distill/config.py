"""The settings of training runs: recovery (distillation / continued pre-training) and task runs.

A :class:`TrainingConfig` is a flat dataclass that round-trips through YAML and JSON, so a run can
be described by a file under ``configs/`` (litgpt style), overridden from the command line, and
stored verbatim inside every checkpoint. Defaults follow Krony-PT's recovery recipe (docs/method.md, "Recovery objectives"):
AdamW with betas (0.9, 0.95), weight decay 0.1, gradient clipping at 1.0, cosine learning rate
6e-5 -> 6e-6 after a linear warm-up.

A :class:`TaskTrainConfig` describes a fine-tuning or task-distillation run on a labelled task
(GLUE; :class:`kronlm.tasks.glue.GlueTrainConfig` derives from it) in the terms such runs are
usually given (examples per batch, epochs, a warm-up ratio, a held-out share of the training
split); :meth:`TaskTrainConfig.training_config` maps it onto the :class:`TrainingConfig` the one
training loop (:class:`kronlm.distill.trainer.Trainer`) runs. Both share the loss recipe fields
through :class:`LossRecipeMixin`, so ``recipe`` + ``loss_weights`` resolve in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from kronlm.distill.recipes import LossWeights, get_recipe
from kronlm.utils.config import ConfigBase

MIXED_PRECISION_CHOICES = ("no", "bf16", "auto")
MODES = ("end_to_end", "blockwise", "local")
LOCAL_TARGETS = ("teacher", "dense")
LOCAL_MODULES = ("all", "data_free")
BLOCK_INPUTS = ("student", "teacher")
BLOCK_LOSSES = ("mse", "relative_mse")
CACHE_DTYPE_NAMES = ("bfloat16", "float16", "float32")

# Fields that fix which examples each optimizer step sees; a resumed run must keep them to
# continue the interrupted one exactly.
DATA_ORDER_FIELDS = ("block_size", "micro_batch_size", "grad_accum_steps", "seed")
# Fields a resumed run may change: the run's length (the cosine is re-timed), when it validates,
# checkpoints and logs, and when it stops early; every other field changes the weights a step
# produces, so a resume with another value is refused (``blockwise.x`` = field x of the section).
RESUME_FREE_FIELDS = (
    "max_steps", "epochs", "max_minutes", "eval_every", "eval_batches", "early_stopping_patience", "save_every",
    "keep_checkpoints", "log_dir", "blockwise.cache_dir", "blockwise.end_to_end_steps", "local.capture_memory_gb",
)


class LossRecipeMixin:
    """The ``recipe`` + ``loss_weights`` fields shared by every training config.

    A subclass (a dataclass) declares ``recipe: str`` (a name in
    :data:`kronlm.distill.recipes.RECIPES`) and ``loss_weights: dict`` (overrides of single
    :class:`~kronlm.distill.recipes.LossWeights` fields).
    """

    recipe: str
    loss_weights: dict[str, Any]

    def loss_weights_resolved(self) -> LossWeights:
        """The recipe's :class:`~kronlm.distill.recipes.LossWeights` with ``loss_weights`` applied.

        Raises:
            ValueError: unknown recipe, unknown loss-weight key, or an invalid weight (negative,
                non-finite, unknown attention loss), as reported by ``get_recipe``.
        """
        return get_recipe(self.recipe, **self.loss_weights)

    def check_loss_recipe(self) -> None:
        """Normalise ``loss_weights`` to a dict and resolve the recipe once (raises ``ValueError``)."""
        self.loss_weights = dict(self.loss_weights or {})
        if not isinstance(self.recipe, str) or not self.recipe:
            raise ValueError(f"recipe must be a recipe name, got {self.recipe!r}")
        self.loss_weights_resolved()


@dataclass
class BlockwiseConfig(ConfigBase):
    """How block-wise distillation (``mode: blockwise``) trains (:mod:`kronlm.distill.blockwise`).

    Each transformer block that holds compressed modules is trained alone to map the teacher's
    hidden state entering it to the one leaving the dense teacher block (ZeroQuant's
    layer-by-layer distillation, BRECQ's block reconstruction); the optimizer, schedule and step
    counts of the enclosing :class:`TrainingConfig` apply to each block.

    Attributes:
        inputs: "student" (sequential: block l learns from the outputs of the already recovered
            student blocks 0..l-1, which corrects the error that accumulates through depth) or
            "teacher" (parallel: from the cached teacher inputs; blocks are independent).
        loss: "mse" (mean squared error of the block output) or "relative_mse" (its squared error
            divided by the target's squared norm).
        train_norms: also train the block's normalisation weights.
        cache_dtype: dtype of the teacher hidden-state cache on disk ("bfloat16", "float16",
            "float32").
        cache_dir: where the cache lives; None = ``<out_dir>/teacher_cache``. A cache made from the
            same teacher, tokens and dtype is reused.
        end_to_end_steps: steps of end-to-end distillation (the enclosing config's recipe) after
            the block-wise pass; 0 = none.
        end_to_end_lr: peak learning rate of that pass; None = the enclosing config's ``lr``
            (block reconstruction tolerates larger steps than end-to-end distillation).
        train_uncompressed: also train the block's uncompressed weights (attention, dense MLP
            matrices, norms); by default only compressed modules (and, with ``train_norms``, the
            norms) learn.

    Raises:
        ValueError: an unknown choice or a negative step count (named).
    """

    inputs: str = "student"
    loss: str = "mse"
    train_norms: bool = False
    cache_dtype: str = "bfloat16"
    cache_dir: str | None = None
    end_to_end_steps: int = 0
    end_to_end_lr: float | None = None
    train_uncompressed: bool = False

    config_name = "blockwise config"

    def validate(self) -> None:
        """Check the choices (see the class docstring)."""
        for name, allowed in (("inputs", BLOCK_INPUTS), ("loss", BLOCK_LOSSES), ("cache_dtype", CACHE_DTYPE_NAMES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if isinstance(self.end_to_end_steps, bool) or not isinstance(self.end_to_end_steps, int) or self.end_to_end_steps < 0:
            raise ValueError(f"end_to_end_steps must be a non-negative integer, got {self.end_to_end_steps!r}")
        if self.end_to_end_lr is not None and not (_is_number(self.end_to_end_lr) and self.end_to_end_lr > 0):
            raise ValueError(f"end_to_end_lr must be a positive number or null, got {self.end_to_end_lr!r}")


@dataclass
class LocalConfig(ConfigBase):
    """How local reconstruction (``mode: local``) fits each compressed module
    (:mod:`kronlm.distill.local`).

    For each block in order, every compressed module's input is captured on the already
    recovered student prefix, and the module alone is fitted to a target output on those tokens:
    first in closed form (the reduced-rank regression / alternating least squares of the module's
    family under the captured input second moment), then by gradient epochs over the captured
    tokens with the enclosing :class:`TrainingConfig`'s optimizer, schedule and run length
    (per block; ``max_minutes`` is the whole stage's budget, shared out over the blocks).

    Attributes:
        target: "teacher" (the dense teacher module's output on the teacher's own inputs: the
            fit also corrects the error earlier blocks left in the student's inputs) or "dense"
            (the dense weight applied to the student's inputs, GPTQ's objective: the fit only
            undoes the module's own approximation).
        refit: start each module with the closed-form fit (kept only where it lowers the held-out
            output error).
        joint: in the gradient epochs, fit the modules inside a child of the block that is called
            with one tensor (an MLP) jointly, to that child's output, instead of each to its own
            target: the activations between them (a 2x Kronecker gate cannot follow the dense
            gate's) are then free, and only what leaves the MLP must match.
        refit_damping: ridge towards the dense weight in the closed-form fit, relative to the
            mean input energy (δ = refit_damping · mean(diag C)).
        modules: "all" compressed linear modules of the blocks, or "data_free": only those whose
            factors were initialised without calibration data (Van Loan, modified Van Loan,
            pruning, random; the compression report says which). An activation-aware init
            already minimises the output error on the teacher's inputs; refitting it to the
            student's inputs fits the recovery text closely and was measured to help other text
            less than block-wise distillation does (docs/recovery.md).
        capture_memory_gb: captured inputs and targets of one block are held in memory (float32)
            up to this many gigabytes; larger captures go to disk as bfloat16 beside the run
            (refused when the disk cannot hold them either).

    Raises:
        ValueError: an unknown target or a non-positive number (named).
    """

    target: str = "teacher"
    modules: str = "all"
    refit: bool = True
    joint: bool = True
    refit_damping: float = 1e-2
    capture_memory_gb: float = 8.0

    config_name = "local config"

    def validate(self) -> None:
        """Check the choices (see the class docstring)."""
        if self.target not in LOCAL_TARGETS:
            raise ValueError(f"target must be one of {', '.join(LOCAL_TARGETS)}, got {self.target!r}")
        if self.modules not in LOCAL_MODULES:
            raise ValueError(f"modules must be one of {', '.join(LOCAL_MODULES)}, got {self.modules!r}")
        for name in ("refit", "joint"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not (_is_number(self.refit_damping) and math.isfinite(self.refit_damping) and self.refit_damping >= 0):
            raise ValueError(f"refit_damping must be a non-negative number, got {self.refit_damping!r}")
        if not (_is_number(self.capture_memory_gb) and math.isfinite(self.capture_memory_gb) and self.capture_memory_gb >= 0):
            raise ValueError(f"capture_memory_gb must be a non-negative number, got {self.capture_memory_gb!r}")


@dataclass
class TrainingConfig(LossRecipeMixin, ConfigBase):
    """Settings of one run of the training loop (:func:`kronlm.distill.trainer.train`).

    Batch geometry: one optimizer step consumes ``micro_batch_size * grad_accum_steps *
    num_processes`` blocks (or examples) of at most ``block_size`` tokens. Step counts
    (``max_steps``, ``warmup_steps``, ``eval_every``, ``save_every``) count optimizer steps, not
    micro-batches.

    Learning rates: ``lr`` applies to every trainable tensor that is not a Kronecker factor or a
    Kronecker scalar; ``lr_kronecker`` (factors ``A``/``B`` of ``KroneckerLinear`` /
    ``KroneckerEmbedding``) and ``lr_scalars`` (Krony-PT's per-term ``scales``) default to ``lr``.
    Every group follows the same warm-up + cosine shape and ends at ``min_lr / lr`` times its own
    peak rate. Weight decay applies to matrices and factors only, never to biases, norm weights
    or scalars (tensors with fewer than 2 dimensions).

    Attributes:
        recipe: loss recipe name (:data:`kronlm.distill.recipes.RECIPES`).
        loss_weights: overrides of the recipe's ``LossWeights`` fields (embedding, attention,
            hidden, kd, ce, cosine, attention_loss, temperature, hidden_loss).
        layer_map: teacher layer (0-based) for each student layer; None = identity.
        block_size: tokens per training block.
        micro_batch_size: blocks per forward pass and process.
        grad_accum_steps: micro-batches per optimizer step.
        max_steps / epochs: run length in optimizer steps, or in passes over the training
            blocks (at most one of the two; neither = 1 epoch).
        lr, lr_kronecker, lr_scalars, min_lr: peak and floor learning rates (see above).
        warmup_steps: linear warm-up steps from 0 to the peak.
        betas, eps, weight_decay: AdamW settings.
        grad_clip: maximum global gradient L2 norm; None = no clipping (the norm is still logged).
        mixed_precision: "no", "bf16", or "auto" (bf16 on a CUDA device that supports it and on a CPU
            with AMX-BF16 or AVX512-BF16: :func:`kronlm.distill.distributed.resolve_mixed_precision`).
        eval_every: validation every this many steps (and after the last step).
        eval_batches: validation micro-batches per pass (all processes together); None = all.
        max_minutes: stop after the first step that ends this many minutes (wall clock) after the
            run (or its resumption) started, validating, checkpointing and exporting as after the
            last step; None = no limit. For equal-time comparisons of recipes.
        early_stopping_patience: stop after this many validations in a row without a new best
            (validation data are held-out training data, never the test split); None = never.
        save_every: checkpoint every this many steps (and after the last step).
        keep_checkpoints: newest checkpoints kept (the best one is kept as well).
        seed: seeds the data order (same on every process) and the RNGs (offset by process rank).
        log_dir: TensorBoard folder; None = ``<out_dir>/logs``.
        freeze_uncompressed: train only Kronecker factors and scalars.
        mode: "end_to_end" (the whole student against the teacher's outputs), "blockwise" (one
            compressed block at a time on cached teacher hidden states; step counts are then per
            block, see :class:`BlockwiseConfig`) or "local" (each compressed module alone on its
            captured inputs, see :class:`LocalConfig`). In the block modes ``max_minutes`` is the
            budget of all blocks together.
        blockwise: the block-wise settings (its cache settings serve the local mode too).
        local: the local-reconstruction settings.

    Raises:
        ValueError: from :meth:`validate` (called by ``__post_init__``) when a value is out of
            range, naming the key and the value.
    """

    recipe: str = "ilkd-kngpt2"
    loss_weights: dict[str, Any] = field(default_factory=dict)
    layer_map: list[int] | None = None
    block_size: int = 1024
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    max_steps: int | None = None
    epochs: float | None = None
    lr: float = 6e-5
    lr_kronecker: float | None = None
    lr_scalars: float | None = None
    min_lr: float = 6e-6
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    mixed_precision: str = "auto"
    eval_every: int = 500
    eval_batches: int | None = None
    max_minutes: float | None = None
    early_stopping_patience: int | None = None
    save_every: int = 1000
    keep_checkpoints: int = 2
    seed: int = 1337
    log_dir: str | None = None
    freeze_uncompressed: bool = False
    mode: str = "end_to_end"
    blockwise: BlockwiseConfig = field(default_factory=BlockwiseConfig)
    local: LocalConfig = field(default_factory=LocalConfig)

    config_name = "training config"

    @classmethod
    def _from_plain(cls, data: dict[str, Any], source: str) -> dict[str, Any]:
        for name, section in (("blockwise", BlockwiseConfig), ("local", LocalConfig)):
            value = data.get(name)
            if value is not None and not isinstance(value, section):
                data[name] = section.from_dict(value, source=f"{source}, {name}")
        return data

    def validate(self) -> None:
        """Normalise and check every value; raise ``ValueError`` naming the first bad key and its value."""
        if self.mixed_precision is False:
            # YAML 1.1 reads an unquoted `mixed_precision: no` as the boolean false.
            self.mixed_precision = "no"
        if isinstance(self.blockwise, dict):
            self.blockwise = BlockwiseConfig.from_dict(self.blockwise, source="blockwise")
        if isinstance(self.local, dict):
            self.local = LocalConfig.from_dict(self.local, source="local")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        if self.layer_map is not None:
            self.layer_map = list(self.layer_map)
        for name in ("block_size", "micro_batch_size", "grad_accum_steps", "eval_every", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "keep_checkpoints", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be at least 1, got {self.keep_checkpoints}")
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError(
                f"give max_steps ({self.max_steps}) or epochs ({self.epochs}), not both"
            )
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps must be a positive integer, got {self.max_steps!r}")
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be smaller than max_steps ({self.max_steps})"
            )
        if self.epochs is not None and not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            raise ValueError(f"epochs must be a positive number, got {self.epochs!r}")
        if self.max_minutes is not None and not (_is_number(self.max_minutes) and self.max_minutes > 0):
            raise ValueError(f"max_minutes must be a positive number or null, got {self.max_minutes!r}")
        for name in ("eval_batches", "early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or null, got {value!r}")
        for name in ("lr", "lr_kronecker", "lr_scalars"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not (_is_number(self.min_lr) and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"min_lr must lie in [0, lr={self.lr}], got {self.min_lr!r}")
        if len(self.betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {list(self.betas)!r}")
        if not (_is_number(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a positive number, got {self.eps!r}")
        if not (_is_number(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and not (_is_number(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be a positive number or null, got {self.grad_clip!r}")
        if self.mixed_precision not in MIXED_PRECISION_CHOICES:
            raise ValueError(
                f"mixed_precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}, "
                f"got {self.mixed_precision!r}"
            )
        if self.layer_map is not None and not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layer_map
        ):
            raise ValueError(f"layer_map must list non-negative layer indices, got {self.layer_map!r}")
        self.check_loss_recipe()


@dataclass
class TaskTrainConfig(LossRecipeMixin, ConfigBase):
    """Settings of a fine-tuning or task-distillation run on a labelled task (GLUE and the like).

    The run is the one training loop of :mod:`kronlm.distill.trainer`; :meth:`training_config`
    maps these fields onto its :class:`TrainingConfig`. Checkpoint choice never looks at the
    reported split: a seeded ``val_fraction`` of the training examples is held out, scored with
    the task's main metric, and picks ``best/`` (and any early stop).

    Attributes:
        max_length: tokens per example after truncation (special tokens included).
        batch_size: examples per optimizer step (and per process; one micro-batch per step).
        epochs / max_steps: run length in passes over the training examples, or in optimizer
            steps (``max_steps`` wins when both are set).
        lr: peak AdamW learning rate; min_lr: floor of the cosine decay.
        warmup_ratio: share of the steps spent warming up linearly from 0.
        weight_decay: AdamW decoupled weight decay on matrices and Kronecker factors.
        betas, eps: AdamW settings (BERT fine-tuning: (0.9, 0.999), 1e-8).
        grad_clip: maximum global gradient L2 norm; None = no clipping.
        mixed_precision: "no", "bf16" or "auto" (see :class:`TrainingConfig`).
        seed: seeds the head, the held-out split, the subset, the data order and dropout.
        max_train_examples: use a seeded random subset of this many training examples (before
            the held-out split); None = all.
        val_fraction: share of the (subset of the) training examples held out to choose the
            checkpoint (seeded, disjoint from the examples trained on); 0 = no choice, the model
            after the last step is used.
        eval_every: validate every this many steps; 0 = once per epoch (and after the last step).
        early_stopping_patience: stop after this many validations without a new best; None = never.
        eval_batch_size: examples per forward pass when evaluating.
        group_by_length: batch examples of similar length together (less padding, same data).
        freeze_word_embeddings: keep a dense word-embedding matrix fixed (on a CPU this skips the
            gradient and AdamW update of its vocab x hidden entries, 11.7M of MiniLM's 22.7M
            parameters, at little cost in accuracy); Kronecker word embeddings stay trainable.
        save_every: checkpoint every this many steps (0 = only after the last step).
        keep_checkpoints: newest checkpoints kept (the best one is kept as well).
        recipe: distillation recipe of a student run (:data:`kronlm.distill.recipes.RECIPES`);
            a teacher is fine-tuned with CE on the labels whatever it says.
        loss_weights: overrides of the recipe's ``LossWeights`` fields.

    Raises:
        ValueError: a value out of range or an unknown key, naming it.
    """

    max_length: int = 128
    batch_size: int = 32
    epochs: float = 3.0
    max_steps: int | None = None
    lr: float = 5e-5
    min_lr: float = 0.0
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    mixed_precision: str = "no"
    seed: int = 42
    max_train_examples: int | None = None
    val_fraction: float = 0.1
    eval_every: int = 0
    early_stopping_patience: int | None = None
    eval_batch_size: int = 128
    group_by_length: bool = True
    freeze_word_embeddings: bool = False
    save_every: int = 0
    keep_checkpoints: int = 1
    recipe: str = "ilkd-kroneckerbert"
    loss_weights: dict[str, Any] = field(default_factory=dict)

    config_name = "task config"

    def validate(self) -> None:
        """Normalise and check every value; raise ``ValueError`` naming the first bad key and its value."""
        if self.mixed_precision is False:
            self.mixed_precision = "no"
        self.betas = tuple(self.betas)
        for name in ("max_length", "batch_size", "eval_batch_size", "keep_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        for name in ("max_steps", "max_train_examples", "early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or null, got {value!r}")
        for name in ("save_every", "eval_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if not (_is_number(self.epochs) and math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"epochs must be a positive number, got {self.epochs!r}")
        if not (_is_number(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (_is_number(self.min_lr) and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"min_lr must lie in [0, lr={self.lr}], got {self.min_lr!r}")
        if not (_is_number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1):
            raise ValueError(f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio!r}")
        if not (_is_number(self.val_fraction) and 0 <= self.val_fraction < 1):
            raise ValueError(f"val_fraction must lie in [0, 1), got {self.val_fraction!r}")
        if not (_is_number(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and not (_is_number(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be a positive number or null, got {self.grad_clip!r}")
        if self.mixed_precision not in MIXED_PRECISION_CHOICES:
            raise ValueError(
                f"mixed_precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}, got {self.mixed_precision!r}"
            )
        if self.early_stopping_patience is not None and self.val_fraction == 0:
            raise ValueError(
                f"early_stopping_patience {self.early_stopping_patience} needs held-out training examples: "
                "set val_fraction > 0"
            )
        self.check_loss_recipe()

    def training_config(self, num_examples: int, num_processes: int = 1, *, recipe: str | None = None,
                        log_dir: str | None = None) -> TrainingConfig:
        """The :class:`TrainingConfig` of a run over ``num_examples`` training examples.

        Steps per epoch = ``num_examples // (batch_size * num_processes)`` (the remainder of
        each epoch's permutation is left out, a different one every epoch); ``max_steps`` or
        ``ceil(epochs * steps per epoch)`` steps, at least 2 (the warm-up + cosine schedule
        needs two); warm-up = ``round(warmup_ratio * steps)``, below the step count; validation
        every ``eval_every`` steps or once per epoch; a checkpoint every ``save_every`` steps or
        only after the last.

        Args:
            num_examples: training examples after the held-out split.
            num_processes: processes sharing each step.
            recipe: the loss recipe of this run (a teacher's is ``"ce"``); None = ``self.recipe``.
            log_dir: TensorBoard folder; None = ``<out_dir>/logs``.

        Raises:
            ValueError: fewer training examples than one step needs (names both numbers).
        """
        per_step = self.batch_size * num_processes
        steps_per_epoch = num_examples // per_step
        if steps_per_epoch == 0:
            raise ValueError(
                f"{num_examples} training examples, fewer than one optimizer step needs (batch_size "
                f"{self.batch_size} x {num_processes} processes = {per_step})"
            )
        max_steps = max(self.max_steps or math.ceil(self.epochs * steps_per_epoch), 2)
        warmup = min(round(self.warmup_ratio * max_steps), max_steps - 1)
        return TrainingConfig(
            recipe=recipe or self.recipe, loss_weights=dict(self.loss_weights) if recipe in (None, self.recipe) else {},
            block_size=self.max_length, micro_batch_size=self.batch_size, grad_accum_steps=1, max_steps=max_steps,
            lr=float(self.lr), min_lr=float(self.min_lr), warmup_steps=warmup, betas=self.betas, eps=float(self.eps),
            weight_decay=float(self.weight_decay), grad_clip=self.grad_clip, mixed_precision=self.mixed_precision,
            eval_every=self.eval_every or steps_per_epoch, early_stopping_patience=self.early_stopping_patience,
            save_every=self.save_every or max_steps, keep_checkpoints=self.keep_checkpoints, seed=self.seed,
            log_dir=log_dir,
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


__all__ = ["DATA_ORDER_FIELDS", "LOCAL_MODULES", "LOCAL_TARGETS", "MIXED_PRECISION_CHOICES", "MODES", "RESUME_FREE_FIELDS", "BlockwiseConfig", "LocalConfig",
           "LossRecipeMixin", "TaskTrainConfig", "TrainingConfig"]
