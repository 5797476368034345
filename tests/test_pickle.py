"""Compressed models pickle and deep-copy like dense ones, and resize their Kronecker embedding."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama

import kronlm
from kronlm import CompressionConfig, KroneckerTarget
from kronlm.layers import KroneckerEmbedding, KroneckerTiedLMHead

LLAMA_CFG = CompressionConfig(
    targets=[
        KroneckerTarget(["**.embed_tokens"], b_shape=(1, 2)),
        KroneckerTarget(["**.mlp.gate_proj", "**.mlp.up_proj"], b_shape=(2, 1), rank=2, learnable_scales=True),
        KroneckerTarget(["**.mlp.down_proj"], b_shape=(1, 2)),
    ]
)
IDS = torch.arange(20).reshape(2, 10)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_torch_save_and_deepcopy(tmp_path):
    model = kronlm.compress(tiny_llama(), LLAMA_CFG, progress=False)
    ref = _logits(model)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert type(loaded) is type(model) and torch.equal(_logits(loaded), ref)
    assert loaded.get_output_embeddings().embedding is loaded.get_input_embeddings()  # the tie survives
    clone = copy.deepcopy(model)
    assert torch.equal(_logits(clone), ref)
    assert clone.model.layers[0].mlp.gate_proj.A.data_ptr() != model.model.layers[0].mlp.gate_proj.A.data_ptr()
    assert clone.compression_report.to_dict() == model.compression_report.to_dict()


def test_unpickling_in_a_fresh_process_creates_the_class(tmp_path):
    # A Kronecker class kronlm has not created yet at import (BERT's QA head) is created on unpickling.
    model = kronlm.compress(tiny_bert(cls_name="BertForQuestionAnswering"), CompressionConfig(targets=[KroneckerTarget(["**.intermediate.dense"], b_shape=(2, 1))]), progress=False)
    torch.save(model, tmp_path / "m.pt")
    code = ("import torch, kronlm.modeling.registry as r; m = torch.load(%r, weights_only=False); "
            "print(type(m).__name__, type(m) is r.KroneckerBertForQuestionAnswering)") % str(tmp_path / "m.pt")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.split() == ["KroneckerBertForQuestionAnswering", "True"], proc.stderr[-2000:]


@pytest.mark.parametrize("new_size,pad", [(120, None), (90, None), (101, 8)])
def test_resize_kronecker_embedding_and_tied_head(tmp_path, new_size, pad):
    model = kronlm.compress(tiny_llama(), LLAMA_CFG, progress=False)
    size = new_size if pad is None else -(-new_size // pad) * pad
    keep = min(96, size)
    ids = IDS % keep  # tokens that exist before and after
    ref = _logits(model, ids)
    old_rows = model.get_input_embeddings().to_dense()
    emb = model.resize_token_embeddings(new_size, pad_to_multiple_of=pad)
    assert isinstance(emb, KroneckerEmbedding) and emb.num_embeddings == size == model.config.vocab_size
    head = model.get_output_embeddings()
    assert isinstance(head, KroneckerTiedLMHead) and head.embedding is emb and head.out_features == size
    rows = emb.to_dense()
    assert torch.equal(rows[:keep], old_rows[:keep])
    if size > 96:  # mean resizing: every new row is the mean of the old ones (B has one row here)
        torch.testing.assert_close(rows[96:], old_rows.mean(0, keepdim=True).expand(size - 96, -1), rtol=0, atol=1e-6)
    logits = _logits(model, ids)
    assert logits.shape[-1] == size
    assert torch.equal(logits[..., :keep], ref[..., :keep])  # kept tokens: same inputs, same scores
    kronlm.save(model, tmp_path / "k")  # the plan follows: the resized model reloads
    assert torch.equal(_logits(kronlm.load(tmp_path / "k"), ids), logits)


def test_resize_refuses_a_size_the_factors_cannot_hold():
    model = kronlm.compress(tiny_gpt2(), CompressionConfig(targets=[KroneckerTarget(["**.wte"], a_shape=(48, 16), b_shape=(2, 2))]), progress=False)
    with pytest.raises(ValueError, match=r"B factor has 2 rows.*got 99 \(pass pad_to_multiple_of=2\)"):
        model.resize_token_embeddings(99)
    assert model.resize_token_embeddings(99, pad_to_multiple_of=2).num_embeddings == 100
    assert model.get_output_embeddings().out_features == 100


def test_resize_with_a_dense_embedding_is_transformers_own():
    model = kronlm.compress(tiny_llama(), CompressionConfig(targets=LLAMA_CFG.targets[1:]), progress=False)
    model.resize_token_embeddings(128)
    assert model.get_input_embeddings().weight.shape == (128, 32) and model.get_output_embeddings().weight.shape == (128, 32)
