"""Save and load compressed models: one folder of config JSON + safetensors, nothing pickled."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from kronlm.utils.io import atomic_dir, write_json

COMPRESSION_FILE = "kronlm_compression.json"


def save(model: PreTrainedModel, folder: str | os.PathLike, *, tokenizer=None, report=None, extra: dict[str, Any] | None = None) -> Path:
    """Write a (compressed) model to ``folder`` atomically.

    The folder holds ``config.json`` (with the Kronecker plan under ``kronlm``),
    ``model.safetensors`` (the factors, biases and uncompressed weights only, so its size
    reflects the compression), ``generation_config.json`` when the model has one, the tokenizer
    files when ``tokenizer`` is given, and ``kronlm_compression.json`` (the compression config
    and, when given, the ``CompressionReport``). The folder is written under a temporary name
    and swapped in at the end: a crash leaves the previous folder, never half of a new one.

    Returns:
        The folder path.

    Raises:
        OSError: the folder cannot be written.
    """
    from kronlm.models.gguf import forget_gguf_quantizer

    forget_gguf_quantizer(model)
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        plan = getattr(model.config, "kronlm", None) or {}
        meta: dict[str, Any] = {"compression": plan.get("compression")}
        if report is not None:
            meta["report"] = report.to_dict()
        if extra:
            meta.update(extra)
        write_json(Path(tmp) / COMPRESSION_FILE, meta)
    return folder


def load(folder: str | os.PathLike, *, dtype: torch.dtype | str | None = torch.float32, device: str | torch.device | None = None, auto_class=None) -> PreTrainedModel:
    """Load a model saved by ``save`` (or any Hugging Face model folder) with its Kronecker modules.

    Equivalent to ``AutoModelForCausalLM.from_pretrained(folder)`` after ``import kronlm``, but
    works for every architecture (it registers the folder's family first) and picks the Auto
    class from the saved ``architectures``.

    Args:
        folder: the saved folder.
        dtype: parameter dtype (default float32; None keeps the saved one).
        device: where to put the model (default CPU).
        auto_class: force an Auto class (e.g. ``AutoModel`` for the encoder only).

    Raises:
        FileNotFoundError: the folder, config or weights are missing (named).
        ValueError: a truncated or corrupt file, or tensors that do not match the config (named).
    """
    from transformers import AutoModel, AutoModelForCausalLM

    from kronlm.export.validate import validate_folder
    from kronlm.models.registry import AUTO_CLASSES, base_model_type, register_architecture, saved_model_class
    from kronlm.utils.io import read_json

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: model folder not found")
    config = read_json(folder / "config.json")
    register_architecture(base_model_type(config.get("model_type", "")))
    if auto_class is None:
        model_class = saved_model_class(config)
        if model_class is not None:
            auto_class = next((a for a in AUTO_CLASSES if model_class in a._model_mapping._extra_content.values()), AutoModel)
        else:  # a dense Hugging Face folder
            arch = (config.get("architectures") or [""])[0]
            auto_class = AutoModelForCausalLM if arch.endswith(("ForCausalLM", "LMHeadModel")) else AutoModel
    if not config.get("kronlm"):
        # A kronlm folder is checked by its Kronecker class's from_pretrained; check dense ones here.
        validate_folder(folder)
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = auto_class.from_pretrained(folder, **kwargs)
    if device is not None:
        model.to(device)
    model.eval()
    return model
