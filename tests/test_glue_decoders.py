"""Decoder students on GLUE through run_glue: a compressed pretrained Llama with task ILKD (KnGPT2) and a
truncated pretrained GPT-2 with DistilGPT2-style KD, both starting from the fine-tuned teacher's head."""

from __future__ import annotations

import json

import pytest
import torch
from test_glue_models import encode, synthetic_sst2, tiny_tokenizer
from test_glue_training import write_sst2
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import kronlm
from kronlm.compression.config import CompressionConfig, KroneckerTarget
from kronlm.compression.truncate import save_truncated
from kronlm.tasks import TaskSplits, copy_head, train_task_model
from kronlm.tasks.glue import GlueFamily, GlueTrainConfig, get_task, run_glue

LLAMA_KRON = CompressionConfig(targets=[
    KroneckerTarget(["**.self_attn.q_proj", "**.self_attn.o_proj"], b_shape=(2, 2)),
    KroneckerTarget(["**.mlp.gate_proj", "**.mlp.up_proj"], b_shape=(2, 1)),
    KroneckerTarget(["**.mlp.down_proj"], b_shape=(1, 2)),
])


def pretrained_llama(folder, tok, seed=0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


def pretrained_gpt2(folder, tok, seed=0):
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_positions=32, n_embd=32, n_layer=3, n_head=4,
                                       pad_token_id=tok.pad_token_id))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


def test_compressed_decoder_student_with_task_ilkd_through_run_glue(tmp_path):
    tok = tiny_tokenizer(tmp_path / "base")
    dense = pretrained_llama(tmp_path / "base", tok)
    # The compressed *pretrained* model (kronlm compress, possibly recovered by kronlm distill).
    compressed = kronlm.compress(dense, LLAMA_KRON)
    kronlm.save(compressed, tmp_path / "compressed", tokenizer=tok)
    glue = write_sst2(tmp_path / "data", synthetic_sst2(64, 0), synthetic_sst2(16, 1))
    teacher_cfg = GlueTrainConfig(batch_size=16, max_steps=6, lr=3e-3, max_length=16, val_fraction=0.25)
    teacher = run_glue("sst2", tmp_path / "t", model=str(tmp_path / "base"), config=teacher_cfg, data_dir=glue, log=lambda line: None)
    assert teacher.row("teacher").params > 0
    cfg = teacher_cfg.replace(recipe="ilkd-kngpt2", lr=1e-3, max_steps=4)
    report = run_glue("sst2", tmp_path / "s", teacher=str(tmp_path / "t" / "teacher"), student_init=str(tmp_path / "compressed"),
                      config=cfg, data_dir=glue, log=lambda line: None)
    row = report.row("student")
    assert row.notes == f"initialised from {tmp_path / 'compressed'} with the teacher's score; task ILKD (ilkd-kngpt2)"
    assert row.params < report.row("teacher").params and report.ratios()["embedding_linear"] > 1
    assert row.eval_tokens == report.row("teacher").eval_tokens > 0 and row.train_steps == 4
    from transformers import AutoModelForSequenceClassification

    saved = kronlm.load(tmp_path / "s" / "student", auto_class=AutoModelForSequenceClassification)
    assert type(saved).__name__.startswith("Kronecker") and saved.config.num_labels == 2
    summary = json.loads((tmp_path / "s" / "student" / "training_summary.json").read_text())
    assert summary["student_init"] == str(tmp_path / "compressed") and "compression" not in summary

    # The same student, trained directly: every ILKD term is computed, and the head starts as the teacher's.
    family = GlueFamily(get_task("sst2"), tok)
    fine_tuned = family.load_model(tmp_path / "t" / "teacher")
    fresh = family.new_model(str(tmp_path / "compressed"), seed=1)
    copy_head(fine_tuned, fresh, "score")
    assert torch.equal(fresh.score.weight, fine_tuned.score.weight)
    rows = encode(tok, synthetic_sst2(32, 2))
    result = train_task_model(family, fresh, TaskSplits(rows, None, rows), cfg.replace(val_fraction=0.0), tmp_path / "direct",
                              role="student", teacher=fine_tuned)
    assert set(result.loss_terms[0]) == {"embedding", "attention", "hidden", "kd", "ce"}


@pytest.mark.parametrize("recipe, layer_map, terms", [
    ("distilgpt2", None, {"kd", "ce", "cosine"}),
    ("ilkd-kngpt2", [0, 2], {"embedding", "attention", "hidden", "kd", "ce"}),
])
def test_truncated_decoder_student_through_run_glue(tmp_path, recipe, layer_map, terms):
    tok = tiny_tokenizer(tmp_path / "base")
    dense = pretrained_gpt2(tmp_path / "base", tok)
    save_truncated(dense, [0, 2], tmp_path / "truncated", tokenizer=tok)  # kronlm truncate base --layers 0,2
    glue = write_sst2(tmp_path / "data", synthetic_sst2(48, 0), synthetic_sst2(16, 1))
    cfg = GlueTrainConfig(batch_size=16, max_steps=3, lr=3e-3, max_length=16, val_fraction=0.25, recipe=recipe)
    run_glue("sst2", tmp_path / "t", model=str(tmp_path / "base"), config=cfg, data_dir=glue, log=lambda line: None)
    report = run_glue("sst2", tmp_path / "s", teacher=str(tmp_path / "t" / "teacher"), student_init=str(tmp_path / "truncated"),
                      layer_map=layer_map, config=cfg, data_dir=glue, log=lambda line: None)
    teacher, student = report.row("teacher"), report.row("student")
    # Two of three blocks: the student lacks exactly one block's parameters.
    block = sum(p.numel() for p in dense.transformer.h[1].parameters())
    assert teacher.params - student.params == block
    kind = "task KD" if recipe == "distilgpt2" else "task ILKD"
    assert student.notes.endswith(f"; {kind} ({recipe})") and report.settings.get("layer_map") == layer_map
    family = GlueFamily(get_task("sst2"), tok)
    fine_tuned = family.load_model(tmp_path / "t" / "teacher")
    fresh = family.new_model(str(tmp_path / "truncated"), seed=0)
    copy_head(fine_tuned, fresh, "score")
    rows = encode(tok, synthetic_sst2(32, 2))
    result = train_task_model(family, fresh, TaskSplits(rows, None, rows), cfg.replace(val_fraction=0.0), tmp_path / "direct",
                              role="student", teacher=fine_tuned, layer_map=layer_map)
    assert set(result.loss_terms[0]) == terms


def test_student_options_are_checked(tmp_path):
    tok = tiny_tokenizer(tmp_path / "base")
    pretrained_gpt2(tmp_path / "base", tok)
    glue = write_sst2(tmp_path / "data", synthetic_sst2(32, 0), synthetic_sst2(8, 1))
    cfg = GlueTrainConfig(batch_size=16, max_steps=2, max_length=16)
    with pytest.raises(ValueError, match="give compression .* or student_init .*, not both"):
        run_glue("sst2", tmp_path / "x", model=str(tmp_path / "base"), student="kroneckerbert8", student_init=str(tmp_path / "base"),
                 config=cfg, data_dir=glue)
    with pytest.raises(ValueError, match="general_distill needs a compression config"):
        run_glue("sst2", tmp_path / "x", model=str(tmp_path / "base"), student_init=str(tmp_path / "base"),
                 general_distill=str(tmp_path / "base"), config=cfg, data_dir=glue)
    with pytest.raises(ValueError, match="task_kd=False / layer_map need a student"):
        run_glue("sst2", tmp_path / "x", model=str(tmp_path / "base"), layer_map=[0], config=cfg, data_dir=glue)
    other = GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_positions=32, n_embd=16, n_layer=1, n_head=4))
    family = GlueFamily(get_task("sst2"), tok)
    teacher = family.new_model(str(tmp_path / "base"), seed=0)
    other.save_pretrained(tmp_path / "narrow")
    narrow = family.new_model(str(tmp_path / "narrow"), seed=0)
    with pytest.raises(ValueError, match=r"task head score.weight: teacher shape \(2, 32\), student shape \(2, 16\)"):
        copy_head(teacher, narrow, "score")


def test_the_benchmark_fine_tunes_a_missing_teacher_again_before_a_student(tmp_path, monkeypatch):
    # A work folder from another machine: the dense row is in the results file, its teacher is not.
    import importlib.util
    import types
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("glue_decoders_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "glue_decoders.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []
    monkeypatch.setattr(bench, "task_config", lambda task, name, args, glue_dir: name)
    monkeypatch.setattr(bench, "run_row", lambda task, name, *a: calls.append((task, name)) or {"main_metric": "f1", "metrics": {"f1": 0.8}})
    args = types.SimpleNamespace(work=tmp_path)
    note = bench.refit_teacher("mrpc", "kron-student", {("mrpc", "dense")}, args, tmp_path, [], "cmd")
    assert calls == [("mrpc", "dense")] and note.endswith("dev f1 80.00")
    teacher = tmp_path / "runs" / "mrpc" / "dense" / "teacher"
    teacher.mkdir(parents=True)
    (teacher / "config.json").write_text("{}")
    assert bench.refit_teacher("mrpc", "kron-student", {("mrpc", "dense")}, args, tmp_path, [], "cmd") is None
    assert bench.refit_teacher("mrpc", "kron-student", set(), args, tmp_path, [], "cmd") is None  # the dense row runs first anyway
    assert calls == [("mrpc", "dense")]
