"""PEFT LoRA on Kronecker layers: adapters train, save, reload bit-identically and merge into a dense model."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from transformers import LlamaForCausalLM

import kronlm
from kronlm import CompressionConfig, KroneckerTarget
from kronlm.layers import KroneckerLinear

peft = pytest.importorskip("peft")
adapters = pytest.importorskip("kronlm.modeling.adapters")

CFG = CompressionConfig(
    targets=[
        KroneckerTarget(["**.mlp.gate_proj", "**.mlp.up_proj"], b_shape=(2, 1), rank=2, learnable_scales=True),
        KroneckerTarget(["**.mlp.down_proj"], b_shape=(1, 2)),
    ]
)
MLP = ["gate_proj", "up_proj", "down_proj"]


def _batch():
    return torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))


def _train(model, steps=25, lr=1e-2):
    ids = _batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def test_plain_peft_refuses_kronecker_layers_and_the_helper_fixes_it():
    model = kronlm.compress(tiny_llama(), CFG, progress=False)
    with pytest.raises(ValueError, match="KroneckerLinear"):
        peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=MLP))
    model = kronlm.compress(tiny_llama(), CFG, progress=False)
    config = adapters.register_kronecker_modules(peft.LoraConfig(r=4, target_modules=MLP))
    wrapped = peft.get_peft_model(model, config)  # PEFT's own entry point, with the registration
    assert sum(isinstance(m, adapters.KroneckerLoraLinear) for m in wrapped.modules()) == 9


def test_lora_on_kronecker_mlp_trains_saves_and_reloads(tmp_path):
    model = kronlm.compress(tiny_llama(), CFG, progress=False)
    kronlm.save(model, tmp_path / "k")
    factors_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = adapters.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=MLP))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 9  # lora_A and lora_B of 3 MLP projections in 3 layers
    losses = _train(peft_model)
    assert losses[-1] < losses[0] - 0.2, losses
    base_params = dict(peft_model.get_base_model().named_parameters())
    for name, before in factors_before.items():  # the Kronecker factors stay frozen
        if "mlp" in name:
            head, _, leaf = name.rpartition(".")
            assert torch.equal(base_params[f"{head}.base_layer.{leaf}"], before), name
    ids = _batch()
    with torch.no_grad():
        ref = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = adapters.load_adapter(kronlm.load(tmp_path / "k"), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, ref)

    # Merge: PEFT's own merge refuses (a dense update is no Kronecker product), kronlm's gives the dense model.
    with pytest.raises(ValueError, match="kronlm.merge_and_unload"):
        reloaded.merge_and_unload()
    dense = kronlm.merge_and_unload(reloaded)
    assert type(dense) is LlamaForCausalLM and not any(isinstance(m, KroneckerLinear) for m in dense.modules())
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, ref, rtol=0, atol=2e-5)
        assert not torch.allclose(kronlm.merge_and_unload(kronlm.load(tmp_path / "k"))(ids).logits, ref, atol=1e-3)  # the adapter counts


def test_all_linear_includes_kronecker_layers_but_not_the_head():
    model = kronlm.compress(tiny_llama(), CFG, progress=False)
    peft_model = adapters.get_peft_model(model, peft.LoraConfig(r=2, target_modules="all-linear"))
    adapted = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and n.count(".") > 2}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert sum(isinstance(m, adapters.KroneckerLoraLinear) for m in peft_model.modules()) == 9
    assert not hasattr(peft_model.get_base_model().lm_head, "lora_A")


def test_lora_on_gpt2_mixes_kronecker_and_conv1d_layers():
    model = kronlm.compress(tiny_gpt2(), CompressionConfig(targets=[KroneckerTarget(["**.mlp.c_fc"], b_shape=(2, 1))]), progress=False)
    peft_model = adapters.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["c_fc", "c_attn"], fan_in_fan_out=False))
    _train(peft_model, steps=3)
    ids = _batch()
    with torch.no_grad():
        torch.testing.assert_close(kronlm.merge_and_unload(peft_model)(ids).logits, peft_model(ids).logits, rtol=0, atol=2e-5)


def test_ia3_is_refused_with_a_reason():
    with pytest.raises(TypeError, match="LoRA only"):
        adapters.register_kronecker_modules(peft.IA3Config(target_modules=MLP, feedforward_modules=["down_proj"]))
