"""The recovery-training objective: weighted distillation terms from one student and one teacher pass.

:class:`DistillationObjective` turns a :class:`~kronlm.distill.recipes.LossWeights` into a
callable ``objective(student, teacher, batch) -> LossOutput``. It traces the frozen teacher
under ``torch.no_grad()`` and the student with gradients (:func:`kronlm.distill.capture.trace`),
computes only the terms with a non-zero weight (:mod:`kronlm.distill.losses`) and sums them.

Layer maps (student layer l learns from teacher layer ``layer_map[l]``, 0-based) apply to the
hidden-state and the attention terms alike. With equal depths the default is the identity; a
student of another depth needs an explicit map, e.g. :func:`uniform_layer_map`.

Student and teacher must have the same hidden size for the embedding, hidden and cosine terms:
kronlm learns no projection between widths (TinyBERT's W_h), because Kronecker compression keeps
the width of the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kronlm.distill.capture import ModelTrace, trace
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
from kronlm.distill.recipes import LossWeights

__all__ = ["DistillationObjective", "LossOutput", "span_ce", "span_kd", "uniform_layer_map"]

# Extra batch entries forwarded to both models when present (BERT sentence pairs, packed rows).
_FORWARDED_BATCH_KEYS = ("token_type_ids", "position_ids")


def _check_span_logits(logits: torch.Tensor, mask: torch.Tensor, what: str) -> None:
    if logits.dim() != 2 or logits.shape != mask.shape:
        raise ValueError(f"{what}: span logits must be (batch, seq) like the mask {tuple(mask.shape)}, got {tuple(logits.shape)}")


def span_kd(
    student: tuple[torch.Tensor, torch.Tensor], teacher: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Knowledge distillation on the start and end logits of an extractive question-answering model.

    Each of start and end is one distribution over the positions of a window; padded positions
    are left out of both distributions (their logits are set to -inf before the softmax). The
    term is the mean of :func:`~kronlm.distill.losses.logit_kd` on the start and on the end
    distributions, each averaged over the windows of the batch and multiplied by T².

    Args:
        student, teacher: (start_logits, end_logits), each (batch, seq) float.
        mask: (batch, seq) bool or 0/1, True = real token; every row needs one.
        temperature: T > 0.

    Returns:
        0-dim tensor: (KL_start + KL_end) / 2 in nats per window, times T².

    Raises:
        ValueError: shapes that differ from the mask's, or a row without a real token.

    Source: KroneckerBERT's task ILKD on SQuAD (Tahaei et al., NAACL 2022: KD on the start and end
    logits); Hinton et al. (2015) for T².
    """
    mask = mask.bool()
    if not bool(mask.any(dim=1).all()):
        raise ValueError("span_kd: a window of the batch has no real token")
    rows = torch.ones(mask.shape[0], 1, dtype=torch.bool, device=mask.device)
    terms = []
    for s, t, name in ((student[0], teacher[0], "start"), (student[1], teacher[1], "end")):
        _check_span_logits(s, mask, f"span_kd {name} (student)")
        _check_span_logits(t, mask, f"span_kd {name} (teacher)")
        s = s.float().masked_fill(~mask, float("-inf"))[:, None]
        t = t.float().masked_fill(~mask, float("-inf"))[:, None]
        terms.append(logit_kd(s, t, rows, temperature))
    return (terms[0] + terms[1]) / 2


def span_ce(
    start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions: torch.Tensor, end_positions: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Cross-entropy of the gold answer span: the loss ``BertForQuestionAnswering`` computes.

    (CE(start_logits, start_positions) + CE(end_logits, end_positions)) / 2, each the mean over
    the windows of the batch, with padded positions left out of the softmax (a gold position
    is always a real token: the answer's tokens, or the CLS token when the window does not hold
    the answer).

    Args:
        start_logits, end_logits: (batch, seq) float.
        start_positions, end_positions: (batch,) int64 token positions (inclusive).
        mask: (batch, seq) bool or 0/1, True = real token.

    Returns:
        0-dim tensor in nats per window.

    Raises:
        ValueError: shapes that disagree; a gold position outside [0, seq) or on a padded
            position (names the window and the position).

    Source: Devlin et al. (2019), SQuAD fine-tuning; the α_ce term of task ILKD (docs/method.md, "Recovery objectives").
    """
    mask = mask.bool()
    losses = []
    for logits, positions, name in ((start_logits, start_positions, "start"), (end_logits, end_positions, "end")):
        _check_span_logits(logits, mask, f"span_ce {name}")
        if positions.dim() != 1 or positions.shape[0] != logits.shape[0]:
            raise ValueError(f"span_ce: {name}_positions have shape {tuple(positions.shape)}, expected ({logits.shape[0]},)")
        positions = positions.long()
        outside = (positions < 0) | (positions >= logits.shape[1])
        if bool(outside.any()):
            row = int(outside.nonzero()[0])
            raise ValueError(f"span_ce: {name} position {int(positions[row])} of window {row} is outside [0, {logits.shape[1]})")
        padded = ~mask.gather(1, positions[:, None])[:, 0]
        if bool(padded.any()):
            row = int(padded.nonzero()[0])
            raise ValueError(f"span_ce: {name} position {int(positions[row])} of window {row} is a padded position")
        losses.append(nn.functional.cross_entropy(logits.float().masked_fill(~mask, float("-inf")), positions))
    return (losses[0] + losses[1]) / 2


def uniform_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Map each student layer to the last teacher layer of its group.

    The teacher's layers are cut into ``n_student`` contiguous groups as evenly as possible and
    student layer ``l`` (0-based) maps to the last layer of group ``l``:
    ``ceil((l + 1) · n_teacher / n_student) - 1``. When ``n_student`` divides ``n_teacher`` with
    group size g this is ``(l + 1) · g - 1`` — TinyBERT's uniform strategy g(m) = m · N/M
    (Jiao et al., 2020) in 0-based form. Examples: 6 of 12 -> [1, 3, 5, 7, 9, 11];
    4 of 30 -> [7, 14, 22, 29]. The last student layer always maps to the last teacher layer.

    Raises:
        ValueError: ``n_student`` < 1 or ``n_student`` > ``n_teacher``.
    """
    if n_student < 1:
        raise ValueError(f"uniform_layer_map: the student needs at least 1 layer, got {n_student}")
    if n_student > n_teacher:
        raise ValueError(
            f"uniform_layer_map: the student has {n_student} layers, more than the teacher's {n_teacher}"
        )
    # Integer ceil division keeps the map exact for any depth (no float rounding).
    return [-(-(l + 1) * n_teacher // n_student) - 1 for l in range(n_student)]


@dataclass
class LossOutput:
    """Result of one objective evaluation.

    Attributes:
        total: 0-dim tensor with grad, Σ weight · term over the computed terms.
        terms: unweighted value of each computed term, detached 0-dim float tensors, keyed
            "embedding", "attention", "hidden", "kd", "ce", "cosine" (only those computed).
    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


class DistillationObjective:
    """Weighted distillation loss of a student against a frozen teacher (docs/method.md, "Recovery objectives").

    Args:
        weights: the recipe (see :mod:`kronlm.distill.recipes`).
        layer_map: ``layer_map[l]`` = teacher layer (0-based) for student layer ``l``; None =
            identity, allowed only when both models have the same depth.

    Attributes:
        needs_teacher: False when only the CE term has a weight (Krony-PT); the teacher may then
            be None.
        student_needs / teacher_needs: the :func:`~kronlm.distill.capture.trace` items each
            model must provide.

    Terms (each skipped when its weight is 0):

    - embedding: :func:`embedding_mse` on the embedding-layer outputs.
    - attention: Σ over student layers of :func:`attention_score_mse` on pre-softmax scores or
      :func:`attention_kl` on probabilities (``weights.attention_loss``); causal pairs only for
      causal models.
    - hidden: :func:`hidden_mse` on the block outputs.
    - kd: :func:`logit_kd` at ``weights.temperature``. Logits of a sequence classifier
      (batch, labels) are treated as one position per row; a 1-label regressor's prediction is
      matched by MSE instead. A question-answering model (start and end logits, no ``logits``)
      is distilled with :func:`span_kd`.
    - ce: :func:`causal_lm_ce` for causal LMs; for a sequence classifier ((batch, labels)
      logits) with ``batch["labels"]``, :func:`sequence_classification_loss` (cross-entropy, or
      MSE for a 1-label regressor); for a question-answering model with
      ``batch["start_positions"]`` / ``batch["end_positions"]``, :func:`span_ce`. Any other
      model with logits and a non-zero CE weight raises.
    - cosine: :func:`hidden_cosine` on the last hidden states.

    When neither model returns logits (a BERT encoder such as ``BertModel``) the kd and ce terms
    are skipped and absent from ``terms``; this is how ``ilkd-kroneckerbert`` runs on an encoder.
    """

    def __init__(self, weights: LossWeights, layer_map: list[int] | None = None):
        if not isinstance(weights, LossWeights):
            raise TypeError(f"weights must be a LossWeights, got {type(weights).__name__}")
        self.weights = weights
        self.layer_map = None if layer_map is None else [int(i) for i in layer_map]
        w = weights
        self.needs_teacher = any(x > 0 for x in (w.embedding, w.attention, w.hidden, w.kd, w.cosine))
        attention_item = "attention_scores" if w.attention_loss == "score_mse" else "attention_probs"
        teacher_needs: set[str] = set()
        if w.embedding > 0:
            teacher_needs.add("embeddings")
        if w.hidden > 0:
            teacher_needs.add("hidden")
        if w.attention > 0:
            teacher_needs.add(attention_item)
        if w.kd > 0:
            teacher_needs.add("logits")
        if w.cosine > 0:
            teacher_needs.add("last_hidden")
        self.teacher_needs = frozenset(teacher_needs)
        self.student_needs = frozenset(teacher_needs | ({"logits"} if w.ce > 0 else set()))
        self._frozen_teacher_id: int | None = None

    def _freeze(self, teacher: nn.Module) -> None:
        # Checked once per teacher object: afterwards a per-step scan of all parameters is waste.
        if self._frozen_teacher_id == id(teacher):
            return
        for p in teacher.parameters():
            p.requires_grad_(False)
        self._frozen_teacher_id = id(teacher)

    def _resolve_layer_map(self, n_student: int, n_teacher: int) -> list[int]:
        if self.layer_map is None:
            if n_student != n_teacher:
                hint = (
                    f" e.g. the uniform map uniform_layer_map({n_student}, {n_teacher}) = "
                    f"{uniform_layer_map(n_student, n_teacher)}"
                    if n_student < n_teacher
                    else ""
                )
                raise ValueError(
                    f"the student has {n_student} layers and the teacher {n_teacher}; the identity "
                    f"layer map needs equal depths, pass layer_map={hint}"
                )
            return list(range(n_student))
        check_layer_map(self.layer_map, n_student, n_teacher)
        return self.layer_map

    @staticmethod
    def _check_width(s: torch.Tensor, t: torch.Tensor, term: str) -> None:
        if s.shape[-1] != t.shape[-1]:
            raise ValueError(
                f"{term} term: student hidden size {s.shape[-1]} differs from teacher hidden size "
                f"{t.shape[-1]}; kronlm learns no projection between widths, so set the {term} weight "
                "to 0 or use a teacher of the same width"
            )

    def __call__(self, student: nn.Module, teacher: nn.Module | None, batch: dict) -> LossOutput:
        """Compute the weighted loss for one batch.

        Args:
            student: transformers model (possibly DDP / accelerate wrapped), run with grad in
                whatever train/eval mode the caller set.
            teacher: transformers model, or None when ``needs_teacher`` is False. It is put in
                eval mode, its parameters get ``requires_grad=False`` (once), and it runs under
                ``torch.no_grad()``.
            batch: dict with "input_ids" (batch, seq) and "attention_mask" (batch, seq, 1 = real
                token; absent = no padding); "token_type_ids" / "position_ids" are forwarded to
                both models when present; "labels" (batch,) feeds the CE term of a sequence
                classifier, "start_positions" / "end_positions" (batch,) that of a
                question-answering model. Other keys are ignored.

        Returns:
            :class:`LossOutput`.

        Raises:
            ValueError: missing teacher or input_ids; depth mismatch without a layer map or a bad
                layer map; hidden-size mismatch; only one model has logits (or start / end
                logits); CE weight on a non-causal model or on non-token logits, or on a
                question-answering student without gold positions; student and teacher disagree
                on causality; any loss-level error (shapes, masks, gold positions).
        """
        if "input_ids" not in batch:
            raise ValueError(f"batch has no 'input_ids' (keys: {sorted(batch)})")
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.bool()
        model_kwargs = {k: batch[k] for k in _FORWARDED_BATCH_KEYS if batch.get(k) is not None}
        w = self.weights

        t_trace = None
        if self.needs_teacher:
            if teacher is None:
                raise ValueError("this objective distils from a teacher (non-zero KD/ILKD weights) but teacher is None")
            self._freeze(teacher)
            teacher.eval()
            with torch.no_grad():
                t_trace = trace(
                    teacher, input_ids, attention_mask, need=set(self.teacher_needs), model_kwargs=model_kwargs
                )
        s_trace = trace(student, input_ids, attention_mask, need=set(self.student_needs), model_kwargs=model_kwargs)

        terms: dict[str, torch.Tensor] = {}
        if w.embedding > 0:
            self._check_width(s_trace.embeddings, t_trace.embeddings, "embedding")
            terms["embedding"] = embedding_mse(s_trace.embeddings, t_trace.embeddings, mask)
        if w.attention > 0:
            terms["attention"] = self._attention_term(s_trace, t_trace, mask)
        if w.hidden > 0:
            self._check_width(s_trace.hidden_states[0], t_trace.hidden_states[0], "hidden")
            layer_map = self._resolve_layer_map(len(s_trace.hidden_states), len(t_trace.hidden_states))
            terms["hidden"] = hidden_mse(
                s_trace.hidden_states, t_trace.hidden_states, layer_map, mask, normalize=w.hidden_loss == "relative_mse"
            )
        if w.kd > 0:
            kd = self._kd_term(s_trace, t_trace, mask)
            if kd is not None:
                terms["kd"] = kd
        if w.ce > 0:
            ce = self._ce_term(s_trace, batch, input_ids, mask)
            if ce is not None:
                terms["ce"] = ce
        if w.cosine > 0:
            self._check_width(s_trace.last_hidden, t_trace.last_hidden, "cosine")
            terms["cosine"] = hidden_cosine(s_trace.last_hidden, t_trace.last_hidden, mask)

        if not terms:
            raise ValueError(
                "no loss term could be computed: the only weighted terms need logits and neither model has any"
            )
        weight_of = {name: getattr(w, name) for name in terms}
        total = sum(weight_of[name] * value for name, value in terms.items())
        return LossOutput(total=total, terms={name: value.detach().float() for name, value in terms.items()})

    def _ce_term(self, s_trace: ModelTrace, batch: dict, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """The CE term of the student's own head: span CE (question answering), classification CE
        (with gold labels) or causal-LM CE; None for a model without logits."""
        if s_trace.start_logits is not None:
            if batch.get("start_positions") is None or batch.get("end_positions") is None:
                raise ValueError("ce term: a question-answering student needs 'start_positions' and 'end_positions' in the batch")
            return span_ce(s_trace.start_logits, s_trace.end_logits, batch["start_positions"], batch["end_positions"], mask)
        if s_trace.logits is not None and s_trace.logits.dim() == 2 and batch.get("labels") is not None:
            # A sequence classifier with gold labels (GLUE task distillation).
            return sequence_classification_loss(s_trace.logits, batch["labels"])
        if s_trace.logits is not None:
            if s_trace.logits.dim() != 3 or not s_trace.is_causal:
                raise ValueError(
                    f"ce weight is {self.weights.ce} but the student is not a causal LM (logits shape "
                    f"{tuple(s_trace.logits.shape)}, causal={s_trace.is_causal}); set ce=0 for MLM or "
                    "classification students"
                )
            return causal_lm_ce(s_trace.logits, input_ids, mask)
        return None

    def _attention_term(self, s: ModelTrace, t: ModelTrace, mask: torch.Tensor) -> torch.Tensor:
        if s.is_causal != t.is_causal:
            raise ValueError(
                f"attention term: the student is {'causal' if s.is_causal else 'bidirectional'} but the teacher "
                f"is {'causal' if t.is_causal else 'bidirectional'}"
            )
        if self.weights.attention_loss == "score_mse":
            s_att, t_att, distance = s.attention_scores, t.attention_scores, attention_score_mse
        else:
            s_att, t_att, distance = s.attention_probs, t.attention_probs, attention_kl
        layer_map = self._resolve_layer_map(len(s_att), len(t_att))
        total = None
        for l, tl in enumerate(layer_map):
            term = distance(s_att[l], t_att[tl], mask, causal=s.is_causal)
            total = term if total is None else total + term
        return total

    def _kd_term(self, s: ModelTrace, t: ModelTrace, mask: torch.Tensor) -> torch.Tensor | None:
        if (s.start_logits is None) != (t.start_logits is None):
            who = "student" if s.start_logits is None else "teacher"
            raise ValueError(f"kd term: the {who} returns no start / end logits but the other model does")
        if s.start_logits is not None:
            return span_kd((s.start_logits, s.end_logits), (t.start_logits, t.end_logits), mask, self.weights.temperature)
        if s.logits is None and t.logits is None:
            return None
        if s.logits is None or t.logits is None:
            who = "student" if s.logits is None else "teacher"
            raise ValueError(f"kd term: the {who} returns no logits but the other model does")
        s_logits, t_logits = s.logits, t.logits
        if s_logits.dim() == 2:
            # Sequence classification: one distribution per row, every row counts.
            s_logits, t_logits = s_logits[:, None], t_logits[:, None]
            mask = torch.ones(s_logits.shape[0], 1, dtype=torch.bool, device=s_logits.device)
            if s_logits.shape[-1] == 1:
                # A regressor (STS-B) has no distribution to match: distil its prediction by MSE.
                return nn.functional.mse_loss(s_logits.float(), t_logits.float())
        return logit_kd(s_logits, t_logits, mask, self.weights.temperature)
