"""Per-question dev F1 of the SQuAD benchmark's students, and the paired standard error of the
difference between two of them.

Two students answer the same 1,539 dev questions, so the question-to-question spread cancels in
their per-question differences: the standard error of the mean difference says whether a gap in
dev F1 is larger than what the choice of questions alone would produce. It does not include the
training's own randomness (each row is one seed), so "separated" is necessary, not sufficient,
for a real difference. benchmarks/squad_minilm.py records the scores in each student row
(``dev_f1_questions``) and squad_minilm_report.py states the comparisons with them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

# Per-question F1 is stored in the result rows at this many decimals (a fraction in [0, 1]):
# the mean moves by at most 5e-5 (0.005 F1 points).
DECIMALS = 4


def question_f1(folder: Path, examples: list, config, tokenizer, source: str, device: str = "cpu") -> list[float]:
    """Per-question F1 (fractions in [0, 1], ``examples``' order) of the QA model in ``folder``,
    decoded as its run decoded dev.json: ``config``'s window (``max_length``, ``doc_stride``
    tokens), n-best size, maximum answer length and evaluation batch, SQuAD v1.1 scoring
    (:func:`kronlm.tasks.squad.question_scores`, the official script's F1), on ``device``.

    Raises:
        FileNotFoundError: ``folder`` is missing or holds no ``config.json`` (from
            :meth:`kronlm.tasks.squad.SquadFamily.load_model`).
        ValueError: a folder without a question-answering head; see
            :func:`kronlm.tasks.squad.evaluate_squad`.
    """
    from kronlm.tasks.squad import (
        SquadEvalSet,
        SquadFamily,
        evaluate_squad,
        prepare_eval_features,
        question_scores,
        references_from_examples,
    )

    family = SquadFamily(tokenizer)
    model = family.load_model(folder).to(device).eval()
    features = prepare_eval_features(examples, tokenizer, config.max_length, config.doc_stride, family.max_positions)
    _, predictions = evaluate_squad(model, SquadEvalSet(examples, features, source), family.collator,
                                    n_best_size=config.n_best_size, max_answer_length=config.max_answer_length,
                                    batch_size=config.eval_batch_size, device=device)
    _, f1 = question_scores(predictions.predictions, references_from_examples(examples))
    return list(f1.values())


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(mean of a - b, its standard error), both in F1 points, from two students' per-question F1
    (fractions) on the same questions in the same order: the sample standard deviation of the
    differences over sqrt(n).

    Raises:
        ValueError: the two lists differ in length, or hold fewer than 2 questions.
    """
    if len(a) != len(b):
        raise ValueError(f"per-question scores of different lengths ({len(a)} and {len(b)} questions): not the same dev set")
    n = len(a)
    if n < 2:
        raise ValueError(f"a standard error needs at least 2 questions, got {n}")
    diffs = [100 * (x - y) for x, y in zip(a, b)]
    mean = sum(diffs) / n
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return mean, math.sqrt(variance / n)


def separated(diff: float, se: float) -> bool:
    """Whether a paired difference exceeds two of its standard errors (same units)."""
    return abs(diff) > 2 * se


def separation(a: Sequence[float], b: Sequence[float]) -> str:
    """The paired comparison of two students in words: the difference (a - b, F1 points), its
    standard error over the questions, and whether it exceeds two standard errors."""
    diff, se = paired_difference(a, b)
    verdict = "separated" if separated(diff, se) else "not separated: within two standard errors"
    return (f"difference {diff:+.2f} F1, paired standard error {se:.2f} over {len(a):,} dev questions, one seed each: "
            f"{verdict}")
