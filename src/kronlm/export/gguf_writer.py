"""GGUF export of a dense (or merged) causal LM for llama.cpp, written with the ``gguf`` package.

A compressed model is first merged (:func:`kronlm.merge_and_unload`): llama.cpp has no Kronecker
layer, so the file holds the dense weights Σ_r s_r A_r ⊗ B_r, in float16 (2-D weights; norms and
biases stay float32, as llama.cpp's own converter does) or float32. The layout follows llama.cpp's
``convert_hf_to_gguf.py``:

- tensor names from ``gguf.TensorNameMap`` (``model.layers.0.mlp.up_proj.weight`` ->
  ``blk.0.ffn_up.weight``);
- Llama's q_proj / k_proj rows are permuted from Hugging Face's rotate-half RoPE layout to GGML's
  interleaved one (``LlamaModel.permute`` there); GPT-2's Conv1D weights are transposed to (out, in);
- a head tied to the embedding is not written for Llama (llama.cpp reuses ``token_embd``), and is
  written as ``output.weight`` for GPT-2 (as the converter does);
- the tokenizer is written as a byte-level BPE vocabulary (``tokenizer.ggml.model = "gpt2"``:
  tokens, token types, merges, special ids) with its chat template
  (``tokenizer.chat_template``). Other tokenizer kinds (SentencePiece) are refused;
- ``general.name`` is the model's name (the last component of its folder or hub id, never the
  path where it was stored), and ``kronlm.version`` marks the file as kronlm's, so that
  ``kronlm merge --gguf`` may replace it later (:func:`gguf_written_by_kronlm`).

Supported architectures: :data:`GGUF_ARCHITECTURES` (Hugging Face ``model_type`` -> GGUF arch).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from kronlm.modeling.merge import merge_and_unload
from kronlm.modeling.registry import is_kronecker_model, kronlm_version
from kronlm.utils.atomic import atomic_path

GGUF_ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "gpt2": gguf.MODEL_ARCH.GPT2}
GGUF_DTYPES = ("f16", "f32")
DEFAULT_PRE_TOKENIZER = "default"
# The metadata key that marks a GGUF file kronlm wrote (its value: kronlm's version).
KRONLM_KEY = "kronlm.version"
_GGUF_MAGIC = b"GGUF"
# Buffers of the Hugging Face modules that are not weights (recomputed by llama.cpp).
_SKIP_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
# Conv1D modules of GPT-2, stored (in, out).
_GPT2_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def permute_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder q_proj / k_proj rows (heads·head_dim, in) from rotate-half to interleaved RoPE pairs.

    Within each head, rows [0..h/2) and [h/2..h) pair up in Hugging Face's layout and rows (2i, 2i+1)
    in GGML's; this is llama.cpp's ``LlamaModel.permute``.
    """
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"GGUF export: RoPE scaling {params.get('rope_type')!r} is not supported (only the default RoPE)")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("GGUF export: the config gives no rope_theta")
    return float(theta)


def _add_llama_metadata(writer: gguf.GGUFWriter, config) -> None:
    heads = config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // heads)
    writer.add_vocab_size(config.vocab_size)


def _add_gpt2_metadata(writer: gguf.GGUFWriter, config) -> None:
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(float(config.layer_norm_epsilon))
    writer.add_vocab_size(config.vocab_size)


def gguf_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> float32 tensor (Hugging Face orientation (out, in)) of a dense causal LM.

    Raises:
        ValueError: an unsupported architecture, or a tensor ``gguf.TensorNameMap`` cannot name.
    """
    config = model.config
    model_type = config.model_type
    if model_type not in GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF export supports model types {', '.join(GGUF_ARCHITECTURES)}; got {model_type!r}")
    arch = GGUF_ARCHITECTURES[model_type]
    blocks = getattr(config, "num_hidden_layers", None) or config.n_layer
    names = gguf.TensorNameMap(arch, blocks)
    state = model.state_dict()
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith(_SKIP_SUFFIXES):
            continue
        if tied and head is not None and tensor.data_ptr() == embed.data_ptr() and "lm_head" in key:
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"GGUF export: no GGUF name for tensor {key} of {type(model).__name__}")
        tensor = tensor.detach().float().cpu()
        if arch == gguf.MODEL_ARCH.LLAMA and key.endswith("q_proj.weight"):
            tensor = permute_rope_rows(tensor, config.num_attention_heads)
        elif arch == gguf.MODEL_ARCH.LLAMA and key.endswith("k_proj.weight"):
            tensor = permute_rope_rows(tensor, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        elif arch == gguf.MODEL_ARCH.GPT2 and key.endswith(_GPT2_CONV1D):
            tensor = tensor.t()
        out[name] = tensor.contiguous()
    if arch == gguf.MODEL_ARCH.GPT2 and "output.weight" not in out:
        out["output.weight"] = out["token_embd.weight"]  # llama.cpp's GPT-2 graph reads the head from output.weight
    return out


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, pre: str) -> None:
    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        raise ValueError("GGUF export needs the model's fast (tokenizer.json) tokenizer")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model_spec = spec.get("model") or {}
    if model_spec.get("type") != "BPE":
        raise ValueError(f"GGUF export writes byte-level BPE vocabularies only; this tokenizer is {model_spec.get('type')!r}")
    vocab = tokenizer.get_vocab()
    too_big = [t for t, i in vocab.items() if i >= vocab_size]
    if too_big:
        raise ValueError(f"GGUF export: the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, index in vocab.items():
        tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens") or []:
        if added["id"] < vocab_size:
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model_spec.get("merges") or []]
    template = getattr(tokenizer, "chat_template", None)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id), (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if token_id is not None:
            setter(int(token_id))
    writer.add_add_bos_token(False)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


def export_gguf(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer,
    dtype: str = "f16",
    pre_tokenizer: str = DEFAULT_PRE_TOKENIZER,
    name: str | None = None,
) -> Path:
    """Write a causal LM (dense, or compressed and then merged) to one GGUF file for llama.cpp, atomically.

    Args:
        model: a Hugging Face causal LM of a :data:`GGUF_ARCHITECTURES` type; a kronlm-compressed
            model is merged first (the model passed in is not changed).
        path: the ``.gguf`` file to write; an existing file is replaced (``kronlm merge --gguf``
            checks first that kronlm wrote it, :func:`gguf_written_by_kronlm`).
        tokenizer: the model's fast byte-level BPE tokenizer (written into the file).
        dtype: "f16" (2-D weights as float16, the rest float32) or "f32".
        pre_tokenizer: llama.cpp's pre-tokenizer name (``tokenizer.ggml.pre``), e.g. "smollm" for
            SmolLM2; llama.cpp falls back to its default splitting for "default".
        name: ``general.name`` (default: the last component of the config's ``_name_or_path``,
            else the class name).

    Returns:
        The path written.

    Raises:
        ValueError: unknown dtype, unsupported architecture, RoPE scaling or tokenizer, or a
            tokenizer whose ids exceed the model's vocabulary (each named).
        OSError: the file cannot be written.
    """
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"GGUF dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    if is_kronecker_model(model):
        model = merge_and_unload(model)
    config = model.config
    if config.model_type not in GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF export supports model types {', '.join(GGUF_ARCHITECTURES)}; got {config.model_type!r}")
    arch = GGUF_ARCHITECTURES[config.model_type]
    tensors = gguf_tensors(model)
    path = Path(path)
    expected = sum(t.numel() * (2 if dtype == "f16" and t.dim() == 2 else 4) for t in tensors.values())
    with atomic_path(path, expected_bytes=expected) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
        writer.add_name(name or model_name(model))
        writer.add_string(KRONLM_KEY, kronlm_version())
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
        (_add_llama_metadata if arch == gguf.MODEL_ARCH.LLAMA else _add_gpt2_metadata)(writer, config)
        _add_tokenizer(writer, tokenizer, config.vocab_size, pre_tokenizer)
        for tensor_name, tensor in tensors.items():
            array = tensor.numpy()
            if dtype == "f16" and array.ndim == 2:
                array = array.astype(np.float16)
            writer.add_tensor(tensor_name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def model_name(model: nn.Module) -> str:
    """A model's name for ``general.name``: the last component of ``config._name_or_path``
    (``/home/me/runs/smol-2x`` -> ``smol-2x``; ``HuggingFaceTB/SmolLM2-135M`` -> ``SmolLM2-135M``),
    else its class name; never the folder path, which says where the file was made."""
    source = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "").rstrip("/\\")
    return Path(source).name or type(model).__name__


def gguf_written_by_kronlm(path: str | os.PathLike) -> bool:
    """True for a GGUF file kronlm wrote (its metadata holds ``kronlm.version``)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != _GGUF_MAGIC:
                return False
        return KRONLM_KEY in gguf.GGUFReader(str(path)).fields
    except (OSError, ValueError, KeyError, IndexError):
        return False


def read_gguf_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """GGUF tensor name -> array in (out, in) orientation (as numpy reads it), float16 or float32.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a GGUF file (``gguf.GGUFReader``'s error, with the path).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file not found")
    try:
        reader = gguf.GGUFReader(str(path))
    except ValueError as exc:
        raise ValueError(f"{path}: not a readable GGUF file ({exc})") from None
    return {t.name: np.asarray(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}


__all__ = ["DEFAULT_PRE_TOKENIZER", "GGUF_ARCHITECTURES", "GGUF_DTYPES", "KRONLM_KEY", "export_gguf", "gguf_tensors", "gguf_written_by_kronlm",
           "model_name", "permute_rope_rows", "read_gguf_tensors"]
