"""General distillation of encoders (KroneckerBERT stage 1) through the same pipeline as decoders:
the Auto class chosen from the checkpoint, [SEP]-joined text blocks, validation by held-out
distillation loss, and `kronlm compress` -> `kronlm distill` -> `kronlm glue --general-distill`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2
from test_glue_models import (
    TINY_KRON,
    WORDS,
    synthetic_sst2,
    tiny_bert_classifier,
    tiny_tokenizer,
)
from transformers import BertForSequenceClassification, BertModel, GPT2LMHeadModel

import kronlm
from kronlm.compression.config import CompressionConfig, KroneckerTarget
from kronlm.data.blocks import BlockDataset, TokenBlocks, tokenize_documents
from kronlm.distill.config import TrainingConfig
from kronlm.distill.distributed import make_accelerator
from kronlm.distill.objective import DistillationObjective
from kronlm.distill.trainer import train
from kronlm.distill.validators import evaluate_distillation_loss
from kronlm.evaluation.perplexity import perplexity
from kronlm.modeling.loading import (
    has_lm_head,
    infer_task,
    load_model,
    task_of_architectures,
)

BLOCK = 8
ENCODER_KRON = CompressionConfig(targets=[
    KroneckerTarget(["encoder.layer.*.attention.self.query", "encoder.layer.*.attention.self.key",
                     "encoder.layer.*.attention.self.value", "encoder.layer.*.attention.output.dense"], b_shape=(2, 2)),
    KroneckerTarget(["encoder.layer.*.intermediate.dense"], b_shape=(2, 1)),
    KroneckerTarget(["encoder.layer.*.output.dense"], b_shape=(1, 2)),
])


@pytest.mark.parametrize("names, task", [
    (["BertModel"], "encoder"),
    (["BertForMaskedLM"], "encoder"),
    (["KroneckerBertModel"], "encoder"),
    (["BertForSequenceClassification"], "sequence-classification"),
    (["GPT2LMHeadModel"], "causal-lm"),
    (["KroneckerLlamaForCausalLM"], "causal-lm"),
    (None, "causal-lm"),
    ([], "causal-lm"),
])
def test_task_of_architectures(names, task):
    assert task_of_architectures(names) == task


def test_auto_loading_keeps_each_checkpoint_in_its_own_class(tmp_path):
    encoder = tiny_bert(seed=1)
    encoder.save_pretrained(tmp_path / "bert")
    tiny_gpt2(seed=1).save_pretrained(tmp_path / "gpt2")
    tiny_bert(seed=1, cls_name="BertForSequenceClassification", num_labels=3).save_pretrained(tmp_path / "cls")

    assert infer_task(str(tmp_path / "bert")) == "encoder"
    loaded = load_model(str(tmp_path / "bert"))
    # Before auto, an encoder came back as BertLMHeadModel with a freshly initialised head.
    assert type(loaded) is BertModel and not has_lm_head(loaded)
    reference = encoder.state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    assert all(torch.equal(t, reference[k]) for k, t in loaded.state_dict().items())
    assert type(load_model(str(tmp_path / "gpt2"))) is GPT2LMHeadModel
    classifier = load_model(str(tmp_path / "cls"))
    assert type(classifier) is BertForSequenceClassification and classifier.config.num_labels == 3

    # Compressed and saved by kronlm, the encoder stays an encoder.
    kronlm.compress(encoder, ENCODER_KRON, progress=False)
    kronlm.save(encoder, tmp_path / "kron")
    assert json.loads((tmp_path / "kron" / "config.json").read_text())["architectures"] == ["KroneckerBertModel"]
    assert not has_lm_head(load_model(str(tmp_path / "kron")))

    with pytest.raises(ValueError, match="perplexity needs a model with a language-modelling head; BertModel has none"):
        perplexity(loaded, torch.arange(10), max_length=8, progress=False)


def test_documents_are_joined_by_sep_when_the_tokenizer_has_no_eos(tmp_path):
    tok = tiny_tokenizer(tmp_path / "tok")
    assert tok.eos_token_id is None and tok.sep_token_id == 3
    ids, n = tokenize_documents(["good movie", "bad plot", "the"], tok)
    word = {w: i + 5 for i, w in enumerate(WORDS)}
    assert n == 3
    assert ids.tolist() == [word["good"], word["movie"], 3, word["bad"], word["plot"], 3, word["the"]]
    tok.sep_token = None
    with pytest.raises(ValueError, match="has neither an EOS nor a SEP token"):
        tokenize_documents(["good"], tok)


def _encoder_pair(seed: int = 0):
    teacher = tiny_bert(seed=seed)
    student = tiny_bert(seed=seed)
    kronlm.compress(student, ENCODER_KRON, progress=False)
    return teacher, student


def _blocks(n: int = 40, val_fraction: float | None = 0.2) -> TokenBlocks:
    ids = torch.randint(5, 90, (n * BLOCK,), generator=torch.Generator().manual_seed(3))
    return TokenBlocks.from_ids(ids, BLOCK, val_fraction=val_fraction)


def test_validation_distillation_loss_is_the_block_weighted_mean_of_the_objective(tmp_path):
    teacher, student = _encoder_pair()
    teacher, student = teacher.double(), student.double()
    objective = DistillationObjective(TrainingConfig(recipe="ilkd-kroneckerbert").loss_weights_resolved())
    blocks = torch.randint(5, 90, (7, BLOCK), generator=torch.Generator().manual_seed(0))
    cfg = TrainingConfig(recipe="ilkd-kroneckerbert", block_size=BLOCK, mixed_precision="no")
    accelerator = make_accelerator(cfg, tmp_path)
    got = evaluate_distillation_loss(student, teacher, objective, BlockDataset(blocks), accelerator, micro_batch_size=3)
    # By hand: batches of 3, 3 and 1 blocks, each batch's mean weighted by its size.
    totals, terms = [], []
    with torch.no_grad():
        for lo, hi in ((0, 3), (3, 6), (6, 7)):
            out = objective(student, teacher, {"input_ids": blocks[lo:hi], "attention_mask": torch.ones_like(blocks[lo:hi])})
            totals.append(out.total.item() * (hi - lo))
            terms.append({k: v.item() * (hi - lo) for k, v in out.terms.items()})
    assert got["blocks"] == 7
    assert got["loss"] == pytest.approx(sum(totals) / 7, rel=1e-12)
    assert set(got) == {"loss", "blocks", "term/embedding", "term/attention", "term/hidden"}
    for name in ("embedding", "attention", "hidden"):
        assert got[f"term/{name}"] == pytest.approx(sum(t[name] for t in terms) / 7, rel=1e-12)
    assert student.training is False  # the mode it had


def test_encoder_student_is_validated_and_selected_by_distillation_loss(tmp_path):
    teacher, student = _encoder_pair()
    cfg = TrainingConfig(recipe="ilkd-kroneckerbert", block_size=BLOCK, micro_batch_size=4, max_steps=8, warmup_steps=1,
                         lr=3e-3, min_lr=3e-4, eval_every=2, save_every=4, mixed_precision="no", log_dir=str(tmp_path / "logs"))
    result = train(student, teacher, _blocks(), cfg, tmp_path / "run")
    assert result.val_metric == "distill_loss" and result.best_val_ppl is None
    assert [v["step"] for v in result.val_history] == [2, 4, 6, 8]
    losses = [v["loss"] for v in result.val_history]
    assert losses[-1] < losses[0]
    assert result.best_val == min(losses)
    assert result.best_step == result.val_history[losses.index(min(losses))]["step"]
    summary = json.loads((tmp_path / "run" / "best" / "training_summary.json").read_text())
    assert summary["val_metric"] == "distill_loss" and summary["step"] == result.best_step
    assert summary["val"] == pytest.approx(result.best_val) and "val_ppl" not in summary
    # A resumed run keeps the best so far instead of re-selecting from scratch.
    resumed = train(_encoder_pair()[1], teacher, _blocks(), TrainingConfig(**{**cfg.to_dict(), "max_steps": 10}),
                    tmp_path / "run", resume=True)
    assert resumed.start_step == 8 and resumed.best_val <= result.best_val

    with pytest.raises(ValueError, match="validated by the distillation loss, which needs a teacher"):
        train(_encoder_pair()[1], None, _blocks(), TrainingConfig(**{**cfg.to_dict(), "recipe": "ce"}), tmp_path / "ce")


def test_cli_compress_distill_an_encoder_then_start_the_task_student_from_it(tmp_path, capsys):
    from kronlm.cli import main

    tok = tiny_tokenizer(tmp_path / "base")
    base = tiny_bert_classifier(seed=4).bert
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    TINY_KRON.to_file(tmp_path / "kron.yaml")
    sentences = [s for s, _ in synthetic_sst2(160, seed=5)]
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(sentences) + "\n")

    assert main(["compress", str(tmp_path / "base"), "--config", str(tmp_path / "kron.yaml"), "--out", str(tmp_path / "kron")]) == 0
    config = json.loads((tmp_path / "kron" / "config.json").read_text())
    assert config["architectures"] == ["KroneckerBertModel"]
    run = ["distill", "--student", str(tmp_path / "kron"), "--teacher", str(tmp_path / "base"), "--data", str(text),
           "--out", str(tmp_path / "stage1"), "--recipe", "ilkd-kroneckerbert", "--block-size", "16", "--batch-size", "4",
           "--max-steps", "6", "--warmup-steps", "1", "--lr", "3e-3", "--val-fraction", "0.2"]
    capsys.readouterr()
    assert main(run) == 0
    out = capsys.readouterr().out
    assert "best validation distillation loss" in out
    best = tmp_path / "stage1" / "best"
    assert json.loads((best / "training_summary.json").read_text())["val_metric"] == "distill_loss"

    # Stage 2 starts from the stage-1 encoder: fine-tune a teacher, then the student with --general-distill.
    data = tmp_path / "glue" / "SST-2"
    data.mkdir(parents=True)
    for split, n, seed in (("train", 64, 0), ("dev", 32, 1)):
        (data / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in synthetic_sst2(n, seed)))
    common = ["--task", "sst2", "--data-dir", str(tmp_path), "--batch-size", "16", "--max-length", "16", "--lr", "1e-3"]
    assert main(["glue", "--model", str(tmp_path / "base"), "--out", str(tmp_path / "t"), "--epochs", "1", *common]) == 0
    assert main(["glue", "--teacher", str(tmp_path / "t" / "teacher"), "--student-config", str(tmp_path / "kron.yaml"),
                 "--general-distill", str(best), "--out", str(tmp_path / "s"), "--max-steps", "1", *common]) == 0
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert [row["role"] for row in report["rows"]] == ["teacher", "student"]

    # Like from like: an encoder student against a causal-LM teacher is refused by name.
    gpt = GPT2LMHeadModel(__import__("transformers").GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64))
    gpt.save_pretrained(tmp_path / "gpt")
    tok.save_pretrained(tmp_path / "gpt")
    capsys.readouterr()
    mixed = [a if a != str(tmp_path / "base") else str(tmp_path / "gpt") for a in run]
    assert main([*mixed[:mixed.index("--out") + 1], str(tmp_path / "mixed"), *mixed[mixed.index("--out") + 2:]]) == 1
    err = capsys.readouterr().err
    assert "is an encoder without an LM head but the teacher (GPT2LMHeadModel) is a language model" in err
