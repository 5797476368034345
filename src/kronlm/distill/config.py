"""The settings of one recovery (distillation / continued pre-training) run.

A :class:`TrainingConfig` is a flat dataclass that round-trips through YAML and JSON, so a run can
be described by a file under ``configs/`` (litgpt style), overridden from the command line, and
stored verbatim inside every checkpoint. Defaults follow Krony-PT's recovery recipe (SPEC §4):
AdamW with betas (0.9, 0.95), weight decay 0.1, gradient clipping at 1.0, cosine learning rate
6e-5 -> 6e-6 after a linear warm-up.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MIXED_PRECISION_CHOICES = ("no", "bf16", "auto")

# Fields that fix which blocks each optimizer step sees; a resumed run must keep them to continue
# the interrupted one exactly.
DATA_ORDER_FIELDS = ("block_size", "micro_batch_size", "grad_accum_steps", "seed")


@dataclass
class TrainingConfig:
    """Settings of one recovery run of :func:`kronlm.distill.trainer.train`.

    Batch geometry: one optimizer step consumes ``micro_batch_size * grad_accum_steps *
    num_processes`` blocks of ``block_size`` tokens. Step counts (``max_steps``, ``warmup_steps``,
    ``eval_every``, ``save_every``) count optimizer steps, not micro-batches.

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
        mixed_precision: "no", "bf16", or "auto" (bf16 on a CUDA device that supports it).
        eval_every: validation every this many steps (and after the last step).
        eval_batches: validation micro-batches per pass (all processes together); None = all.
        save_every: checkpoint every this many steps (and after the last step).
        keep_checkpoints: newest checkpoints kept (the best one is kept as well).
        seed: seeds the data order (same on every process) and the RNGs (offset by process rank).
        log_dir: TensorBoard folder; None = ``<out_dir>/logs``.
        freeze_uncompressed: train only Kronecker factors and scalars.

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
    save_every: int = 1000
    keep_checkpoints: int = 2
    seed: int = 1337
    log_dir: str | None = None
    freeze_uncompressed: bool = False

    def __post_init__(self) -> None:
        if self.mixed_precision is False:
            # YAML 1.1 reads an unquoted `mixed_precision: no` as the boolean false.
            self.mixed_precision = "no"
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        if self.layer_map is not None:
            self.layer_map = list(self.layer_map)
        self.loss_weights = dict(self.loss_weights or {})
        self.validate()

    def validate(self) -> None:
        """Check every value; raise ``ValueError`` naming the first bad key and its value."""
        for name in ("block_size", "micro_batch_size", "grad_accum_steps", "eval_every", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"training config: {name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "keep_checkpoints", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"training config: {name} must be a non-negative integer, got {value!r}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"training config: keep_checkpoints must be at least 1, got {self.keep_checkpoints}")
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError(
                f"training config: give max_steps ({self.max_steps}) or epochs ({self.epochs}), not both"
            )
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"training config: max_steps must be a positive integer, got {self.max_steps!r}")
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"training config: warmup_steps ({self.warmup_steps}) must be smaller than max_steps ({self.max_steps})"
            )
        if self.epochs is not None and not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            raise ValueError(f"training config: epochs must be a positive number, got {self.epochs!r}")
        if self.eval_batches is not None and (not isinstance(self.eval_batches, int) or self.eval_batches < 1):
            raise ValueError(f"training config: eval_batches must be a positive integer, got {self.eval_batches!r}")
        for name in ("lr", "lr_kronecker", "lr_scalars"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and value > 0):
                raise ValueError(f"training config: {name} must be a positive number, got {value!r}")
        if not (_is_number(self.min_lr) and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"training config: min_lr must lie in [0, lr={self.lr}], got {self.min_lr!r}")
        if len(self.betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"training config: betas must be two numbers in [0, 1), got {list(self.betas)!r}")
        if not (_is_number(self.eps) and self.eps > 0):
            raise ValueError(f"training config: eps must be a positive number, got {self.eps!r}")
        if not (_is_number(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"training config: weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and not (_is_number(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"training config: grad_clip must be a positive number or null, got {self.grad_clip!r}")
        if self.mixed_precision not in MIXED_PRECISION_CHOICES:
            raise ValueError(
                f"training config: mixed_precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}, "
                f"got {self.mixed_precision!r}"
            )
        if self.layer_map is not None and not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layer_map
        ):
            raise ValueError(f"training config: layer_map must list non-negative layer indices, got {self.layer_map!r}")
        if not isinstance(self.recipe, str) or not self.recipe:
            raise ValueError(f"training config: recipe must be a recipe name, got {self.recipe!r}")
        self.loss_weights_resolved()

    def loss_weights_resolved(self):
        """The recipe's :class:`~kronlm.distill.recipes.LossWeights` with ``loss_weights`` applied.

        Raises:
            ValueError: unknown recipe, unknown loss-weight key, or an invalid weight (negative,
                non-finite, unknown attention loss), as reported by ``get_recipe``.
        """
        from kronlm.distill.recipes import get_recipe

        try:
            return get_recipe(self.recipe, **self.loss_weights)
        except ValueError as exc:
            raise ValueError(f"training config: {exc}") from None

    # ---------------------------------------------------------------- serialisation

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "training config") -> "TrainingConfig":
        """Build a config from a dict, e.g. a parsed YAML file.

        Raises:
            ValueError: ``values`` is not a mapping, has keys that are not fields (all named), or a
                value is out of range.
        """
        if not isinstance(values, dict):
            raise ValueError(f"{source}: expected a mapping of keys to values, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                f"(known keys: {', '.join(sorted(known))})"
            )
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> "TrainingConfig":
        """Read a ``.yaml``/``.yml``/``.json`` config file, with ``overrides`` replacing its values.

        The overrides (e.g. command-line flags) are applied before validation, so a file that is
        only consistent together with them (``warmup_steps`` below an overridden ``max_steps``)
        is accepted.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: unknown suffix, unparsable content, unknown keys or bad values (the message
                names the file).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: training config not found")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                values = yaml.safe_load(text)
            elif path.suffix == ".json":
                values = json.loads(text)
            else:
                raise ValueError(f"{path}: training config must end in .yaml, .yml or .json")
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot parse training config ({exc})".replace("\n", " ")) from None
        values = values if values is not None else {}
        if isinstance(values, dict) and overrides:
            values = {**values, **overrides}
        return cls.from_dict(values, source=str(path))

    def save(self, path: str | os.PathLike) -> None:
        """Write the config atomically as YAML (``.yaml``/``.yml``) or JSON (anything else)."""
        from kronlm.utils.io import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            if path.suffix in (".yaml", ".yml"):
                tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
            else:
                tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes: Any) -> "TrainingConfig":
        """A copy with some fields changed (validated again); unknown names raise ``ValueError``."""
        return TrainingConfig.from_dict({**self.to_dict(), **changes}, source="training config override")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
