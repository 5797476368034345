"""The Hugging Face side of a compressed model: the typed plan, one saved format, the report on the
model, and merging back to a plain dense model of the base class."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from transformers import GPT2LMHeadModel, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import kronlm
from kronlm import CompressionConfig, KroneckerTarget
from kronlm.layers import KroneckerLinear
from kronlm.modeling import COMPRESSION_FILE, KroneckerPlan, ModulePlan

LLAMA_CFG = CompressionConfig(
    targets=[
        KroneckerTarget(["**.embed_tokens"], b_shape=(1, 2)),
        KroneckerTarget(["**.mlp.gate_proj", "**.mlp.up_proj"], b_shape=(2, 1), rank=2, learnable_scales=True),
        KroneckerTarget(["**.mlp.down_proj"], b_shape=(1, 2)),
    ]
)
GPT2_CFG = CompressionConfig(targets=[KroneckerTarget(["**.mlp.c_fc"], b_shape=(2, 1)), KroneckerTarget(["**.mlp.c_proj"], b_shape=(1, 2))])


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_compress_returns_the_model_with_its_report_and_plan():
    model = tiny_llama()
    out = kronlm.compress(model, LLAMA_CFG, progress=False)
    assert out is model and type(model).__name__ == "KroneckerLlamaForCausalLM"
    report = kronlm.compression_report(model)
    assert report is model.compression_report and len(report.modules) == 1 + 9
    plan = KroneckerPlan.from_dict(model.config.kronlm)
    assert list(plan.modules) == [m.name for m in report.modules]
    gate = plan.modules["model.layers.0.mlp.gate_proj"]
    assert gate == ModulePlan("linear", 48, 32, (24, 32), (2, 1), 2, False, True, "van_loan", None)
    assert plan.lm_head is not None and (plan.lm_head.module, plan.lm_head.mode, plan.lm_head.embedding) == ("lm_head", "tied", "model.embed_tokens")
    assert KroneckerPlan.from_dict(plan.to_dict()) == plan


def test_save_pretrained_writes_what_kronlm_save_writes(tmp_path):
    model = kronlm.compress(tiny_llama(), LLAMA_CFG, progress=False)
    kronlm.save(model, tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert COMPRESSION_FILE in names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    stored = json.loads((tmp_path / "a" / COMPRESSION_FILE).read_text())
    assert stored["compression"] == LLAMA_CFG.to_dict() and len(stored["report"]["modules"]) == 10


def test_report_survives_save_and_load(tmp_path):
    model = kronlm.compress(tiny_llama(), LLAMA_CFG, progress=False)
    kronlm.save(model, tmp_path / "k")
    for loaded in (kronlm.load(tmp_path / "k"), kronlm.load_model(str(tmp_path / "k"))):
        assert loaded.compression_report.to_dict() == model.compression_report.to_dict()


@pytest.mark.parametrize("bad,message", [
    ({"version": 1, "modules": [["a", 1]]}, r"modules must be a mapping"),
    ({"version": 1, "modules": {}, "lm_head": "tied"}, r"lm_head must be a mapping"),
    ({"version": 2, "modules": {}}, r"version 2 is not supported"),
    ({"version": 1, "modules": {"x": {"kind": "linear", "out": 4, "in": 4, "a_shape": [2, 2]}}}, r"entry 'x' has no key 'b_shape'"),
    ({"version": 1, "modules": {"x": {"kind": "conv", "out": 4, "in": 4, "a_shape": [2, 2], "b_shape": [2, 2]}}}, r"entry 'x': kind must be"),
    ({"version": 1, "modules": {"x": {"kind": "linear", "out": 4, "in": 4, "a_shape": [2, "2"], "b_shape": [2, 2]}}}, r"entry 'x': a_shape must be two positive integers"),
    ("tied", r"plan must be a mapping, got str"),
])
def test_malformed_plans_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        KroneckerPlan.from_dict(bad)


def test_merge_and_unload_gives_the_base_class_with_the_same_logits(tmp_path):
    model = kronlm.compress(tiny_llama(), LLAMA_CFG, progress=False)
    ids = torch.randint(0, 96, (2, 11))
    ref = _logits(model, ids)
    dense = kronlm.merge_and_unload(model)
    assert type(dense) is LlamaForCausalLM and not hasattr(dense.config, "kronlm")
    assert dense.config.model_type == "llama" and dense.config.tie_word_embeddings is True
    assert dense.lm_head.weight is dense.model.embed_tokens.weight
    assert not any(isinstance(m, KroneckerLinear) for m in dense.modules())
    assert torch.allclose(_logits(dense, ids), ref, atol=1e-5)
    assert type(model).__name__ == "KroneckerLlamaForCausalLM"  # the compressed model is left as it was
    # Any tool loads the merged folder without kronlm's classes.
    dense.save_pretrained(tmp_path / "dense")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert config["model_type"] == "llama" and "kronlm" not in config and config["architectures"] == ["LlamaForCausalLM"]
    again = LlamaForCausalLM.from_pretrained(tmp_path / "dense")
    assert torch.equal(_logits(again.eval(), ids), _logits(dense, ids))
    assert torch.equal(_logits(model.merge_and_unload(), ids), _logits(dense, ids))


def test_merge_restores_gpt2_conv1d_storage():
    model = kronlm.compress(tiny_gpt2(), GPT2_CFG, progress=False)
    ids = torch.randint(0, 96, (1, 13))
    dense = kronlm.merge_and_unload(model)
    assert type(dense) is GPT2LMHeadModel
    fc = dense.transformer.h[0].mlp.c_fc
    assert isinstance(fc, Conv1D) and tuple(fc.weight.shape) == (32, 64)  # Conv1D stores (in, out)
    layer = model.transformer.h[0].mlp.c_fc
    assert torch.allclose(fc.weight, layer.to_dense().T)
    assert torch.allclose(_logits(dense, ids), _logits(model, ids), atol=1e-5)
