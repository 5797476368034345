"""Kronecker-factored replacements for ``nn.Linear`` / ``Conv1D`` and ``nn.Embedding``, and their export form."""

from kronlm.layers.dense import dense_weight, is_conv1d, is_factorable
from kronlm.layers.embedding import KroneckerEmbedding, KroneckerTiedLMHead
from kronlm.layers.linear import KroneckerLinear, kronecker_matmul, set_autotune
from kronlm.layers.lowrank import KroneckerLowRankLinear
from kronlm.layers.onnx_linear import OnnxKroneckerLinear

KRONECKER_MODULES = (KroneckerLinear, KroneckerLowRankLinear, KroneckerEmbedding)

__all__ = [
    "KRONECKER_MODULES",
    "KroneckerEmbedding",
    "KroneckerLinear",
    "KroneckerLowRankLinear",
    "KroneckerTiedLMHead",
    "OnnxKroneckerLinear",
    "dense_weight",
    "is_conv1d",
    "is_factorable",
    "kronecker_matmul",
    "set_autotune",
]
