"""Shared test setup: offline hub, one intra-op thread for tiny models, tiny model builders."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from shared_paths import SHARED_DATA

# Library code looks for local copies of public data only where it is told: point it at the
# repository's example data, as `--data-dir`'s default does for the command line.
if SHARED_DATA is not None:
    os.environ.setdefault("KRONLM_DATA_DIR", str(SHARED_DATA))

import pytest
import torch

# Tiny models run fastest on one thread, and two test processes never fight over the cores.
torch.set_num_threads(1)


@pytest.fixture
def all_threads():
    """Use every core for a test on a real model; restores one thread afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(old)


def rule_ids(n: int, seed: int, length: int = 16) -> torch.Tensor:
    """(n, length) token ids of a fixed rule (x_t+1 = 5 x_t + 3 mod 96) from random starts: text a
    tiny teacher can learn, so that compressing it costs perplexity."""
    start = torch.randint(0, 96, (n, 1), generator=torch.Generator().manual_seed(seed))
    out = [start]
    for _ in range(length - 1):
        out.append((out[-1] * 5 + 3) % 96)
    return torch.cat(out, dim=1)


def tiny_gpt2(seed: int = 0, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = dict(vocab_size=96, n_positions=64, n_embd=32, n_layer=4, n_head=4, n_inner=64)
    cfg.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def rule_trained_llama():
    """A tiny Llama (2 blocks, hidden 48) trained for 40 Adam steps on ``rule_ids``, so that
    compressing it costs NLL and allocations can be told apart by measurement."""
    model = tiny_llama(1, hidden_size=48, intermediate_size=96, num_hidden_layers=2)
    ids = rule_ids(64, 0, length=24)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    return model.eval()


def tiny_bert(seed: int = 0, cls_name: str = "BertModel", **overrides):
    import transformers

    torch.manual_seed(seed)
    cfg = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    cfg.update(overrides)
    return getattr(transformers, cls_name)(transformers.BertConfig(**cfg)).eval()
