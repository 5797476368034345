"""`kronlm merge`: a compressed folder back to a plain dense model any tool loads, and a GGUF file
that gguf reads back and llama.cpp runs with the same logits."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from transformers import GPT2LMHeadModel, LlamaForCausalLM, PreTrainedTokenizerFast

import kronlm
from kronlm import CompressionConfig, KroneckerTarget
from kronlm.cli import main
from kronlm.export.gguf_writer import export_gguf, permute_rope_rows, read_gguf_tensors

LLAMA_CFG = CompressionConfig(
    targets=[
        KroneckerTarget(["**.embed_tokens"], b_shape=(1, 2)),
        KroneckerTarget(["**.mlp.gate_proj", "**.mlp.up_proj"], b_shape=(2, 1), rank=2, learnable_scales=True),
        KroneckerTarget(["**.mlp.down_proj"], b_shape=(1, 2)),
    ]
)
GPT2_CFG = CompressionConfig(targets=[KroneckerTarget(["**.mlp.c_fc"], b_shape=(2, 1)), KroneckerTarget(["**.mlp.c_proj"], b_shape=(1, 2))])
VOCAB = 320  # byte-level BPE: 256 bytes, a few merges, one special token


@pytest.fixture(scope="module")
def bpe_tokenizer():
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20, "kronecker products are neat"], vocab_size=300,
                            min_frequency=1, special_tokens=["<|endoftext|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def _perturbed(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("builder,cfg,dense_cls", [(tiny_llama, LLAMA_CFG, LlamaForCausalLM), (tiny_gpt2, GPT2_CFG, GPT2LMHeadModel)])
def test_cli_merge_writes_a_plain_model(tmp_path, capsys, bpe_tokenizer, builder, cfg, dense_cls):
    model = _perturbed(kronlm.compress(builder(vocab_size=VOCAB), cfg, progress=False))
    kronlm.save(model, tmp_path / "k", tokenizer=bpe_tokenizer)
    assert main(["merge", str(tmp_path / "k"), "--out", str(tmp_path / "dense")]) == 0
    assert "max |logits difference|" in capsys.readouterr().out
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert config["architectures"] == [dense_cls.__name__] and "kronlm" not in config and "auto_map" not in config
    assert not any(p.suffix == ".py" for p in (tmp_path / "dense").iterdir())
    dense = dense_cls.from_pretrained(tmp_path / "dense").eval()  # transformers alone, no kronlm class involved
    assert type(dense) is dense_cls
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(dense, ids), _logits(model, ids), rtol=0, atol=2e-5)
    assert PreTrainedTokenizerFast.from_pretrained(tmp_path / "dense")("the fox")["input_ids"] == bpe_tokenizer("the fox")["input_ids"]


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_gguf_holds_the_merged_weights(tmp_path, bpe_tokenizer, dtype):
    import gguf

    model = _perturbed(kronlm.compress(tiny_llama(vocab_size=VOCAB), LLAMA_CFG, progress=False))
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=bpe_tokenizer, dtype=dtype)
    dense = kronlm.merge_and_unload(model)
    tensors = read_gguf_tensors(path)
    cfg = dense.config
    assert len(tensors) == 2 + 9 * cfg.num_hidden_layers  # embedding, final norm, 9 per block; the tied head is not stored
    tol = 0 if dtype == "f32" else 2e-3
    expected = {
        "token_embd.weight": dense.model.embed_tokens.weight,
        "blk.1.ffn_gate.weight": dense.model.layers[1].mlp.gate_proj.weight,
        "blk.2.ffn_down.weight": dense.model.layers[2].mlp.down_proj.weight,
        "blk.0.attn_q.weight": permute_rope_rows(dense.model.layers[0].self_attn.q_proj.weight, cfg.num_attention_heads),
        "blk.0.attn_k.weight": permute_rope_rows(dense.model.layers[0].self_attn.k_proj.weight, cfg.num_key_value_heads),
        "output_norm.weight": dense.model.norm.weight,
    }
    for name, weight in expected.items():
        np.testing.assert_allclose(tensors[name].astype(np.float32), weight.detach().numpy(), rtol=0, atol=tol, err_msg=name)
    assert tensors["output_norm.weight"].dtype == np.float32  # norms stay f32, as llama.cpp's converter writes them
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items() if name.startswith(("llama.", "tokenizer.ggml.model", "general.architecture"))}
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["llama.block_count"] == 3 and fields["llama.attention.head_count_kv"] == 2 and fields["llama.vocab_size"] == VOCAB
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == VOCAB


def test_permute_rope_rows_matches_the_interleaved_pairs():
    # Head of dim 4: HF pairs rows (0, 2) and (1, 3); GGML wants them adjacent: 0, 2, 1, 3.
    w = torch.arange(8.0).reshape(8, 1)
    assert permute_rope_rows(w, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
@pytest.mark.parametrize("builder,cfg", [(tiny_llama, LLAMA_CFG), (tiny_gpt2, GPT2_CFG)])
def test_llama_cpp_runs_the_gguf_with_the_same_logits(tmp_path, bpe_tokenizer, builder, cfg):
    import llama_cpp

    model = _perturbed(kronlm.compress(builder(vocab_size=VOCAB), cfg, progress=False))
    kronlm.save(model, tmp_path / "k", tokenizer=bpe_tokenizer)
    assert main(["merge", str(tmp_path / "k"), "--gguf", str(tmp_path / "m.gguf"), "--gguf-dtype", "f32"]) == 0
    ids = bpe_tokenizer("the quick brown fox jumps")["input_ids"]
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    try:
        assert llm.tokenize(b"the quick brown fox jumps", add_bos=False) == ids  # llama.cpp reads the vocabulary and merges
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    ref = _logits(model, torch.tensor([ids]))[0].numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=5e-4)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_merge_cli_errors(tmp_path, capsys):
    kronlm.save(kronlm.compress(tiny_llama(), LLAMA_CFG, progress=False), tmp_path / "k")
    assert main(["merge", str(tmp_path / "k")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "k"), "--gguf", str(tmp_path / "m.gguf")]) == 1  # no tokenizer saved
    assert "needs the model's tokenizer" in capsys.readouterr().err
