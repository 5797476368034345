"""Span decoding: from start / end logits per window to an answer string per question.

Follows ``postprocess_qa_predictions`` of the Hugging Face ``run_qa.py`` example (``utils_qa.py``):
for each window, the ``n_best_size`` highest start logits and end logits are paired; a pair is kept
when both tokens are context tokens, end >= start and the span has at most ``max_answer_length``
tokens; its score is start_logit + end_logit, and the best pair over all windows of a question
gives the answer, cut from the context with the offset mapping. For SQuAD v2.0 the null score is
start_logit[CLS] + end_logit[CLS], the minimum over the windows (as that script), and the answer
is "" when null score - best span score > ``null_score_diff_threshold``. The threshold is chosen
on held-out *training* questions with :func:`best_null_threshold` (the search of
``evaluate-v2.0.py``, Rajpurkar et al. 2018), never on the dev set that is reported.

Departure from run_qa.py: when no window yields a valid span, run_qa.py answers the literal
string "empty"; here the answer is "" with score -inf (v2.0 score difference +inf).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kronlm.tasks.squad.data import SquadExample
from kronlm.tasks.squad.metrics import question_scores

__all__ = ["SquadPredictions", "apply_null_threshold", "best_null_threshold", "best_window_span", "decode_predictions"]


@dataclass
class SquadPredictions:
    """Decoded answers of one evaluation set.

    Attributes:
        predictions: question id -> answer text (after the null threshold for v2.0; "" = no answer).
        best_spans: question id -> best non-null span text ("" when no window has a valid span).
        best_scores: question id -> its score, start + end logit (-inf when none).
        best_offsets: question id -> (char_start, char_end) of that span in the context ((0, 0) when none).
        null_scores: v2.0 only: question id -> min over windows of start_logit[CLS] + end_logit[CLS].
        score_diff: v2.0 only: question id -> null score - best span score (+inf when no span);
            the answer is "" when this exceeds ``threshold``.
        threshold: the null-score-difference threshold applied (v2.0).
    """

    predictions: dict[str, str] = field(default_factory=dict)
    best_spans: dict[str, str] = field(default_factory=dict)
    best_scores: dict[str, float] = field(default_factory=dict)
    best_offsets: dict[str, tuple[int, int]] = field(default_factory=dict)
    null_scores: dict[str, float] = field(default_factory=dict)
    score_diff: dict[str, float] = field(default_factory=dict)
    threshold: float = 0.0


def _rows(logits: Any, n_features: int, name: str) -> Sequence[np.ndarray]:
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().float().cpu().numpy()
    if isinstance(logits, np.ndarray):
        if logits.ndim != 2:
            raise ValueError(f"{name} must have shape (features, seq_len), got {tuple(logits.shape)}")
        rows = list(logits.astype(np.float64, copy=False))
    else:
        rows = [np.asarray(r.detach().float().cpu().numpy() if isinstance(r, torch.Tensor) else r, dtype=np.float64) for r in logits]
        for i, r in enumerate(rows):
            if r.ndim != 1:
                raise ValueError(f"{name}[{i}] must be 1-D (seq_len,), got shape {r.shape}")
    if len(rows) != n_features:
        raise ValueError(f"{name} has {len(rows)} rows for {n_features} features")
    return rows


def decode_predictions(
    examples: Sequence[SquadExample],
    features: Sequence[Mapping[str, Any]],
    start_logits: Any,
    end_logits: Any,
    *,
    version_2_with_negative: bool = False,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    null_score_diff_threshold: float = 0.0,
) -> SquadPredictions:
    """Turn per-window logits into one answer per question.

    Args:
        examples: the examples the features were made from (same list, same order).
        features: from :func:`kronlm.tasks.squad.features.prepare_eval_features` (uses
            ``example_index``, ``example_id``, ``offset_mapping`` and ``cls_index``).
        start_logits, end_logits: numpy arrays or torch tensors of shape (features, seq_len)
            with seq_len >= every feature's token count (padding positions are ignored), or a
            sequence of 1-D rows, one per feature.
        version_2_with_negative: decide between the best span and no answer (SQuAD v2.0).
        n_best_size: start and end candidates per window (run_qa default 20).
        max_answer_length: longest span kept, in tokens (run_qa default 30).
        null_score_diff_threshold: v2.0: answer "" when null score - best span score exceeds it.

    Returns:
        :class:`SquadPredictions` keyed by question id, in example order.

    Raises:
        ValueError: logits of the wrong shape or count, a row shorter than its feature or not
            finite (names the feature index); a feature whose example index or id does not
            match ``examples``; an example without any feature (names its id);
            ``n_best_size`` or ``max_answer_length`` < 1.
    """
    if n_best_size < 1 or max_answer_length < 1:
        raise ValueError(f"n_best_size ({n_best_size}) and max_answer_length ({max_answer_length}) must be at least 1")
    starts = _rows(start_logits, len(features), "start_logits")
    ends = _rows(end_logits, len(features), "end_logits")
    best_score = [-math.inf] * len(examples)
    best_offsets = [(0, 0)] * len(examples)
    null_score = [math.inf] * len(examples)
    seen = [False] * len(examples)
    for f, feature in enumerate(features):
        index = feature["example_index"]
        if not 0 <= index < len(examples) or examples[index].id != feature["example_id"]:
            raise ValueError(f"feature {f}: example_index {index} / example_id {feature['example_id']!r} does not match the examples given")
        seen[index] = True
        offsets = feature["offset_mapping"]
        n = len(offsets)
        if len(starts[f]) < n or len(ends[f]) < n:
            raise ValueError(f"feature {f}: {len(starts[f])} start / {len(ends[f])} end logits for {n} tokens")
        s_logits, e_logits = starts[f][:n], ends[f][:n]
        if not (np.isfinite(s_logits).all() and np.isfinite(e_logits).all()):
            raise ValueError(f"feature {f} (question {feature['example_id']!r}): non-finite logits")
        cls = feature.get("cls_index", 0)
        null_score[index] = min(null_score[index], float(s_logits[cls] + e_logits[cls]))
        span = best_window_span(s_logits, e_logits, offsets, n_best_size, max_answer_length)
        if span is not None and span[0] > best_score[index]:
            best_score[index], best_offsets[index] = span
    out = SquadPredictions(threshold=float(null_score_diff_threshold))
    for index, example in enumerate(examples):
        if not seen[index]:
            raise ValueError(f"question {example.id!r} (example {index}) has no feature")
        char_start, char_end = best_offsets[index]
        text = example.context[char_start:char_end]
        out.best_spans[example.id] = text
        out.best_scores[example.id] = best_score[index]
        out.best_offsets[example.id] = (char_start, char_end)
        out.predictions[example.id] = text
        if version_2_with_negative:
            out.null_scores[example.id] = null_score[index]
            out.score_diff[example.id] = null_score[index] - best_score[index]
    if version_2_with_negative:
        out.predictions = apply_null_threshold(out.best_spans, out.score_diff, null_score_diff_threshold)
    return out


def best_window_span(s_logits: np.ndarray, e_logits: np.ndarray, offsets: Sequence, n_best_size: int,
                     max_answer_length: int) -> tuple[float, tuple[int, int]] | None:
    """(score, (char start, char end)) of the best context span of one window, among its top
    ``n_best_size`` starts and ends, at most ``max_answer_length`` tokens long; None when no pair
    is valid. Score = start logit + end logit.

    Args:
        s_logits, e_logits: (n,) start and end logits of the window's n tokens.
        offsets: (n,) (char start, char end) of each token, None outside the context.
    """
    # Stable sort on the negated logits: ties keep the lower position, so results are reproducible.
    top_s = np.argsort(-s_logits, kind="stable")[:n_best_size]
    top_e = np.argsort(-e_logits, kind="stable")[:n_best_size]
    is_context = np.array([o is not None for o in offsets])
    valid = (
        is_context[top_s][:, None] & is_context[top_e][None, :]
        & (top_e[None, :] >= top_s[:, None])
        & (top_e[None, :] - top_s[:, None] + 1 <= max_answer_length)
    )
    if not valid.any():
        return None
    scores = np.where(valid, s_logits[top_s][:, None] + e_logits[top_e][None, :], -np.inf)
    flat = int(np.argmax(scores))
    s, e = int(top_s[flat // len(top_e)]), int(top_e[flat % len(top_e)])
    return float(scores.flat[flat]), (offsets[s][0], offsets[e][1])


def apply_null_threshold(best_spans: Mapping[str, str], score_diff: Mapping[str, float], threshold: float) -> dict[str, str]:
    """v2.0 answers: "" where ``score_diff[id] > threshold``, else ``best_spans[id]``.

    Raises:
        ValueError: an id of ``best_spans`` without a score difference (names it).
    """
    out = {}
    for qid, text in best_spans.items():
        if qid not in score_diff:
            raise ValueError(f"no null score difference for question id {qid!r}")
        out[qid] = "" if score_diff[qid] > threshold else text
    return out


def best_null_threshold(
    best_spans: Mapping[str, str], score_diff: Mapping[str, float], references: Mapping[str, Sequence[str]],
    metric: str = "f1",
) -> tuple[float, float]:
    """The null-score-difference threshold that maximises the v2.0 score on ``references``.

    The search of ``find_best_thresh`` in ``evaluate-v2.0.py``: start from "no answer anywhere",
    then answer questions in increasing order of score difference and keep the best running
    score. Unlike that script, questions with equal differences are switched together (one
    threshold cannot separate them), and when answering nothing is best the threshold returned
    is the largest float below the smallest difference (not 0.0). Call it on held-out training
    questions, never on the reported dev set.

    Args:
        best_spans, score_diff: from :class:`SquadPredictions` (``best_spans``, ``score_diff``).
        references: question id -> gold answers (empty list = unanswerable); its ids are scored.
        metric: "f1" or "exact".

    Returns:
        (threshold, score): :func:`apply_null_threshold` with ``threshold`` gives ``score``, the
        v2.0 ``metric`` in percent over ``references``.

    Raises:
        ValueError: unknown metric; an id of ``references`` missing from ``best_spans`` or
            ``score_diff`` (names it); see :func:`kronlm.tasks.squad.metrics.question_scores`.
    """
    if metric not in ("f1", "exact"):
        raise ValueError(f"unknown metric {metric!r}; expected 'f1' or 'exact'")
    for qid in references:
        if qid not in score_diff:
            raise ValueError(f"no null score difference for question id {qid!r}")
    exact_answer, f1_answer = question_scores(best_spans, references, True)
    exact_null, f1_null = question_scores({qid: "" for qid in references}, references, True)
    answered, null = (f1_answer, f1_null) if metric == "f1" else (exact_answer, exact_null)
    order = sorted(references, key=lambda q: score_diff[q])
    running = sum(null.values())
    best, threshold = running, float(np.nextafter(score_diff[order[0]], -np.inf))
    for i, qid in enumerate(order):
        running += answered[qid] - null[qid]
        last_of_tie = i + 1 == len(order) or score_diff[order[i + 1]] != score_diff[qid]
        if last_of_tie and running > best:
            best, threshold = running, float(score_diff[qid])
    return threshold, 100.0 * best / len(references)
