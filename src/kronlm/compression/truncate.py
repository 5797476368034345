"""Depth compression by layer truncation (Li et al., "A Short Study on Compressing Decoder-Based
Language Models", arXiv 2110.08460).

A student of the same architecture and class as the teacher keeps a chosen subset of the teacher's
blocks, in a given order (the paper's best 6-layer GPT-2 keeps blocks [0, 2, 4, 6, 8, 10];
DistilGPT2 was initialised from [0, 2, 4, 7, 9, 11]). Embeddings, the final norm, the head (and
BERT's pooler) are copied unchanged; the student is then recovered by causal-LM pre-training or
distillation (docs/method.md, "The papers"; docs/recovery.md, "Layer truncation").

The student is built from a fresh configuration rather than by deleting modules from a copy of the
teacher, so that every per-layer index the modelling code derives from the configuration
(``layer_idx`` of the attention modules, which the KV cache is indexed by; ``config.layer_types``)
is the student's own, and ``save_pretrained`` / ``from_pretrained`` give back exactly this model.
"""

from __future__ import annotations

import copy
import logging
import operator
import os
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from kronlm.utils.atomic import atomic_dir, write_json
from kronlm.utils.outputs import check_output_folder, write_manifest

logger = logging.getLogger(__name__)

TRUNCATION_FILE = "kronlm_truncation.json"

# Configuration fields that hold one entry per block (transformers 5.x: attention kind and MLP kind
# of each layer, read by the modelling code as config.layer_types[layer_idx]). They are re-indexed
# with the kept layers so that student block i keeps the behaviour of teacher block layers[i].
PER_LAYER_CONFIG_FIELDS = ("layer_types", "mlp_layer_types")


def _teacher_depth(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    depth = getattr(config, "num_hidden_layers", None) if config is not None else None
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(
            f"{type(model).__name__} has no Hugging Face config with a number of layers "
            "(config.num_hidden_layers); layer truncation needs a transformers PreTrainedModel"
        )
    return depth


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the stack of transformer blocks in a Hugging Face model.

    The blocks are the one ``nn.ModuleList`` holding ``config.num_hidden_layers`` modules of one
    class that is not itself inside such a list: ``transformer.h`` (GPT-2), ``model.layers`` (Llama,
    Qwen, Gemma), ``bert.encoder.layer`` / ``encoder.layer`` (BERT), ``gpt_neox.layers``, ...

    Args:
        model: a transformers ``PreTrainedModel``.

    Returns:
        (dotted module path, the ModuleList), e.g. ``("transformer.h", model.transformer.h)``.

    Raises:
        ValueError: the model has no config with ``num_hidden_layers``, no such list (the message
            names the class and the depth it looked for), or several (encoder-decoder models).
    """
    depth = _teacher_depth(model)
    candidates: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) != depth:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        # Lists nested inside an outer block list (e.g. experts) are parts of blocks, not blocks.
        if any(name.startswith(outer + ".") for outer, _ in candidates):
            continue
        candidates.append((name, module))
    if not candidates:
        raise ValueError(
            f"unsupported architecture {type(model).__name__}: found no nn.ModuleList of "
            f"{depth} blocks (config.num_hidden_layers) to truncate"
        )
    if len(candidates) > 1:
        names = ", ".join(name for name, _ in candidates)
        raise ValueError(
            f"unsupported architecture {type(model).__name__}: several block lists of {depth} "
            f"blocks ({names}); truncation handles models with a single stack of blocks"
        )
    return candidates[0]


def _check_layers(layers: list[int], depth: int) -> list[int]:
    if layers is None or len(layers) == 0:
        raise ValueError("layer list is empty: keep at least one teacher block")
    checked = []
    for position, value in enumerate(layers):
        if isinstance(value, bool):
            raise ValueError(f"layer list entry {position} is a bool ({value}), not a block index")
        try:
            index = operator.index(value)
        except TypeError:
            raise ValueError(f"layer list entry {position} is {value!r}, not an integer block index") from None
        if not 0 <= index < depth:
            raise ValueError(
                f"layer index {index} (entry {position}) is out of range: the teacher has {depth} "
                f"layers, indices 0..{depth - 1}"
            )
        checked.append(index)
    duplicates = sorted({index for index in checked if checked.count(index) > 1})
    if duplicates:
        raise ValueError(f"layer list {checked} repeats teacher block(s) {duplicates}; each block may be kept once")
    return checked


def _student_config(model: PreTrainedModel, layers: list[int], depth: int):
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(layers)
    for field in PER_LAYER_CONFIG_FIELDS:
        values = getattr(config, field, None)
        if values is None:
            continue
        if len(values) != depth:
            raise ValueError(
                f"config.{field} has {len(values)} entries but the teacher has {depth} layers"
            )
        setattr(config, field, [values[index] for index in layers])
    # Any other list with one entry per teacher layer would silently describe the wrong blocks.
    for key, value in config.to_dict().items():
        if (
            "layer" in key
            and key not in PER_LAYER_CONFIG_FIELDS
            and not key.startswith("mtp_")
            and isinstance(value, (list, tuple))
            and len(value) == depth != len(layers)
        ):
            raise ValueError(
                f"config.{key} of {type(model).__name__} looks like a per-layer list ({len(value)} "
                f"entries for {depth} layers) that kronlm does not know how to re-index"
            )
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and layers != list(range(len(layers))):
        # GPT-2 option: attention scores are divided by (layer_idx + 1), which follows the block's new
        # position; the copied weights stay exact but the block's function changes.
        logger.warning(
            "config.scale_attn_by_inverse_layer_idx is set: truncated block i is scaled by 1/(i+1), "
            "not by 1/(teacher index + 1) as in the teacher"
        )
    return config


def _same_tensor(a: nn.Module | None, b: nn.Module | None) -> bool:
    return a is not None and b is not None and a.weight is b.weight


def copy_kept_blocks(teacher: nn.Module, student: nn.Module, block_path: str, layers: list[int]) -> None:
    """Load ``student`` with the teacher's weights: block i from teacher block ``layers[i]``, every
    other parameter and buffer unchanged.

    Raises:
        RuntimeError: a state key outside the expected layout (``load_state_dict(strict=True)``).
    """
    prefix = block_path + "."
    position_of = {teacher_index: i for i, teacher_index in enumerate(layers)}

    def student_key(key: str) -> str | None:
        if not key.startswith(prefix):
            return key
        index, rest = key[len(prefix) :].split(".", 1)
        if int(index) not in position_of:
            return None
        return f"{prefix}{position_of[int(index)]}.{rest}"

    state = {}
    for key, tensor in teacher.state_dict().items():
        if (new_key := student_key(key)) is not None:
            state[new_key] = tensor
    # strict: a key outside the expected layout is an architecture this function does not
    # understand, better an error than a half-copied student.
    student.load_state_dict(state, strict=True)
    # Non-persistent buffers (rotary inv_freq, position ids) are rebuilt from the config; copy the
    # teacher's anyway so that the student computes exactly what the teacher's blocks compute.
    student_buffers = dict(student.named_buffers())
    with torch.no_grad():
        for key, buffer in teacher.named_buffers():
            new_key = student_key(key)
            if new_key is None or new_key in state:
                continue
            target = student_buffers.get(new_key)
            if target is not None and target.shape == buffer.shape:
                target.copy_(buffer)


def truncate_layers(model: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """Build a shallower model of the same class from the teacher blocks ``layers``, in that order.

    Student block i is a bit-exact copy of teacher block ``layers[i]``; every parameter and
    persistent buffer outside the block list (embeddings, final norm, LM / classification head,
    BERT pooler) is copied unchanged (:func:`copy_kept_blocks`). The configuration is the teacher's with the number of layers
    set to ``len(layers)`` (``n_layer`` / ``num_hidden_layers``) and per-layer lists
    (``layer_types``, ``mlp_layer_types``) re-indexed; per-layer indices stored in modules
    (``layer_idx`` of attention, used by the KV cache) are the student's own 0..len(layers)-1.
    Tied input/output embeddings stay tied. The teacher is not modified. The student has the
    teacher's dtype, device and train/eval mode. Follows Li et al., arXiv 2110.08460.

    Caveat: with GPT-2's ``scale_attn_by_inverse_layer_idx`` the attention scaling follows the new
    block position (a warning is logged).

    Args:
        model: a transformers ``PreTrainedModel`` with one stack of blocks (GPT-2, Llama, BERT, ...),
            on a single device.
        layers: teacher block indices to keep, e.g. ``[0, 2, 4, 6, 8, 10]`` of GPT-2's 12.

    Returns:
        A ``PreTrainedModel`` of ``type(model)`` with ``len(layers)`` blocks; parameter count
        = teacher's minus the parameters of the removed blocks.

    Raises:
        ValueError: ``layers`` is empty, repeats an index, holds a non-integer or an index outside
            0..depth-1 (the message names the index and the teacher's depth); the architecture has
            no recognisable block list (the message names the class); the configuration has a
            per-layer list kronlm cannot re-index; the teacher's embedding tying disagrees with its
            config.
    """
    depth = _teacher_depth(model)
    layers = _check_layers(list(layers) if layers is not None else [], depth)
    block_path, _ = find_block_list(model)
    config = _student_config(model, layers, depth)

    first = next(model.parameters())
    # Building the student draws random initial weights that are overwritten at once; keep the
    # caller's RNG stream untouched by that.
    with torch.random.fork_rng(devices=[]):
        student = type(model)._from_config(config, dtype=first.dtype)
    student.to(first.device)

    copy_kept_blocks(model, student, block_path, layers)
    teacher_tied = _same_tensor(model.get_input_embeddings(), model.get_output_embeddings())
    student_tied = _same_tensor(student.get_input_embeddings(), student.get_output_embeddings())
    if model.get_output_embeddings() is not None and teacher_tied != student_tied:
        raise ValueError(
            f"{type(model).__name__}: the teacher's input and output embeddings are "
            f"{'tied' if teacher_tied else 'untied'} but config.tie_word_embeddings="
            f"{getattr(model.config, 'tie_word_embeddings', None)}; fix the config before truncating"
        )
    student.train(model.training)
    return student


def save_truncated(
    model: PreTrainedModel,
    layers: list[int],
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
) -> PreTrainedModel:
    """Truncate ``model`` to ``layers`` (see :func:`truncate_layers`) and save it as a normal
    Hugging Face folder.

    ``out_dir`` receives ``config.json``, ``model.safetensors`` (via ``save_pretrained``), the
    tokenizer files when ``tokenizer`` is given, ``kronlm_truncation.json``:
    ``{"source_model", "source_class", "source_num_layers", "block_list", "layers", "num_layers"}``,
    and ``kronlm_manifest.json`` (size and SHA-256 of every file). An existing ``out_dir`` is
    replaced only when kronlm wrote it, or with ``overwrite``
    (:func:`kronlm.utils.outputs.check_output_folder`).
    The folder is written under a temporary name and swapped in when complete, so a crash never
    leaves a partial model under ``out_dir``. ``AutoModelForCausalLM.from_pretrained(out_dir)``
    (or the matching Auto class) loads it back.

    Args:
        model: the teacher (unchanged).
        layers: teacher block indices to keep, in order.
        out_dir: the folder to write.
        tokenizer: optional tokenizer saved alongside.
        overwrite: replace ``out_dir`` even when kronlm did not write it.

    Returns:
        The truncated model that was saved.

    Raises:
        ValueError: as :func:`truncate_layers`.
        FileExistsError: ``out_dir`` holds something kronlm did not write and ``overwrite`` is False.
    """
    out_dir = check_output_folder(out_dir, overwrite=overwrite)
    student = truncate_layers(model, layers)
    block_path, _ = find_block_list(model)
    record = {
        "method": "layer truncation (Li et al., arXiv 2110.08460)",
        "source_model": getattr(model.config, "name_or_path", "") or None,
        "source_class": type(model).__name__,
        "source_num_layers": model.config.num_hidden_layers,
        "block_list": block_path,
        "layers": [operator.index(i) for i in layers],
        "num_layers": len(layers),
    }
    with atomic_dir(out_dir) as tmp:
        student.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / TRUNCATION_FILE, record)
        write_manifest(tmp)
    return student
