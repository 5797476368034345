"""Export: compressed models for other runtimes.

- :mod:`onnx`: ONNX graphs checked with onnxruntime, with or without a KV cache (needs the ``onnx`` extra);
- :mod:`gguf_writer`: a merged dense GGUF file for llama.cpp (the ``gguf`` package, a core dependency).
"""

from kronlm.export.gguf_writer import export_gguf, read_gguf_tensors
from kronlm.export.onnx import (
    compare_onnx,
    export_onnx,
    greedy_generate,
    onnx_session,
    verify_onnx,
)

__all__ = ["compare_onnx", "export_gguf", "export_onnx", "greedy_generate", "onnx_session", "read_gguf_tensors", "verify_onnx"]
