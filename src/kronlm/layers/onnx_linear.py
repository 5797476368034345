"""``OnnxKroneckerLinear``: the export form of a Kronecker layer, arranged for onnxruntime.

Same product and multiply-adds as ``KroneckerLinear`` (docs/method.md, "The forward pass never forms W"), but every large-factor product is
one 2-D ``MatMul`` against a constant matrix (which onnxruntime's MLAS pre-packs) and every
small-factor product runs along the long axis, because traced as is, ``kronecker_matmul`` gives
GEMMs with 1-4 columns that MLAS runs about as slowly as the large GEMM they follow (measured with
onnxruntime's profiler). ``kronlm.export.onnx`` swaps these in while exporting.
"""

from __future__ import annotations

import torch
from torch import nn

from kronlm.decompose.shapes import contraction_macs
from kronlm.layers.embedding import KroneckerTiedLMHead
from kronlm.layers.linear import KroneckerLinear

# A factor side up to this long makes a 2-D MLAS GEMM mostly packing overhead (measured: a
# (N·384, 4) @ (4, 1) product costs 3x a transpose plus a batched (1, 4) @ (N, 4, 384) product).
SMALL_SIDE = 8


def swap_inner(t: torch.Tensor, a: int, r: int, b: int) -> torch.Tensor:
    """View t as (N, a, r, b) and return it as (N, b, r, a): a Transpose only when data moves."""
    if sum(d > 1 for d in (a, r, b)) <= 1:
        # At most one axis longer than 1: the element order is unchanged, a Reshape suffices.
        return t.reshape(-1, b, r, a)
    if r == 1:
        # A 3-D swap of the last two axes hits onnxruntime's fast transpose; the same with a unit
        # axis in the middle of a 4-D perm takes its generic path (measured 20-30x slower).
        return t.reshape(-1, a, b).transpose(1, 2).reshape(-1, b, 1, a)
    return t.reshape(-1, a, r, b).permute(0, 3, 2, 1)


def swap_outer(t: torch.Tensor, a: int, b: int, c: int) -> torch.Tensor:
    """View t as (N, a, b, c) and return it as (N, b, a, c): a Transpose only when data moves."""
    if a == 1 or b == 1:
        return t.reshape(-1, b, a, c)
    return t.reshape(-1, a, b, c).transpose(1, 2)


def left_matmul(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(P, K) @ (N, K, Q) -> (N, P, Q); a broadcast Mul along the long Q axis when K = 1."""
    if w.shape[1] == 1:
        return w * t
    return w @ t


class OnnxKroneckerLinear(nn.Module):
    """Export form of ``KroneckerLinear`` / ``KroneckerTiedLMHead``: y = x (Σ_r s_r A_r ⊗ B_r)ᵀ + b.

    Same contraction orders and multiply-adds as ``kronecker_matmul`` (docs/method.md, "The forward pass never forms W"), with X =
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
        xt = x.reshape(-1, n2, n1) if self.swap_in else swap_inner(x, n1, 1, n2).reshape(-1, n2, n1)
        y_swapped = None
        if self.order == "b_first":
            if self.small_b:
                z = left_matmul(self.first, xt)  # (N, R·m2, n1)
                z = swap_outer(z, R, m2, n1).reshape(-1, R * n1)  # (N·m2, R·n1)
            else:
                xn = swap_inner(xt, n2, 1, n1) if self.swap_in else x  # (N, n1, n2)
                z = xn.reshape(-1, n2) @ self.first  # (N·n1, R·m2)
                z = swap_inner(z, n1, R, m2).reshape(-1, R * n1)  # (N·m2, R·n1)
            y_swapped = z @ self.second  # (N·m2, m1)
        else:
            t = xt.reshape(-1, n1) @ self.first  # (N·n2, R·m1)
            if self.small_b:
                t = swap_outer(t, n2, R, m1).reshape(-1, R * n2, m1)  # (N, R·n2, m1)
                y_swapped = left_matmul(self.second, t)  # (N, m2, m1)
            else:
                t = swap_inner(t, n2, R, m1).reshape(-1, R * n2)  # (N·m1, R·n2)
                y = t @ self.second  # (N·m1, m2)
                if self.swap_out:
                    y = swap_inner(y, m1, 1, m2)
        if y_swapped is not None:
            y = y_swapped if self.swap_out else swap_inner(y_swapped, m2, 1, m1)
        y = y.reshape(*lead, m1 * m2)
        if self.bias is not None:
            y = y + self.bias
        return y


__all__ = ["SMALL_SIDE", "OnnxKroneckerLinear", "left_matmul", "swap_inner", "swap_outer"]
