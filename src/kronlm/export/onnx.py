"""ONNX export of a (compressed) causal LM, with or without a KV cache, checked with onnxruntime.

Default graph: ``input_ids`` and ``attention_mask`` (both int64, (batch, sequence)) -> ``logits``
(float32, (batch, sequence, vocab)), batch and sequence dynamic, no KV cache: it scores or prefills
whole sequences. ``kv_cache=True`` writes a decoder graph instead (the layout of Hugging Face
Optimum's ``decoder_with_past``): inputs ``input_ids`` (batch, sequence), ``attention_mask`` (batch,
past + sequence), ``position_ids`` (batch, sequence) and ``past_key_values.{i}.key`` / ``.value``
(batch, kv_heads, past, head_dim) for every layer; outputs ``logits`` and ``present.{i}.key`` /
``.value`` (batch, kv_heads, past + sequence, head_dim). A past of length 0 is the prefill, so one
graph serves prompt and decode steps, and :func:`greedy_generate` decodes without re-running the
prefix.

The verification (:func:`compare_logits`) fits float32 on real models: the largest difference at
attended positions must be at most ``tolerance`` (default 1e-3) times the largest |logit| of the
PyTorch model, and the argmax must agree at every attended position except near ties (top-2 gap of
PyTorch's logits within twice that difference). Measured on SmolLM2-135M: 1.0e-4 absolute (3e-6
relative) dense, 1.1e-3 (3.3e-5 relative) with ``krony-pt-llama-mlp-2x``; an absolute 1e-4 bound, as
before, refused both real models.

A head tied to the input embedding is stored once: the TorchScript exporter folds the head's
transposed weight into a second initializer; :func:`dedupe_transposed_initializers` replaces such a
copy by a ``Transpose`` of the original (494 -> 381 MB for SmolLM2 ``krony-pt-llama-mlp-2x``).

Kronecker modules are exported through ``OnnxKroneckerLinear``, a form of the same product (docs/method.md,
"The forward pass never forms W": same contraction order and multiply-adds) arranged for onnxruntime: the large factor is one 2-D
``MatMul`` against a constant matrix (MLAS pre-packs it), the small factor of the presets' (2, 1) /
(1, 2) B is a broadcast ``Mul`` or a small left ``MatMul`` along the long axis, and inside an MLP
the hidden features travel in the swapped Kronecker order so that no ``Transpose`` is needed. Traced
as is, ``kronecker_matmul`` gives GEMMs with 1-4 columns or a contraction of 1, which MLAS runs
about as slowly as the large GEMM they follow (measured with onnxruntime's profiler: the compressed
MLP was no faster than the dense one). The factors, per-term scalars included, are folded into
constant buffers once at export time: the graph holds R·(m1·n1 + m2·n2) numbers per layer, never the
dense (out, in) weight.

The exporter is the TorchScript one (``torch.onnx.export(..., dynamo=False)``): for transformers 5.x
Llama and GPT-2 it exports in about a second and gives logits equal to PyTorch's at every position,
padding included, while the dynamo exporter takes 15-20 s even for a tiny model and differs at
fully-masked (left-padding) query positions. ``exporter="dynamo"`` selects the latter.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from kronlm.compression.surgery import set_module
from kronlm.layers import KroneckerLinear, KroneckerTiedLMHead, OnnxKroneckerLinear
from kronlm.utils.atomic import (
    atomic_dir,
    write_json,
)
from kronlm.utils.outputs import (
    check_output_folder,
    write_manifest,
)

ONNX_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx.data"
DEFAULT_OPSET = 18
# Largest allowed max |logits_onnx - logits_torch| as a fraction of max |logits_torch| (see the module docstring).
TOLERANCE = 1e-3
EXPORTERS = ("torchscript", "dynamo")
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("logits",)
PAST_INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")
# Initializers smaller than this are not worth a Transpose node.
DEDUPE_MIN_ELEMENTS = 1 << 16
# Protobuf cannot hold a file over 2 GiB; keep weights beside the graph well before that.
EXTERNAL_DATA_THRESHOLD_BYTES = 1 << 30
METADATA_FILE = "kronlm_onnx.json"


def require_onnx() -> None:
    """Check that the ONNX packages are importable.

    Raises:
        ImportError: ``onnx``, ``onnxscript`` or ``onnxruntime`` is missing (the message names the
            missing packages and the pip extra ``kronlm[onnx]``).
    """
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: install them with pip install 'kronlm[onnx]'")


# MLPs whose projections in -> out have only an elementwise activation (and gating product)
# between them: (input projections, output projection), by attribute name.
MLP_PROJECTIONS = ((("gate_proj", "up_proj"), "down_proj"), (("c_fc",), "c_proj"), (("fc1",), "fc2"))


def _swap_pairs(model: nn.Module) -> tuple[set[str], set[str]]:
    """Names of modules that may write (first set) and read (second set) swapped features.

    An MLP qualifies when its class name ends in "MLP", every projection is a ``KroneckerLinear``,
    the input projections' output factor sides (m1, m2) equal the output projection's input sides
    (n1, n2), and the swap is free for all of them.
    """
    writers, readers = set(), set()
    for name, module in model.named_modules():
        if not type(module).__name__.endswith("MLP"):
            continue
        for ins, out in MLP_PROJECTIONS:
            mods = [getattr(module, n, None) for n in (*ins, out)]
            if not all(isinstance(m, KroneckerLinear) for m in mods):
                continue
            *firsts, last = [OnnxKroneckerLinear.from_module(m) for m in mods]
            sides = {(f.a_shape[0], f.b_shape[0]) for f in firsts}
            if sides != {(last.a_shape[1], last.b_shape[1])}:
                continue
            if all(f.free_swap_out for f in firsts) and last.free_swap_in:
                prefix = f"{name}." if name else ""
                writers.update(prefix + n for n in ins)
                readers.add(prefix + out)
    return writers, readers


@contextlib.contextmanager
def export_friendly(model: nn.Module) -> Iterator[nn.Module]:
    """Swap every ``KroneckerLinear`` / ``KroneckerTiedLMHead`` for an ``OnnxKroneckerLinear``.

    Inside a qualifying MLP (see ``_swap_pairs``) the hidden features travel in the swapped
    Kronecker order, which removes the Transposes at both ends of the activation; the MLP's output
    is unchanged because the activation is elementwise. The original modules are put back when
    the block exits (also on error); the model's parameters are never modified.
    """
    swapped = [(name, m) for name, m in model.named_modules() if isinstance(m, (KroneckerLinear, KroneckerTiedLMHead))]
    writers, readers = _swap_pairs(model)
    try:
        with torch.no_grad():
            for name, module in swapped:
                set_module(model, name, OnnxKroneckerLinear.from_module(module, swap_in=name in readers, swap_out=name in writers))
        yield model
    finally:
        for name, module in swapped:
            set_module(model, name, module)


class CausalLMLogits(nn.Module):
    """Wrap a Hugging Face causal LM as (input_ids, attention_mask) -> logits, without a KV cache.

    Args:
        model: a ``PreTrainedModel`` whose forward takes ``input_ids``, ``attention_mask`` and
            ``use_cache`` and returns an output with ``logits``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: (batch, sequence) int64 -> logits (batch, sequence, vocab)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def cache_geometry(model: nn.Module) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder's KV cache, from its config.

    Raises:
        ValueError: a config without the layer / head counts.
    """
    config = getattr(model, "config", None)
    config = config.get_text_config(decoder=True) if config is not None and hasattr(config, "get_text_config") else config
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not (layers and heads and hidden):
        raise ValueError(f"{type(model).__name__}: the config gives no num_hidden_layers / num_attention_heads / hidden_size for a KV cache")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return int(layers), int(kv_heads), int(head_dim)


def past_names(layers: int) -> tuple[list[str], list[str]]:
    """Graph input names of the past and output names of the present keys/values, layer by layer."""
    past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return past, present


class CausalLMWithPast(nn.Module):
    """Wrap a Hugging Face causal LM as (input_ids, attention_mask, position_ids, *past) -> (logits, *present).

    ``past`` is the flat list key_0, value_0, key_1, ... of (batch, kv_heads, past, head_dim)
    tensors; a ``DynamicCache`` is built from them, the model runs with ``use_cache=True`` and the
    updated keys and values come back in the same order, (batch, kv_heads, past + sequence, head_dim).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.layers = cache_geometry(model)[0]
        # transformers 5.x renames past_key_values to cache; use the name this model's forward takes.
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor):
        """input_ids, position_ids: (batch, sequence); attention_mask: (batch, past + sequence); past as above."""
        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **{self.cache_kwarg: cache})
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def example_past_inputs(model: nn.Module, batch_size: int = 2, seq_len: int = 4, past_len: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of the KV-cache graph: random ids (batch, seq_len), a mask over past + new tokens with
    the first row left-padded by 2 (the general masking path), matching position ids, and random
    past keys / values (batch, kv_heads, past_len, head_dim).

    Raises:
        ValueError: sizes below 1 (past_len below 0), or a config without vocab / head counts.
    """
    if batch_size < 1 or seq_len < 1 or past_len < 0:
        raise ValueError(f"example past inputs need batch_size, seq_len >= 1 and past_len >= 0, got {batch_size}, {seq_len}, {past_len}")
    inputs = example_inputs(model, batch_size, seq_len, seed)
    layers, kv_heads, head_dim = cache_geometry(model)
    gen = torch.Generator().manual_seed(seed + 1)
    mask = torch.ones(batch_size, past_len + seq_len, dtype=torch.int64)
    if batch_size >= 2 and past_len + seq_len >= 4:
        mask[0, :2] = 0
    out = {"input_ids": inputs["input_ids"], "attention_mask": mask, "position_ids": position_ids_from_mask(mask)[:, past_len:]}
    for name in past_names(layers)[0]:
        out[name] = torch.randn(batch_size, kv_heads, past_len, head_dim, generator=gen)
    return out


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of every token counting only attended ones (padding gets 0), as Hugging Face's generate does."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass(frozen=True)
class LogitsCheck:
    """ONNX logits against PyTorch's at the attended positions.

    Attributes:
        max_abs_diff: max |onnx - torch|.
        scale: max |torch| (the logits' scale).
        relative_diff: max_abs_diff / scale.
        argmax_agreement: fraction of positions whose argmax agrees.
        disagreement_gap: the largest gap between PyTorch's two top logits at a position whose
            argmax differs (0 when all agree). A difference of at most d can flip the argmax only
            where that gap is at most 2·d (a near tie).
        positions: attended positions compared.
    """

    max_abs_diff: float
    scale: float
    relative_diff: float
    argmax_agreement: float
    disagreement_gap: float
    positions: int

    def passed(self, tolerance: float) -> bool:
        """relative_diff within ``tolerance``, and argmax disagreements only at near ties (top-2 gap
        within 2·tolerance·scale)."""
        return self.relative_diff <= tolerance and self.disagreement_gap <= 2 * tolerance * self.scale

    def describe(self, tolerance: float | None = None) -> str:
        """One line: both differences, the argmax agreement and (given) the tolerance."""
        bound = "" if tolerance is None else f" (tolerance {tolerance:g} of the scale)"
        return (
            f"max |logits difference| {self.max_abs_diff:.3g} = {self.relative_diff:.2g} of max |logit| {self.scale:.3g}{bound}; "
            f"argmax agrees at {self.argmax_agreement:.1%} of {self.positions} positions"
        )

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready form."""
        return asdict(self)


def compare_logits(onnx_logits: torch.Tensor, torch_logits: torch.Tensor, attended: torch.Tensor) -> LogitsCheck:
    """Compare (batch, sequence, vocab) logits at the positions where ``attended`` (batch, sequence) is true.

    Raises:
        ValueError: different shapes, or no attended position.
    """
    if onnx_logits.shape != torch_logits.shape:
        raise ValueError(f"ONNX logits have shape {tuple(onnx_logits.shape)} but PyTorch's {tuple(torch_logits.shape)}")
    attended = attended.bool()
    if not attended.any():
        raise ValueError("compare_logits: the attention mask has no attended position")
    out, ref = onnx_logits.float()[attended], torch_logits.float()[attended]  # (positions, vocab)
    diff = float((out - ref).abs().max())
    scale = float(ref.abs().max())
    agree = out.argmax(-1) == ref.argmax(-1)
    gap = 0.0
    if not agree.all():
        top2 = ref[~agree].topk(min(2, ref.shape[-1]), dim=-1).values
        gap = float((top2[:, 0] - top2[:, -1]).max())
    relative = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    return LogitsCheck(diff, scale, relative, float(agree.float().mean()), gap, int(agree.numel()))


def example_inputs(model: nn.Module, batch_size: int = 2, seq_len: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ``input_ids`` (batch, seq_len) below the model's vocab and an ``attention_mask``.

    The first row is left-padded by a quarter of the sequence (when batch ≥ 2 and seq_len ≥ 4), so
    tracing follows the general masking path rather than the all-ones shortcut.

    Raises:
        ValueError: batch_size or seq_len below 1, or a model without ``config.vocab_size``.
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"example inputs need batch_size >= 1 and seq_len >= 1, got {batch_size} and {seq_len}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab:
        raise ValueError(f"{type(model).__name__} has no config.vocab_size; pass inputs explicitly")
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    if batch_size >= 2 and seq_len >= 4:
        attention_mask[0, : seq_len // 4] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def check_output_dir(out_dir: str | os.PathLike, *, overwrite: bool = False, inputs=()) -> Path:
    """Check, before any work, that ``out_dir`` can be created or replaced (kronlm's output policy,
    :func:`kronlm.utils.outputs.check_output_folder`): a new or empty folder, a folder kronlm wrote
    (an earlier export), or any folder with ``overwrite``; never one that is, holds or lies inside
    an input. A symlinked ``out_dir`` is followed.

    Returns:
        The folder to write (a symlink's target).

    Raises:
        FileExistsError: the folder is refused (named, with why).
        NotADirectoryError: a parent of the folder is a file.
        PermissionError: the nearest existing parent folder is not writable.
    """
    return check_output_folder(out_dir, overwrite=overwrite, inputs=inputs, option="--out")


def _graph_signature(model: nn.Module, kv_cache: bool) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
    """(input names, output names, dynamic axes) of the exported graph."""
    if not kv_cache:
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
        return list(INPUT_NAMES), list(OUTPUT_NAMES), axes
    past, present = past_names(cache_geometry(model)[0])
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    axes.update({name: {0: "batch", 2: "past_sequence"} for name in past})
    axes.update({name: {0: "batch", 2: "total_sequence"} for name in present})
    return [*PAST_INPUT_NAMES, *past], [*OUTPUT_NAMES, *present], axes


def _export_graph(wrapper: nn.Module, inputs: dict[str, torch.Tensor], path: Path, opset: int, exporter: str,
                  signature: tuple[list[str], list[str], dict[str, dict[int, str]]]) -> None:
    input_names, output_names, axes = signature
    args = tuple(inputs[name] for name in input_names)
    if exporter == "torchscript":
        with warnings.catch_warnings():
            # The deprecation notice and the tracer's notes on Python-side branches of the mask code;
            # the verification checks the result at shapes other than the traced one.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper, args, str(path), dynamo=False, input_names=input_names, output_names=output_names,
                dynamic_axes=axes, opset_version=opset, do_constant_folding=True,
            )
    else:
        dims = {label: torch.export.Dim(label) for name in input_names for label in axes[name].values()}
        shapes = {name: {axis: dims[label] for axis, label in axes[name].items()} for name in input_names}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper, args, dynamo=True, input_names=input_names, output_names=output_names,
                dynamic_shapes=tuple(shapes[name] for name in input_names), opset_version=opset, verbose=False,
            )
        program.save(str(path))


def dedupe_transposed_initializers(proto, min_elements: int = DEDUPE_MIN_ELEMENTS) -> int:
    """Replace every 2-D initializer that equals the transpose of another by a ``Transpose`` node, in place.

    The TorchScript exporter folds ``lm_head.weight.t()`` of a head tied to the input embedding into
    a second copy of the (vocab, dim) table; this keeps one. onnxruntime may still fold the
    ``Transpose`` in memory when it loads the graph; the file holds the weights once.

    Args:
        proto: an ``onnx.ModelProto`` (modified).
        min_elements: only initializers with at least this many elements are compared.

    Returns:
        The number of initializers replaced.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = proto.graph
    big = [t for t in graph.initializer if len(t.dims) == 2 and t.dims[0] * t.dims[1] >= min_elements]
    by_shape: dict[tuple, list] = {}
    for tensor in big:
        by_shape.setdefault((tuple(tensor.dims), tensor.data_type), []).append(tensor)
    replaced = []
    arrays: dict[str, np.ndarray] = {}

    def array(tensor):
        if tensor.name not in arrays:
            arrays[tensor.name] = numpy_helper.to_array(tensor)
        return arrays[tensor.name]

    gone = set()
    for tensor in big:
        if tensor.name in gone:
            continue
        rows, cols = tensor.dims
        for other in by_shape.get(((cols, rows), tensor.data_type), []):
            if other.name in gone or other.name == tensor.name:
                continue
            if np.array_equal(array(other), array(tensor).T):
                replaced.append((other, tensor))
                gone.add(other.name)
    for copy, original in replaced:
        graph.initializer.remove(copy)
        graph.node.insert(0, helper.make_node("Transpose", [original.name], [copy.name], perm=[1, 0], name=f"kronlm_tied_{copy.name}"))
    if replaced:
        onnx.checker.check_model(proto)
    return len(replaced)


def _finalize_graph(path: Path) -> int:
    """Dedupe tied weights (:func:`dedupe_transposed_initializers`) and move weights beside a graph over 1 GiB."""
    import onnx

    proto = onnx.load(str(path))
    replaced = dedupe_transposed_initializers(proto)
    external = proto.ByteSize() >= EXTERNAL_DATA_THRESHOLD_BYTES
    if replaced or external:
        if external:
            onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=EXTERNAL_DATA_FILE, size_threshold=1024)
        else:
            onnx.save_model(proto, str(path))
    return replaced


def export_onnx(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    opset: int = DEFAULT_OPSET,
    batch_size: int = 2,
    seq_len: int = 16,
    exporter: str = "torchscript",
    tolerance: float | None = TOLERANCE,
    kv_cache: bool = False,
    overwrite: bool = False,
) -> Path:
    """Export a causal LM (dense or kronlm-compressed) to ``out_dir/model.onnx``, atomically.

    The folder also gets ``config.json`` (the model's config), the tokenizer files when
    ``tokenizer`` is given, ``kronlm_onnx.json`` (inputs, outputs, opset, exporter, KV cache
    and the verification result) and ``kronlm_manifest.json`` (size and SHA-256 of every file). Weights go to ``model.onnx.data`` beside the graph when the
    graph file would exceed 1 GiB; a head tied to the embedding is stored once. The folder is
    written under a temporary name and swapped in only after the graph has been checked with
    onnxruntime (``tolerance``): a failed export leaves no folder.

    Args:
        model: a Hugging Face causal LM (``...ForCausalLM`` / ``GPT2LMHeadModel``), possibly compressed.
        out_dir: the output folder; an existing one is replaced only when kronlm wrote it (an
            earlier export) or with ``overwrite`` (:func:`check_output_dir`).
        tokenizer: saved beside the graph when given.
        opset: ONNX opset version of the default domain.
        batch_size, seq_len: shape of the example input traced (tokens); the graph's batch and
            sequence axes are dynamic either way.
        exporter: "torchscript" (default, see the module docstring) or "dynamo".
        tolerance: largest allowed max |logits_onnx - logits_torch| relative to max |logits_torch|,
            with argmax agreement outside near ties (:func:`compare_logits`), on 3 × 11 tokens with
            padding (with ``kv_cache``: a 7-token prefill, then 4 tokens on its cache); None skips the check.
        kv_cache: export the decoder with past keys / values in and out (module docstring).
        overwrite: replace ``out_dir`` even when kronlm did not write it.

    Returns:
        The path of ``model.onnx``.

    Raises:
        ImportError: onnx / onnxscript / onnxruntime missing (names the extra ``kronlm[onnx]``).
        ValueError: unknown exporter, opset below 14 (scaled-dot-product attention needs it),
            bad example shape, a config without head counts or the dynamo exporter (``kv_cache``).
        FileExistsError: ``out_dir`` is refused (:func:`check_output_dir`).
        OSError: ``out_dir`` cannot be written.
        RuntimeError: the check failed (the message gives both differences and the argmax agreement).
    """
    require_onnx()
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if opset < 14:
        raise ValueError(f"opset {opset} is too old: the attention export needs opset 14 or newer")
    if kv_cache and exporter != "torchscript":
        raise ValueError("the KV-cache graph is exported with the torchscript exporter only (the one verified)")
    out_dir = check_output_dir(out_dir, overwrite=overwrite)
    signature = _graph_signature(model, kv_cache)
    if kv_cache:
        inputs = example_past_inputs(model, batch_size, max(1, seq_len // 4), past_len=max(1, seq_len - seq_len // 4))
        wrapper = CausalLMWithPast(model)
    else:
        inputs = example_inputs(model, batch_size, seq_len)
        wrapper = CausalLMLogits(model)
    was_training = model.training
    model.eval()
    try:
        with atomic_dir(out_dir) as tmp:
            with export_friendly(model), torch.no_grad():
                _export_graph(wrapper, inputs, tmp / ONNX_FILE, opset, exporter, signature)
            deduplicated = _finalize_graph(tmp / ONNX_FILE)
            check = _check_export(model, tmp / ONNX_FILE, tolerance, kv_cache)
            _write_export_files(tmp, model, tokenizer, signature, check, opset=opset, exporter=exporter, kv_cache=kv_cache,
                                deduplicated=deduplicated, tolerance=tolerance)
    finally:
        model.train(was_training)
    return out_dir / ONNX_FILE


def _check_export(model: nn.Module, path: Path, tolerance: float | None, kv_cache: bool) -> LogitsCheck | None:
    """onnxruntime against the model's own Kronecker modules (not the export form); None without
    a tolerance.

    Raises:
        RuntimeError: the logits differ beyond ``tolerance`` (nothing is written).
    """
    if tolerance is None:
        return None
    check = check_onnx_past(model, path) if kv_cache else compare_onnx(model, path)
    if not check.passed(tolerance):
        raise RuntimeError(f"ONNX logits differ from PyTorch's: {check.describe(tolerance)}; nothing written")
    return check


def _write_export_files(folder: Path, model: nn.Module, tokenizer, signature, check: LogitsCheck | None, *, opset: int,
                        exporter: str, kv_cache: bool, deduplicated: int, tolerance: float | None) -> None:
    """Beside the graph: ``config.json``, the tokenizer, ``kronlm_onnx.json`` and the manifest (last)."""
    config = getattr(model, "config", None)
    if config is not None:
        config.to_json_file(folder / "config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    input_names, output_names, axes = signature
    write_json(
        folder / METADATA_FILE,
        {
            "inputs": {name: _describe_axes(name, axes) for name in input_names},
            "outputs": {name: _describe_axes(name, axes) for name in output_names},
            "kv_cache": kv_cache, "opset": opset, "exporter": exporter, "torch": torch.__version__,
            "tied_copies_removed": deduplicated,
            "max_abs_diff": None if check is None else check.max_abs_diff,
            "check": None if check is None else check.to_dict(),
            "tolerance": tolerance, "tolerance_kind": "max |difference| / max |logit|, plus argmax agreement outside near ties",
        },
    )
    write_manifest(folder)


def _describe_axes(name: str, axes: dict[str, dict[int, str]]) -> str:
    dtype = "int64" if name in PAST_INPUT_NAMES else "float32"
    dims = axes.get(name, {})
    rank = 4 if name.startswith(("past_key_values.", "present.")) else (3 if name == "logits" else 2)
    fixed = {"logits": {2: "vocab"}}.get(name, {1: "kv_heads", 3: "head_dim"} if rank == 4 else {})
    labels = [dims.get(i) or fixed.get(i, "?") for i in range(rank)]
    return f"{dtype} ({', '.join(labels)})"


def onnx_session(onnx_path: str | os.PathLike, *, threads: int | None = None, optimization: str = "all"):
    """An onnxruntime ``InferenceSession`` on ``CPUExecutionProvider``.

    Args:
        onnx_path: the ``model.onnx`` file.
        threads: intra-op threads (None: onnxruntime's default, one per physical core); inter-op
            threads are 1 (the graph is sequential).
        optimization: graph optimisation level: "disable", "basic", "extended" or "all".

    Raises:
        ImportError: onnxruntime missing (names ``kronlm[onnx]``).
        FileNotFoundError: no such file.
        ValueError: unknown optimisation level.
    """
    require_onnx()
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization not in levels:
        raise ValueError(f"unknown optimisation level {optimization!r}; choose one of {', '.join(levels)}")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path}: ONNX file not found")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization]
    options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def _torch_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if position_ids is None:
                return CausalLMLogits(model)(input_ids, attention_mask).float().cpu()
            return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits.float().cpu()
    finally:
        model.train(was_training)


def compare_onnx(model: nn.Module, onnx_path: str | os.PathLike, inputs: dict[str, torch.Tensor] | None = None, *, session=None) -> LogitsCheck:
    """:func:`compare_logits` of a no-cache graph against the model, at the attended positions.

    Args:
        model: the model that was exported.
        onnx_path: its ``model.onnx``.
        inputs: {"input_ids", "attention_mask"}, int64 (batch, sequence); default: 3 × 11 tokens
            with one left-padded row (a shape other than the default traced one). Padded positions
            are left out: every key is masked for a left-padded query, so its logits are not defined
            by the model (the dynamo exporter's graph gives other values there).
        session: a ready ``InferenceSession`` (else one is opened).

    Raises:
        ImportError / FileNotFoundError: as ``onnx_session``.
        ValueError: inputs missing a key, or output shapes that differ (both shapes named).
    """
    if inputs is None:
        inputs = example_inputs(model, batch_size=3, seq_len=11, seed=1)
    missing = [k for k in INPUT_NAMES if k not in inputs]
    if missing:
        raise ValueError(f"verify_onnx: inputs lack {', '.join(missing)}")
    session = session or onnx_session(onnx_path)
    feed = {k: inputs[k].to(torch.int64).cpu().numpy() for k in INPUT_NAMES}
    (logits_onnx,) = session.run(list(OUTPUT_NAMES), feed)
    ref = _torch_logits(model, inputs["input_ids"], inputs["attention_mask"])
    return compare_logits(torch.from_numpy(logits_onnx), ref, inputs["attention_mask"].cpu())


def verify_onnx(model: nn.Module, onnx_path: str | os.PathLike, inputs: dict[str, torch.Tensor] | None = None, *, session=None) -> float:
    """Largest absolute difference between the model's logits in PyTorch and in onnxruntime (CPU).

    ``compare_onnx(...).max_abs_diff``: max |logits_onnx - logits_torch| over the positions whose
    ``attention_mask`` is 1, float32 logits. Arguments and errors as :func:`compare_onnx`.
    """
    return compare_onnx(model, onnx_path, inputs, session=session).max_abs_diff


def run_with_past(session, input_ids: np.ndarray, attention_mask: np.ndarray, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One call of a KV-cache graph: returns (logits (batch, sequence, vocab), the next call's past).

    Args:
        session: an ``InferenceSession`` of a ``kv_cache=True`` export.
        input_ids: (batch, sequence) int64, the new tokens.
        attention_mask: (batch, past + sequence) int64.
        past: ``past_key_values.{i}.key`` / ``.value`` -> (batch, kv_heads, past, head_dim) float32.
    """
    positions = position_ids_from_mask(torch.from_numpy(attention_mask)).numpy()[:, -input_ids.shape[1]:]
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(names, {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": positions, **past})
    logits = outputs[0]
    present = {name.replace("present.", "past_key_values.", 1): value for name, value in zip(names[1:], outputs[1:])}
    return logits, present


def empty_past(session, batch_size: int = 1) -> dict[str, np.ndarray]:
    """Zero-length past keys / values for a KV-cache graph's first (prefill) call."""
    past = {}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values."):
            _, kv_heads, _, head_dim = value.shape
            past[value.name] = np.zeros((batch_size, int(kv_heads), 0, int(head_dim)), np.float32)
    return past


def check_onnx_past(model: nn.Module, onnx_path: str | os.PathLike, *, session=None, prefill: int = 7, step: int = 4, seed: int = 1) -> LogitsCheck:
    """Check a KV-cache graph: a prefill of ``prefill`` tokens with an empty past, then ``step``
    more tokens on the returned cache, against PyTorch's logits of the whole sequence (no cache).

    Batch 2, one row left-padded by 2; positions count attended tokens only (as ``generate`` and
    :func:`run_with_past` do). Returns the :class:`LogitsCheck` over both calls' attended positions.
    """
    session = session or onnx_session(onnx_path)
    inputs = example_inputs(model, batch_size=2, seq_len=prefill + step, seed=seed)
    ids, mask = inputs["input_ids"], torch.ones_like(inputs["input_ids"])
    mask[0, :2] = 0
    ref = _torch_logits(model, ids, mask, position_ids_from_mask(mask))
    ids_np, mask_np = ids.numpy(), mask.numpy()
    first, past = run_with_past(session, ids_np[:, :prefill], mask_np[:, :prefill], empty_past(session, 2))
    second, _ = run_with_past(session, ids_np[:, prefill:], mask_np, past)
    return compare_logits(torch.from_numpy(np.concatenate([first, second], axis=1)), ref, mask)


def greedy_generate(session, prompt_ids: list[int] | np.ndarray, max_new_tokens: int, *, eos_token_id: int | None = None) -> list[int]:
    """Greedy decoding with an exported graph; returns the new token ids.

    A KV-cache graph (``kv_cache=True``) runs the prompt once and then one token per call on its
    cache; a no-cache graph re-runs the whole sequence for every token (what the default export
    costs for generation). Stops early at ``eos_token_id``.

    Raises:
        ValueError: an empty prompt or ``max_new_tokens`` below 1.
    """
    ids = np.asarray(prompt_ids, dtype=np.int64).reshape(1, -1)
    if ids.shape[1] < 1 or max_new_tokens < 1:
        raise ValueError(f"greedy_generate needs a prompt and max_new_tokens >= 1, got {ids.shape[1]} tokens and {max_new_tokens}")
    with_past = any(v.name.startswith("past_key_values.") for v in session.get_inputs())
    new: list[int] = []
    past = empty_past(session) if with_past else None
    current, total = ids, ids.shape[1]
    for _ in range(max_new_tokens):
        if with_past:
            logits, past = run_with_past(session, current, np.ones((1, total), np.int64), past)
        else:
            (logits,) = session.run(list(OUTPUT_NAMES), {"input_ids": current, "attention_mask": np.ones_like(current)})
        token = int(logits[0, -1].argmax())
        new.append(token)
        if eos_token_id is not None and token == eos_token_id:
            break
        total += 1
        current = np.array([[token]], np.int64) if with_past else np.concatenate([current, [[token]]], axis=1)
    return new


__all__ = [
    "DEDUPE_MIN_ELEMENTS",
    "PAST_INPUT_NAMES",
    "TOLERANCE",
    "CausalLMLogits",
    "CausalLMWithPast",
    "LogitsCheck",
    "OnnxKroneckerLinear",
    "cache_geometry",
    "check_onnx_past",
    "check_output_dir",
    "compare_logits",
    "compare_onnx",
    "dedupe_transposed_initializers",
    "empty_past",
    "example_inputs",
    "example_past_inputs",
    "export_friendly",
    "export_onnx",
    "greedy_generate",
    "onnx_session",
    "past_names",
    "position_ids_from_mask",
    "require_onnx",
    "run_with_past",
    "verify_onnx",
]
