"""GGUF checkpoints: after transformers dequantises one, make the model an ordinary dense model."""

from __future__ import annotations

from torch import nn


def forget_gguf_quantizer(model: nn.Module) -> nn.Module:
    """Drop the GGUF quantizer of a model whose GGUF weights were dequantised at load time.

    transformers keeps the quantizer on a model loaded with ``gguf_file=`` and then refuses
    ``save_pretrained``. Once every weight is a plain float tensor the model is dense, so the
    quantizer and ``config.quantization_config`` are removed. Returns the model.

    Raises:
        ValueError: the GGUF weights were kept quantized (loaded with the GGUF matmul kernels);
            reload with ``quantization_config=GgufConfig(dequantize=True)``.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or str(getattr(quantizer.quantization_config, "quant_method", "")).lower().split(".")[-1] != "gguf":
        return model
    # transformers' legacy GGUF path (no matmul kernels) dequantises every weight whatever the
    # ``dequantize`` flag says; weights kept quantized live in the quantizer's packed modules.
    if getattr(quantizer, "packed_modules", None):
        raise ValueError("the GGUF weights were kept quantized; load with quantization_config=GgufConfig(dequantize=True) to compress or save")
    model.hf_quantizer = None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return model
