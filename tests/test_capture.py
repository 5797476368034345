"""kronlm.distill.capture.trace on tiny GPT-2, BERT and Llama (grouped-query) models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kronlm.distill.capture import ModelTrace, is_causal_model, trace

ALL_NEEDS = {"logits", "embeddings", "hidden", "attention_scores", "attention_probs", "last_hidden"}
VOCAB = 97


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=3, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertModel(config).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


FAMILIES = {
    # name: (builder, left padding?, final norm getter or None, causal)
    "gpt2": (tiny_gpt2, False, lambda m: m.transformer.ln_f, True),
    "bert": (tiny_bert, False, None, False),
    "llama": (tiny_llama, True, lambda m: m.model.norm, True),
}


def make_batch(left_pad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.long)
    if left_pad:
        mask[1, :2] = 0
    else:
        mask[1, 4:] = 0
    return ids, mask


def additive_mask(mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """(batch, seq) 0/1 -> (batch, 1, seq, seq) additive float mask, built independently of transformers."""
    T = mask.shape[1]
    allowed = mask.bool()[:, None, None, :].expand(-1, 1, T, T)
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool).tril()
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trace_matches_transformers_outputs(family):
    build, left_pad, final_norm, causal = FAMILIES[family]
    model = build()
    ids, mask = make_batch(left_pad)
    tr = trace(model, ids, mask, need=ALL_NEEDS)
    n_layers = model.config.num_hidden_layers
    n_heads = model.config.num_attention_heads

    # The model is left as it was.
    assert model.config._attn_implementation == "sdpa"
    assert "tie_last_hidden_states" not in vars(model.config)

    assert tr.is_causal is causal
    assert len(tr.hidden_states) == len(tr.attention_scores) == len(tr.attention_probs) == n_layers
    for scores, probs in zip(tr.attention_scores, tr.attention_probs):
        assert scores.shape == probs.shape == (2, n_heads, 6, 6)
        # probs = softmax(scores + mask) on real query rows (a fully padded row is left undefined).
        expected = torch.softmax(scores + additive_mask(mask, causal), dim=-1)
        rows = mask.bool()[:, None, :].expand(-1, n_heads, -1)
        torch.testing.assert_close(probs[rows], expected[rows], rtol=1e-6, atol=1e-7)
        assert torch.isfinite(scores).all()

    ref_model = copy.deepcopy(model)
    ref_model.config._attn_implementation = "eager"
    with torch.no_grad():
        ref = ref_model(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    for probs, ref_probs in zip(tr.attention_probs, ref.attentions):
        torch.testing.assert_close(probs, ref_probs, rtol=1e-6, atol=1e-7)

    # hidden_states from transformers: (embeddings, block 0 .. block L-2 outputs, final-normed last).
    assert len(ref.hidden_states) == n_layers + 1
    torch.testing.assert_close(tr.embeddings, ref.hidden_states[0], rtol=0, atol=0)
    for l in range(n_layers - 1):
        torch.testing.assert_close(tr.hidden_states[l], ref.hidden_states[l + 1], rtol=1e-6, atol=1e-6)
    last_block = tr.hidden_states[-1]
    if final_norm is not None:
        # The trace keeps the raw last block output; transformers reports it after the final norm.
        assert not torch.allclose(last_block, ref.hidden_states[-1], atol=1e-3)
        last_block = final_norm(model)(last_block)
    torch.testing.assert_close(last_block, ref.hidden_states[-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tr.last_hidden, ref.hidden_states[-1], rtol=1e-5, atol=1e-5)
    if family == "bert":
        assert tr.logits is None
        torch.testing.assert_close(tr.last_hidden, ref.last_hidden_state, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(tr.logits, ref.logits, rtol=1e-5, atol=1e-5)


class MatmulProjection(nn.Module):
    """A stand-in for a compressed linear map: same call signature (..., in) -> (..., out), not nn.Linear."""

    def __init__(self, n_in: int, n_out: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(n_out, n_in, generator=g) * 0.3)
        self.bias = nn.Parameter(torch.randn(n_out, generator=g) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...i,oi->...o", x, self.weight) + self.bias


def test_gpt2_scores_equal_hand_computed_qk_with_replaced_projection():
    model = tiny_gpt2()
    # Replace the Conv1D c_attn of block 1 by a custom module with other weights.
    model.transformer.h[1].attn.c_attn = MatmulProjection(32, 96, seed=3)
    ids, mask = make_batch(False)
    tr = trace(model, ids, mask, need={"hidden", "attention_scores"})
    block = model.transformer.h[1]
    with torch.no_grad():
        x = block.ln_1(tr.hidden_states[0])  # block 1 input = block 0 output
        q, k, _ = block.attn.c_attn(x).split(32, dim=-1)
    q = q.view(2, 6, 4, 8).transpose(1, 2)
    k = k.view(2, 6, 4, 8).transpose(1, 2)
    expected = q @ k.transpose(-1, -2) / math.sqrt(8)
    torch.testing.assert_close(tr.attention_scores[1], expected, rtol=1e-5, atol=1e-6)


def test_bert_scores_equal_hand_computed_qk():
    model = tiny_bert()
    ids, mask = make_batch(False)
    tr = trace(model, ids, mask, need={"embeddings", "attention_scores"})
    attn = model.encoder.layer[0].attention.self
    with torch.no_grad():
        q = attn.query(tr.embeddings).view(2, 6, 4, 8).transpose(1, 2)
        k = attn.key(tr.embeddings).view(2, 6, 4, 8).transpose(1, 2)
    torch.testing.assert_close(tr.attention_scores[0], q @ k.transpose(-1, -2) / math.sqrt(8), rtol=1e-5, atol=1e-6)


def test_llama_grouped_query_scores_equal_hand_computed_qk():
    model = tiny_llama()
    ids, mask = make_batch(True)
    tr = trace(model, ids, mask, need={"embeddings", "attention_scores"})
    layer = model.model.layers[0]
    with torch.no_grad():
        x = layer.input_layernorm(tr.embeddings)
        q = layer.self_attn.q_proj(x).view(2, 6, 4, 8).transpose(1, 2)
        k = layer.self_attn.k_proj(x).view(2, 6, 2, 8).transpose(1, 2)
        cos, sin = model.model.rotary_emb(x, position_ids=torch.arange(6)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    # Query heads 0, 1 share K/V head 0; heads 2, 3 share K/V head 1.
    expected = torch.stack([q[:, h] @ k[:, h // 2].transpose(-1, -2) for h in range(4)], dim=1) / math.sqrt(8)
    assert tr.attention_scores[0].shape == (2, 4, 6, 6)
    torch.testing.assert_close(tr.attention_scores[0], expected, rtol=1e-5, atol=1e-6)


def test_only_requested_items_are_filled():
    model = tiny_gpt2()
    ids, mask = make_batch(False)
    tr = trace(model, ids, mask, need={"logits"})
    assert isinstance(tr, ModelTrace)
    assert tr.logits.shape == (2, 6, VOCAB)
    assert tr.embeddings is tr.hidden_states is tr.attention_scores is tr.attention_probs is tr.last_hidden is None
    tr = trace(model, ids, mask, need={"attention_probs"})
    assert tr.attention_scores is None and len(tr.attention_probs) == 3 and tr.logits is None


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_a_trace_keeps_only_the_attention_it_was_asked_for(family, monkeypatch):
    import weakref

    softmax, made = torch.nn.functional.softmax, []

    def recorded_softmax(*args, **kwargs):
        out = softmax(*args, **kwargs)
        made.append(weakref.ref(out))
        return out

    monkeypatch.setattr(torch.nn.functional, "softmax", recorded_softmax)
    model = FAMILIES[family][0]()
    ids, mask = make_batch(FAMILIES[family][1])
    alive_at_end = []
    # After the last layer, before the forward returns: which layers' probabilities are still held.
    last = model.encoder.layer[-1] if family == "bert" else model.model.layers[-1]
    last.register_forward_hook(lambda *_: alive_at_end.append(sum(ref() is not None for ref in made)))
    with torch.no_grad():
        tr = trace(model, ids, mask, need={"attention_scores"})
        # A teacher traced for its scores does not hold every layer's (batch, heads, seq, seq)
        # probabilities through its forward: at most the last layer's is alive at its end.
        assert len(made) == 2 and len(tr.attention_scores) == 2 and alive_at_end[0] <= 1
        made.clear()
        tr = trace(model, ids, mask, need={"attention_scores", "attention_probs"})
        assert alive_at_end[1] == 2 and [ref() for ref in made] == [p for p in tr.attention_probs]


def test_gradients_flow_through_captured_tensors():
    model = tiny_gpt2().train()
    ids, mask = make_batch(False)
    tr = trace(model, ids, mask, need={"attention_scores", "hidden", "last_hidden"})
    (tr.attention_scores[0].pow(2).sum() + tr.hidden_states[1].sum() + tr.last_hidden.sum()).backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0
    assert model.transformer.ln_f.weight.grad.abs().sum() > 0


class FakeWrapper(nn.Module):
    """Mimics DDP / accelerate: the real model is `.module`, calls go through the wrapper."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


def test_wrapped_model_runs_through_the_wrapper():
    model = tiny_llama()
    ids, mask = make_batch(True)
    direct = trace(model, ids, mask, need=ALL_NEEDS)
    wrapper = FakeWrapper(model)
    wrapped = trace(wrapper, ids, mask, need=ALL_NEEDS)
    assert wrapper.calls == 1
    assert wrapped.is_causal
    torch.testing.assert_close(wrapped.logits, direct.logits, rtol=0, atol=0)
    for a, b in zip(wrapped.attention_scores, direct.attention_scores):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_real_ddp_wrapper(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = tiny_gpt2().train()
        reference = copy.deepcopy(model)
        ddp = DistributedDataParallel(model)
        ids, mask = make_batch(False)
        tr = trace(ddp, ids, mask, need={"logits", "attention_scores"})
        (tr.logits.logsumexp(-1).mean() + tr.attention_scores[2].pow(2).mean()).backward()
        ref = trace(reference, ids, mask, need={"logits", "attention_scores"})
        (ref.logits.logsumexp(-1).mean() + ref.attention_scores[2].pow(2).mean()).backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    finally:
        dist.destroy_process_group()


def test_sequence_classifier_logits_and_encoder_causality():
    torch.manual_seed(0)
    config = BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=16, num_labels=3,
    )
    model = BertForSequenceClassification(config).eval()
    ids, mask = make_batch(False)
    tr = trace(model, ids, mask, need={"logits", "last_hidden", "attention_probs"},
               model_kwargs={"token_type_ids": torch.zeros_like(ids)})
    assert tr.logits.shape == (2, 3)
    assert tr.last_hidden.shape == (2, 6, 32)
    assert not tr.is_causal and not is_causal_model(model)
    assert is_causal_model(tiny_gpt2()) and is_causal_model(FakeWrapper(tiny_llama()))


def test_errors():
    model = tiny_gpt2()
    ids, mask = make_batch(False)
    with pytest.raises(ValueError, match=r"unknown items \['scores'\]"):
        trace(model, ids, mask, need={"scores"})
    with pytest.raises(TypeError, match="Linear"):
        trace(nn.Linear(2, 2), ids, mask, need={"logits"})
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\)"):
        trace(model, ids, mask[:, :5], need={"logits"})
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq\)"):
        trace(model, ids[0], None, need={"logits"})
    model.activation_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        trace(model, ids, mask, need={"attention_probs"})
    # Hidden states are fine with checkpointing, and the config is restored after an error.
    assert model.config._attn_implementation == "sdpa"
    assert len(trace(model, ids, mask, need={"hidden"}).hidden_states) == 3
