"""``KroneckerLinear``: y = x (Σ_r s_r A_r ⊗ B_r)ᵀ + b without materialising the weight (docs/method.md, "The Kronecker-factored linear map")."""

from __future__ import annotations

import time

import torch
from torch import nn

from kronlm.decompose.initializers import get_initializer
from kronlm.decompose.shapes import check_factor_shapes, contraction_macs, is_low_rank_shape
from kronlm.decompose.vanloan import KroneckerFactors, balance_terms, kron_sum
from kronlm.layers.dense import MergesToLinear

ORDERS = ("b_first", "a_first")
MIDDLES = ("gemm", "bmm")
# Below this many columns per token, a batched (m1, n1) @ (n1, cols) product per token runs far
# below GEMM speed (it re-reads A for every token), so the small factor is applied to a transposed
# view of the activations and A in one flat GEMM instead. Measured on the preset shapes: (k,k) B
# with k <= 3 was 10-20x faster that way, 24+ columns about even, 192+ clearly "bmm"
# (docs/benchmarks.md).
BMM_MIN_COLS = 16


def default_middle(order: str, b_shape: tuple[int, int]) -> str:
    """How ``kronecker_matmul`` contracts the middle (n1) axis when not told: "bmm" or "gemm".

    The rule: with B first the per-token matrices have m2 columns, with A first n2; "bmm" (one
    batched matmul broadcasting A over tokens, no copies) when that count is at least
    ``BMM_MIN_COLS``, else "gemm" (the small factor against a transposed view of the
    activations, then one flat matmul with A, then one transpose of the output).
    Irrelevant when m2 = 1 (B first) or n2 = 1 (A first): those paths are two flat GEMMs.
    """
    m2, n2 = b_shape
    cols = m2 if order == "b_first" else n2
    return "bmm" if cols >= BMM_MIN_COLS else "gemm"


def materializes(tokens: int, rank: int, a_shape: tuple[int, int], b_shape: tuple[int, int]) -> bool:
    """Whether ``kronecker_matmul`` forms W = Σ_r A_r ⊗ B_r and applies it as one dense product.

    Many terms can make the factored product cost more than the dense one it stands for (the
    budget's Kronecker factors reach R = 100-180 on (576, 576) projections, up to 8x the dense
    multiply-adds). Forming W costs R·m·n multiply-adds once per call; it pays when the tokens'
    factored multiply-adds (the cheaper order's) exceed the dense ones by more than that. An order
    with a middle-axis product counts its multiply-adds twice: with R > 1 its small products and
    copies ran at about half GEMM speed (benchmarks/layer_train_speed.py); the orders that are two
    flat GEMMs (B first with m2 = 1, A first with n2 = 1) count once. One term never forms W.

    Args:
        tokens: rows of the input (tokens in the batch).
        rank: R, the number of terms.
        a_shape, b_shape: (m1, n1), (m2, n2).
    """
    (m1, n1), (m2, n2) = a_shape, b_shape
    dense = m1 * m2 * n1 * n2
    b_first, a_first = contraction_macs(a_shape, b_shape, rank)
    factored = min(b_first * (1 if m2 == 1 else 2), a_first * (1 if n2 == 1 else 2))
    return rank > 1 and tokens * (factored - dense) > rank * dense


def kronecker_matmul(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, order: str, middle: str | None = None) -> torch.Tensor:
    """Apply W = Σ_r A_r ⊗ B_r to the last dimension of x: returns x Wᵀ (docs/method.md, "The
    forward pass never forms W").

    With X = x.reshape(N, n1, n2), y = Σ_r A_r X B_rᵀ. All R terms share each matmul (B_r
    stacked along the output, A_r along the contraction), so there is no loop over terms. With
    B (1, n2) or (m2, 1), R > 1 and few tokens (N·(m1 + n1) < m1·n1) the terms run as one batched
    matmul over r and a sum instead, which avoids copying the A_r into one stacked matrix. Two
    more rules apply when ``middle`` is None: with many terms and tokens (``materializes``), W is
    formed once and applied as one dense product; in training (B needs a gradient) with
    R·m2 >= 4·n1, "bmm" replaces a "gemm" middle. All three are eager-mode rules; under
    torch.compile / export the factored, stacked form is traced, whatever N.

    Args:
        x: (..., n1*n2) input.
        A: (R, m1, n1) left factors (per-term scalars already folded in).
        B: (R, m2, n2) right factors.
        order: "b_first" (Z = X B_rᵀ, then A_r Z) or "a_first" (A_r X, then · B_rᵀ).
        middle: how the contraction over the middle axis n1 runs: "bmm" (A broadcast over the
            tokens in one batched matmul) or "gemm" (one flat matmul on a transposed copy of
            the activations); ``None`` uses ``default_middle`` and the rules above. Every plan
            gives the same result up to floating-point rounding.

    Returns:
        (..., m1*m2) output.

    Raises:
        ValueError: unknown ``order`` or ``middle``.
    """
    if order not in ORDERS:
        raise ValueError(f"kronecker_matmul: order must be one of {ORDERS}, got {order!r}")
    if middle is not None and middle not in MIDDLES:
        raise ValueError(f"kronecker_matmul: middle must be one of {MIDDLES}, got {middle!r}")
    R, m1, n1 = A.shape
    _, m2, n2 = B.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n1 * n2)
    N = x2.shape[0]
    # The rules below depend on the token count, so only eager mode applies them: traced code
    # (torch.compile, export) keeps the factored, stacked form, with no guard on the token count.
    eager = not torch.compiler.is_compiling()
    if middle is None and eager and materializes(N, R, (m1, n1), (m2, n2)):
        return (x2 @ kron_sum(A, B).t()).reshape(*lead, m1 * m2)
    if middle is None:
        middle = default_middle(order, (m2, n2))
        # In training, the "gemm" layout's per-token view of B (an expand) gets a gradient of
        # N·R·m2·n2 values before they are summed; with many terms that costs far more than the
        # product (5-10x slower than "bmm" at R = 28-176, docs/benchmarks.md).
        if middle == "gemm" and eager and R * m2 >= 4 * n1 and B.requires_grad and torch.is_grad_enabled():
            middle = "bmm"
    few_tokens = R > 1 and eager and N * (m1 + n1) < m1 * n1
    if order == "b_first":
        Y = b_first_matmul(x2, A, B, middle, few_tokens)
    else:
        Y = a_first_matmul(x2, A, B, middle, few_tokens)
    return Y.reshape(*lead, m1 * m2)


def b_first_matmul(x2: torch.Tensor, A: torch.Tensor, B: torch.Tensor, middle: str, few_tokens: bool) -> torch.Tensor:
    """The "b_first" order of :func:`kronecker_matmul` on x2 (N, n1*n2): Z = X B_rᵀ, then A_r Z;
    returns Y as (N, m1, m2) or a tensor of the same elements in that order."""
    R, m1, n1 = A.shape
    _, m2, n2 = B.shape
    N = x2.shape[0]
    if m2 == 1 or middle == "bmm":
        # Z (N, n1, R, m2): every B_r in one (N*n1, n2) @ (n2, R*m2) product.
        Z = x2.reshape(N * n1, n2) @ B.reshape(R * m2, n2).t()
    if m2 == 1 and few_tokens:
        # Few tokens: one (N, n1) @ (n1, m1) product per term and a sum, instead of stacking
        # the A_r (a copy of R*m1*n1 values, the dominant cost at decode).
        return torch.bmm(Z.reshape(N, n1, R).permute(2, 0, 1), A.transpose(1, 2)).sum(0)
    if m2 == 1:
        # Z is already (N, n1*R) with the contraction index (i, r) last: one flat GEMM.
        return Z.reshape(N, n1 * R) @ A.permute(2, 0, 1).reshape(n1 * R, m1)
    if middle == "bmm":
        if R > 1:
            Z = Z.reshape(N, n1, R, m2).permute(0, 2, 1, 3)
        # (m1, R*n1) @ (N, R*n1, m2) -> (N, m1, m2).
        return A.permute(1, 0, 2).reshape(m1, R * n1) @ Z.reshape(N, R * n1, m2)
    # Per token (R*m2, n2) @ (n2, n1) against the transposed view of X (no copy), B_r
    # stacked (b, r) so that (N*m2, R*n1) is a free view; then one flat GEMM with A.
    B_br = B.permute(1, 0, 2).reshape(m2 * R, n2)
    Zt = torch.bmm(B_br.expand(N, m2 * R, n2), x2.reshape(N, n1, n2).transpose(1, 2))
    Yt = Zt.reshape(N * m2, R * n1) @ A.permute(1, 0, 2).reshape(m1, R * n1).t()
    return Yt.reshape(N, m2, m1).transpose(1, 2)


def a_first_matmul(x2: torch.Tensor, A: torch.Tensor, B: torch.Tensor, middle: str, few_tokens: bool) -> torch.Tensor:
    """The "a_first" order of :func:`kronecker_matmul` on x2 (N, n1*n2): A_r X, then · B_rᵀ;
    returns Y as (N, m1, m2) or a tensor of the same elements in that order."""
    R, m1, n1 = A.shape
    _, m2, n2 = B.shape
    N = x2.shape[0]
    if n2 == 1 and few_tokens:
        # Few tokens: x @ A_rᵀ per term (R, N, m1) without stacking the A_r, then B mixes the terms.
        Wx = torch.matmul(x2, A.transpose(1, 2))
        return Wx.permute(1, 2, 0).reshape(N * m1, R) @ B.reshape(R, m2)
    if n2 == 1:
        # x @ A_catᵀ with the output index (a, r), then the (R, m2) matrix of B mixes the terms.
        Wx = x2 @ A.permute(1, 0, 2).reshape(m1 * R, n1).t()
        return Wx.reshape(N * m1, R) @ B.reshape(R, m2)
    if middle == "bmm":
        # (R*m1, n1) @ (N, n1, n2) -> (N, R*m1, n2), then (N*m1, R*n2) @ (R*n2, m2).
        Wx = A.reshape(R * m1, n1) @ x2.reshape(N, n1, n2)
        if R > 1:
            Wx = Wx.reshape(N, R, m1, n2).permute(0, 2, 1, 3)
        return Wx.reshape(N * m1, R * n2) @ B.permute(0, 2, 1).reshape(R * n2, m2)
    # One flat GEMM on the transposed activations: U (N, n2*R, m1) indexed (j, r, a).
    Xt = x2.reshape(N, n1, n2).transpose(1, 2).reshape(N * n2, n1)
    U = (Xt @ A.reshape(R * m1, n1).t()).reshape(N, n2 * R, m1)
    # Per token (m1, n2*R) @ (n2*R, m2) on the transposed view of U (no copy).
    B_jr = B.permute(2, 0, 1).reshape(n2 * R, m2)
    return torch.bmm(U.transpose(1, 2), B_jr.expand(N, n2 * R, m2))


# Opt-in measured plan choice: {(m1, n1, m2, n2, R, token bucket, dtype, device type): (order, middle)}.
_AUTOTUNE = {"enabled": False}
_PLAN_CACHE: dict[tuple, tuple[str, str]] = {}


def set_autotune(enabled: bool) -> None:
    """Turn the measured choice of contraction plan for every ``KroneckerLinear`` on or off.

    Off (the default), a layer uses the order with fewer multiply-adds (docs/method.md, "The forward pass never forms W") and
    ``default_middle``: deterministic, no timing in the forward pass. On, the first eager
    forward for each (factor shapes, R, token bucket, dtype, device) times the candidate plans
    once (``autotune_plan``) and caches the fastest in-process; under ``torch.compile`` the
    rule is used. Clearing: ``clear_plan_cache()``.
    """
    _AUTOTUNE["enabled"] = bool(enabled)


def clear_plan_cache() -> None:
    """Forget every plan ``autotune_plan`` measured."""
    _PLAN_CACHE.clear()


def token_bucket(tokens: int) -> int:
    """The power of two at or above ``tokens`` (tokens >= 1): plans are cached per bucket."""
    return 1 << max(0, int(tokens) - 1).bit_length()


def candidate_plans(a_shape: tuple[int, int], b_shape: tuple[int, int]) -> list[tuple[str, str]]:
    """The distinct (order, middle) plans of ``kronecker_matmul`` for these factor shapes.

    The middle choice only matters when the path has a middle-axis product: B first with m2 > 1,
    A first with n2 > 1; otherwise one plan per order is listed.
    """
    m2, n2 = b_shape
    plans = [("b_first", "gemm")] + ([("b_first", "bmm")] if m2 > 1 else [])
    plans += [("a_first", "gemm")] + ([("a_first", "bmm")] if n2 > 1 else [])
    return plans


def _time_plan(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, order: str, middle: str, repeats: int = 3) -> float:
    with torch.no_grad():
        kronecker_matmul(x, A, B, order, middle)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            t0 = time.perf_counter()
            kronecker_matmul(x, A, B, order, middle)
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            best = min(best, time.perf_counter() - t0)
    return best


def autotune_plan(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, measure=None) -> tuple[str, str]:
    """The fastest (order, middle) for this input size, measured once and cached.

    Args:
        x: (..., n1*n2) a representative input; only its token count, dtype and device matter.
        A: (R, m1, n1), B: (R, m2, n2) the factors.
        measure: ``measure(order, middle) -> seconds``; default: best of 3 timed calls of
            ``kronecker_matmul`` on ``x`` (wall clock, ``time.perf_counter``).

    Returns:
        The (order, middle) with the smallest measured time; ties go to the earlier candidate
        of ``candidate_plans``.
    """
    R, m1, n1 = A.shape
    _, m2, n2 = B.shape
    tokens = x.numel() // max(1, n1 * n2)
    key = (m1, n1, m2, n2, R, token_bucket(max(1, tokens)), x.dtype, x.device.type)
    if key not in _PLAN_CACHE:
        if measure is None:
            measure = lambda order, middle: _time_plan(x, A, B, order, middle)
        times = {plan: measure(*plan) for plan in candidate_plans((m1, n1), (m2, n2))}
        _PLAN_CACHE[key] = min(times, key=times.get)
    return _PLAN_CACHE[key]


class KroneckerLinear(MergesToLinear, nn.Module):
    """A linear map whose weight (out, in) = (m1·m2, n1·n2) is Σ_r s_r · A_r ⊗ B_r, plus a bias.

    Parameters: ``A`` (R, m1, n1), ``B`` (R, m2, n2), ``scales`` (R,) when ``learnable_scales``
    (Krony-PT's per-term scalars; otherwise the scalars are folded into A), ``bias`` (out,).
    The forward pass contracts x.reshape(..., n1, n2) with B then A, or A then B, whichever costs
    fewer multiply-adds for these shapes (``self.order``; docs/method.md, "The forward pass never
    forms W"), with the middle-axis layout of ``default_middle``; only a layer with so many terms
    that the factored product costs more than the dense one forms W, for a batch of enough
    tokens (``materializes``). ``set_autotune(True)`` lets a one-time in-process measurement pick
    the order and layout instead. Any leading dimensions work; ``torch.compile`` traces it.

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
        m1, n1, m2, n2 = check_factor_shapes((out_features, in_features), a_shape, b_shape, "KroneckerLinear")
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

    def forward_factors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The (A (R, m1, n1), B (R, m2, n2)) the forward pass multiplies by, in ``dtype``.

        Per-term scalars are folded into the smaller factor (s_r (A_r ⊗ B_r) = A_r ⊗ (s_r B_r)),
        one short pass per forward instead of a pass over the larger factor.
        """
        A, B = self.A, self.B
        if self.scales is not None:
            s = self.scales.view(-1, 1, 1).to(A.dtype)
            if B[0].numel() <= A[0].numel():
                B = B * s
            else:
                A = A * s
        if dtype is not None:
            A, B = A.to(dtype), B.to(dtype)
        return A, B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out)."""
        A, B = self.forward_factors(x.dtype)
        if _AUTOTUNE["enabled"] and not torch.compiler.is_compiling():
            order, middle = autotune_plan(x, A.detach(), B.detach())
        else:
            order, middle = self.order, None
        y = kronecker_matmul(x, A, B, order, middle)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The weight Σ_r s_r A_r ⊗ B_r as an (out, in) tensor (nn.Linear orientation)."""
        return kron_sum(self.A, self.B, self.scales)

    @torch.no_grad()
    def load_factors(self, factors: KroneckerFactors) -> None:
        """Copy factors into the parameters; scales are folded into A unless they are learnable.
        Each Kronecker term is then stored with ||A_r||_F = ||B_r||_F (``balance_``).

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
        self.balance_()

    @property
    def balances_terms(self) -> bool:
        """Whether ``balance_`` evens this layer's terms: not for the terms of a truncated SVD (A a
        column, B a row: ``is_low_rank_shape``), whose init's split distils faster (docs/method.md,
        "How the factors are stored")."""
        return not is_low_rank_shape(self.a_shape, self.b_shape)

    @torch.no_grad()
    def balance_(self) -> KroneckerLinear:
        """Split each term's scale evenly, ||A_r||_F = ||B_r||_F, in place, when ``balances_terms``;
        the weight is unchanged (``kronlm.decompose.balance_terms``, which says why). Returns the layer."""
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
        *,
        init: str = "van_loan",
        learnable_scales: bool = False,
        svd_solver: str = "auto",
        calibration=None,
        name: str = "weight",
    ) -> tuple[KroneckerLinear, KroneckerFactors]:
        """Build a layer approximating ``weight`` (out, in) with a registered initialiser.

        Returns the layer (on the weight's device and dtype) and the factors, whose
        ``relative_error`` reports the approximation quality.

        Raises:
            ValueError: shapes that do not divide the weight, R out of range, unknown init.
        """
        out_features, in_features = weight.shape
        factors = get_initializer(init)(weight, a_shape, b_shape, rank, svd_solver=svd_solver, calibration=calibration, name=name)
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
    def from_linear(cls, linear: nn.Linear, a_shape, b_shape, rank: int = 1, **kwargs) -> KroneckerLinear:
        """Approximate an ``nn.Linear`` (weight stored (out, in)); kwargs as ``from_dense``."""
        return cls.from_dense(linear.weight, linear.bias, a_shape, b_shape, rank, **kwargs)[0]

    @classmethod
    def from_conv1d(cls, conv, a_shape, b_shape, rank: int = 1, **kwargs) -> KroneckerLinear:
        """Approximate a Hugging Face ``Conv1D`` (GPT-2), whose weight is stored (in, out)."""
        return cls.from_dense(conv.weight.t(), conv.bias, a_shape, b_shape, rank, **kwargs)[0]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, A={self.a_shape}, "
            f"B={self.b_shape}, rank={self.rank}, bias={self.bias is not None}, "
            f"learnable_scales={self.scales is not None}, order={self.order}"
        )
