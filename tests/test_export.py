"""Save / load of compressed models: bit-identical logits, Auto classes, and errors naming the file."""

import json
import os

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from transformers import AutoModel, AutoModelForCausalLM

import kronlm
from kronlm import CompressionConfig, KroneckerTarget
from kronlm.layers import KroneckerEmbedding, KroneckerLinear, KroneckerTiedLMHead

GPT2_CFG = CompressionConfig(
    targets=[
        KroneckerTarget(["**.wte"], b_shape=(1, 2)),
        KroneckerTarget(["**.h.*.mlp.c_fc"], b_shape=(2, 1), rank=2, learnable_scales=True, init="van_loan_rescaled"),
        KroneckerTarget(["**.h.*.mlp.c_proj"], b_shape=(1, 2), init="pruning"),
    ]
)
LLAMA_CFG = CompressionConfig(targets=[KroneckerTarget(["**.mlp.gate_proj", "**.mlp.up_proj"], b_shape=(2, 1)), KroneckerTarget(["**.mlp.down_proj"], b_shape=(1, 2))])


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("builder,cfg", [(tiny_gpt2, GPT2_CFG), (tiny_llama, LLAMA_CFG)])
def test_causal_lm_round_trip_is_bit_identical(tmp_path, builder, cfg):
    model = builder()
    dense_bytes_dir = tmp_path / "dense"
    model.save_pretrained(dense_bytes_dir)
    kronlm.compress(model, cfg, progress=False)
    ids = torch.randint(0, 96, (2, 12))
    ref = _logits(model, ids)
    out = kronlm.save(model, tmp_path / "k")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "configuration_kronlm.py", "generation_config.json", "kronlm_compression.json", "kronlm_layers.py",
        "kronlm_manifest.json", "model.safetensors", "modeling_kronlm.py",
    ]
    assert os.path.getsize(out / "model.safetensors") < os.path.getsize(dense_bytes_dir / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["model_type"].startswith("kronecker_")

    loaded = kronlm.load(out)
    assert type(loaded).__name__.startswith("Kronecker")
    assert torch.equal(_logits(loaded, ids), ref)
    auto = AutoModelForCausalLM.from_pretrained(out)
    assert type(auto) is type(loaded) and torch.equal(_logits(auto.eval(), ids), ref)
    assert any(isinstance(m, KroneckerLinear) for m in auto.modules())


def test_tied_kronecker_head_survives_reload(tmp_path):
    model = tiny_gpt2()
    kronlm.compress(model, GPT2_CFG, progress=False)
    kronlm.save(model, tmp_path / "k")
    loaded = kronlm.load(tmp_path / "k")
    head, emb = loaded.get_output_embeddings(), loaded.get_input_embeddings()
    assert isinstance(emb, KroneckerEmbedding) and isinstance(head, KroneckerTiedLMHead) and head.embedding is emb
    assert loaded.transformer.h[0].mlp.c_fc.scales.shape == (2,)


def test_base_model_loads_from_causal_lm_folder(tmp_path):
    model = tiny_llama()
    kronlm.compress(model, LLAMA_CFG, progress=False)
    kronlm.save(model, tmp_path / "k")
    base = AutoModel.from_pretrained(tmp_path / "k")
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        assert torch.equal(base(ids).last_hidden_state, model.model(ids).last_hidden_state)


def test_bert_encoder_round_trip(tmp_path):
    model = tiny_bert()
    kronlm.compress(model, kronlm.CompressionConfig(targets=[KroneckerTarget(["**.word_embeddings"], b_shape=(1, 4)), KroneckerTarget(["**.intermediate.dense"], b_shape=(2, 1))]), progress=False)
    kronlm.save(model, tmp_path / "b")
    loaded = kronlm.load(tmp_path / "b")
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, model(ids).last_hidden_state)


@pytest.fixture
def saved(tmp_path):
    model = tiny_llama()
    kronlm.compress(model, LLAMA_CFG, progress=False)
    return kronlm.save(model, tmp_path / "k")


def test_missing_weights_are_named(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        kronlm.load(saved)
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_missing_config_is_named(saved):
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        kronlm.load(saved)


def test_truncated_weights_are_named(saved):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated"):
        kronlm.load(saved)
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_inconsistent_config_is_named(saved):
    cfg_path = saved / "config.json"
    cfg = json.loads(cfg_path.read_text())
    entry = cfg["kronlm"]["modules"]["model.layers.0.mlp.gate_proj"]
    entry["a_shape"], entry["b_shape"] = [24, 16], [2, 2]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: .* when the model was saved"):
        kronlm.load(saved)
    (saved / "kronlm_manifest.json").unlink()  # without the manifest, the tensor check still names it
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.gate_proj\.A has shape \(1, 24, 32\), the config needs \(1, 24, 16\)"):
        kronlm.load(saved)


def test_corrupt_config_json_is_named(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        kronlm.load(saved)


def test_missing_tensor_is_named(saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(saved / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.B"]
    save_file(tensors, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors: .* bytes, but .* when the model was saved"):
        AutoModelForCausalLM.from_pretrained(saved)
    (saved / "kronlm_manifest.json").unlink()  # without the manifest, the tensor check still names it
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.B .* is missing"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_save_is_atomic(tmp_path, saved, monkeypatch):
    model = kronlm.load(saved)
    before = (saved / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        kronlm.save(model, saved)
    assert (saved / "model.safetensors").read_bytes() == before
    assert [p.name for p in saved.parent.iterdir() if p.name.startswith(".")] == []


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    # Temporary files are created private (0600); the finished file or folder must not stay so.
    import os
    import stat

    from kronlm.utils.atomic import atomic_dir, write_json

    umask = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "f.txt").write_text("x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755
