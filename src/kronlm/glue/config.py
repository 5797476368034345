"""Settings of one GLUE fine-tuning or task-distillation run, YAML/JSON round-trippable."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["GlueTrainConfig"]


@dataclass
class GlueTrainConfig:
    """Hyper-parameters of :func:`kronlm.glue.finetune.train_classifier`.

    Attributes:
        max_length: tokens per example after truncation (special tokens included).
        batch_size: examples per optimizer step.
        epochs / max_steps: run length in passes over the training examples, or in optimizer
            steps (``max_steps`` wins when both are set).
        lr: peak AdamW learning rate.
        min_lr: floor of the cosine decay.
        warmup_ratio: share of the steps spent warming up linearly from 0.
        weight_decay: AdamW decoupled weight decay on matrices and Kronecker factors.
        betas, eps: AdamW settings (BERT fine-tuning: (0.9, 0.999), 1e-8).
        grad_clip: maximum global gradient L2 norm; None = no clipping.
        seed: seeds the head, the data order and dropout.
        max_train_examples: train on a seeded random subset of this many examples; None = all.
        eval_batch_size: examples per forward pass when evaluating.
        group_by_length: batch examples of similar length together (less padding, same data).
        freeze_word_embeddings: keep the (dense) word-embedding matrix fixed: on a CPU this
            skips the gradient and AdamW update of its vocab x hidden entries (11.7M of
            MiniLM's 22.7M parameters) at little cost in accuracy. Kronecker word embeddings
            (students) are left trainable.
        save_every: checkpoint every this many steps (0 = only after the last step).
        keep_checkpoints: newest checkpoints kept.
        recipe: distillation recipe of a student run (:data:`kronlm.distill.recipes.RECIPES`).
        loss_weights: overrides of the recipe's ``LossWeights`` fields.

    Raises:
        ValueError: a value out of range or an unknown key (from :meth:`from_dict`), naming it.
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
    seed: int = 42
    max_train_examples: int | None = None
    eval_batch_size: int = 128
    group_by_length: bool = True
    freeze_word_embeddings: bool = False
    save_every: int = 0
    keep_checkpoints: int = 1
    recipe: str = "ilkd-kroneckerbert"
    loss_weights: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.loss_weights = dict(self.loss_weights or {})
        for name in ("max_length", "batch_size", "eval_batch_size", "keep_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"glue config: {name} must be a positive integer, got {value!r}")
        if self.max_length < 2:
            raise ValueError(f"glue config: max_length must be at least 2, got {self.max_length}")
        for name in ("max_steps", "max_train_examples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"glue config: {name} must be a positive integer or null, got {value!r}")
        if not isinstance(self.save_every, int) or self.save_every < 0:
            raise ValueError(f"glue config: save_every must be a non-negative integer, got {self.save_every!r}")
        if not (isinstance(self.epochs, (int, float)) and math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"glue config: epochs must be a positive number, got {self.epochs!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"glue config: lr must be a positive number, got {self.lr!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"glue config: min_lr must lie in [0, lr={self.lr}], got {self.min_lr!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"glue config: warmup_ratio must lie in [0, 1), got {self.warmup_ratio!r}")
        if self.weight_decay < 0:
            raise ValueError(f"glue config: weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"glue config: grad_clip must be positive or null, got {self.grad_clip!r}")
        self.loss_weights_resolved()

    def loss_weights_resolved(self):
        """The recipe's :class:`~kronlm.distill.recipes.LossWeights` with ``loss_weights`` applied.

        Raises:
            ValueError: unknown recipe or field, or an invalid weight.
        """
        from kronlm.distill.recipes import get_recipe

        try:
            return get_recipe(self.recipe, **self.loss_weights)
        except ValueError as exc:
            raise ValueError(f"glue config: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-ready dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "glue config") -> GlueTrainConfig:
        """Build from a dict; ``source`` names the origin in errors.

        Raises:
            ValueError: unknown keys (listed with the valid ones) or invalid values.
        """
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping, got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; valid keys: {known}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> GlueTrainConfig:
        """Read a YAML or JSON file, then apply ``overrides`` (command-line values win).

        Raises:
            FileNotFoundError: no such file.
            ValueError: it does not parse, or holds unknown keys / bad values (names the file).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"glue config {path}: file not found")
        try:
            data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ValueError(f"glue config {path}: cannot parse ({str(exc).splitlines()[0]})") from None
        data = dict(data or {})
        data.update(overrides or {})
        return cls.from_dict(data, source=f"glue config {path}")

    def training_config(self, max_steps: int):
        """The :class:`kronlm.distill.config.TrainingConfig` that drives the shared AdamW groups and schedule."""
        from kronlm.distill.config import TrainingConfig

        warmup = min(round(self.warmup_ratio * max_steps), max_steps - 1)
        return TrainingConfig(
            recipe=self.recipe, loss_weights=self.loss_weights, lr=float(self.lr), min_lr=float(self.min_lr),
            warmup_steps=warmup, max_steps=max_steps, betas=self.betas, eps=float(self.eps),
            weight_decay=float(self.weight_decay), grad_clip=self.grad_clip, mixed_precision="no",
            seed=self.seed, micro_batch_size=self.batch_size, block_size=self.max_length,
        )
