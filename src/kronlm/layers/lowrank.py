"""``KroneckerLowRankLinear``: y = x (Σ_r A_r ⊗ B_r + U V)ᵀ + b without forming the weight."""

from __future__ import annotations

import torch
from torch import nn

from kronlm.decompose.lowrank import KroneckerLowRankFactors, kronecker_lowrank_factors
from kronlm.decompose.shapes import check_factor_shapes, contraction_macs
from kronlm.decompose.vanloan import balance_terms, kron_sum
from kronlm.layers.dense import MergesToLinear
from kronlm.layers.linear import kronecker_matmul


class KroneckerLowRankLinear(MergesToLinear, nn.Module):
    """A linear map whose weight (out, in) = (m1·m2, n1·n2) is Σ_r A_r ⊗ B_r + U V, plus a bias.

    Parameters: ``A`` (R, m1, n1), ``B`` (R, m2, n2), ``U`` (out, k), ``V`` (k, in), ``bias``
    (out,). The forward pass never forms W: y = kronecker_matmul(x, A, B) + (x Vᵀ) Uᵀ + b, the
    Kronecker part in the contraction order with fewer multiply-adds (docs/method.md, "The forward pass never forms W"), the low-rank part
    as two thin GEMMs (k·(in + out) multiply-adds per token). Parameters:
    R·(m1·n1 + m2·n2) + k·(out + in) (+ out for the bias).

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
        y = kronecker_matmul(x, self.A.to(x.dtype), self.B.to(x.dtype), self.order, None)
        y = y + (x @ self.V.to(x.dtype).t()) @ self.U.to(x.dtype).t()
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

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


__all__ = ["KroneckerLowRankLinear"]
