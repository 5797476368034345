"""Capture what the distillation losses need from a Hugging Face model in one forward pass.

:func:`trace` runs a ``transformers`` model (GPT-2, BERT, Llama family, and any other model that
calls its attention through ``ALL_ATTENTION_FUNCTIONS`` and records hidden states with
``capture_outputs``) once and returns a :class:`ModelTrace` holding only the requested items.

How it works (transformers 5.x):

- Hidden states come from the model's own ``output_hidden_states=True`` machinery, which hooks
  every decoder/encoder block. By default transformers replaces the last entry with
  ``last_hidden_state`` (after the final LayerNorm / RMSNorm of GPT-2 and Llama); when block
  outputs are requested, :func:`trace` sets ``config.tie_last_hidden_states = False`` for the
  duration of the call, so every entry is a raw block output. The final-normed state is taken
  from the output of ``model.base_model`` with a forward hook.
- Attention scores and probabilities: this module registers an attention function under the
  name ``"kronlm_trace"`` in ``transformers``' ``AttentionInterface`` (and the eager 4-D float
  mask builder under the same name in ``AttentionMaskInterface``). While tracing, the model's
  configs have ``_attn_implementation = "kronlm_trace"``; every attention layer then calls
  :func:`_tracing_attention_forward`, which is the eager attention of the modeling files
  (``eager_attention_forward``: scores = Q Kᵀ · scaling, + additive mask, softmax, dropout,
  · V), with grouped-query K/V repeated to all query heads, and which records the scores before
  the mask and the softmax probabilities before dropout. ``scaling`` is whatever the
  architecture passes (1/√d_k; GPT-2's ``scale_attn_by_inverse_layer_idx`` is folded into it),
  so the recorded scores include any architecture-specific scaling. The original implementation
  is restored when the call returns or raises. ``output_attentions=True`` is not used: it
  returns only the probabilities, needs eager attention all the same, and cannot give the
  pre-softmax scores; the recorded probabilities equal what it returns under eager attention.

Costs: with attention requested, the forward runs eager attention instead of SDPA / flash
kernels, so it materialises (batch, heads, seq, seq) scores and probabilities for every layer
and keeps them alive for the loss: about 2 · layers · batch · heads · seq² · 4 bytes (GPT-2
small at seq 1024: ≈ 100 MB per sequence), and runs slower than the fused kernels. Hidden
states cost nothing extra beyond holding references to tensors the forward computes anyway.

Limits: attention capture refuses a model in training mode with gradient checkpointing enabled
(the recomputation in backward would run outside the trace with a different attention
implementation); ``reorder_and_upcast_attn`` of GPT-2 is not reproduced (plain eager maths is
used instead); attention sinks (``s_aux``) are rejected. The code never touches linear layers,
so ``nn.Linear`` / ``Conv1D`` replaced by any module with the same call signature works.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import AttentionInterface

__all__ = ["NEED_KEYS", "TRACE_ATTN_IMPLEMENTATION", "ModelTrace", "is_causal_model", "trace"]

TRACE_ATTN_IMPLEMENTATION = "kronlm_trace"
NEED_KEYS = frozenset({"logits", "embeddings", "hidden", "attention_scores", "attention_probs", "last_hidden"})

# Holds the list the attention function appends (scores, probs) to and which of the two to keep
# (an item not kept is recorded as None, so a teacher traced for its scores does not hold its
# (batch, heads, seq, seq) probabilities of every layer until the loss); None outside a trace.
_attention_records: ContextVar[tuple[list, bool, bool] | None] = ContextVar("kronlm_attention_records", default=None)


@dataclass
class ModelTrace:
    """What one traced forward pass captured; items that were not requested are None.

    Attributes:
        logits: the model output's ``logits`` ((batch, seq, vocab) for LMs, (batch, labels) for
            classifiers), or None when requested but the model has no such head.
        start_logits / end_logits: (batch, seq) span scores of an extractive question-answering
            model (``*ForQuestionAnswering``: answer start / end at each position), captured with
            "logits"; None for any other model.
        embeddings: (batch, seq, hidden), the embedding-layer output fed to block 0
            (GPT-2: dropout(wte + wpe); BERT: LayerNorm(word + position + type); Llama: embed_tokens).
        hidden_states: list of n_layers tensors (batch, seq, hidden), the raw output of each block
            (no final norm applied to the last one).
        attention_scores: list of n_layers tensors (batch, heads, seq, seq): pre-softmax
            Q Kᵀ · scaling (1/√d_k and any architecture scaling), before adding the mask; masked
            entries hold the raw finite scores. Query along dim 2, key along dim 3.
        attention_probs: list of n_layers tensors (batch, heads, seq, seq): softmax(scores + mask),
            before attention dropout.
        last_hidden: (batch, seq, hidden), the base model's ``last_hidden_state`` (after the final
            norm for GPT-2 / Llama; the last layer's output for BERT).
        is_causal: True when the model's self-attention is causal (key <= query).
    """

    logits: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    hidden_states: list[torch.Tensor] | None = None
    attention_scores: list[torch.Tensor] | None = None
    attention_probs: list[torch.Tensor] | None = None
    last_hidden: torch.Tensor | None = None
    is_causal: bool = False


def _tracing_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention that records its scores and probabilities (see module docstring).

    Args:
        module: the calling attention module (used for ``training`` only).
        query: (batch, heads, q_len, head_dim).
        key, value: (batch, kv_heads, kv_len, head_dim); heads must be a multiple of kv_heads.
        attention_mask: None or additive float mask broadcastable to (batch, 1, q_len, kv_len)
            (0 = attend, dtype minimum = masked), as built by ``eager_mask``.
        scaling: multiplier on Q Kᵀ; None means 1/√head_dim.
        dropout: attention dropout probability, applied in training mode.

    Returns:
        (attn_output (batch, q_len, heads, head_dim), attn_probs (batch, heads, q_len, kv_len)),
        the same contract as ``eager_attention_forward`` in the modeling files.

    Raises:
        ValueError: heads not a multiple of kv_heads, or attention sinks requested.
    """
    if kwargs.get("s_aux") is not None:
        raise ValueError("kronlm trace: attention sinks (s_aux) are not supported")
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    n_heads, n_kv = query.shape[1], key.shape[1]
    if n_heads % n_kv != 0:
        raise ValueError(f"kronlm trace: {n_heads} query heads is not a multiple of {n_kv} key/value heads")
    if n_kv != n_heads:
        # Grouped-query attention: query head h uses K/V head h // (n_heads / n_kv), as repeat_kv does.
        key = key.repeat_interleave(n_heads // n_kv, dim=1)
        value = value.repeat_interleave(n_heads // n_kv, dim=1)

    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    softcap = kwargs.get("softcap")
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    masked = scores
    if attention_mask is not None:
        masked = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = nn.functional.softmax(masked, dim=-1, dtype=torch.float32).to(query.dtype)

    recording = _attention_records.get()
    if recording is not None:
        records, keep_scores, keep_probs = recording
        records.append((scores if keep_scores else None, probs if keep_probs else None))

    dropped = nn.functional.dropout(probs, p=dropout, training=module.training)
    attn_output = torch.matmul(dropped, value).transpose(1, 2).contiguous()
    return attn_output, probs


AttentionInterface.register(TRACE_ATTN_IMPLEMENTATION, _tracing_attention_forward)
AttentionMaskInterface.register(TRACE_ATTN_IMPLEMENTATION, eager_mask)


def is_causal_model(model: nn.Module) -> bool:
    """Whether ``model``'s self-attention is causal.

    Reads the ``is_causal`` attribute that transformers attention modules carry (GPT-2 and Llama:
    True; BERT encoder: False; BERT with ``is_decoder``: True). Cross-attention modules carry
    False and do not change the answer.

    Args:
        model: a transformers model, possibly wrapped (DDP / accelerate: ``model.module``).

    Raises:
        ValueError: no submodule carries a boolean ``is_causal`` attribute.
    """
    inner = getattr(model, "module", model)
    flags = [m.is_causal for m in inner.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if not flags:
        raise ValueError(
            f"{type(inner).__name__}: no attention module has an `is_causal` attribute; cannot tell "
            "whether the model is causal"
        )
    return any(flags)


def _configs_of(model: nn.Module) -> list[PretrainedConfig]:
    """Every distinct config object the model's submodules read at forward time."""
    seen: dict[int, PretrainedConfig] = {}
    for m in model.modules():
        config = getattr(m, "config", None)
        if isinstance(config, PretrainedConfig):
            seen.setdefault(id(config), config)
    return list(seen.values())


@contextlib.contextmanager
def _patched_configs(configs: list[PretrainedConfig], *, attention: bool, untie: bool) -> Iterator[None]:
    """Temporarily switch attention to the tracing function and/or untie the last hidden state."""
    saved = []
    try:
        for config in configs:
            had_tie = "tie_last_hidden_states" in vars(config)
            tie = getattr(config, "tie_last_hidden_states", None)
            saved.append((config, config._attn_implementation, had_tie, tie))
            if attention:
                config._attn_implementation = TRACE_ATTN_IMPLEMENTATION
            if untie:
                config.tie_last_hidden_states = False
        yield
    finally:
        # Parents first: a parent's setter also resets its sub-configs, which are restored after.
        for config, attn, had_tie, tie in saved:
            config._attn_implementation = attn
            if had_tie:
                config.tie_last_hidden_states = tie
            elif "tie_last_hidden_states" in vars(config):
                delattr(config, "tie_last_hidden_states")


def trace(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    need: set[str],
    model_kwargs: dict | None = None,
) -> ModelTrace:
    """Run ``model`` once and capture the items in ``need``.

    The forward goes through ``model`` itself (so a DDP wrapper still synchronises gradients);
    config changes and hooks are applied to ``getattr(model, "module", model)``. Gradients flow
    through the captured tensors when grad mode is on. See the module docstring for the
    mechanism and its cost (eager attention while attention is traced).

    Args:
        model: a transformers ``PreTrainedModel``, possibly wrapped by DDP / accelerate.
        input_ids: (batch, seq) token ids.
        attention_mask: (batch, seq) 1 = real token, 0 = padding; None = no padding.
        need: subset of {"logits", "embeddings", "hidden", "attention_scores",
            "attention_probs", "last_hidden"}; see :class:`ModelTrace` for each item.
        model_kwargs: extra keyword arguments for the forward (e.g. ``token_type_ids``).

    Returns:
        a :class:`ModelTrace` with the requested items (``logits`` None when the model has none;
        "logits" also fills ``start_logits`` / ``end_logits`` of a question-answering model)
        and ``is_causal``.

    Raises:
        TypeError: the (unwrapped) model is not a transformers ``PreTrainedModel``.
        ValueError: unknown items in ``need``; ``input_ids`` not 2-D; ``attention_mask`` of another
            shape; attention requested on a model training with gradient checkpointing; or the
            model never called the attention interface.
    """
    need = set(need)
    inner = _check_trace_inputs(model, input_ids, attention_mask, need)
    want_attention = bool(need & {"attention_scores", "attention_probs"})
    kwargs = dict(model_kwargs or {})
    kwargs.update(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
    if need & {"embeddings", "hidden"}:
        kwargs["output_hidden_states"] = True
    if getattr(inner.config, "use_cache", None) is not None:
        # A KV cache is useless for a single full-sequence pass and would keep K/V alive.
        kwargs["use_cache"] = False

    last_hidden: list[torch.Tensor] = []
    hook = None
    if "last_hidden" in need:

        def grab_last_hidden(module, args, output):
            state = getattr(output, "last_hidden_state", None)
            last_hidden.append(state if state is not None else output[0])

        hook = inner.base_model.register_forward_hook(grab_last_hidden)

    records: list = []
    token = _attention_records.set((records, "attention_scores" in need, "attention_probs" in need) if want_attention else None)
    try:
        with _patched_configs(_configs_of(inner), attention=want_attention, untie="hidden" in need):
            output = model(**kwargs)
    finally:
        _attention_records.reset(token)
        if hook is not None:
            hook.remove()
    return _collect_trace(inner, output, need, last_hidden, records)


def _check_trace_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, need: set[str]) -> PreTrainedModel:
    """The unwrapped model, after refusing what :func:`trace` cannot do (see its Raises)."""
    unknown = need - NEED_KEYS
    if unknown:
        raise ValueError(f"trace: unknown items {sorted(unknown)}; valid items are {sorted(NEED_KEYS)}")
    inner = getattr(model, "module", model)
    if not isinstance(inner, PreTrainedModel):
        raise TypeError(f"trace: expected a transformers PreTrainedModel, got {type(inner).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"trace: input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"trace: attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
            f"shape {tuple(input_ids.shape)}"
        )
    checkpointing = getattr(inner, "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers < 5.x spelling
        checkpointing = getattr(inner, "is_gradient_checkpointing", False)
    if need & {"attention_scores", "attention_probs"} and inner.training and checkpointing:
        raise ValueError(
            f"trace: cannot capture attention of {type(inner).__name__} while it trains with gradient "
            "checkpointing (the backward recomputation would use another attention implementation); "
            "disable gradient checkpointing or drop the attention term"
        )
    return inner


def _collect_trace(inner: PreTrainedModel, output: Any, need: set[str], last_hidden: list[torch.Tensor], records: list) -> ModelTrace:
    """The :class:`ModelTrace` of one forward: the items of ``need`` from its output, the
    last-hidden hook and the attention records."""
    result = ModelTrace(is_causal=is_causal_model(inner))
    if "logits" in need:
        result.logits = getattr(output, "logits", None)
        result.start_logits = getattr(output, "start_logits", None)
        result.end_logits = getattr(output, "end_logits", None)
    if need & {"embeddings", "hidden"}:
        states = output.hidden_states
        if "embeddings" in need:
            result.embeddings = states[0]
        if "hidden" in need:
            result.hidden_states = list(states[1:])
    if "last_hidden" in need:
        result.last_hidden = last_hidden[-1]
    if need & {"attention_scores", "attention_probs"}:
        if not records:
            raise ValueError(
                f"trace: {type(inner).__name__} never called the transformers attention interface, so "
                "its attention cannot be captured"
            )
        if "attention_scores" in need:
            result.attention_scores = [scores for scores, _ in records]
        if "attention_probs" in need:
            result.attention_probs = [probs for _, probs in records]
    return result
