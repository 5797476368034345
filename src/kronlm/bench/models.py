"""Model-level speed: prefill and KV-cache decode throughput and peak memory of dense and compressed
models: presets with random weights in the reference configurations, or saved model folders (a
compressed model against the same model merged back to dense)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from kronlm.bench.memory import peak_memory
from kronlm.bench.markdown import machine_info, machine_line, markdown_table
from kronlm.bench.timing import time_interleaved
from kronlm.compression.presets import get_preset
from kronlm.decompose.shapes import contraction_macs
from kronlm.layers.linear import KroneckerLinear
from kronlm.layers.lowrank import KroneckerLowRankLinear
from kronlm.modeling import compress, load_model, merge_and_unload

# Speed target: compressed prefill speed-up at least 0.7 × the model's multiply-add ratio; decode not slower.
PREFILL_TARGET_FRACTION = 0.7
FAMILY_PRESETS = {
    "llama": ("krony-pt-llama-mlp-2x", "krony-pt-llama-mlp-4x"),
    "gpt2": ("krony-pt-81m", "krony-pt-96m", "kngpt2", "krony-pt-67m"),
}
FAMILY_LABEL = {"llama": "SmolLM2-135M configuration", "gpt2": "GPT-2 124M configuration (GPT2Config())"}


def build_reference(family: str, seed: int = 0, **overrides) -> nn.Module:
    """A randomly initialised model in a family's reference configuration, in eval mode.

    "llama": SmolLM2-135M's sizes (30 layers, hidden 576, MLP 1536, 9 heads / 3 KV heads, vocab
    49,152, tied); "gpt2": ``GPT2Config()`` defaults (GPT-2 124M). ``overrides`` change config
    fields (tests use tiny sizes). Random weights are enough for speed: the FLOPs do not depend
    on the values.

    Raises:
        ValueError: an unknown family.
    """

    torch.manual_seed(seed)
    if family == "llama":
        cfg = dict(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True,
        )
        cfg.update(overrides)
        return LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(**overrides)).eval()
    raise ValueError(f"build_reference: unknown family {family!r}; choose one of: {', '.join(FAMILY_PRESETS)}")


def compressed_copy(model: nn.Module, preset: str) -> nn.Module:
    """A deep copy of ``model`` compressed with ``preset``, factors drawn at random (fast; speed only).

    Raises:
        ValueError: unknown preset, or one that does not fit the model.
    """

    config = get_preset(preset)
    config.targets = [dataclasses.replace(t, init="random") for t in config.targets]
    student = copy.deepcopy(model)
    compress(student, config, progress=False)
    return student.eval()


def saved_models(paths: Sequence[str | Path], dense: str | None = None, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> dict[str, nn.Module]:
    """Saved causal LMs to time against a dense baseline, in :func:`model_speed_rows`' order.

    The baseline (the first entry) is ``dense`` loaded (a hub id, folder, ``.gguf`` path or
    alias), or by default the first folder merged back to dense (``merge_and_unload``: the base
    architecture with every factored module an ``nn.Linear`` again, the same weights), which is
    the model a user would otherwise run. Each folder is named by its last path component (the
    whole path where two share one).

    Args:
        paths: compressed (or any causal-LM) model folders, at least one.
        dense: the baseline instead of the first folder merged back.
        device, dtype: where and in which dtype the models run.

    Returns:
        name -> model in eval mode: ``"dense"`` (or ``"dense (NAME merged)"``) first, then the folders.

    Raises:
        ValueError: no folder, or a model whose vocabulary size differs from the baseline's (the
            prompts are drawn from one vocabulary; names both).
        FileNotFoundError, ValueError: from :func:`kronlm.load_model` (a missing folder, a corrupt file).
    """
    if not paths:
        raise ValueError("saved_models: no model folder given")
    names = [Path(p).name or str(p) for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    loaded = {name: load_model(str(p), dtype=dtype, device=device, task="causal-lm").eval() for name, p in zip(names, paths)}
    if dense is not None:
        models = {"dense": load_model(dense, dtype=dtype, device=device, task="causal-lm").eval()}
    else:
        models = {f"dense ({names[0]} merged)": merge_and_unload(loaded[names[0]]).eval()}
    base_name, base = next(iter(models.items()))
    for name, model in loaded.items():
        if model.config.vocab_size != base.config.vocab_size:
            raise ValueError(f"saved_models: {name} has a vocabulary of {model.config.vocab_size:,} tokens, the baseline "
                             f"{base_name} {base.config.vocab_size:,}; time models of one tokenizer together")
    return {**models, **loaded}


def speed_model_sets(family: str, presets: str | None, model_paths: Sequence[str], dense: str | None, *,
                     device: torch.device, dtype: torch.dtype):
    """The tables of ``kronlm bench models`` (and ``benchmarks/model_speed.py``), built one at a time.

    With ``model_paths`` one table: the saved folders against ``dense`` or the first folder merged
    back (:func:`saved_models`). Otherwise one table per family (``"llama"``, ``"gpt2"`` or
    ``"all"``): the reference configuration with random weights against ``presets`` (comma-separated;
    default the family's list, :data:`FAMILY_PRESETS`) compressed with random factors.

    Yields:
        (key, title, models, weights sentence): the family (``"saved"`` for the folders), the
        table's title, name -> model with the baseline first, and what the table says about the
        weights.

    Raises:
        ValueError: ``presets`` or ``dense`` given with, respectively without, ``model_paths``; an
            unknown preset; from :func:`saved_models`.
    """
    dtype_name = str(dtype).removeprefix("torch.")
    if model_paths:
        if presets:
            raise ValueError("bench models: give --presets (random weights) or --model (saved folders), not both")
        models = saved_models(model_paths, dense, device=device, dtype=dtype)
        baseline = "the dense model given" if dense else "the first folder merged back to dense (the same weights, every factored module an nn.Linear again)"
        yield ("saved", f"Model speed, saved models, {dtype_name} on {torch.device(device).type}", models,
               f"Saved weights; the baseline is {baseline}.")
        return
    if dense is not None:
        raise ValueError("bench models: --dense is the baseline of --model folders; the presets are timed against their reference configuration")
    for fam in list(FAMILY_PRESETS) if family == "all" else [family]:
        names = [p.strip() for p in presets.split(",")] if presets and family != "all" else list(FAMILY_PRESETS[fam])
        reference = build_reference(fam).to(device=device, dtype=dtype)
        yield (fam, f"Model speed, {FAMILY_LABEL[fam]}, {dtype_name} on {torch.device(device).type}",
               {"dense": reference, **{name: compressed_copy(reference, name) for name in names}}, "Random weights.")


def _is_head(model: nn.Module, module: nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and module is head


def linear_macs_per_token(model: nn.Module, *, include_head: bool = False) -> int:
    """Multiply-adds per token of every linear map (nn.Linear, Conv1D, KroneckerLinear,
    KroneckerLowRankLinear) in ``model``.

    Kronecker factors count their cheaper contraction order (docs/method.md, "The forward pass never
    forms W"), a low-rank part U (out, k) V (k, in) its two thin products, k·(in + out); the LM head
    is left out unless ``include_head`` (prefill in ``generate`` computes logits at the last
    position only).
    """

    total = 0
    for module in model.modules():
        if not include_head and _is_head(model, module):
            continue
        if isinstance(module, KroneckerLowRankLinear):
            total += min(contraction_macs(module.a_shape, module.b_shape, module.rank))
            total += module.lowrank * (module.in_features + module.out_features)
        elif isinstance(module, KroneckerLinear):
            total += min(contraction_macs(module.a_shape, module.b_shape, module.rank))
        elif isinstance(module, (nn.Linear, Conv1D)):
            total += module.weight.numel()
    return total


def attention_macs_per_token(model: nn.Module, seq_len: int) -> int:
    """Multiply-adds per token of the attention products QKᵀ and AV in a causal prompt of ``seq_len``.

    Each query attends to (seq_len + 1) / 2 keys on average: 2 · layers · heads · head_dim of them.
    """
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    return int(2 * layers * hidden * (seq_len + 1) / 2)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the distinct parameters and buffers (tied weights counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _prefill_fn(model, ids):
    def run():
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=False, logits_to_keep=1)

    return run


def _decode_fn(model, ids, new_tokens):
    mask = torch.ones_like(ids)

    def run():
        with torch.inference_mode():
            return model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=0,
            )

    return run


def model_speed_rows(
    models: dict[str, nn.Module],
    *,
    prefill_shapes: Sequence[tuple[int, int]] = ((1, 512), (8, 512)),
    prompt_tokens: int = 8,
    new_tokens: int = 64,
    repeats: int = 3,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> list[dict]:
    """Prefill and decode throughput of several models of one family, interleaved; the first is the baseline.

    Prefill: one forward of (batch, seq) random token ids without cache, logits at the last
    position only (as ``generate``'s prefill). Decode: greedy ``generate`` with the KV cache from
    a (1, ``prompt_tokens``) prompt, exactly ``new_tokens`` new tokens (``min_new_tokens``), so
    decode tokens/s = new_tokens / time (the short prompt's prefill is included). Peak memory:
    ``peak_memory`` around one prefill at the largest shape.

    Args:
        models: name -> model (same vocabulary); the first entry is the dense baseline.
        prefill_shapes: (batch, seq) prompts to time.
        prompt_tokens, new_tokens: the decode setting.
        repeats, warmup: timing effort (``time_interleaved``).

    Returns:
        One dict per model: "model", "params_bytes", "macs_per_token" (linear + attention at the
        largest seq), "mac_ratio" (baseline / this), "prefill_tok_s" {(batch, seq): tokens/s},
        "prefill_speedup" {(batch, seq): this / baseline}, "decode_tok_s", "decode_speedup",
        "peak_bytes", "peak_extra_bytes", "memory_method".

    Raises:
        ValueError: no models, a non-positive size.
    """
    if not models:
        raise ValueError("model_speed_rows: no models")
    if prompt_tokens < 1 or new_tokens < 1 or any(b < 1 or s < 1 for b, s in prefill_shapes):
        raise ValueError(f"model_speed_rows: sizes must be >= 1, got prefill {list(prefill_shapes)}, prompt {prompt_tokens}, new {new_tokens}")
    device = torch.device(device)
    first = next(iter(models.values()))
    vocab = first.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    seq_for_macs = max(s for _, s in prefill_shapes)
    rows = {name: {"model": name, "params_bytes": parameter_bytes(m),
                   "macs_per_token": linear_macs_per_token(m) + attention_macs_per_token(m, seq_for_macs),
                   "prefill_tok_s": {}, "prefill_speedup": {}} for name, m in models.items()}
    for batch, seq in prefill_shapes:
        ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
        t = time_interleaved({n: _prefill_fn(m, ids) for n, m in models.items()}, warmup=warmup, repeats=repeats, device=device)
        for name in models:
            rows[name]["prefill_tok_s"][(batch, seq)] = batch * seq / t[name].median_s
    prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=gen).to(device)
    t = time_interleaved({n: _decode_fn(m, prompt, new_tokens) for n, m in models.items()}, warmup=warmup, repeats=repeats, device=device)
    for name in models:
        rows[name]["decode_tok_s"] = new_tokens / t[name].median_s
    batch, seq = max(prefill_shapes, key=lambda s: s[0] * s[1])
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    for name, m in models.items():
        peak, start, method = peak_memory(_prefill_fn(m, ids), device)
        rows[name].update({"peak_bytes": peak, "peak_extra_bytes": peak - start, "memory_method": method})
    base = rows[next(iter(models))]
    for row in rows.values():
        row["mac_ratio"] = base["macs_per_token"] / row["macs_per_token"]
        row["prefill_speedup"] = {k: v / base["prefill_tok_s"][k] for k, v in row["prefill_tok_s"].items()}
        row["decode_speedup"] = row["decode_tok_s"] / base["decode_tok_s"]
    return list(rows.values())


def _prefill_target(speedup: float, mac_ratio: float) -> str:
    need = PREFILL_TARGET_FRACTION * mac_ratio
    return "met" if speedup >= need else f"missed by {100 * (1 - speedup / need):.0f}%"


def model_speed_markdown(rows: Sequence[dict], *, title: str, command: str = "", new_tokens: int = 64,
                         prompt_tokens: int = 8, device="cpu", weights: str = "Random weights.") -> str:
    """The rows of ``model_speed_rows`` as a Markdown section with the targets checked; ``weights``
    is the sentence that says where the models' weights come from."""
    shapes = list(rows[0]["prefill_tok_s"])
    headers = ["model", "weights MB", "MACs/token (M)", "MAC ratio"]
    for b, s in shapes:
        headers += [f"prefill {b}×{s} tok/s", f"speed-up {b}×{s}", f"target {b}×{s}"]
    headers += [f"decode tok/s (1×{prompt_tokens}+{new_tokens})", "decode speed-up", "decode target",
                "prefill peak MB (extra)"]
    table = []
    for i, r in enumerate(rows):
        cells = [r["model"], f"{r['params_bytes'] / 2**20:.0f}", f"{r['macs_per_token'] / 1e6:.1f}", f"{r['mac_ratio']:.2f}"]
        for k in shapes:
            cells += [f"{r['prefill_tok_s'][k]:.0f}", f"{r['prefill_speedup'][k]:.2f}",
                      "–" if i == 0 else _prefill_target(r["prefill_speedup"][k], r["mac_ratio"])]
        decode_target = "–" if i == 0 else ("met" if r["decode_speedup"] >= 1.0 else f"slower by {100 * (1 - r['decode_speedup']):.0f}%")
        cells += [f"{r['decode_tok_s']:.1f}", f"{r['decode_speedup']:.2f}", decode_target,
                  f"{r['peak_bytes'] / 2**20:.0f} ({r['peak_extra_bytes'] / 2**20:.0f})"]
        table.append(cells)
    parts = [f"## {title}", "", machine_line(machine_info(device))]
    if command:
        parts += ["", f"Command: `{command}`"]
    parts += [
        "",
        f"{weights} MACs/token: every linear map except the LM head (prefill computes last-position logits "
        f"only, as `generate` does) plus QKᵀ/AV at the longest prompt; MAC ratio = dense / this. Targets: prefill "
        f"speed-up >= {PREFILL_TARGET_FRACTION} × MAC ratio; decode speed-up >= 1. Decode is greedy `generate` with the KV "
        f"cache, exactly {new_tokens} new tokens after a {prompt_tokens}-token prompt (its prefill included). Peak "
        f"memory: {rows[0]['memory_method']} during one prefill at the largest shape, in brackets the part above the "
        "level at its start (every model of the table is resident).",
        "",
        markdown_table(headers, table),
    ]
    return "\n".join(parts)
