"""Named loss recipes for recovery training (docs/method.md, "Recovery objectives").

A recipe is a :class:`LossWeights`: one weight per loss term plus the attention distance and the
KD temperature. :data:`RECIPES` holds the four recipes of the source papers and ``kd``; :func:`get_recipe`
returns one, optionally with fields overridden.

Recipes:

- ``ilkd-kroneckerbert``: KroneckerBERT (Tahaei et al., NAACL 2022) intermediate-layer KD:
  embedding, attention, hidden, logit KD and CE all weighted 1, attention distance = MSE on the
  pre-softmax scores, T = 1. For a model without an LM head (a BERT encoder such as
  ``BertModel``) there are no logits, and the objective skips the KD and CE terms.
- ``ilkd-kngpt2``: KnGPT2 (Edalati et al., ACL 2022): the same weights, attention distance = KL
  between attention distributions.
- ``distilgpt2``: DistilGPT2 (Sanh et al., 2019): 5 · KD at T = 2, 2 · CE, 1 · cosine loss on
  the last hidden state.
- ``ce``: Krony-PT (Ayad et al., 2024): causal-LM cross-entropy only, no teacher.
- ``kd``: pure logit KD, KL(teacher ‖ student) at T = 1 and no CE: the recovery of a compressed
  student (``kronlm compress --recover``, ``configs/recover*.yaml``). The same weights as ``ce``
  with ``loss_weights {ce: 0, kd: 1}``, which earlier configs wrote.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["ATTENTION_LOSSES", "HIDDEN_LOSSES", "RECIPES", "LossWeights", "get_recipe"]

ATTENTION_LOSSES = ("score_mse", "kl")
HIDDEN_LOSSES = ("mse", "relative_mse")
_WEIGHT_FIELDS = ("embedding", "attention", "hidden", "kd", "ce", "cosine")


@dataclass(frozen=True)
class LossWeights:
    """Weights of the distillation loss terms (dimensionless).

    total = embedding·MSE(E_S, E_T) + attention·Σ_l D(att_S,l, att_T,map[l])
            + hidden·Σ_l MSE(H_S,l, H_T,map[l]) + kd·KD_T(logits) + ce·CE + cosine·(1 - cos)

    Attributes:
        embedding, attention, hidden, kd, ce, cosine: weights, finite and >= 0; a zero weight
            means the term is not computed at all.
        attention_loss: "score_mse" (MSE on pre-softmax scores, KroneckerBERT) or "kl"
            (KL(teacher ‖ student) on attention probabilities, KnGPT2).
        temperature: KD temperature T > 0; the KD term is multiplied by T².
        hidden_loss: "mse" (the papers') or "relative_mse" (each layer's MSE divided by the
            teacher layer's mean square: scale-free, for Llama-family models whose hidden states
            reach the hundreds; see :func:`kronlm.distill.losses.hidden_mse`).

    Raises:
        ValueError: a negative or non-finite weight, an unknown ``attention_loss``, or
            ``temperature`` <= 0 or non-finite.
    """

    embedding: float = 0.0
    attention: float = 0.0
    hidden: float = 0.0
    kd: float = 0.0
    ce: float = 0.0
    cosine: float = 0.0
    attention_loss: str = "score_mse"
    temperature: float = 1.0
    hidden_loss: str = "mse"

    def __post_init__(self) -> None:
        for name in _WEIGHT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"loss weight {name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"loss weight {name} must be finite and >= 0, got {value}")
            object.__setattr__(self, name, float(value))
        if self.attention_loss not in ATTENTION_LOSSES:
            raise ValueError(f"attention_loss must be one of {list(ATTENTION_LOSSES)}, got {self.attention_loss!r}")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"hidden_loss must be one of {list(HIDDEN_LOSSES)}, got {self.hidden_loss!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
        object.__setattr__(self, "temperature", float(t))

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict (floats and one string)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LossWeights:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: a key is missing or unknown (no silent default), or a value is invalid.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        missing = [n for n in names if n not in data]
        if unknown or missing:
            raise ValueError(f"LossWeights.from_dict: unknown keys {unknown}, missing keys {missing}; expected {names}")
        return cls(**data)


RECIPES: dict[str, LossWeights] = {
    "ilkd-kroneckerbert": LossWeights(
        embedding=1.0, attention=1.0, hidden=1.0, kd=1.0, ce=1.0, attention_loss="score_mse", temperature=1.0
    ),
    "ilkd-kngpt2": LossWeights(
        embedding=1.0, attention=1.0, hidden=1.0, kd=1.0, ce=1.0, attention_loss="kl", temperature=1.0
    ),
    "distilgpt2": LossWeights(kd=5.0, ce=2.0, cosine=1.0, temperature=2.0),
    "ce": LossWeights(ce=1.0),
    "kd": LossWeights(kd=1.0),
}


def get_recipe(name: str, **overrides: Any) -> LossWeights:
    """Return the recipe ``name`` from :data:`RECIPES`, with fields replaced by ``overrides``.

    Example: ``get_recipe("ilkd-kroneckerbert", ce=0.0)`` for an MLM / classification student.

    Raises:
        ValueError: unknown recipe (the message lists the valid names), unknown override field
            (lists the fields), or an invalid value.
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid recipes are {sorted(RECIPES)}")
    names = [f.name for f in dataclasses.fields(LossWeights)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(f"unknown LossWeights fields {unknown}; valid fields are {names}")
    return dataclasses.replace(RECIPES[name], **overrides)
