"""The dense modules kronlm replaces: ``nn.Linear``, Hugging Face's ``Conv1D`` and ``nn.Embedding``."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def is_conv1d(module: nn.Module) -> bool:
    """True for Hugging Face's ``Conv1D`` (GPT-2), which stores its weight (in, out)."""
    return isinstance(module, Conv1D)


def is_factorable(module: nn.Module) -> bool:
    """True for the module types kronlm can replace by a Kronecker module."""
    return isinstance(module, (nn.Linear, nn.Embedding)) or is_conv1d(module)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear / Conv1D / Embedding: (out, in) or (vocab, dim), a view, never a copy."""
    return module.weight.t() if is_conv1d(module) else module.weight


__all__ = ["dense_weight", "is_conv1d", "is_factorable"]
