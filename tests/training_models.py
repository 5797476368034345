"""Tiny GPT-2 students and teachers shared by the training-engine tests (also imported by the
torchrun worker scripts test_ddp.py / test_fsdp.py, which run with this folder on sys.path)."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB = 64
BLOCK = 16


def tiny_gpt2(seed: int = 0, n_layer: int = 2, dropout: float = 0.0) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 (hidden 32, vocab 64, 32 positions) with the given dropout on every path."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )
    return GPT2LMHeadModel(config)


def compressed_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """FFN matrices as rank-2 Kronecker sums with learnable scalars, the embedding factored by 2."""
    import kronlm

    model = tiny_gpt2(seed)
    config = kronlm.CompressionConfig(
        targets=[
            kronlm.KroneckerTarget(modules=["transformer.h.*.mlp.c_fc", "transformer.h.*.mlp.c_proj"],
                                   b_shape=(4, 4), rank=2, learnable_scales=True),
            kronlm.KroneckerTarget(modules=["transformer.wte"], b_shape=(1, 2)),
        ],
        lm_head="dense",
    )
    kronlm.compress(model, config, progress=False)
    return model
