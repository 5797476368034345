"""The dense modules kronlm replaces: ``nn.Linear``, Hugging Face's ``Conv1D`` and ``nn.Embedding``."""

from __future__ import annotations

import warnings

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


__all__ = ["QUANTIZATION_NOTICE", "StaysFloatNotice", "dense_weight", "is_conv1d", "is_factorable"]

QUANTIZATION_NOTICE = (
    "{name} stays float under torch.ao.quantization: PyTorch quantizes nn.Linear and the other layer types it knows, not "
    "kronlm's Kronecker layers. To quantize every weight, merge first (kronlm.merge_and_unload(model): a dense model) and "
    "quantize that; or keep the Kronecker layers in float (they hold few of the parameters) and ignore this warning"
)


class StaysFloatNotice:
    """Mixin: say so when ``torch.ao.quantization`` passes over a Kronecker layer.

    ``torch.ao.quantization.quantize_dynamic`` / ``prepare`` assign ``module.qconfig`` to every
    module while they walk the model, then swap only the types they have quantized versions of
    (``nn.Linear``, ...). A Kronecker layer would silently stay float32 while the model looks
    quantized; the ``qconfig`` setter warns instead (once per layer type), naming what to do.
    Reading ``qconfig`` before it was assigned raises ``AttributeError`` like any missing attribute,
    so PyTorch's own default applies.
    """

    @property
    def qconfig(self):
        """The quantization config PyTorch assigned (AttributeError until it assigns one)."""
        try:
            return self.__dict__["_torch_qconfig"]
        except KeyError:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute 'qconfig'") from None

    @qconfig.setter
    def qconfig(self, value) -> None:
        self.__dict__["_torch_qconfig"] = value
        warnings.warn(QUANTIZATION_NOTICE.format(name=type(self).__name__), UserWarning, stacklevel=2)

    @qconfig.deleter
    def qconfig(self) -> None:
        self.__dict__.pop("_torch_qconfig", None)


class MergesToLinear(StaysFloatNotice):
    """Mixin of the factored linear layers: merge back into an ``nn.Linear`` and count parameters.

    The layer provides ``to_dense()`` (the (out, in) weight), ``in_features``, ``out_features``
    and ``bias`` (a parameter or None); peft's ``merge_and_unload`` follows the same idea.
    """

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """Merge back into an ``nn.Linear`` with the same output (up to float rounding)."""
        weight = self.to_dense()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def num_parameters(self) -> int:
        """Parameters of the layer (factors, learnable scalars, bias), counted from ``parameters()``."""
        return sum(p.numel() for p in self.parameters())
