"""The official SQuAD evaluation: exact match and token F1 (v1.1), plus HasAns / NoAns (v2.0).

Re-implements the official evaluation scripts ``evaluate-v1.1.py`` (Rajpurkar et al. 2016) and
``evaluate-v2.0.py`` (Rajpurkar et al. 2018), https://rajpurkar.github.io/SQuAD-explorer/:

- ``normalize_answer``: lower-case, drop ASCII punctuation (``string.punctuation``), replace the
  articles a / an / the (whole words) by a space, collapse whitespace.
- exact match: the normalised strings are equal (1 or 0).
- F1: bag-of-tokens overlap of the normalised strings split on whitespace,
  P = common / |prediction|, R = common / |gold|, F1 = 2PR / (P + R).
- per question, the maximum over its gold answers; the score is the mean over questions, in
  percent.

v1.1 F1 is 0 whenever the prediction or the gold has no token. v2.0 drops gold answers that
normalise to "" and scores an unanswerable question against the single gold "": exact match and
F1 are 1 only for a prediction that normalises to "" (F1 is 1 when both token lists are empty).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from kronlm.tasks.squad.data import SquadExample

__all__ = [
    "exact_match_score",
    "f1_score",
    "normalize_answer",
    "question_scores",
    "references_from_examples",
    "squad_metrics",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, remove punctuation, remove the articles a/an/the, collapse whitespace (official script)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def exact_match_score(prediction: str, gold: str) -> int:
    """1 when the normalised prediction equals the normalised gold answer, else 0."""
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str, version_2: bool = True) -> float:
    """Token F1 in [0, 1] between a prediction and one gold answer.

    Args:
        version_2: True = ``evaluate-v2.0.py`` (1.0 when both normalise to no token, 0.0 when
            exactly one does); False = ``evaluate-v1.1.py`` (0.0 when either has no token).
    """
    pred_tokens, gold_tokens = _tokens(prediction), _tokens(gold)
    if not pred_tokens or not gold_tokens:
        return float(version_2 and pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def references_from_examples(examples: Iterable[SquadExample]) -> dict[str, list[str]]:
    """Question id -> gold answer texts (an empty list for an unanswerable question)."""
    return {ex.id: list(ex.answer_texts) for ex in examples}


def _golds(qid: str, answers: Sequence[str], version_2: bool) -> list[str]:
    if isinstance(answers, str):
        raise ValueError(f"references[{qid!r}] must be a list of gold answer strings, got a single string")
    if not version_2:
        if not answers:
            raise ValueError(f"question {qid!r} has no gold answer; an unanswerable question needs version_2_with_negative=True")
        return list(answers)
    golds = [a for a in answers if normalize_answer(a)]
    return golds or [""]


def question_scores(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], version_2_with_negative: bool = False,
) -> tuple[dict[str, float], dict[str, float]]:
    """Per-question exact match and F1 (each in [0, 1], max over the gold answers).

    Args:
        predictions: question id -> predicted answer text ("" = no answer). Ids absent from
            ``references`` are ignored (as in the official scripts).
        references: question id -> gold answer texts (see :func:`references_from_examples`);
            an empty list marks an unanswerable v2.0 question.
        version_2_with_negative: score as ``evaluate-v2.0.py`` (else ``evaluate-v1.1.py``).

    Returns:
        (exact, f1): dicts keyed by the ids of ``references``, in its order.

    Raises:
        ValueError: no reference; a question without a prediction (names the id and how many
            are missing); a prediction that is not a string; a reference without gold answer
            in v1.1 mode.
    """
    if not references:
        raise ValueError("no reference question to score")
    missing = [qid for qid in references if qid not in predictions]
    if missing:
        raise ValueError(f"no prediction for question id {missing[0]!r} ({len(missing)} of {len(references)} questions missing)")
    exact: dict[str, float] = {}
    f1: dict[str, float] = {}
    for qid, answers in references.items():
        prediction = predictions[qid]
        if not isinstance(prediction, str):
            raise ValueError(f"prediction for question id {qid!r} must be a string, got {type(prediction).__name__}")
        golds = _golds(qid, answers, version_2_with_negative)
        exact[qid] = float(max(exact_match_score(prediction, g) for g in golds))
        f1[qid] = max(f1_score(prediction, g, version_2_with_negative) for g in golds)
    return exact, f1


def squad_metrics(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], version_2_with_negative: bool = False,
) -> dict[str, float]:
    """The official SQuAD scores, in percent.

    Args:
        predictions, references, version_2_with_negative: see :func:`question_scores`. For v2.0
            the null-answer decision must already be applied ("" in ``predictions``); see
            :func:`kronlm.tasks.squad.postprocess.apply_null_threshold`.

    Returns:
        v1.1: ``{"exact_match", "f1"}`` (the keys of ``evaluate-v1.1.py``).
        v2.0: ``{"exact", "f1", "total"}`` plus ``HasAns_exact``, ``HasAns_f1``, ``HasAns_total``
        when some question is answerable and ``NoAns_exact``, ``NoAns_f1``, ``NoAns_total`` when
        some is not (the keys of ``evaluate-v2.0.py``); totals are question counts.

    Raises:
        ValueError: see :func:`question_scores`.
    """
    exact, f1 = question_scores(predictions, references, version_2_with_negative)
    total = len(exact)
    if not version_2_with_negative:
        return {"exact_match": 100.0 * sum(exact.values()) / total, "f1": 100.0 * sum(f1.values()) / total}
    out: dict[str, float] = {
        "exact": 100.0 * sum(exact.values()) / total,
        "f1": 100.0 * sum(f1.values()) / total,
        "total": total,
    }
    for prefix, ids in (("HasAns", [q for q in exact if references[q]]), ("NoAns", [q for q in exact if not references[q]])):
        if ids:
            out[f"{prefix}_exact"] = 100.0 * sum(exact[q] for q in ids) / len(ids)
            out[f"{prefix}_f1"] = 100.0 * sum(f1[q] for q in ids) / len(ids)
            out[f"{prefix}_total"] = len(ids)
    return out
