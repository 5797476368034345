"""The official SQuAD v1.1 / v2.0 metrics on hand-computed cases."""

import os
from pathlib import Path

import pytest

from kronlm.tasks.squad import (
    SquadExample,
    exact_match_score,
    f1_score,
    load_squad_split,
    normalize_answer,
    question_scores,
    references_from_examples,
    squad_metrics,
)

SQUAD_DIR = Path(os.environ.get("KRONLM_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data") / "squad-v1.1-dev-split"


def test_normalize_answer():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"
    # Articles are whole words only; punctuation goes before articles, so "the-end" -> "theend".
    assert normalize_answer("Theater of the absurd") == "theater of absurd"
    assert normalize_answer("the-end") == "theend"
    assert normalize_answer("A.B.C.") == "abc"
    assert normalize_answer(" \t\n") == ""
    assert normalize_answer("The") == ""


def test_exact_and_f1_single_gold():
    assert exact_match_score("The Cat", "cat") == 1
    assert exact_match_score("cat sat", "cat") == 0
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]; common 2:
    # P = 2/2 = 1, R = 2/3, F1 = 2 * 1 * 2/3 / (1 + 2/3) = (4/3) / (5/3) = 0.8.
    assert f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8, abs=1e-12)
    # Repeated tokens count once per gold occurrence: [cat, cat, cat] vs [cat, sat]: common 1,
    # P = 1/3, R = 1/2, F1 = 2 * (1/6) / (5/6) = 0.4.
    assert f1_score("cat cat cat", "cat sat") == pytest.approx(0.4, abs=1e-12)
    assert f1_score("dog", "cat") == 0.0
    # Empty prediction: v2.0 gives 1 only when the gold is empty too, v1.1 gives 0 always.
    assert f1_score("", "cat") == 0.0 and f1_score("", "cat", version_2=False) == 0.0
    assert f1_score("", "") == 1.0 and f1_score("the", "") == 1.0
    assert f1_score("", "the", version_2=False) == 0.0


def test_v11_metrics_hand_computed():
    references = {
        "q1": ["cat"],
        "q2": ["a cat sat down"],
        "q3": ["Broncos", "the Denver Broncos team"],
        "q4": ["cat"],
    }
    predictions = {"q1": "The Cat", "q2": "the cat sat", "q3": "Denver Broncos", "q4": "", "extra": "ignored"}
    exact, f1 = question_scores(predictions, references)
    # q3: vs "broncos": common 1, P 1/2, R 1, F1 2/3; vs "denver broncos team": P 1, R 2/3, F1 0.8.
    assert exact == {"q1": 1.0, "q2": 0.0, "q3": 0.0, "q4": 0.0}
    assert f1 == pytest.approx({"q1": 1.0, "q2": 0.8, "q3": 0.8, "q4": 0.0}, abs=1e-12)
    # EM = 1/4 = 25 %; F1 = (1 + 0.8 + 0.8 + 0) / 4 = 0.65 = 65 %.
    scores = squad_metrics(predictions, references)
    assert set(scores) == {"exact_match", "f1"}
    assert scores["exact_match"] == pytest.approx(25.0, abs=1e-9)
    assert scores["f1"] == pytest.approx(65.0, abs=1e-9)


def test_v20_metrics_hand_computed():
    references = {"a1": ["the cat"], "a2": ["cat sat"], "a3": ["a cat sat down"], "n1": [], "n2": [], "n3": []}
    predictions = {"a1": "cat", "a2": "", "a3": "cat sat on mat", "n1": "", "n2": "the", "n3": "cat"}
    # a3: [cat, sat, on, mat] vs [cat, sat, down]: common 2, P 1/2, R 2/3, F1 = (2/3) / (7/6) = 4/7.
    # n2: "the" normalises to "", which matches the unanswerable gold [""] (official convention).
    exact, f1 = question_scores(predictions, references, version_2_with_negative=True)
    assert exact == {"a1": 1.0, "a2": 0.0, "a3": 0.0, "n1": 1.0, "n2": 1.0, "n3": 0.0}
    assert f1 == pytest.approx({"a1": 1.0, "a2": 0.0, "a3": 4 / 7, "n1": 1.0, "n2": 1.0, "n3": 0.0}, abs=1e-12)
    scores = squad_metrics(predictions, references, version_2_with_negative=True)
    expected = {
        "exact": 100 * 3 / 6,  # a1, n1, n2
        "f1": 100 * (1 + 0 + 4 / 7 + 1 + 1 + 0) / 6,  # = 100 * 25/42 = 59.5238...
        "total": 6,
        "HasAns_exact": 100 * 1 / 3,
        "HasAns_f1": 100 * (1 + 0 + 4 / 7) / 3,  # = 100 * 11/21 = 52.3809...
        "HasAns_total": 3,
        "NoAns_exact": 100 * 2 / 3,
        "NoAns_f1": 100 * 2 / 3,
        "NoAns_total": 3,
    }
    assert scores == pytest.approx(expected, abs=1e-9)
    assert scores["f1"] == pytest.approx(59.523809523809, abs=1e-9)
    # Only answerable questions: no NoAns_* keys (as the official script).
    only = squad_metrics({"a1": "cat"}, {"a1": ["the cat"]}, version_2_with_negative=True)
    assert only == {"exact": 100.0, "f1": 100.0, "total": 1, "HasAns_exact": 100.0, "HasAns_f1": 100.0, "HasAns_total": 1}


def test_gold_answers_that_normalise_to_empty():
    # v2.0 drops the gold "the" (normalises to ""), so an empty prediction scores 0 against "cat";
    # v1.1 keeps it: "a" and "the" both normalise to "" (EM 1), but v1.1 F1 of no tokens is 0.
    references = {"q": ["the", "cat"]}
    assert squad_metrics({"q": ""}, references, version_2_with_negative=True)["exact"] == 0.0
    assert squad_metrics({"q": "a"}, references) == {"exact_match": 100.0, "f1": 0.0}


def test_errors():
    with pytest.raises(ValueError, match=r"no prediction for question id 'q2' \(2 of 3 questions missing\)$"):
        squad_metrics({"q1": "x"}, {"q1": ["x"], "q2": ["y"], "q3": ["z"]})
    with pytest.raises(ValueError, match="question 'n1' has no gold answer; an unanswerable question needs version_2_with_negative=True"):
        squad_metrics({"n1": ""}, {"n1": []})
    with pytest.raises(ValueError, match="prediction for question id 'q1' must be a string, got NoneType"):
        squad_metrics({"q1": None}, {"q1": ["x"]})
    with pytest.raises(ValueError, match=r"references\['q1'\] must be a list"):
        squad_metrics({"q1": "x"}, {"q1": "x"})
    with pytest.raises(ValueError, match="no reference question"):
        squad_metrics({}, {})


def test_references_from_examples():
    examples = [
        SquadExample("a", "t", "The cat.", "Who?", ("cat", "The cat"), (4, 0)),
        SquadExample("n", "t", "The cat.", "Why?", (), (), True),
    ]
    assert references_from_examples(examples) == {"a": ["cat", "The cat"], "n": []}


@pytest.mark.skipif(not SQUAD_DIR.is_dir(), reason="shared squad-v1.1-dev-split data not present")
def test_gold_predictions_score_100_on_real_dev():
    dev = load_squad_split("dev", SQUAD_DIR)
    references = references_from_examples(dev)
    perfect = {e.id: e.answer_texts[0] for e in dev}
    assert squad_metrics(perfect, references) == {"exact_match": 100.0, "f1": 100.0}
    # Answering nothing: 0 on every v1.1 question.
    assert squad_metrics({e.id: "" for e in dev}, references) == {"exact_match": 0.0, "f1": 0.0}
