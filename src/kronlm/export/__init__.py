"""Export: compressed models for other runtimes.

- :mod:`onnx`: ONNX graphs checked with onnxruntime, with or without a KV cache (needs the ``onnx`` extra);
- :mod:`gguf_writer`: a merged dense GGUF file for llama.cpp (the ``gguf`` package, a core dependency).
"""

from kronlm.export.gguf_writer import (
    DEFAULT_PRE_TOKENIZER,
    GGUF_DTYPES,
    export_gguf,
    gguf_written_by_kronlm,
    read_gguf_tensors,
)
from kronlm.export.onnx import (
    METADATA_FILE,
    TOLERANCE,
    LogitsCheck,
    check_output_dir,
    compare_onnx,
    export_onnx,
    greedy_generate,
    onnx_session,
    require_onnx,
    verify_onnx,
)

__all__ = [
    "DEFAULT_PRE_TOKENIZER",
    "GGUF_DTYPES",
    "METADATA_FILE",
    "TOLERANCE",
    "LogitsCheck",
    "check_output_dir",
    "compare_onnx",
    "export_gguf",
    "export_onnx",
    "gguf_written_by_kronlm",
    "greedy_generate",
    "onnx_session",
    "read_gguf_tensors",
    "require_onnx",
    "verify_onnx",
]
