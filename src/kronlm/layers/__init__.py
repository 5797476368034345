"""Kronecker-factored replacements for ``nn.Linear`` / ``Conv1D`` and ``nn.Embedding``."""

from kronlm.layers.embedding import KroneckerEmbedding, KroneckerTiedLMHead
from kronlm.layers.linear import KroneckerLinear, kronecker_matmul

__all__ = ["KroneckerEmbedding", "KroneckerLinear", "KroneckerTiedLMHead", "kronecker_matmul"]
