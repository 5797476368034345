"""GLUE heads, fine-tuning, student construction, task distillation, report, CLI (tiny models)."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from kronlm.compression.config import CompressionConfig, KroneckerTarget
from kronlm.distill import DistillationObjective, get_recipe
from kronlm.tasks import TaskSplits, count_embedding_linear_parameters, train_task_model
from kronlm.tasks.glue import (
    GlueBatchCollator,
    GlueFamily,
    GlueReport,
    GlueTrainConfig,
    ModelResult,
    check_classifier,
    classifier_head_name,
    evaluate_classifier,
    get_task,
    load_general_distilled,
    make_classifier_student,
    read_report,
    write_report,
)

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "movie", "was", "plot", "a", "very", "and", "this"]
POSITIVE = {"good", "great", "fine"}


def tiny_tokenizer(folder: Path) -> BertTokenizerFast:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 ignores vocab_file= silently (every word becomes [UNK]); pass the mapping.
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})


def synthetic_sst2(n: int, seed: int) -> list[tuple[str, int]]:
    """Sentences whose label is 1 iff they hold a positive word: trivially learnable."""
    g = torch.Generator().manual_seed(seed)
    filler = ["the", "movie", "was", "plot", "a", "very", "and", "this"]
    out = []
    for i in range(n):
        label = i % 2
        key = ["good", "great", "fine"] if label else ["bad", "awful", "poor"]
        words = [filler[int(j)] for j in torch.randint(0, len(filler), (4,), generator=g)]
        words.insert(int(torch.randint(0, 5, (1,), generator=g)), key[int(torch.randint(0, 3, (1,), generator=g))])
        out.append((" ".join(words), label))
    return out


def tiny_bert_classifier(num_labels=2, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def encode(tokenizer, pairs):
    enc = tokenizer([s for s, _ in pairs])
    return [{"input_ids": ids, "token_type_ids": tt, "labels": y} for ids, tt, (_, y) in zip(enc["input_ids"], enc["token_type_ids"], pairs)]


TINY_KRON = CompressionConfig(targets=[
    KroneckerTarget(["**.embeddings.word_embeddings"], b_shape=(1, 2)),
    KroneckerTarget(["**.encoder.layer.*.attention.self.query", "**.encoder.layer.*.attention.self.key",
                     "**.encoder.layer.*.attention.self.value", "**.encoder.layer.*.attention.output.dense"], b_shape=(2, 2)),
    KroneckerTarget(["**.encoder.layer.*.intermediate.dense"], b_shape=(2, 1)),
    KroneckerTarget(["**.encoder.layer.*.output.dense"], b_shape=(1, 2)),
])


def test_check_classifier_errors():
    task = get_task("sst2")
    check_classifier(tiny_bert_classifier(), task)
    with pytest.raises(ValueError, match="has 3 labels but sst2 needs 2"):
        check_classifier(tiny_bert_classifier(num_labels=3), task)
    from transformers import BertModel

    bare = BertModel(BertConfig(vocab_size=20, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ValueError, match="BertModel has no sequence-classification head"):
        check_classifier(bare, task)
    gpt = GPT2ForSequenceClassification(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=4, num_labels=2))
    with pytest.raises(ValueError, match="pad_token_id is not set"):
        check_classifier(gpt, task)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoder_pools_last_non_padding_token(arch):
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2ForSequenceClassification(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4, num_labels=3, pad_token_id=0))
        base = model.transformer
    else:
        model = LlamaForSequenceClassification(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                           num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0))
        base = model.model
    model.eval().double()
    check_classifier(model, get_task("mnli"))
    batch = GlueBatchCollator(0)([{"input_ids": [5, 6, 7, 8, 9], "labels": 0}, {"input_ids": [3, 4], "labels": 1}])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        hidden = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    last = batch["attention_mask"].sum(1) - 1  # right padding: last real position
    manual = model.score(hidden[torch.arange(2), last])
    torch.testing.assert_close(logits, manual, rtol=0, atol=1e-12)


def test_finetune_tiny_bert_accuracy_goes_up(tmp_path):
    task = get_task("sst2")
    tok = tiny_tokenizer(tmp_path / "tok")
    model = tiny_bert_classifier()
    train_rows, dev_rows = encode(tok, synthetic_sst2(256, 0)), encode(tok, synthetic_sst2(64, 1))
    collator = GlueBatchCollator(tok.pad_token_id)
    before, _ = evaluate_classifier(model, dev_rows, collator, task)
    cfg = GlueTrainConfig(batch_size=16, epochs=4, lr=3e-3, warmup_ratio=0.1, seed=0, val_fraction=0.0)
    result = train_task_model(GlueFamily(task, tok), model, TaskSplits(train_rows, None, dev_rows), cfg,
                              tmp_path / "run", role="teacher")
    after, _ = evaluate_classifier(model, dev_rows, collator, task)
    assert result.steps == 64 and set(result.loss_terms[0]) == {"ce"}  # a teacher learns from the labels only
    assert after["accuracy"] >= 0.95 > before["accuracy"] + 0.2
    assert sum(result.losses[-8:]) < 0.5 * sum(result.losses[:8])
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-0000064" / "trainer_state.json").read_text())
    assert state["step"] == 64 and state["length_grouped"] and state["config"]["recipe"] == "ce"
    assert (tmp_path / "run" / "checkpoints" / "step-0000064" / "model.safetensors").is_file()
    assert result.best_step is None and not (tmp_path / "run" / "best").exists()  # val_fraction 0: nothing chosen
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_student_copies_head_counts_params_and_distillation_loss_goes_down(tmp_path):
    task = get_task("sst2")
    tok = tiny_tokenizer(tmp_path / "tok")
    family = GlueFamily(task, tok)
    teacher = tiny_bert_classifier(seed=1)
    rows = encode(tok, synthetic_sst2(64, 0))
    collator = GlueBatchCollator(tok.pad_token_id)
    splits = TaskSplits(rows, None, rows)
    train_task_model(family, teacher, splits, GlueTrainConfig(batch_size=16, epochs=2, lr=3e-3, val_fraction=0.0),
                     tmp_path / "t", role="teacher")
    student, report = make_classifier_student(teacher, TINY_KRON)
    assert len(report.modules) == 1 + 2 * 6
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    assert torch.equal(student.classifier.bias, teacher.classifier.bias)
    assert student.classifier.weight.data_ptr() != teacher.classifier.weight.data_ptr()
    # Embeddings + linear layers by hand: word 19x32 -> A 19x16 + B 1x2; per layer Q/K/V/O
    # 32x32 -> A 16x16 + B 2x2 (+32 bias each); FFN in 64x32 -> A 32x32 + B 2x1 (+64), out 32x64 -> A 32x32 + B 1x2 (+32).
    pos, typ, pool = 32 * 32, 2 * 32, 32 * 32 + 32
    dense = 19 * 32 + pos + typ + pool + 2 * (4 * (32 * 32 + 32) + (64 * 32 + 64) + (32 * 64 + 32))
    kron = (19 * 16 + 2) + pos + typ + pool + 2 * (4 * (256 + 4 + 32) + (1024 + 2 + 64) + (1024 + 2 + 32))
    assert count_embedding_linear_parameters(teacher, head_name=classifier_head_name(teacher)) == dense
    assert count_embedding_linear_parameters(student, head_name=classifier_head_name(student)) == kron
    objective = DistillationObjective(get_recipe("ilkd-kroneckerbert"))
    fixed = collator(rows)

    def fixed_loss():
        student.eval()
        with torch.no_grad():
            return float(objective(student, teacher, fixed).total)

    before = fixed_loss()
    cfg = GlueTrainConfig(batch_size=16, epochs=6, lr=3e-3, seed=0, val_fraction=0.0)
    result = train_task_model(family, student, splits, cfg, tmp_path / "s", role="student", teacher=teacher)
    assert set(result.loss_terms[0]) == {"embedding", "attention", "hidden", "kd", "ce"}
    after = fixed_loss()
    assert after < 0.9 * before
    # The teacher is frozen now; a student made from it is not.
    assert not any(p.requires_grad for p in teacher.parameters())
    second = make_classifier_student(teacher, TINY_KRON)[0]
    assert all(p.requires_grad for p in second.parameters())
    # The "no task KD" ablation: CE on the labels only, the teacher is not consulted.
    ce_only = train_task_model(family, second, splits, cfg.replace(max_steps=2), tmp_path / "ce", role="student",
                               teacher=teacher, task_kd=False)
    assert [set(t) for t in ce_only.loss_terms] == [{"ce"}, {"ce"}]
    with pytest.raises(ValueError, match="selects the task head"):
        make_classifier_student(teacher, CompressionConfig(targets=[KroneckerTarget(["classifier"], b_shape=(1, 2))]))


def test_ce_recipe_on_a_regressor_is_mse_and_regression_kd_is_mse():
    teacher, student = tiny_bert_classifier(num_labels=1, seed=0), tiny_bert_classifier(num_labels=1, seed=1)
    batch = {"input_ids": torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
             "labels": torch.tensor([1.5, 4.0])}
    out = DistillationObjective(get_recipe("ilkd-kroneckerbert", embedding=0.0, attention=0.0, hidden=0.0))(student, teacher, batch)
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].double()
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].double()
    assert float(out.terms["kd"]) == pytest.approx(float(((s - t) ** 2).mean()), rel=1e-5)
    assert float(out.terms["ce"]) == pytest.approx(float(((s - batch["labels"]) ** 2).mean()), rel=1e-5)
    # Recipe "ce" (teacher fine-tuning, the no-task-KD ablation) needs no teacher.
    ce = DistillationObjective(get_recipe("ce"))
    assert not ce.needs_teacher
    ce_out = ce(student, None, batch)
    assert set(ce_out.terms) == {"ce"} and float(ce_out.total.detach()) == pytest.approx(float(out.terms["ce"]), rel=1e-5)
    from kronlm.distill import sequence_classification_loss

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # Cross-entropy by hand: mean of log(1 + e^-2) and log(1 + e^-1).
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0))) / 2
    assert float(sequence_classification_loss(logits, torch.tensor([0, 1]))) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match=r"label 2 is outside \[0, 2\) for a 2-label classifier"):
        sequence_classification_loss(logits, torch.tensor([0, 2]))


def test_general_distill_stage_then_load_into_task_student(tmp_path):
    import kronlm
    from kronlm.distill import TrainingConfig
    from kronlm.tasks.glue import general_distill

    teacher_cls = tiny_bert_classifier(seed=2)
    encoder = teacher_cls.bert
    g = torch.Generator().manual_seed(0)
    blocks = {"train": torch.randint(5, 19, (32, 8), generator=g), "val": None}
    tcfg = TrainingConfig(recipe="ilkd-kroneckerbert", block_size=8, micro_batch_size=8, max_steps=6, warmup_steps=1,
                          lr=3e-3, min_lr=3e-4, mixed_precision="no", save_every=6)
    final = general_distill(encoder, TINY_KRON, blocks, tcfg, tmp_path / "stage1")
    summary = json.loads((final / "training_summary.json").read_text())
    assert summary["step"] == 6
    student, _ = make_classifier_student(teacher_cls, TINY_KRON)
    pooler_before = student.bert.pooler.dense.weight.clone()
    load_general_distilled(student, final)
    stage1 = kronlm.load(final, auto_class=__import__("transformers").AutoModel)
    torch.testing.assert_close(student.bert.encoder.layer[0].attention.self.query.A, stage1.encoder.layer[0].attention.self.query.A, rtol=0, atol=0)
    assert torch.equal(student.bert.pooler.dense.weight, pooler_before)
    assert torch.equal(student.classifier.weight, teacher_cls.classifier.weight)
    # A folder compressed another way does not fit.
    other, _ = make_classifier_student(tiny_bert_classifier(seed=3), CompressionConfig(targets=[KroneckerTarget(["**.intermediate.dense"], b_shape=(4, 1))]))
    kronlm.save(other.bert, tmp_path / "other")
    with pytest.raises(ValueError, match="does not match the student's encoder"):
        load_general_distilled(student, tmp_path / "other")


def test_report_round_trip_and_ratios(tmp_path):
    rep = GlueReport("mrpc", "dev", "f1", [
        ModelResult("teacher", "minilm", {"f1": 0.88, "accuracy": 0.84}, 1000, 800, 3668, 115, 60.5),
        ModelResult("student", "kb8", {"f1": 0.836, "accuracy": 0.80}, 250, 100, 3668, 115, 90.0, notes="task ILKD"),
    ], {"seed": 42})
    json_path, md_path = write_report(rep, tmp_path)
    back = read_report(tmp_path)
    assert back == rep
    data = json.loads(json_path.read_text())
    assert data["retention"] == pytest.approx(0.95) and data["compression_ratio"] == {"whole_model": 4.0, "embedding_linear": 8.0}
    md = md_path.read_text()
    assert "| student | `kb8` | 83.60 | 80.00 | 250 | 100 | 4.00x | 8.00x | 95.0% |" in md
    with pytest.raises(ValueError, match="not a kronlm task report"):
        GlueReport.from_dict({"task": "x"})


def test_cli_teacher_then_student_end_to_end(tmp_path, capsys):
    from kronlm.cli import main

    tok = tiny_tokenizer(tmp_path / "base")
    tiny_bert_classifier().bert.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    data = tmp_path / "glue" / "SST-2"
    data.mkdir(parents=True)
    for split, n, seed in (("train", 96, 0), ("dev", 32, 1)):
        (data / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in synthetic_sst2(n, seed)))
    TINY_KRON.to_file(tmp_path / "kron.yaml")
    common = ["--task", "sst2", "--data-dir", str(tmp_path), "--batch-size", "16", "--epochs", "1", "--max-length", "16", "--lr", "1e-3"]
    assert main(["glue", "--model", str(tmp_path / "base"), "--out", str(tmp_path / "t"), *common]) == 0
    student_args = ["glue", "--teacher", str(tmp_path / "t" / "teacher"), "--student-config", str(tmp_path / "kron.yaml"),
                    "--out", str(tmp_path / "s"), *common]
    assert main(student_args) == 0
    rep = read_report(tmp_path / "s")
    assert [r.role for r in rep.rows] == ["teacher", "student"]
    assert rep.ratios()["embedding_linear"] > 1
    # 96 examples, 10 % held out: 86 to train on, 5 steps of 16; the student's checkpoint chosen on the other 10.
    row = rep.row("student")
    assert (row.train_examples, row.train_steps) == (86, 5)
    assert row.selection["checkpoint"] == "best" and row.selection["val_examples"] == 10
    assert rep.row("teacher").selection["checkpoint"] == "given"
    assert rep.row("teacher").train_steps == 5  # read from the teacher's training_summary.json
    # --resume on a finished run trains nothing and reports the same models.
    assert main([*student_args, "--resume"]) == 0
    again = read_report(tmp_path / "s")
    assert again.row("student").metrics == row.metrics and again.row("student").selection == row.selection
    from transformers import AutoModelForSequenceClassification

    import kronlm

    student = kronlm.load(tmp_path / "s" / "student", auto_class=AutoModelForSequenceClassification)
    assert student.config.num_labels == 2
    # Bad input, each with its message: a teacher whose head does not fit the task (STS-B is a
    # 1-output regression), a missing split file, an unknown task.
    sts = tmp_path / "glue" / "STS-B"
    sts.mkdir()
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    for split in ("train", "dev"):
        (sts / f"{split}.tsv").write_text(head + "0\tg\tf\ty\t0\ts\ts\tgood movie\tgreat movie\t4.5\n")
    capsys.readouterr()
    assert main(["glue", "--teacher", str(tmp_path / "t" / "teacher"), "--out", str(tmp_path / "x"), "--task", "stsb",
                 "--data-dir", str(tmp_path)]) == 1
    assert "has 2 labels but stsb needs 1 (regression)" in capsys.readouterr().err
    assert main(["glue", "--model", str(tmp_path / "base"), "--out", str(tmp_path / "y"), "--task", "mrpc", "--data-dir", str(tmp_path)]) == 1
    assert "MRPC/train.tsv: mrpc train split not found" in capsys.readouterr().err
    assert main(["glue", "--model", str(tmp_path / "base"), "--out", str(tmp_path / "z"), "--task", "nope"]) == 1
    assert "unknown GLUE task 'nope'" in capsys.readouterr().err
