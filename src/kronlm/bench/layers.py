"""Per-layer speed: ``KroneckerLinear`` against ``nn.Linear`` of the same (out, in), for the factor
shapes of the presets."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from kronlm.bench.markdown import machine_info, machine_line, markdown_table
from kronlm.bench.timing import calls_for, time_interleaved
from kronlm.compression.presets import PRESETS, get_preset, reference_model
from kronlm.compression.surgery import plan_compression
from kronlm.decompose.shapes import contraction_macs
from kronlm.layers.linear import (
    KroneckerLinear,
    autotune_plan,
    default_middle,
    kronecker_matmul,
)

DEFAULT_TOKENS = (1, 16, 512, 4096)
# Speed target: dense/Kronecker time ratio at least 0.8 × the multiply-add ratio from this many tokens on.
TARGET_FRACTION = 0.8
TARGET_MIN_TOKENS = 512


@dataclass(frozen=True)
class LayerShape:
    """One Kronecker factorisation of an (out, in) weight, and the presets that use it.

    Attributes:
        out_features, in_features: the dense weight (out, in).
        a_shape: (m1, n1); b_shape: (m2, n2); rank: R.
        learnable_scales: the layer carries Krony-PT's per-term scalars (one extra multiply of A).
        presets: names of the presets with this factorisation.
    """

    out_features: int
    in_features: int
    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    rank: int = 1
    learnable_scales: bool = False
    presets: tuple[str, ...] = ()

    @property
    def dense_macs(self) -> int:
        """Multiply-adds per token of the dense layer: out·in."""
        return self.out_features * self.in_features

    @property
    def kron_macs(self) -> int:
        """Multiply-adds per token of the Kronecker layer with the cheaper order (docs/method.md, "The forward pass never forms W")."""
        return min(contraction_macs(self.a_shape, self.b_shape, self.rank))

    @property
    def mac_ratio(self) -> float:
        """dense_macs / kron_macs."""
        return self.dense_macs / self.kron_macs

    def describe(self) -> str:
        """"A (m1, n1) ⊗ B (m2, n2), R" as text."""
        return f"A {self.a_shape} ⊗ B {self.b_shape}, R={self.rank}"


def preset_layer_shapes(names: Iterable[str] | None = None) -> list[LayerShape]:
    """The distinct ``KroneckerLinear`` factorisations of the named presets (default: all).

    Each preset is planned on its reference architecture on the meta device (no weights);
    embeddings are skipped. Identical (out, in, A, B, R, scalars) from several presets become one
    entry listing them all, in preset order.

    Raises:
        ValueError: an unknown preset name.
    """

    names = list(PRESETS) if names is None else list(names)
    found: dict[tuple, list[str]] = {}
    models: dict[str, nn.Module] = {}
    for name in names:
        config = get_preset(name)  # raises with the list of names
        family = PRESETS[name].family
        if family not in models:
            models[family] = reference_model(family)
        for choice in plan_compression(models[family], config):
            if choice.kind != "linear":
                continue
            key = (*choice.weight_shape, choice.a_shape, choice.b_shape, choice.rank, choice.target.learnable_scales)
            users = found.setdefault(key, [])
            if name not in users:
                users.append(name)
    return [LayerShape(*key, presets=tuple(users)) for key, users in found.items()]


def _layers(shape: LayerShape, dtype: torch.dtype, device: torch.device, seed: int) -> tuple[nn.Linear, KroneckerLinear]:
    torch.manual_seed(seed)
    dense = nn.Linear(shape.in_features, shape.out_features, device=device, dtype=dtype)
    kron = KroneckerLinear(
        shape.in_features, shape.out_features, shape.a_shape, shape.b_shape, shape.rank,
        learnable_scales=shape.learnable_scales, device=device, dtype=dtype,
    )
    return dense, kron


def _forward_fn(layer, x):
    def run():
        with torch.no_grad():
            return layer(x)

    return run


def _train_step_fn(layer, x, grad):
    params = list(layer.parameters())

    def run():
        for p in params:
            p.grad = None
        x.grad = None
        layer(x).backward(grad)

    return run


class _Planned(nn.Module):
    """A ``KroneckerLinear`` forced to one (order, middle) plan (the autotuned one)."""

    def __init__(self, layer: KroneckerLinear, order: str, middle: str) -> None:
        super().__init__()
        self.layer, self.order, self.middle = layer, order, middle

    def forward(self, x):
        layer = self.layer
        y = kronecker_matmul(x, *layer.forward_factors(x.dtype), self.order, self.middle)
        return y if layer.bias is None else y + layer.bias


def layer_speed_rows(
    shapes: Sequence[LayerShape],
    tokens: Sequence[int] = DEFAULT_TOKENS,
    *,
    backward: bool = True,
    autotune: bool = False,
    repeats: int = 5,
    warmup: int = 1,
    sample_s: float = 0.02,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = False,
) -> list[dict]:
    """Time each shape's dense and Kronecker layer at each token count, interleaved.

    Forward runs under ``torch.no_grad``; forward+backward computes the input gradient and all
    parameter gradients from a fixed output gradient. Each sample is as many back-to-back calls
    of the dense layer as take about ``sample_s`` seconds (the same count for every contender);
    times are medians of ``repeats`` samples.

    Args:
        shapes: from ``preset_layer_shapes`` or hand-made.
        tokens: token counts (rows of the (tokens, in) input).
        backward: also time forward+backward.
        autotune: also time the plan ``autotune_plan`` measures as fastest ("tuned" columns).
        repeats, warmup, sample_s: timing effort (see ``time_interleaved``).
        dtype, device: where the layers run.
        seed: for the random weights and inputs.
        progress: a tqdm bar over the shapes on stderr.

    Returns:
        One dict per (shape, tokens): "presets", "out", "in", "factors", "rank", "plan",
        "tokens", "mac_ratio", "fwd_dense_s", "fwd_kron_s", "fwd_ratio", and when ``backward``
        "fwdbwd_dense_s", "fwdbwd_kron_s", "fwdbwd_ratio"; with ``autotune`` "tuned_plan",
        "fwd_tuned_s", "fwd_tuned_ratio". Times are seconds per call, ratios dense/Kronecker.

    Raises:
        ValueError: a token count below 1 or no shapes.
    """
    if not shapes:
        raise ValueError("layer_speed_rows: no shapes to time")
    if any(t < 1 for t in tokens):
        raise ValueError(f"layer_speed_rows: token counts must be >= 1, got {list(tokens)}")
    device = torch.device(device)
    rows = []
    for shape in tqdm(shapes, desc="layer shapes", unit="shape", disable=not progress):
        dense, kron = _layers(shape, dtype, device, seed)
        plan = f"{kron.order}/{default_middle(kron.order, shape.b_shape)}"
        for n in tokens:
            torch.manual_seed(seed + n)
            x = torch.randn(n, shape.in_features, device=device, dtype=dtype)
            fns = {"dense": _forward_fn(dense, x), "kron": _forward_fn(kron, x)}
            tuned = None
            if autotune:
                with torch.no_grad():
                    tuned = autotune_plan(x, *kron.forward_factors(x.dtype))
                fns["tuned"] = _forward_fn(_Planned(kron, *tuned), x)
            inner = calls_for(fns["dense"], sample_s)
            t = time_interleaved(fns, warmup=warmup, repeats=repeats, inner=inner, device=device)
            row = {
                "presets": ", ".join(shape.presets), "out": shape.out_features, "in": shape.in_features,
                "factors": f"{shape.a_shape}⊗{shape.b_shape}", "rank": shape.rank, "plan": plan, "tokens": n,
                "mac_ratio": shape.mac_ratio, "fwd_dense_s": t["dense"].median_s, "fwd_kron_s": t["kron"].median_s,
                "fwd_ratio": t["dense"].median_s / t["kron"].median_s,
            }
            if autotune:
                row.update({"tuned_plan": "/".join(tuned), "fwd_tuned_s": t["tuned"].median_s,
                            "fwd_tuned_ratio": t["dense"].median_s / t["tuned"].median_s})
            if backward:
                xg = x.clone().requires_grad_(True)
                grad = torch.randn(n, shape.out_features, device=device, dtype=dtype)
                fns = {"dense": _train_step_fn(dense, xg, grad), "kron": _train_step_fn(kron, xg, grad)}
                inner = calls_for(fns["dense"], sample_s)
                t = time_interleaved(fns, warmup=warmup, repeats=repeats, inner=inner, device=device)
                row.update({"fwdbwd_dense_s": t["dense"].median_s, "fwdbwd_kron_s": t["kron"].median_s,
                            "fwdbwd_ratio": t["dense"].median_s / t["kron"].median_s})
            rows.append(row)
    return rows


def _target_cell(ratio: float, mac_ratio: float, tokens: int) -> str:
    if tokens < TARGET_MIN_TOKENS:
        return "–"
    need = TARGET_FRACTION * mac_ratio
    return "met" if ratio >= need else f"missed by {100 * (1 - ratio / need):.0f}%"


def layer_speed_markdown(rows: Sequence[dict], *, title: str = "Per-layer speed", command: str = "", device="cpu") -> str:
    """The rows of ``layer_speed_rows`` as a Markdown section: machine line, command, table.

    Columns: time ratio dense/Kronecker beside the multiply-add ratio, their quotient, and
    whether the target (ratio >= 0.8 × MAC ratio at >= 512 tokens, forward) is met.
    """
    headers = ["presets", "(out, in)", "factors, R", "plan", "tokens", "MAC ratio", "fwd dense ms", "fwd Kron ms",
               "fwd ratio", "fwd ratio / MAC ratio", "target fwd"]
    has_bwd = any("fwdbwd_ratio" in r for r in rows)
    has_tuned = any("tuned_plan" in r for r in rows)
    if has_tuned:
        headers += ["tuned plan", "tuned fwd ratio"]
    if has_bwd:
        headers += ["fwd+bwd dense ms", "fwd+bwd Kron ms", "fwd+bwd ratio", "target fwd+bwd"]
    table = []
    for r in rows:
        cells = [r["presets"], f"({r['out']}, {r['in']})", f"{r['factors']}, {r['rank']}", r["plan"], r["tokens"],
                 f"{r['mac_ratio']:.2f}", f"{1e3 * r['fwd_dense_s']:.3f}", f"{1e3 * r['fwd_kron_s']:.3f}",
                 f"{r['fwd_ratio']:.2f}", f"{r['fwd_ratio'] / r['mac_ratio']:.2f}",
                 _target_cell(r["fwd_ratio"], r["mac_ratio"], r["tokens"])]
        if has_tuned:
            cells += [r.get("tuned_plan", ""), f"{r['fwd_tuned_ratio']:.2f}" if "fwd_tuned_ratio" in r else ""]
        if has_bwd:
            cells += [f"{1e3 * r['fwdbwd_dense_s']:.3f}", f"{1e3 * r['fwdbwd_kron_s']:.3f}", f"{r['fwdbwd_ratio']:.2f}",
                      _target_cell(r["fwdbwd_ratio"], r["mac_ratio"], r["tokens"])]
        table.append(cells)
    align = ["l", "l", "l", "l"] + ["r"] * (len(headers) - 4)
    measured = [r for r in rows if r["tokens"] >= TARGET_MIN_TOKENS]
    met = sum(r["fwd_ratio"] >= TARGET_FRACTION * r["mac_ratio"] for r in measured)
    parts = [f"## {title}", "", machine_line(machine_info(device))]
    if command:
        parts += ["", f"Command: `{command}`"]
    parts += [
        "",
        "Times are medians per call; ratio = dense time / Kronecker time; MAC ratio = out·in / the Kronecker "
        "layer's multiply-adds per token with its order (docs/method.md); plan = contraction order / middle-axis layout. "
        f"Target: fwd ratio >= {TARGET_FRACTION} × MAC ratio at >= {TARGET_MIN_TOKENS} tokens "
        f"(met in {met} of {len(measured)} rows).",
        "",
        markdown_table(headers, table, align),
    ]
    return "\n".join(parts)
