"""Named compression configs that reproduce the papers' architectures (docs/method.md, "The papers"; docs/method.md, "Parameter counts").

Each preset knows the reference architecture it was written for, so its parameter count can be
computed from the configuration alone, on the meta device, without weights
(``preset_parameter_counts``). Factor shapes are (rows, cols) in the ``nn.Linear`` (out, in)
orientation of each matrix: GPT-2's ``mlp.c_fc`` is (3072, 768) and ``mlp.c_proj`` (768, 3072),
so the second gets the transposed shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from kronlm.compression.config import CompressionConfig, KroneckerTarget
from kronlm.compression.surgery import compress_modules

GPT2_FC = "**.h.*.mlp.c_fc"
GPT2_PROJ = "**.h.*.mlp.c_proj"
LLAMA_UP = ["**.layers.*.mlp.gate_proj", "**.layers.*.mlp.up_proj"]
LLAMA_DOWN = "**.layers.*.mlp.down_proj"
BERT_ATTENTION = [
    "**.encoder.layer.*.attention.self.query",
    "**.encoder.layer.*.attention.self.key",
    "**.encoder.layer.*.attention.self.value",
    "**.encoder.layer.*.attention.output.dense",
]
BERT_FFN_IN = "**.encoder.layer.*.intermediate.dense"
BERT_FFN_OUT = "**.encoder.layer.*.output.dense"


@dataclass(frozen=True)
class Preset:
    """A named compression config.

    Attributes:
        name: the preset's name (``kronlm compress --preset NAME``).
        family: the architecture it targets ("gpt2", "bert", "llama").
        source: the paper or idea it follows.
        description: one line.
        reference: the parameter count the paper reports (docs/method.md, "Parameter counts"), as text, or "".
        build: returns a fresh ``CompressionConfig``.
    """

    name: str
    family: str
    source: str
    description: str
    reference: str
    build: Callable[[], CompressionConfig]

    @property
    def config(self) -> CompressionConfig:
        """A fresh ``CompressionConfig`` carrying the preset's name and description."""
        cfg = self.build()
        cfg.name = self.name
        cfg.description = self.description
        return cfg


def _krony_pt(fc_a, fc_b, rank=1, init="van_loan", learnable_scales=False) -> Callable[[], CompressionConfig]:
    def build() -> CompressionConfig:
        proj_a, proj_b = (fc_a[1], fc_a[0]), (fc_b[1], fc_b[0])
        return CompressionConfig(
            targets=[
                KroneckerTarget([GPT2_FC], fc_a, fc_b, rank, init=init, learnable_scales=learnable_scales),
                KroneckerTarget([GPT2_PROJ], proj_a, proj_b, rank, init=init, learnable_scales=learnable_scales),
            ]
        )

    return build


def _kngpt2() -> CompressionConfig:
    odd = [1, 3, 5, 7, 9, 11]
    # Halve each matrix with a 2-element B along its longer side, which keeps the most rank.
    return CompressionConfig(
        targets=[
            KroneckerTarget(["**.wte"], b_shape=(1, 2)),
            KroneckerTarget(["**.h.*.attn.c_attn", "**.h.*.attn.c_proj", GPT2_FC], b_shape=(2, 1), layers=odd),
            KroneckerTarget([GPT2_PROJ], b_shape=(1, 2), layers=odd),
        ],
        lm_head="dense",
    )


def _kronecker_bert(attn_a, attn_b, ffn_a, ffn_b, embed_n, position_n) -> Callable[[], CompressionConfig]:
    def build() -> CompressionConfig:
        targets = [
            KroneckerTarget(["**.embeddings.word_embeddings"], b_shape=(1, embed_n)),
            KroneckerTarget(BERT_ATTENTION, attn_a, attn_b),
            KroneckerTarget([BERT_FFN_IN], ffn_a, ffn_b),
            KroneckerTarget([BERT_FFN_OUT], (ffn_a[1], ffn_a[0]), (ffn_b[1], ffn_b[0])),
        ]
        if position_n:
            targets.insert(1, KroneckerTarget(["**.embeddings.position_embeddings"], b_shape=(1, position_n)))
        return CompressionConfig(targets=targets)

    return build


def _llama_mlp(factor: int, init: str, rank: int = 1, learnable_scales: bool = False) -> Callable[[], CompressionConfig]:
    # Krony-PT's 81M/96M shapes carried over to a Llama MLP: B (k, 1) on the (intermediate, hidden)
    # gate/up projections and B (1, k) on the (hidden, intermediate) down projection, A the rest.
    def build() -> CompressionConfig:
        return CompressionConfig(
            targets=[
                KroneckerTarget(LLAMA_UP, b_shape=(factor, 1), rank=rank, init=init, learnable_scales=learnable_scales),
                KroneckerTarget([LLAMA_DOWN], b_shape=(1, factor), rank=rank, init=init, learnable_scales=learnable_scales),
            ]
        )

    return build


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("krony-pt-67m", "gpt2", "Krony-PT (Ayad et al. 2024)", "GPT-2 FFN c_fc/c_proj as A (64,32) ⊗ B (48,24), Van Loan init", "67,893,504", _krony_pt((64, 32), (48, 24))),
        Preset("krony-pt-81m", "gpt2", "Krony-PT (Ayad et al. 2024)", "GPT-2 FFN as A (768,768) ⊗ B (4,1), Van Loan init", "81,972,576", _krony_pt((768, 768), (4, 1))),
        Preset(
            "krony-pt-80m-2", "gpt2", "Krony-PT (Ayad et al. 2024)",
            "GPT-2 FFN as 2 terms A (1024,256) ⊗ B (3,3) with learnable scalars, modified Van Loan init",
            "80,400,048 + 48", _krony_pt((1024, 256), (3, 3), rank=2, init="van_loan_rescaled", learnable_scales=True),
        ),
        Preset("krony-pt-96m", "gpt2", "Krony-PT (Ayad et al. 2024)", "GPT-2 FFN as A (1536,768) ⊗ B (2,1), pruning init", "96,128,304", _krony_pt((1536, 768), (2, 1), init="pruning")),
        Preset("kngpt2", "gpt2", "KnGPT2 (Edalati et al. 2022)", "GPT-2 wte by n=2 and odd blocks' attention + FFN halved; dense untied LM head", "≈83.9M w/o head (83M)", _kngpt2),
        Preset(
            "kroneckerbert8", "bert", "KroneckerBERT (Tahaei et al. 2022)",
            "BERT-base Q/K/V/O A (384,384) B (2,2), FFN A (8,2) B (384,384), word+position embeddings n=8",
            "14,310,160", _kronecker_bert((384, 384), (2, 2), (8, 2), (384, 384), 8, 8),
        ),
        Preset(
            "kroneckerbert21", "bert", "KroneckerBERT (Tahaei et al. 2022)",
            "BERT-base Q/K/V/O A (384,48) B (2,16), FFN A (16,2) B (192,384), word embedding n=16",
            "5,228,272", _kronecker_bert((384, 48), (2, 16), (16, 2), (192, 384), 16, 0),
        ),
        Preset("krony-pt-llama-mlp-2x", "llama", "Krony-PT ideas on a Llama MLP", "gate/up/down halved with a (2,1)/(1,2) B, modified Van Loan init", "", _llama_mlp(2, "van_loan_rescaled")),
        Preset("krony-pt-llama-mlp-2x-prune", "llama", "Krony-PT ideas on a Llama MLP", "gate/up/down halved with a (2,1)/(1,2) B, pruning init (every other row/column)", "", _llama_mlp(2, "pruning")),
        Preset("krony-pt-llama-mlp-4x", "llama", "Krony-PT ideas on a Llama MLP", "gate/up/down quartered with a (4,1)/(1,4) B, modified Van Loan init", "", _llama_mlp(4, "van_loan_rescaled")),
        Preset(
            "krony-pt-llama-mlp-4x-r2", "llama", "Krony-PT ideas on a Llama MLP",
            "gate/up/down as 2 terms with a (8,1)/(1,8) B and learnable scalars (≈4x), modified Van Loan init",
            "", _llama_mlp(8, "van_loan_rescaled", rank=2, learnable_scales=True),
        ),
    ]
}


def get_preset(name: str) -> CompressionConfig:
    """The ``CompressionConfig`` of a named preset.

    Raises:
        ValueError: unknown preset (the message lists the valid names).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name].config


def list_presets() -> list[Preset]:
    """All presets, in definition order."""
    return list(PRESETS.values())


def reference_model(family: str):
    """The paper's reference architecture of a family, built on the meta device (no weights).

    "gpt2": GPT-2 124M (tied head); "bert": BERT-base with pooler; "llama": SmolLM2-135M
    (30 layers, hidden 576, MLP 1536, 9 heads / 3 KV heads, vocab 49,152, tied).
    """
    with torch.device("meta"):
        if family == "gpt2":
            return GPT2LMHeadModel(GPT2Config())
        if family == "bert":
            return BertModel(BertConfig())
        if family == "llama":
            cfg = LlamaConfig(
                vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True,
            )
            return LlamaForCausalLM(cfg)
    raise ValueError(f"no reference architecture for family {family!r}")


def preset_parameter_counts(name: str) -> dict[str, int]:
    """Parameter counts of a preset on its reference architecture, from the configuration alone.

    Returns:
        {"before", "after", "after_no_head", "scalars"}: distinct parameters of the dense and the
        compressed model, the compressed one without an untied LM head, and the number of
        learnable per-term scalars included in "after".
    """
    preset = PRESETS[name] if name in PRESETS else None
    if preset is None:
        get_preset(name)  # raises with the list of names
    model = reference_model(preset.family)
    report = compress_modules(model, preset.config, progress=False)
    scalars = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".scales"))
    return {"before": report.params_before, "after": report.params_after, "after_no_head": report.params_after_no_head, "scalars": scalars}
