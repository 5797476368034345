"""SQuAD through the task pipeline: KD / CE on start and end logits, the held-out paragraphs that choose
checkpoints (never the evaluation split), v2.0's threshold, run_squad and ``kronlm squad`` on a tiny
BERT and a tiny tokenizer built here, and the errors a user can make."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from test_squad_data import tiny_bert_tokenizer
from transformers import BertConfig, BertForQuestionAnswering, BertModel

from kronlm.compression.config import CompressionConfig, KroneckerTarget
from kronlm.distill.objective import DistillationObjective, span_ce, span_kd
from kronlm.distill.recipes import get_recipe
from kronlm.tasks.results import read_report
from kronlm.tasks.squad import (
    SquadEvalSet,
    SquadExample,
    SquadFamily,
    SquadTrainConfig,
    best_null_threshold,
    decode_predictions,
    evaluate_squad,
    hold_out_by_paragraph,
    prepare_eval_features,
    references_from_examples,
    run_squad,
    span_logits,
    subset_questions,
)

ANIMALS = ["cat", "dog", "bird", "fox", "cow", "pig"]
PLACES = ["garden", "house", "park", "barn", "river", "field", "road", "shop"]
VOCAB_TEXT = " ".join(ANIMALS + PLACES + ["the is in where ? ."])

TINY_KRON = CompressionConfig(targets=[
    KroneckerTarget(["**.encoder.layer.*.attention.self.query", "**.encoder.layer.*.attention.self.key",
                     "**.encoder.layer.*.attention.self.value", "**.encoder.layer.*.attention.output.dense"], b_shape=(2, 2)),
    KroneckerTarget(["**.encoder.layer.*.intermediate.dense"], b_shape=(2, 1)),
    KroneckerTarget(["**.encoder.layer.*.output.dense"], b_shape=(1, 2)),
])


def synthetic_squad(n_paragraphs: int, seed: int, *, shuffle_answers: bool = False) -> dict:
    """Paragraphs "the cat is in the park . the dog is in the barn ." with questions "where is the cat ?".

    ``shuffle_answers`` gives every question the place of another animal of its paragraph (still a
    span of the context): the same questions with other gold answers.
    """
    rng = random.Random(seed)
    data, k = [], 0
    for p in range(n_paragraphs):
        animals = rng.sample(ANIMALS, rng.randint(3, 5))
        places = [rng.choice(PLACES) for _ in animals]
        context, spans = "", {}
        for a, place in zip(animals, places):
            sentence = f"the {a} is in the {place} . "
            spans[a] = (len(context) + sentence.index(place + " ."), place)
            context += sentence
        context = context.strip()
        qas = []
        for a in rng.sample(animals, 2):
            other = animals[(animals.index(a) + 1) % len(animals)] if shuffle_answers else a
            start, place = spans[other]
            qas.append({"id": f"q{seed}-{k}", "question": f"where is the {a} ?", "answers": [{"text": place, "answer_start": start}]})
            k += 1
        data.append({"title": f"t{p % 4}", "paragraphs": [{"context": context, "qas": qas}]})
    return {"version": "1.1", "data": data}


def write_split(folder: Path, train: dict, dev: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps(train))
    (folder / "dev.json").write_text(json.dumps(dev))
    return folder


def tiny_base(folder: Path, positions: int = 64, seed: int = 0) -> Path:
    """A tiny bare BERT encoder (like MiniLM: no QA head) and its tokenizer, saved to ``folder``."""
    tok = tiny_bert_tokenizer(VOCAB_TEXT)
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=positions)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_qa(seed: int, vocab: int = 30) -> BertForQuestionAnswering:
    torch.manual_seed(seed)
    return BertForQuestionAnswering(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               intermediate_size=64, max_position_embeddings=32)).eval()


# ---------------------------------------------------------------- losses on start / end logits


def test_span_ce_is_the_qa_models_own_loss_and_span_kd_is_hand_computed():
    student, teacher = tiny_qa(0), tiny_qa(1)
    ids = torch.randint(5, 30, (3, 12))
    mask = torch.ones_like(ids)
    starts, ends = torch.tensor([1, 4, 0]), torch.tensor([3, 9, 0])
    batch = {"input_ids": ids, "attention_mask": mask, "start_positions": starts, "end_positions": ends}
    out = DistillationObjective(get_recipe("ce"))(student, None, batch)
    assert set(out.terms) == {"ce"}
    with torch.no_grad():
        own = student(input_ids=ids, attention_mask=mask, start_positions=starts, end_positions=ends).loss
    torch.testing.assert_close(out.terms["ce"], own, rtol=0, atol=1e-6)

    # Padding: padded positions leave both distributions; KD at T = 2 by hand.
    mask[1, 8:] = 0
    batch = {**batch, "attention_mask": mask, "start_positions": torch.tensor([1, 4, 0]), "end_positions": torch.tensor([3, 7, 0])}
    weights = get_recipe("ilkd-kroneckerbert", embedding=0.0, attention=0.0, hidden=0.0, ce=0.0, temperature=2.0)
    kd = DistillationObjective(weights)(student, teacher, batch).terms["kd"]
    with torch.no_grad():
        s_out, t_out = student(input_ids=ids, attention_mask=mask), teacher(input_ids=ids, attention_mask=mask)
    expected = 0.0
    for s, t in ((s_out.start_logits, t_out.start_logits), (s_out.end_logits, t_out.end_logits)):
        rows = []
        for b in range(3):
            n = int(mask[b].sum())
            p_t = torch.softmax(t[b, :n] / 2, -1)
            rows.append((p_t * (torch.log_softmax(t[b, :n] / 2, -1) - torch.log_softmax(s[b, :n] / 2, -1))).sum())
        expected += 4 * torch.stack(rows).mean() / 2
    torch.testing.assert_close(kd, expected, rtol=1e-5, atol=1e-7)
    assert float(span_kd((s_out.start_logits, s_out.end_logits), (s_out.start_logits, s_out.end_logits), mask, 1.0)) == pytest.approx(0, abs=1e-7)


def test_task_ilkd_on_a_qa_student_computes_every_term_and_gradients_are_finite():
    student, teacher = tiny_qa(0), tiny_qa(1)
    student.train()
    ids = torch.randint(5, 30, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "start_positions": torch.tensor([2, 3]), "end_positions": torch.tensor([4, 8])}
    out = DistillationObjective(get_recipe("ilkd-kroneckerbert"))(student, teacher, batch)
    assert set(out.terms) == {"embedding", "attention", "hidden", "kd", "ce"}
    out.total.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert float(student.qa_outputs.weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_span_loss_errors():
    mask = torch.tensor([[1, 1, 1, 0]])
    logits = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="span_ce: end position 3 of window 0 is a padded position"):
        span_ce(logits, logits, torch.tensor([1]), torch.tensor([3]), mask)
    with pytest.raises(ValueError, match=r"span_ce: start position 4 of window 0 is outside \[0, 4\)"):
        span_ce(logits, logits, torch.tensor([4]), torch.tensor([1]), mask)
    with pytest.raises(ValueError, match="span_kd: a window of the batch has no real token"):
        span_kd((logits, logits), (logits, logits), torch.zeros(1, 4), 1.0)
    student = tiny_qa(0)
    batch = {"input_ids": torch.randint(5, 19, (1, 6))}  # within the GLUE classifier's vocabulary too
    with pytest.raises(ValueError, match="ce term: a question-answering student needs 'start_positions' and 'end_positions'"):
        DistillationObjective(get_recipe("ce"))(student, None, batch)
    from test_glue_models import tiny_bert_classifier

    with pytest.raises(ValueError, match="kd term: the teacher returns no start / end logits but the other model does"):
        DistillationObjective(get_recipe("ilkd-kroneckerbert", ce=0.0))(student, tiny_bert_classifier(), batch)


# ---------------------------------------------------------------- data splits


def test_hold_out_by_paragraph_is_seeded_disjoint_and_whole_paragraphs(tmp_path):
    from kronlm.tasks.squad import read_squad_json

    path = tmp_path / "s.json"
    path.write_text(json.dumps(synthetic_squad(30, 0)))
    examples = read_squad_json(path)
    train, held = hold_out_by_paragraph(examples, 0.2, seed=3)
    assert len(train) + len(held) == 60 and len(held) == 12  # 2 questions a paragraph: exactly 6 paragraphs
    assert {e.context for e in train}.isdisjoint({e.context for e in held})
    assert [e.id for e in train + held] != [e.id for e in examples] and sorted(e.id for e in train + held) == sorted(e.id for e in examples)
    assert [e.id for e in held] == [e.id for e in examples if e in held]  # file order kept
    assert hold_out_by_paragraph(examples, 0.2, seed=3) == (train, held)
    assert hold_out_by_paragraph(examples, 0.2, seed=4)[1] != held
    assert hold_out_by_paragraph(examples, 0.0, seed=3) == (examples, None)
    with pytest.raises(ValueError, match="val_fraction 0.99 of 60 questions in 30 paragraphs leaves no paragraph to train on"):
        hold_out_by_paragraph(examples, 0.99, seed=3)
    sub = subset_questions(examples, 7, seed=1)
    assert len(sub) == 7 and sub == subset_questions(examples, 7, seed=1) and sub == [e for e in examples if e in sub]


# ---------------------------------------------------------------- the pipeline


def test_run_squad_teacher_and_student_and_the_checkpoint_is_chosen_on_held_out_questions(tmp_path):
    base = tiny_base(tmp_path / "base")
    train = synthetic_squad(40, 0)
    data = write_split(tmp_path / "a" / "squad-v1.1-dev-split", train, synthetic_squad(10, 1))
    # The same evaluation questions with other gold answers: a choice that looked at them would differ.
    other = write_split(tmp_path / "b" / "squad-v1.1-dev-split", train, synthetic_squad(10, 1, shuffle_answers=True))
    cfg = SquadTrainConfig(max_length=32, doc_stride=8, batch_size=16, max_steps=8, lr=3e-3, eval_every=2, val_fraction=0.25,
                           eval_batch_size=8)
    quiet = dict(model=str(base), config=cfg, student=TINY_KRON, log=lambda line: None)
    a = run_squad(tmp_path / "run-a", data_dir=data, **quiet)
    b = run_squad(tmp_path / "run-b", data_dir=other, **quiet)

    for role in ("teacher", "student"):
        ra, rb = a.row(role), b.row(role)
        assert ra.selection == rb.selection and ra.selection["checkpoint"] == "best"
        assert ra.selection["val_examples"] == 20 and ra.train_examples > 60  # windows of the 60 questions trained on
        assert ra.metrics_final != rb.metrics_final or ra.metrics_best != rb.metrics_best  # the other answers are scored
    history = json.loads((tmp_path / "run-a" / "teacher" / "training_summary.json").read_text())["run"]["val_history"]
    assert [v["step"] for v in history] == [2, 4, 6, 8] and {v["examples"] for v in history} == {20}
    best = max(history, key=lambda v: v["f1"])
    assert a.row("teacher").selection["step"] == best["step"] and a.row("teacher").selection["value"] == best["f1"]
    # The teacher learned: held-out F1 after training beats the untrained span head's.
    t_summary = json.loads((tmp_path / "run-a" / "teacher" / "training_summary.json").read_text())
    assert t_summary["run"]["last_losses"][-1] < t_summary["run"]["first_losses"][0]
    s_summary = json.loads((tmp_path / "run-a" / "student" / "training_summary.json").read_text())
    assert s_summary["stages"] == ["task ILKD (ilkd-kroneckerbert)"] and s_summary["task"] == "squad"

    assert [r.role for r in a.rows] == ["teacher", "student"] and a.main_metric == "f1" and a.split == "dev"
    assert set(a.row("teacher").metrics) == {"exact_match", "f1"} and 0 <= a.row("teacher").metrics["f1"] <= 1
    assert a.ratios()["embedding_linear"] > 1.5 and a.retention == pytest.approx(
        a.row("student").metrics["f1"] / a.row("teacher").metrics["f1"])
    assert a.row("student").eval_tokens == a.row("teacher").eval_tokens > 0 and a.row("student").train_tokens > 0
    assert read_report(tmp_path / "run-a") == a
    md = (tmp_path / "run-a" / "report.md").read_text()
    assert "not comparable with published SQuAD dev numbers" in md and "| dev f1 |" in md
    from transformers import AutoModelForQuestionAnswering

    import kronlm

    student = kronlm.load(tmp_path / "run-a" / "student", auto_class=AutoModelForQuestionAnswering)
    assert student.qa_outputs.out_features == 2 and (tmp_path / "run-a" / "student" / "kronlm_compression.json").is_file()


def test_a_teacher_trained_twice_with_one_seed_is_bit_identical(tmp_path):
    # What lets a fresh clone of a benchmark train its chosen teacher again instead of storing it.
    from safetensors.torch import load_file

    base = tiny_base(tmp_path / "base")
    data = write_split(tmp_path / "squad-v1.1-dev-split", synthetic_squad(24, 0), synthetic_squad(6, 1))
    cfg = SquadTrainConfig(max_length=32, doc_stride=8, batch_size=8, max_steps=4, lr=3e-3, eval_every=2, val_fraction=0.25,
                           eval_batch_size=8)
    runs = [run_squad(tmp_path / name, model=str(base), config=cfg, data_dir=data, log=lambda line: None) for name in ("a", "b")]
    first, second = (load_file(tmp_path / name / "teacher" / "model.safetensors") for name in ("a", "b"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert runs[0].row("teacher").metrics == runs[1].row("teacher").metrics
    run_squad(tmp_path / "c", model=str(base), config=cfg.replace(seed=cfg.seed + 1), data_dir=data, log=lambda line: None)
    third = load_file(tmp_path / "c" / "teacher" / "model.safetensors")
    assert not torch.equal(third["qa_outputs.weight"], first["qa_outputs.weight"])  # the seed is what fixes it


def test_v2_threshold_is_chosen_on_the_held_out_questions_never_on_dev():
    tok = tiny_bert_tokenizer(VOCAB_TEXT)
    model = tiny_qa(3, vocab=tok.vocab_size)
    context = "the cat is in the park . the dog is in the barn ."

    def examples(prefix, impossible):
        return [SquadExample(f"{prefix}{i}", "t", context, f"where is the {a} ?", () if imp else (p,),
                             () if imp else (context.index(p),), imp)
                for i, (a, p, imp) in enumerate(zip(["cat", "dog", "fox", "cow"], ["park", "barn", "park", "barn"], impossible))]

    held = examples("h", [False, False, True, True])
    feats = prepare_eval_features(held, tok, 32, 8)
    held_set = SquadEvalSet(held, feats, "held")
    collator = SquadFamily(tok).collator
    metrics_held, _ = evaluate_squad(model, held_set, collator, version="2.0")
    starts, ends = span_logits(model, feats, collator)
    p = decode_predictions(held, feats, starts, ends, version_2_with_negative=True)
    expected, score = best_null_threshold(p.best_spans, p.score_diff, references_from_examples(held))
    assert metrics_held["null_threshold"] == expected and metrics_held["f1"] == pytest.approx(score / 100)
    # Two dev sets with opposite answerability get the held-out threshold, whatever their own best would be.
    for flags in ([True, True, False, False], [False, False, True, True]):
        dev = examples("d", flags)
        dev_set = SquadEvalSet(dev, prepare_eval_features(dev, tok, 32, 8), "dev", threshold_set=held_set)
        assert evaluate_squad(model, dev_set, collator, version="2.0")[0]["null_threshold"] == expected


# ---------------------------------------------------------------- errors and the CLI


def test_bad_input_errors(tmp_path):
    base = tiny_base(tmp_path / "base", positions=24)
    train = synthetic_squad(8, 0)
    v2 = json.loads(json.dumps(train))
    v2["version"] = "v2.0"
    v2["data"][0]["paragraphs"][0]["qas"][0].update(answers=[], is_impossible=True)
    data = write_split(tmp_path / "v2", v2, synthetic_squad(4, 1))
    cfg = SquadTrainConfig(max_length=24, doc_stride=4, batch_size=4, max_steps=2)
    with pytest.raises(ValueError, match=r"v2/train.json: version 'v2.0' is SQuAD v2.0 data \(first question id 'q0-0'\); v1.1 was asked"):
        run_squad(tmp_path / "x", model=str(base), config=cfg, data_dir=data, log=lambda line: None)
    ok = write_split(tmp_path / "ok", train, synthetic_squad(4, 1))
    # Windows longer than the model's 24 positions: refused before any tokenising, naming both numbers.
    with pytest.raises(ValueError, match="windows of max_length 32 tokens do not fit the model's 24 positions"):
        run_squad(tmp_path / "y", model=str(base), config=cfg.replace(max_length=32), data_dir=ok, log=lambda line: None)
    with pytest.raises(ValueError, match="squad config: doc_stride must be an integer in \\[0, max_length=24\\) tokens, got 24"):
        SquadTrainConfig(max_length=24, doc_stride=24)
    with pytest.raises(ValueError, match="teacher config is SQuAD 2.0 but the student config is 1.1"):
        run_squad(tmp_path / "z", model=str(base), config=cfg, teacher_config=cfg.replace(version="2.0"), data_dir=ok)
    from test_glue_models import tiny_bert_classifier

    classifier = tmp_path / "clf"
    tiny_bert_classifier().save_pretrained(classifier)
    tiny_bert_tokenizer(VOCAB_TEXT).save_pretrained(classifier)
    with pytest.raises(ValueError, match="clf: a BertForSequenceClassification has no question-answering head"):
        run_squad(tmp_path / "w", teacher=str(classifier), config=cfg, data_dir=ok, log=lambda line: None)


def test_cli_teacher_then_student(tmp_path, capsys):
    from kronlm.cli import main

    base = tiny_base(tmp_path / "base")
    write_split(tmp_path / "data" / "squad-v1.1-dev-split", synthetic_squad(24, 0), synthetic_squad(6, 1))
    common = ["--data-dir", str(tmp_path / "data"), "--batch-size", "16", "--max-steps", "3", "--max-length", "32",
              "--doc-stride", "8", "--lr", "1e-3", "--threads", "1"]
    assert main(["squad", "--model", str(base), "--out", str(tmp_path / "t"), *common]) == 0
    TINY_KRON.to_file(tmp_path / "kron.yaml")
    assert main(["squad", "--teacher", str(tmp_path / "t" / "teacher"), "--student-config", str(tmp_path / "kron.yaml"),
                 "--out", str(tmp_path / "s"), *common, "--max-answer-length", "3"]) == 0
    report = read_report(tmp_path / "s")
    assert [r.role for r in report.rows] == ["teacher", "student"] and report.row("teacher").selection["checkpoint"] == "given"
    assert report.settings["student_config"]["max_answer_length"] == 3 and report.row("student").train_steps == 3
    assert "### squad (dev split)" in capsys.readouterr().out
    # A v2.0 file for the (default) v1.1 run: one line naming the file and the question.
    v2 = synthetic_squad(4, 2)
    v2["data"][1]["paragraphs"][0]["qas"][1].update(answers=[], is_impossible=True)
    (tmp_path / "v2.json").write_text(json.dumps(v2))
    assert main(["squad", "--model", str(base), "--out", str(tmp_path / "v"), "--train-file", str(tmp_path / "v2.json"),
                 "--dev-file", str(tmp_path / "v2.json"), *common]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kronlm: error: ") and "question 'q2-3' is unanswerable (is_impossible); this is SQuAD v2.0 data, v1.1 was asked" in err
    assert err.count("\n") == 1
    assert main(["squad", "--model", str(base), "--out", str(tmp_path / "u"), "--student-init", str(base),
                 "--student-preset", "kroneckerbert8", *common]) == 2
    assert "give one student option, not --student-preset and --student-init" in capsys.readouterr().err
