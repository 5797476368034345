"""``KroneckerLinear``: y = x (Σ_r s_r A_r ⊗ B_r)ᵀ + b without materialising the weight (SPEC §2)."""

from __future__ import annotations

import torch
from torch import nn

from kronlm.decompose.initializers import get_initializer
from kronlm.decompose.shapes import contraction_macs
from kronlm.decompose.vanloan import KroneckerFactors, kron_sum


def kronecker_matmul(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, order: str) -> torch.Tensor:
    """Apply W = Σ_r A_r ⊗ B_r to the last dimension of x: returns x Wᵀ.

    Args:
        x: (..., n1*n2) input.
        A: (R, m1, n1) left factors (per-term scalars already folded in).
        B: (R, m2, n2) right factors.
        order: "b_first" (Z = X B_rᵀ, then A_r Z) or "a_first" (A_r X, then · B_rᵀ), with
            X = x.reshape(..., n1, n2); the R terms are batched into one matmul per step.

    Returns:
        (..., m1*m2) output.
    """
    R, m1, n1 = A.shape
    _, m2, n2 = B.shape
    lead = x.shape[:-1]
    X = x.reshape(-1, n1, n2)
    if order == "b_first":
        # Stack the B_r along the output: one (N*n1, n2) @ (n2, R*m2) product.
        Z = X @ B.reshape(R * m2, n2).t()
        if R > 1:
            Z = Z.view(-1, n1, R, m2).permute(0, 2, 1, 3).reshape(-1, R * n1, m2)
        # Stack the A_r along the contraction: (m1, R*n1) @ (N, R*n1, m2).
        Y = A.permute(1, 0, 2).reshape(m1, R * n1) @ Z
    else:
        # Stack the A_r along the output: (R*m1, n1) @ (N, n1, n2).
        Wx = A.reshape(R * m1, n1) @ X
        if R > 1:
            Wx = Wx.view(-1, R, m1, n2).permute(0, 2, 1, 3)
        # Stack the B_rᵀ along the contraction: (N*m1, R*n2) @ (R*n2, m2).
        Y = Wx.reshape(-1, R * n2) @ B.permute(0, 2, 1).reshape(R * n2, m2)
    return Y.reshape(*lead, m1 * m2)


class KroneckerLinear(nn.Module):
    """A linear map whose weight (out, in) = (m1·m2, n1·n2) is Σ_r s_r · A_r ⊗ B_r, plus a bias.

    Parameters: ``A`` (R, m1, n1), ``B`` (R, m2, n2), ``scales`` (R,) when ``learnable_scales``
    (Krony-PT's per-term scalars; otherwise the scalars are folded into A), ``bias`` (out,).
    The forward pass never forms W: it contracts x.reshape(..., n1, n2) with B then A, or A then
    B, whichever costs fewer multiply-adds for these shapes (SPEC §2); any leading dimensions work.

    Follows KnGPT2 (Edalati et al. 2022), KroneckerBERT (Tahaei et al. 2022) and Krony-PT
    (Ayad et al. 2024). Build one from a pretrained layer with ``from_linear`` / ``from_conv1d``,
    merge it back with ``to_linear``.

    Raises:
        ValueError: factor shapes that do not multiply to (out, in), or a rank below 1.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        a_shape: tuple[int, int],
        b_shape: tuple[int, int],
        rank: int = 1,
        bias: bool = True,
        learnable_scales: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        (m1, n1), (m2, n2) = tuple(a_shape), tuple(b_shape)
        if m1 * m2 != out_features or n1 * n2 != in_features:
            raise ValueError(
                f"KroneckerLinear: A {tuple(a_shape)} ⊗ B {tuple(b_shape)} gives ({m1 * m2}, {n1 * n2}), "
                f"expected (out, in) = ({out_features}, {in_features})"
            )
        if rank < 1:
            raise ValueError(f"KroneckerLinear: rank must be >= 1, got {rank}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.a_shape, self.b_shape, self.rank = (m1, n1), (m2, n2), rank
        self.A = nn.Parameter(torch.empty(rank, m1, n1, **kw))
        self.B = nn.Parameter(torch.empty(rank, m2, n2, **kw))
        self.scales = nn.Parameter(torch.ones(rank, **kw)) if learnable_scales else None
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        b_first, a_first = contraction_macs(self.a_shape, self.b_shape, rank)
        self.order = "b_first" if b_first <= a_first else "a_first"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init whose product has nn.Linear's default scale (used when not built from a layer)."""
        if self.A.is_meta:
            return
        with torch.no_grad():
            # nn.Linear draws W from U(±1/√in) (std 1/√(3·in)); match that std for Σ_r A_r⊗B_r.
            target = (3.0 * self.in_features) ** -0.5 / self.rank**0.5
            std = target**0.5
            self.A.normal_(0.0, std)
            self.B.normal_(0.0, std)
            if self.bias is not None:
                self.bias.zero_()

    @property
    def learnable_scales(self) -> bool:
        """True when the layer has Krony-PT's learnable per-term scalars."""
        return self.scales is not None

    def scaled_A(self) -> torch.Tensor:
        """A with the per-term scalars folded in: (R, m1, n1)."""
        if self.scales is None:
            return self.A
        return self.A * self.scales.view(-1, 1, 1).to(self.A.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out)."""
        y = kronecker_matmul(x, self.scaled_A().to(x.dtype), self.B.to(x.dtype), self.order)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The weight Σ_r s_r A_r ⊗ B_r as an (out, in) tensor (nn.Linear orientation)."""
        return kron_sum(self.A, self.B, self.scales)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """Merge back into an ``nn.Linear`` with the same output (up to rounding)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.A.device, dtype=self.A.dtype)
        linear.weight.copy_(self.to_dense())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def num_parameters(self) -> int:
        """Parameters of this layer: R·(m1·n1 + m2·n2) + R (learnable scalars) + out (bias)."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def load_factors(self, factors: KroneckerFactors) -> None:
        """Copy factors into the parameters; scales are folded into A unless they are learnable.

        Raises:
            ValueError: factor shapes or rank differ from this layer's.
        """
        if tuple(factors.A.shape) != tuple(self.A.shape) or tuple(factors.B.shape) != tuple(self.B.shape):
            raise ValueError(
                f"KroneckerLinear: factors A {tuple(factors.A.shape)}, B {tuple(factors.B.shape)} do not match "
                f"the layer's A {tuple(self.A.shape)}, B {tuple(self.B.shape)}"
            )
        if self.scales is not None:
            self.A.copy_(factors.A)
            self.scales.copy_(factors.scales)
        else:
            self.A.copy_(factors.A * factors.scales.view(-1, 1, 1))
        self.B.copy_(factors.B)

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a_shape: tuple[int, int],
        b_shape: tuple[int, int],
        rank: int = 1,
        *,
        init: str = "van_loan",
        learnable_scales: bool = False,
        svd: str = "auto",
        calibration=None,
        name: str = "weight",
    ) -> tuple["KroneckerLinear", KroneckerFactors]:
        """Build a layer approximating ``weight`` (out, in) with a registered initialiser.

        Returns the layer (on the weight's device and dtype) and the factors, whose
        ``relative_error`` reports the approximation quality.

        Raises:
            ValueError: shapes that do not divide the weight, R out of range, unknown init.
        """
        out_features, in_features = weight.shape
        factors = get_initializer(init)(weight, a_shape, b_shape, rank, svd=svd, calibration=calibration, name=name)
        layer = cls(
            in_features,
            out_features,
            a_shape,
            b_shape,
            rank,
            bias=bias is not None,
            learnable_scales=learnable_scales,
            device=weight.device,
            dtype=weight.dtype,
        )
        layer.load_factors(factors)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
        return layer, factors

    @classmethod
    def from_linear(cls, linear: nn.Linear, a_shape, b_shape, rank: int = 1, **kwargs) -> "KroneckerLinear":
        """Approximate an ``nn.Linear`` (weight stored (out, in)); kwargs as ``from_dense``."""
        return cls.from_dense(linear.weight, linear.bias, a_shape, b_shape, rank, **kwargs)[0]

    @classmethod
    def from_conv1d(cls, conv, a_shape, b_shape, rank: int = 1, **kwargs) -> "KroneckerLinear":
        """Approximate a Hugging Face ``Conv1D`` (GPT-2), whose weight is stored (in, out)."""
        return cls.from_dense(conv.weight.t(), conv.bias, a_shape, b_shape, rank, **kwargs)[0]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, A={self.a_shape}, "
            f"B={self.b_shape}, rank={self.rank}, bias={self.bias is not None}, "
            f"learnable_scales={self.scales is not None}, order={self.order}"
        )
