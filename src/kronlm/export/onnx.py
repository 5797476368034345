"""ONNX export of a (compressed) causal LM: ``input_ids``, ``attention_mask`` -> ``logits``.

The graph takes ``input_ids`` and ``attention_mask`` (both int64, (batch, sequence)) and returns
``logits`` (float32, (batch, sequence, vocab)), with batch and sequence dynamic. There is no KV cache
in the graph: it scores or prefills whole sequences (one forward pass per generated token if used
for generation).

Kronecker modules are exported through ``OnnxKroneckerLinear``, a form of the same product (SPEC
§2, same contraction order and multiply-adds) arranged for onnxruntime: the large factor is one 2-D
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
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from kronlm.decompose.shapes import contraction_macs
from kronlm.layers.embedding import KroneckerTiedLMHead
from kronlm.layers.linear import KroneckerLinear
from kronlm.utils.io import atomic_dir, write_json

ONNX_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx.data"
DEFAULT_OPSET = 18
TOLERANCE = 1e-4
EXPORTERS = ("torchscript", "dynamo")
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("logits",)
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


# A factor side up to this long makes a 2-D MLAS GEMM mostly packing overhead (measured: a
# (N·384, 4) @ (4, 1) product costs 3x a transpose plus a batched (1, 4) @ (N, 4, 384) product).
SMALL_SIDE = 8


def _swap_inner(t: torch.Tensor, a: int, r: int, b: int) -> torch.Tensor:
    """View t as (N, a, r, b) and return it as (N, b, r, a): a Transpose only when data moves."""
    if sum(d > 1 for d in (a, r, b)) <= 1:
        # At most one axis longer than 1: the element order is unchanged, a Reshape suffices.
        return t.reshape(-1, b, r, a)
    if r == 1:
        # A 3-D swap of the last two axes hits onnxruntime's fast transpose; the same with a unit
        # axis in the middle of a 4-D perm takes its generic path (measured 20-30x slower).
        return t.reshape(-1, a, b).transpose(1, 2).reshape(-1, b, 1, a)
    return t.reshape(-1, a, r, b).permute(0, 3, 2, 1)


def _swap_outer(t: torch.Tensor, a: int, b: int, c: int) -> torch.Tensor:
    """View t as (N, a, b, c) and return it as (N, b, a, c): a Transpose only when data moves."""
    if a == 1 or b == 1:
        return t.reshape(-1, b, a, c)
    return t.reshape(-1, a, b, c).transpose(1, 2)


def _left_matmul(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(P, K) @ (N, K, Q) -> (N, P, Q); a broadcast Mul along the long Q axis when K = 1."""
    if w.shape[1] == 1:
        return w * t
    return w @ t


class OnnxKroneckerLinear(nn.Module):
    """Export form of ``KroneckerLinear`` / ``KroneckerTiedLMHead``: y = x (Σ_r s_r A_r ⊗ B_r)ᵀ + b.

    Same contraction orders and multiply-adds as ``kronecker_matmul`` (SPEC §2), with X =
    x.reshape(N, n1, n2), arranged for onnxruntime: the large factor is always one 2-D GEMM of
    (rows, K) activations with a constant (K, cols) matrix, which MLAS pre-packs; the small factor
    (a side of at most ``SMALL_SIDE``, as in the presets' (2, 1) / (1, 4) B) is applied from the
    left to (N, K, long) activations, so its product runs along the long axis (a broadcast ``Mul``
    when its contraction is 1) instead of as a GEMM with 1-4 columns. Layout changes are one
    ``Transpose`` each and are skipped where an axis is 1. The factors, per-term scalars included,
    are folded into constant buffers once: R·(m1·n1 + m2·n2) numbers, never the (out, in) weight.

    Buffers ``first`` and ``second`` (the factor applied first, then second):

    - "b_first", small B side: ``first`` (R·m2, n2) [B_r stacked], ``second`` (R·n1, m1) [A_rᵀ stacked];
    - "b_first", otherwise: ``first`` (n2, R·m2) [B_rᵀ side by side], ``second`` as above;
    - "a_first", small B side: ``first`` (n1, R·m1) [A_rᵀ side by side], ``second`` (m2, R·n2) [B_r side by side];
    - "a_first", otherwise: ``first`` as above, ``second`` (R·n2, m2) [B_rᵀ stacked].

    Feature order: by default input and output features are in the Kronecker order of
    ``KroneckerLinear`` (input k·n2 + l, output i·m2 + j). ``swap_in`` / ``swap_out`` read /
    write them in the swapped order l·n1 + k / j·m1 + i instead, the order the small-B paths
    produce and consume without a ``Transpose``; ``export_friendly`` uses this between an MLP's
    up and down projections, where only an elementwise activation sits between them.

    Args:
        A: (R, m1, n1) left factors, per-term scalars folded in.
        B: (R, m2, n2) right factors.
        bias: (m1·m2,) in the Kronecker order, or None.
        order: "b_first" or "a_first".
        swap_in, swap_out: see above.

    Raises:
        ValueError: unknown ``order`` or factors of different rank.
    """

    def __init__(
        self, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None, order: str, *, swap_in: bool = False, swap_out: bool = False
    ) -> None:
        super().__init__()
        if order not in ("b_first", "a_first"):
            raise ValueError(f"OnnxKroneckerLinear: order must be b_first or a_first, got {order!r}")
        if A.shape[0] != B.shape[0]:
            raise ValueError(f"OnnxKroneckerLinear: A has {A.shape[0]} terms but B has {B.shape[0]}")
        R, m1, n1 = A.shape
        _, m2, n2 = B.shape
        self.rank, self.a_shape, self.b_shape, self.order = R, (m1, n1), (m2, n2), order
        self.swap_in, self.swap_out = swap_in, swap_out
        A, B = A.detach(), B.detach()
        if bias is not None and swap_out:
            bias = bias.detach().reshape(m1, m2).t().reshape(-1)
        if order == "b_first":
            self.small_b = min(n2, R * m2) <= SMALL_SIDE
            first = B.reshape(R * m2, n2) if self.small_b else B.reshape(R * m2, n2).t()
            second = A.permute(0, 2, 1).reshape(R * n1, m1)
        else:
            self.small_b = min(R * n2, m2) <= SMALL_SIDE
            first = A.reshape(R * m1, n1).t()
            second = B.permute(1, 0, 2).reshape(m2, R * n2) if self.small_b else B.permute(0, 2, 1).reshape(R * n2, m2)
        self.register_buffer("first", first.contiguous().clone())
        self.register_buffer("second", second.contiguous().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_module(cls, module: nn.Module, *, swap_in: bool = False, swap_out: bool = False) -> OnnxKroneckerLinear:
        """Build from a ``KroneckerLinear`` (its order) or a ``KroneckerTiedLMHead`` (cheaper order).

        Raises:
            TypeError: any other module.
        """
        if isinstance(module, KroneckerLinear):
            return cls(module.scaled_A(), module.B, module.bias, module.order, swap_in=swap_in, swap_out=swap_out)
        if isinstance(module, KroneckerTiedLMHead):
            emb = module.embedding
            b_first, a_first = contraction_macs(emb.a_shape, emb.b_shape, emb.rank)
            order = "b_first" if b_first <= a_first else "a_first"
            return cls(emb.A, emb.B, module.bias, order, swap_in=swap_in, swap_out=swap_out)
        raise TypeError(f"OnnxKroneckerLinear: cannot convert {type(module).__name__}")

    @property
    def free_swap_in(self) -> bool:
        """True when reading swapped input saves a Transpose (and never adds one)."""
        return self.order == "a_first" or self.small_b

    @property
    def free_swap_out(self) -> bool:
        """True when writing swapped output saves a Transpose (and never adds one)."""
        return self.order == "b_first" or self.small_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., n1·n2) -> (..., m1·m2)."""
        R, (m1, n1), (m2, n2) = self.rank, self.a_shape, self.b_shape
        lead = x.shape[:-1]
        # xt: the input as (N, n2, n1); y_swapped: the output as (N, m2, m1).
        xt = x.reshape(-1, n2, n1) if self.swap_in else _swap_inner(x, n1, 1, n2).reshape(-1, n2, n1)
        y_swapped = None
        if self.order == "b_first":
            if self.small_b:
                z = _left_matmul(self.first, xt)  # (N, R·m2, n1)
                z = _swap_outer(z, R, m2, n1).reshape(-1, R * n1)  # (N·m2, R·n1)
            else:
                xn = _swap_inner(xt, n2, 1, n1) if self.swap_in else x  # (N, n1, n2)
                z = xn.reshape(-1, n2) @ self.first  # (N·n1, R·m2)
                z = _swap_inner(z, n1, R, m2).reshape(-1, R * n1)  # (N·m2, R·n1)
            y_swapped = z @ self.second  # (N·m2, m1)
        else:
            t = xt.reshape(-1, n1) @ self.first  # (N·n2, R·m1)
            if self.small_b:
                t = _swap_outer(t, n2, R, m1).reshape(-1, R * n2, m1)  # (N, R·n2, m1)
                y_swapped = _left_matmul(self.second, t)  # (N, m2, m1)
            else:
                t = _swap_inner(t, n2, R, m1).reshape(-1, R * n2)  # (N·m1, R·n2)
                y = t @ self.second  # (N·m1, m2)
                if self.swap_out:
                    y = _swap_inner(y, m1, 1, m2)
        if y_swapped is not None:
            y = y_swapped if self.swap_out else _swap_inner(y_swapped, m2, 1, m1)
        y = y.reshape(*lead, m1 * m2)
        if self.bias is not None:
            y = y + self.bias
        return y


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


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
                _set_module(model, name, OnnxKroneckerLinear.from_module(module, swap_in=name in readers, swap_out=name in writers))
        yield model
    finally:
        for name, module in swapped:
            _set_module(model, name, module)


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


def check_output_dir(out_dir: str | os.PathLike) -> Path:
    """Check, before any work, that ``out_dir`` can be created or replaced.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        NotADirectoryError: ``out_dir`` or one of its parents exists and is a file.
        OSError: the nearest existing parent folder is not writable.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output path {out_dir} exists and is not a folder")
    parent = out_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"output folder {out_dir}: {parent} is a file, not a folder")
    # atomic_dir writes a sibling temporary folder, so the parent must be writable.
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OSError(f"output folder {out_dir} is not writable (no write permission on {parent})")
    return out_dir


def _export_graph(wrapper: nn.Module, inputs: dict[str, torch.Tensor], path: Path, opset: int, exporter: str) -> None:
    args = (inputs["input_ids"], inputs["attention_mask"])
    if exporter == "torchscript":
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
        with warnings.catch_warnings():
            # The deprecation notice and the tracer's notes on Python-side branches of the mask code;
            # verify_onnx checks the result at shapes other than the traced one.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper, args, str(path), dynamo=False, input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                dynamic_axes=axes, opset_version=opset, do_constant_folding=True,
            )
    else:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper, args, dynamo=True, input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                dynamic_shapes=shapes, opset_version=opset, verbose=False,
            )
        program.save(str(path))


def _externalise_if_large(path: Path) -> None:
    import onnx

    if path.stat().st_size < EXTERNAL_DATA_THRESHOLD_BYTES or (path.parent / EXTERNAL_DATA_FILE).exists():
        return
    proto = onnx.load(str(path))
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=EXTERNAL_DATA_FILE, size_threshold=1024)


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
) -> Path:
    """Export a causal LM (dense or kronlm-compressed) to ``out_dir/model.onnx``, atomically.

    The folder also gets ``config.json`` (the model's config), the tokenizer files when
    ``tokenizer`` is given, and ``kronlm_onnx.json`` (inputs, outputs, opset, exporter and the
    verification result). Weights go to ``model.onnx.data`` beside the graph when the graph file
    would exceed 1 GiB. The folder is written under a temporary name and swapped in only after the
    graph has been checked with onnxruntime (``tolerance``): a failed export leaves no folder.

    Args:
        model: a Hugging Face causal LM (``...ForCausalLM`` / ``GPT2LMHeadModel``), possibly compressed.
        out_dir: the output folder (replaced if it exists).
        tokenizer: saved beside the graph when given.
        opset: ONNX opset version of the default domain.
        batch_size, seq_len: shape of the example input traced (tokens); the graph's batch and
            sequence axes are dynamic either way.
        exporter: "torchscript" (default, see the module docstring) or "dynamo".
        tolerance: largest allowed max |logits_onnx - logits_torch| on 3 × 11 tokens with
            padding (``verify_onnx``); None skips the check.

    Returns:
        The path of ``model.onnx``.

    Raises:
        ImportError: onnx / onnxscript / onnxruntime missing (names the extra ``kronlm[onnx]``).
        ValueError: unknown exporter, opset below 14 (scaled-dot-product attention needs it),
            bad example shape.
        OSError / NotADirectoryError: ``out_dir`` cannot be written.
        RuntimeError: the ONNX logits differ from PyTorch's by more than ``tolerance`` (the
            message gives both numbers).
    """
    require_onnx()
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if opset < 14:
        raise ValueError(f"opset {opset} is too old: the attention export needs opset 14 or newer")
    out_dir = check_output_dir(out_dir)
    inputs = example_inputs(model, batch_size, seq_len)
    was_training = model.training
    model.eval()
    try:
        with atomic_dir(out_dir) as tmp:
            with export_friendly(model), torch.no_grad():
                _export_graph(CausalLMLogits(model), inputs, tmp / ONNX_FILE, opset, exporter)
            _externalise_if_large(tmp / ONNX_FILE)
            # Checked against the model's own Kronecker modules, not the export form.
            diff = None
            if tolerance is not None:
                diff = verify_onnx(model, tmp / ONNX_FILE)
                if not diff <= tolerance:
                    raise RuntimeError(f"ONNX logits differ from PyTorch's by {diff:.3g} (> tolerance {tolerance:g}); nothing written")
            if getattr(model, "config", None) is not None:
                model.config.to_json_file(tmp / "config.json")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            write_json(
                tmp / METADATA_FILE,
                {
                    "inputs": {"input_ids": "int64 (batch, sequence)", "attention_mask": "int64 (batch, sequence)"},
                    "outputs": {"logits": "float32 (batch, sequence, vocab)"},
                    "kv_cache": False, "opset": opset, "exporter": exporter,
                    "torch": torch.__version__, "max_abs_diff": diff, "tolerance": tolerance,
                },
            )
    finally:
        model.train(was_training)
    return out_dir / ONNX_FILE


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


def verify_onnx(model: nn.Module, onnx_path: str | os.PathLike, inputs: dict[str, torch.Tensor] | None = None, *, session=None) -> float:
    """Largest absolute difference between the model's logits in PyTorch and in onnxruntime (CPU).

    Args:
        model: the model that was exported.
        onnx_path: its ``model.onnx``.
        inputs: {"input_ids", "attention_mask"}, int64 (batch, sequence); default: 3 × 11 tokens
            with one left-padded row (a shape other than the default traced one).
        session: a ready ``InferenceSession`` (else one is opened).

    Returns:
        max |logits_onnx - logits_torch| over the positions whose ``attention_mask`` is 1, float32
        logits. Padded positions are left out: every key is masked for a left-padded query, so its
        logits are not defined by the model (the dynamo exporter's graph gives other values there).

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
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = CausalLMLogits(model)(inputs["input_ids"], inputs["attention_mask"]).float().cpu()
    finally:
        model.train(was_training)
    out = torch.from_numpy(logits_onnx)
    if out.shape != ref.shape:
        raise ValueError(f"verify_onnx: ONNX logits have shape {tuple(out.shape)} but PyTorch's {tuple(ref.shape)}")
    attended = inputs["attention_mask"].cpu().bool()
    if not attended.any():
        raise ValueError("verify_onnx: the attention mask has no attended position")
    return float((out - ref).abs()[attended].max())


__all__ = [
    "CausalLMLogits",
    "OnnxKroneckerLinear",
    "check_output_dir",
    "example_inputs",
    "export_friendly",
    "export_onnx",
    "onnx_session",
    "require_onnx",
    "verify_onnx",
]
