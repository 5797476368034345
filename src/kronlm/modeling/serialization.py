"""Save and load models as one folder of config JSON + safetensors; nothing pickled.

:func:`save` is ``model.save_pretrained`` (which, for a compressed model, also writes
``kronlm_compression.json``) plus the tokenizer and an optional run summary, assembled in a
temporary folder and swapped in when complete. :func:`load` picks the Auto class from the saved
``architectures`` and applies kronlm's folder checks to dense folders too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from kronlm.modeling.gguf_checkpoint import forget_gguf_quantizer
from kronlm.modeling.integrity import check_finite, write_manifest
from kronlm.modeling.loading import load_model
from kronlm.modeling.metadata import attach_report
from kronlm.modeling.folder_checks import check_folder_files
from kronlm.utils.atomic import atomic_dir, write_json
from kronlm.utils.outputs import check_output_folder

SUMMARY_FILE = "training_summary.json"


def save(
    model: PreTrainedModel,
    folder: str | os.PathLike,
    *,
    tokenizer=None,
    report=None,
    summary: dict[str, Any] | None = None,
    overwrite: bool = False,
    inputs=(),
) -> Path:
    """Write a (compressed) model to ``folder`` atomically.

    The folder holds what ``model.save_pretrained`` writes — ``config.json`` (with the Kronecker
    plan under ``kronlm``), ``model.safetensors`` (the factors, biases and uncompressed weights
    only, so its size reflects the compression), ``generation_config.json`` when the model has
    one, and for a compressed model ``kronlm_compression.json`` (compression config and report)
    — plus the tokenizer files when ``tokenizer`` is given and ``training_summary.json`` when
    ``summary`` is, and ``kronlm_manifest.json`` (size and SHA-256 of every file, verified on
    load). It is assembled under a temporary name beside ``folder`` and exchanged with the old
    folder in one atomic step when complete (:func:`kronlm.utils.atomic.atomic_dir`): a crash leaves
    the previous model or the new one at ``folder``, never neither, and so does a full disk (one
    error naming the folder and the bytes). An existing ``folder`` is replaced only when kronlm
    wrote it (its ``kronlm_manifest.json`` lists every file in it) or with ``overwrite``, and never
    when it is, holds or lies inside one of ``inputs`` (:func:`kronlm.utils.outputs.check_output_folder`);
    a symlinked ``folder`` is followed (its target replaced, the link kept).

    Args:
        model: a Hugging Face model (compressed or dense).
        folder: where to write.
        tokenizer: saved alongside when given.
        report: a ``CompressionReport`` to store instead of the one ``kronlm.compress`` attached.
        summary: a JSON-ready dict of how the model was trained (steps, losses, settings).
        overwrite: replace ``folder`` even when kronlm did not write it.
        inputs: files and folders ``folder`` must not be, hold or lie inside (the model's source).

    Returns:
        The folder path (a symlink's target).

    Raises:
        FileExistsError: ``folder`` is refused (:class:`kronlm.utils.outputs.OutputRefused`: a file, a
            folder kronlm did not write while ``overwrite`` is False, an input; named).
        FolderBusyError: another process is writing ``folder``.
        StorageFullError: the disk or the file-size limit ran out (the old folder stays).
        OSError: the folder cannot be written.
        ValueError: NaN or infinite weights (the tensor is named), or GGUF weights that were kept
            quantized (see ``forget_gguf_quantizer``).
    """
    forget_gguf_quantizer(model)
    check_finite(model, type(model).__name__)
    if report is not None:
        attach_report(model, report)
    folder = check_output_folder(folder, overwrite=overwrite, inputs=inputs)
    with atomic_dir(folder, expected_bytes=state_bytes(model)) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if summary is not None:
            write_json(tmp / SUMMARY_FILE, summary)
        write_manifest(tmp)
    return folder


def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of the tensors ``model.state_dict()`` holds, shared storage counted once (about the
    size of its safetensors file)."""
    seen: dict[tuple, int] = {}
    for tensor in model.state_dict().values():
        if tensor.is_meta:
            continue
        storage = tensor.untyped_storage()
        seen[(tensor.device.type, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def load(
    folder: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = torch.float32,
    device: str | torch.device | None = None,
    auto_class=None,
) -> PreTrainedModel:
    """Load a model saved by :func:`save` (or any Hugging Face model folder) with its Kronecker modules.

    Equivalent to ``AutoModelForCausalLM.from_pretrained(folder)`` after ``import kronlm``, but
    works for every architecture (it registers the folder's family first), picks the Auto class
    from the saved ``architectures``, and refuses a dense folder whose tensors are missing or
    reshaped as it does a compressed one (:func:`kronlm.modeling.loading.load_model`).

    Args:
        folder: the saved folder.
        dtype: parameter dtype (default float32; None keeps the saved one).
        device: where to put the model (default CPU).
        auto_class: force an Auto class (e.g. ``AutoModel`` for the encoder only).

    Returns:
        The model in eval mode.

    Raises:
        FileNotFoundError: the folder, config or weights are missing (named).
        ValueError: a truncated or corrupt file, or tensors that do not match the config (named).
    """
    folder = Path(folder)
    if not folder.is_dir():
        check_folder_files(folder)  # raises, naming what an interrupted save left behind
    return load_model(str(folder), dtype="auto" if dtype is None else dtype, device=device, auto_class=auto_class)


__all__ = ["SUMMARY_FILE", "load", "save", "state_bytes"]
