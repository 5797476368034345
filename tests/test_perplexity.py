"""Perplexity protocols against one-token-at-a-time references on tiny random GPT-2 models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from shared_paths import GPT2_TOKENIZER_DIR
from transformers import GPT2Config, GPT2LMHeadModel

from kronlm.evaluation.perplexity import (
    PerplexityResult,
    perplexity,
    perplexity_of_text,
    plan_windows,
)

VOCAB = 97
POSITIONS = 64


def tiny_gpt2(dtype=torch.float64, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=POSITIONS,
        bos_token_id=0, eos_token_id=0, **overrides,
    )
    return GPT2LMHeadModel(config).to(dtype).eval()


@pytest.fixture(scope="module")
def model() -> GPT2LMHeadModel:
    return tiny_gpt2()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (70,), generator=generator)


def nll_of_last(model, contexts: list[torch.Tensor]) -> list[float]:
    """NLL (nats) of each context[-1] given context[:-1].

    Every context is its own row, run from position 0 and right-padded to the longest: with causal
    attention the padding after a row's last real token cannot change that token's logits, so each
    row equals a model call on exactly its context (one call instead of one per token).
    """
    width = max(len(c) for c in contexts) - 1
    batch = torch.zeros(len(contexts), width, dtype=torch.long)
    for row, context in enumerate(contexts):
        batch[row, : len(context) - 1] = context[:-1]
    with torch.no_grad():
        logits = model(input_ids=batch).logits.double()
    return [
        -torch.log_softmax(logits[row, len(context) - 2], dim=-1)[context[-1]].item()
        for row, context in enumerate(contexts)
    ]


def sliding_reference(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """(summed NLL, tokens scored) with every token scored once from its own context.

    In the HF guide's scheme token t belongs to the first window that reaches past it: the smallest k
    with min(k * stride + max_length, n) > t; its context is that window's tokens before it.
    Tokens at the very start of their window have no context and are skipped.
    """
    n = len(ids)
    contexts = []
    for t in range(1, n):
        k = 0
        while min(k * stride + max_length, n) <= t:
            k += 1
        begin = k * stride
        if begin < t:
            contexts.append(ids[begin : t + 1])
    return sum(nll_of_last(model, contexts)), len(contexts)


@pytest.mark.parametrize("max_length,stride", [(16, 16), (16, 8), (16, 5), (7, 3), (16, 15)])
def test_sliding_matches_token_by_token_reference(model, tokens, max_length, stride):
    total, count = sliding_reference(model, tokens, max_length, stride)
    result = perplexity(model, tokens, max_length=max_length, stride=stride, progress=False)
    assert result.tokens_scored == count
    assert result.nll == pytest.approx(total, rel=1e-10)
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-10)


def test_sliding_when_text_fits_one_window(model, tokens):
    ids = tokens[:10]
    total = sum(nll_of_last(model, [ids[: t + 1] for t in range(1, 10)]))
    result = perplexity(model, ids, max_length=16, stride=8, progress=False)
    assert (result.windows, result.tokens_scored) == (1, 9)
    assert result.ppl == pytest.approx(math.exp(total / 9), rel=1e-10)


@pytest.mark.parametrize(
    # Window counts by hand for n = 70: windows begin at 0, s, 2s, ... up to the first k with
    # k*s + L >= 70. L=16, s=8: k=7 -> 8 windows. s=5: k=11 -> 12. s=16: k=4 -> 5 windows, and as
    # they do not overlap each window's first token is unscored: 70 - 5 = 65.
    "max_length,stride,windows,scored",
    [(16, 8, 8, 69), (16, 5, 12, 69), (16, 16, 5, 65), (64, 32, 2, 69), (64, 64, 2, 68)],
)
def test_window_count_and_tokens_scored(model, tokens, max_length, stride, windows, scored):
    result = perplexity(model, tokens, max_length=max_length, stride=stride, progress=False)
    assert (result.windows, result.tokens_scored) == (windows, scored)
    planned = plan_windows(len(tokens), max_length, stride)
    assert sum(w.scored for w in planned) == scored
    assert planned[-1].end == len(tokens)


def test_default_stride_is_512_capped_at_max_length(model, tokens):
    assert perplexity(model, tokens, max_length=16, progress=False).stride == 16
    assert plan_windows(2000, 1024) == plan_windows(2000, 1024, 512)


def test_disjoint_is_exp_of_mean_window_mean(model, tokens):
    # 70 tokens, max_length 16: four full windows; the 6 trailing tokens are dropped.
    window_means = []
    for k in range(4):
        window = tokens[16 * k : 16 * (k + 1)]
        with torch.no_grad():
            logits = model(input_ids=window[None]).logits[0].double()
        window_means.append(F.cross_entropy(logits[:-1], window[1:]).item())
    result = perplexity(model, tokens, max_length=16, protocol="disjoint", progress=False)
    assert (result.windows, result.tokens_scored, result.stride) == (4, 60, 16)
    assert result.ppl == pytest.approx(math.exp(sum(window_means) / 4), rel=1e-10)
    assert result.nll == pytest.approx(15 * sum(window_means), rel=1e-10)
    # A sliding stride passed along (the CLI passes one for both protocols) changes nothing.
    with_stride = perplexity(model, tokens, max_length=16, stride=5, protocol="disjoint", progress=False)
    assert (with_stride.ppl, with_stride.stride, with_stride.windows) == (result.ppl, 16, 4)


def test_disjoint_keeps_a_partial_window_when_it_is_the_only_one(model, tokens):
    ids = tokens[:10]
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0].double()
    mean = F.cross_entropy(logits[:-1], ids[1:]).item()
    result = perplexity(model, ids, max_length=16, protocol="disjoint", progress=False)
    assert (result.windows, result.tokens_scored) == (1, 9)
    assert result.ppl == pytest.approx(math.exp(mean), rel=1e-10)


@pytest.mark.parametrize("protocol,stride", [("sliding", 5), ("sliding", 16), ("disjoint", None)])
@pytest.mark.parametrize("batch_size", [2, 3])
def test_batched_equals_one_window_at_a_time(model, tokens, protocol, stride, batch_size):
    one = perplexity(model, tokens, max_length=16, stride=stride, protocol=protocol, progress=False)
    many = perplexity(
        model, tokens, max_length=16, stride=stride, protocol=protocol, batch_size=batch_size, progress=False
    )
    assert (many.windows, many.tokens_scored) == (one.windows, one.tokens_scored)
    assert many.nll == pytest.approx(one.nll, rel=1e-12)
    assert many.ppl == pytest.approx(one.ppl, rel=1e-12)


def test_batched_float32_model_within_float_tolerance(tokens):
    model32 = tiny_gpt2(torch.float32)
    one = perplexity(model32, tokens, max_length=16, stride=5, progress=False)
    many = perplexity(model32, tokens, max_length=16, stride=5, batch_size=4, progress=False)
    assert many.ppl == pytest.approx(one.ppl, rel=1e-5)


class FullLogitsOnly(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep``: every position's logits come back."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids, use_cache=False):
        return self.inner(input_ids=input_ids, use_cache=use_cache)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_models_without_logits_to_keep(model, tokens, batch_size):
    total, count = sliding_reference(model, tokens, 16, 5)
    wrapper = FullLogitsOnly(model)  # wrapper in training mode, the shared model in eval mode
    result = perplexity(wrapper, tokens, max_length=16, stride=5, batch_size=batch_size, progress=False)
    assert wrapper.training and not model.training
    assert result.tokens_scored == count
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-10)


def test_runs_in_eval_mode_and_restores_training_flag(tokens):
    model = tiny_gpt2(resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    total, count = sliding_reference(model, tokens, 16, 8)  # model is in eval mode here
    model.train()
    model.transformer.h[0].eval()  # a mixed state must come back as it was
    result = perplexity(model, tokens, max_length=16, stride=8, progress=False)
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-10)
    assert model.training and model.transformer.h[1].attn.training
    assert not model.transformer.h[0].training and not model.transformer.h[0].attn.training


def test_result_record(model, tokens):
    result = perplexity(model, tokens, max_length=16, stride=8, progress=False)
    record = json.loads(json.dumps(result.to_dict()))
    assert record["protocol"] == "sliding" and record["max_length"] == 16 and record["stride"] == 8
    assert record["tokens_per_second"] == pytest.approx(result.tokens_scored / result.seconds)
    assert "sliding" in str(result) and f"{result.ppl:.4f}" in str(result)
    assert isinstance(result, PerplexityResult)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"max_length": 1}, "max_length is 1"),
        ({"max_length": 16, "stride": 0}, "stride is 0"),
        ({"max_length": 16, "stride": 17}, "stride is 17.*max_length \\(16\\)"),
        ({"max_length": 65}, "max_length is 65.*64 positions"),
        ({"max_length": 16, "protocol": "nope"}, "unknown perplexity protocol 'nope'"),
        ({"max_length": 16, "batch_size": 0}, "batch_size is 0"),
    ],
)
def test_bad_arguments(model, tokens, kwargs, match):
    with pytest.raises(ValueError, match=match):
        perplexity(model, tokens, progress=False, **kwargs)


def test_bad_inputs(model, tokens):
    with pytest.raises(ValueError, match="at least 2 tokens, got 1"):
        perplexity(model, tokens[:1], max_length=16, progress=False)
    with pytest.raises(ValueError, match=r"1-D integer tensor.*\(1, 70\)"):
        perplexity(model, tokens[None], max_length=16, progress=False)
    with pytest.raises(ValueError, match=f"token id {VOCAB} is outside the model's vocabulary of {VOCAB}"):
        perplexity(model, torch.tensor([1, 2, VOCAB]), max_length=16, progress=False)
    with pytest.raises(ValueError, match="token id -1 is negative"):
        perplexity(model, torch.tensor([1, -1, 2]), max_length=16, progress=False)
    with pytest.raises(ValueError, match="max_tokens is 1"):
        perplexity_of_text(model, None, "text", max_tokens=1)


# The GPT-2 BPE files sit in ../shared/tokenizers/gpt2, beside the data folder.
GPT2_TOKENIZER = GPT2_TOKENIZER_DIR or Path("missing")


@pytest.mark.skipif(not (GPT2_TOKENIZER / "vocab.json").is_file(), reason="GPT-2 tokenizer files not present")
def test_perplexity_of_text_cuts_tokens_not_text():
    from transformers import GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast.from_pretrained(str(GPT2_TOKENIZER))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64)).double().eval()
    text = "Hello world. " * 40
    ids = torch.tensor(tokenizer(text)["input_ids"])
    assert ids[0].item() == 15496  # "Hello": GPT-2 prepends no BOS token
    result = perplexity_of_text(model, tokenizer, text, max_tokens=50, max_length=32, stride=16, progress=False)
    total, count = sliding_reference(model, ids[:50], 32, 16)
    assert result.tokens_scored == count == 49
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-10)


# The dense SmolLM2 reference (20.16 on the first 4,096 WikiText-2 test tokens) is checked in
# tests/test_smollm2.py, which loads the model once for all real-model checks.
