"""``KroneckerLowRankLinear``: y = x (Σ_r A_r ⊗ B_r + U V)ᵀ + b without forming the weight."""

from __future__ import annotations

import torch
from torch import nn

from kronlm.decompose.lowrank import KroneckerLowRankFactors, kronecker_lowrank_factors
from kronlm.decompose.shapes import check_factor_shapes, contraction_macs
from kronlm.decompose.vanloan import balance_terms, kron_sum, kron_sum_lowrank, kron_sum_rank_bound
from kronlm.layers.dense import MergesToLinear
from kronlm.layers.linear import kronecker_matmul

# Without gradients to the Kronecker factors, the Kronecker part runs as its exact low-rank form
# (kron_sum_lowrank) when that form costs at most this share of the dense product per token:
# R·min(m1, n1)·min(m2, n2)·(in + out) <= share·in·out. Two thin GEMMs then replace the several
# small products and copies of kronecker_matmul, whose fixed cost per call dominates decoding
# (docs/method.md, "The folded Kronecker part"; docs/benchmarks/fold_speed.md).
FOLD_MAX_SHARE = 0.25


def tensor_version(t: torch.Tensor) -> int:
    """The in-place update counter of ``t`` (-1 for an inference tensor, which has none)."""
    return -1 if t.is_inference() else t._version


def folds_kronecker_part(in_features: int, out_features: int, a_shape: tuple[int, int], b_shape: tuple[int, int], rank: int) -> bool:
    """Whether a ``KroneckerLowRankLinear`` of these shapes runs its Kronecker part as the exact
    low-rank form when no gradient reaches A or B: its width R·min(m1, n1)·min(m2, n2)
    (``kron_sum_rank_bound``) times (in + out) at most ``FOLD_MAX_SHARE`` of in·out."""
    return kron_sum_rank_bound(a_shape, b_shape, rank) * (in_features + out_features) <= FOLD_MAX_SHARE * in_features * out_features


def kronecker_lowrank_matmul(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None,
    order: str,
    fold: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """y = x (Σ_r A_r ⊗ B_r + U V)ᵀ + b for x (..., in) -> (..., out), never forming the weight.

    Args:
        A, B: (R, m1, n1), (R, m2, n2) Kronecker factors, applied with ``kronecker_matmul`` in
            ``order`` unless ``fold`` is given.
        U, V: (out, k), (k, in) low-rank factors.
        bias: (out,) or None.
        fold: (U_K (out, K), V_K (K, in)) with U_K V_K = Σ_r A_r ⊗ B_r (``kron_sum_lowrank``):
            the Kronecker part as two more thin GEMMs (A and B are then not read).
    """
    if fold is None:
        y = kronecker_matmul(x, A, B, order, None)
        y = y + (x @ V.t()) @ U.t()
        if bias is not None:
            y = y + bias
        return y
    U_K, V_K = fold
    x2 = x.reshape(-1, x.shape[-1])
    y = (x2 @ V.t()) @ U.t() if bias is None else torch.addmm(bias, x2 @ V.t(), U.t())
    y = torch.addmm(y, x2 @ V_K.t(), U_K.t())
    return y.reshape(*x.shape[:-1], y.shape[-1])


class KroneckerLowRankLinear(MergesToLinear, nn.Module):
    """A linear map whose weight (out, in) = (m1·m2, n1·n2) is Σ_r A_r ⊗ B_r + U V, plus a bias.

    Parameters: ``A`` (R, m1, n1), ``B`` (R, m2, n2), ``U`` (out, k), ``V`` (k, in), ``bias``
    (out,). The forward pass never forms W: y = kronecker_matmul(x, A, B) + (x Vᵀ) Uᵀ + b, the
    Kronecker part in the contraction order with fewer multiply-adds (docs/method.md, "The forward pass never forms W"), the low-rank part
    as two thin GEMMs (k·(in + out) multiply-adds per token). Parameters:
    R·(m1·n1 + m2·n2) + k·(out + in) (+ out for the bias).

    When no gradient reaches A or B (inference, or training U and V alone) and the factors are thin
    (``folds_kronecker_part``), the Kronecker part runs as its exact low-rank form instead
    (``kronecker_fold``, cached until A or B change): same function, fewer and larger GEMMs.

    Build one from a dense weight with ``from_dense`` (the joint fit of
    ``kronlm.decompose.lowrank``), merge it back with ``to_linear``.

    Raises:
        ValueError: factor shapes that do not multiply to (out, in), R or k below 1.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        a_shape: tuple[int, int],
        b_shape: tuple[int, int],
        rank: int = 1,
        lowrank: int = 1,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        m1, n1, m2, n2 = check_factor_shapes((out_features, in_features), a_shape, b_shape, "KroneckerLowRankLinear")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"KroneckerLowRankLinear: rank R must be an integer >= 1, got {rank!r}")
        if isinstance(lowrank, bool) or not isinstance(lowrank, int) or lowrank < 1:
            raise ValueError(f"KroneckerLowRankLinear: low rank k must be an integer >= 1, got {lowrank!r}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.a_shape, self.b_shape, self.rank, self.lowrank = (m1, n1), (m2, n2), rank, lowrank
        self.A = nn.Parameter(torch.empty(rank, m1, n1, **kw))
        self.B = nn.Parameter(torch.empty(rank, m2, n2, **kw))
        self.U = nn.Parameter(torch.empty(out_features, lowrank, **kw))
        self.V = nn.Parameter(torch.empty(lowrank, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        b_first, a_first = contraction_macs(self.a_shape, self.b_shape, rank)
        self.order = "b_first" if b_first <= a_first else "a_first"
        self.folds = folds_kronecker_part(in_features, out_features, self.a_shape, self.b_shape, rank)
        self._fold = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init: each part has half of nn.Linear's default weight variance (1 / (3·in))."""
        if self.A.is_meta:
            return
        with torch.no_grad():
            half = (6.0 * self.in_features) ** -0.5  # std of each part; the sum has nn.Linear's
            kron_std = (half / self.rank**0.5) ** 0.5
            self.A.normal_(0.0, kron_std)
            self.B.normal_(0.0, kron_std)
            lr_std = (half / self.lowrank**0.5) ** 0.5
            self.U.normal_(0.0, lr_std)
            self.V.normal_(0.0, lr_std)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out)."""
        dtype = x.dtype
        fold = self.kronecker_fold(dtype) if self.uses_fold() else None
        bias = None if self.bias is None else self.bias.to(dtype)
        return kronecker_lowrank_matmul(x, self.A.to(dtype), self.B.to(dtype), self.U.to(dtype), self.V.to(dtype), bias, self.order, fold)

    def uses_fold(self) -> bool:
        """Whether the next forward pass runs the Kronecker part as its low-rank form: thin factors
        (``folds``), eager mode (traced and exported graphs keep the stored factors), and no gradient
        wanted for A or B."""
        wants_grad = torch.is_grad_enabled() and (self.A.requires_grad or self.B.requires_grad)
        traced = torch.compiler.is_compiling() or torch.jit.is_tracing()
        return self.folds and not wants_grad and not traced

    def kronecker_fold(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(U_K (out, K), V_K (K, in)) in ``dtype`` with U_K V_K = Σ_r A_r ⊗ B_r (``kron_sum_lowrank``),
        computed without gradient and kept until A or B change (in place or replaced), or the
        dtype or device does."""
        A, B = self.A, self.B
        key = (dtype, A.device, A.data_ptr(), B.data_ptr(), tensor_version(A), tensor_version(B))
        if self._fold is None or self._fold[0] != key:
            # Normal tensors even under inference_mode: a later training step that keeps A and B
            # frozen saves them for backward, which inference tensors refuse.
            with torch.inference_mode(False), torch.no_grad():
                U_K, V_K = kron_sum_lowrank(A, B)
            self._fold = (key, U_K.to(dtype), V_K.to(dtype))
        return self._fold[1], self._fold[2]

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The weight Σ_r A_r ⊗ B_r + U V as an (out, in) tensor (nn.Linear orientation)."""
        return kron_sum(self.A, self.B) + self.U @ self.V

    @torch.no_grad()
    def load_factors(self, factors: KroneckerLowRankFactors) -> None:
        """Copy factors into the parameters as the joint fit split them (see ``balances_terms``).

        Raises:
            ValueError: factor shapes, R or k differ from this layer's.
        """
        pairs = (("A", factors.A, self.A), ("B", factors.B, self.B), ("U", factors.U, self.U), ("V", factors.V, self.V))
        for label, got, want in pairs:
            if tuple(got.shape) != tuple(want.shape):
                raise ValueError(f"KroneckerLowRankLinear: factor {label} is {tuple(got.shape)}, the layer's is {tuple(want.shape)}")
        for _, got, want in pairs:
            want.copy_(got)

    # Unlike KroneckerLinear's terms, these keep the split the joint fit (ALS with the low-rank part)
    # left: every measured comparison distilled faster with it than with even terms (0.4-2.4 %
    # at 85 % on one CPU, several per cent at 70 %; docs/method.md, "How the factors are stored").
    balances_terms = False

    @torch.no_grad()
    def balance_(self) -> KroneckerLowRankLinear:
        """Split the scale of each Kronecker term evenly between A_r and B_r, in place, when
        ``balances_terms`` (never for this class: a no-op kept so that every factored layer answers
        it, as ``KroneckerLinear.balance_`` does); the weight is unchanged. Returns the layer."""
        if not self.balances_terms:
            return self
        A, B = balance_terms(self.A, self.B)
        self.A.copy_(A)
        self.B.copy_(B)
        return self

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a_shape: tuple[int, int],
        b_shape: tuple[int, int],
        rank: int = 1,
        lowrank: int = 1,
        *,
        covariance: torch.Tensor | None = None,
        name: str = "weight",
        **fit_kwargs,
    ) -> tuple[KroneckerLowRankLinear, KroneckerLowRankFactors]:
        """Build a layer approximating ``weight`` (out, in) with ``kronecker_lowrank_factors``.

        Args:
            weight: (out, in) dense weight.
            bias: (out,) or None.
            covariance: (in, in) input second moment for the activation-aware fit, or None for
                the Frobenius fit.
            fit_kwargs: passed to ``kronecker_lowrank_factors`` (damping, iterations, ...).

        Returns:
            (the layer on the weight's device and dtype, the factors).

        Raises:
            ValueError: see ``kronecker_lowrank_factors``.
        """
        out_features, in_features = weight.shape
        factors = kronecker_lowrank_factors(weight, a_shape, b_shape, rank, lowrank, covariance=covariance, name=name, **fit_kwargs)
        layer = cls(in_features, out_features, a_shape, b_shape, rank, lowrank, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        layer.load_factors(factors)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
        return layer, factors

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, A={self.a_shape}, "
            f"B={self.b_shape}, rank={self.rank}, lowrank={self.lowrank}, bias={self.bias is not None}, order={self.order}"
        )


__all__ = ["FOLD_MAX_SHARE", "KroneckerLowRankLinear", "folds_kronecker_part", "kronecker_lowrank_matmul", "tensor_version"]
