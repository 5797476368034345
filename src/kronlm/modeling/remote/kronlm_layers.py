"""Kronecker layers and model surgery for a kronlm-compressed model, standalone (torch only).

kronlm writes this file, unchanged, into every compressed model folder it saves, next to
``configuration_kronlm.py`` and ``modeling_kronlm.py``, so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

rebuilds the compressed model in a Python process that does not have kronlm installed (lm-eval's
command line, a serving tool, a notebook). It depends only on torch; the forward passes are the
same operations, in the same order, as kronlm's own ``KroneckerLinear`` / ``KroneckerLowRankLinear`` /
``KroneckerEmbedding`` / ``KroneckerTiedLMHead`` (``kronecker_matmul`` and its two orders are verbatim copies, checked by kronlm's tests), so the
logits are bit-identical to ``kronlm.load(folder)``'s.

The compressed architecture is described by the plan stored under ``kronlm`` in ``config.json``
(kronlm's ``KroneckerPlan``): every planned module is replaced by an empty Kronecker module of the
planned shape before the weights are loaded. ``MODULE_BUILDERS`` maps each plan ``kind`` to the
function that builds its module: a new kind of Kronecker module is one entry there (and one class).

Source: the kronlm package (``kronlm.layers``, ``kronlm.modeling.plan``), kronlm's docs/method.md, "The Kronecker-factored linear map" (the product W = Σ_r s_r A_r ⊗ B_r
and its contraction orders), Van Loan & Pitsianis (1993), KnGPT2 / KroneckerBERT / Krony-PT.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

# config.json key transformers reads the weights file name from, and the value kronlm writes into
# it: a dense class (LlamaForCausalLM, ...) asked to load a compressed folder stops with this
# message instead of silently initialising the missing dense weights at random. The Kronecker
# config classes drop the key when they load the config. Keep in sync with kronlm.modeling.remote_code.
LOAD_GUARD_KEY = "transformers_weights"
LOAD_GUARD_PREFIX = "kronlm-compressed model"
PLAN_KEY = "kronlm"

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


def kron_sum(A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """Return Σ_r s_r · A_r ⊗ B_r for A (R, m1, n1), B (R, m2, n2), scales (R,) -> (m1*m2, n1*n2).

    Computed by broadcasting rather than a loop over ``torch.kron``; used for ``to_dense``, error
    measurement, and the forward pass of a layer whose terms make the factored product dearer than
    the dense one (``kronlm.layers.linear.materializes``).
    """
    R, m1, n1 = A.shape
    _, m2, n2 = B.shape
    if scales is not None:
        A = A * scales.to(A.dtype).view(R, 1, 1)
    # out[i*m2 + k, j*n2 + l] = Σ_r A[r, i, j] B[r, k, l]
    dense = torch.einsum("rij,rkl->ikjl", A, B)
    return dense.reshape(m1 * m2, n1 * n2)


def kron_sum_rank_bound(a_shape: tuple[int, int], b_shape: tuple[int, int], rank: int) -> int:
    """An upper bound on the rank of Σ_r A_r ⊗ B_r: R · min(m1, n1) · min(m2, n2).

    rank(A ⊗ B) = rank(A) · rank(B), and a sum of R terms has at most the sum of their ranks; it
    is also the width of ``kron_sum_lowrank``'s factors. Thin factors ((288, 2) ⊗ (2, 288), say)
    make the whole sum a low-rank matrix: 4 per term here, against 576 for the (576, 576) weight.
    """
    (m1, n1), (m2, n2) = a_shape, b_shape
    return rank * min(m1, n1) * min(m2, n2)


def kron_sum_lowrank(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact low-rank form U V of Σ_r A_r ⊗ B_r, from the SVD of each factor.

    With A_r = P_A S_A Q_Aᵀ and B_r = P_B S_B Q_Bᵀ (thin SVDs), A_r ⊗ B_r = (P_A ⊗ P_B)(S_A ⊗ S_B)
    (Q_A ⊗ Q_B)ᵀ (Van Loan, "The ubiquitous Kronecker product", 2000, §2); the terms' factors
    are stacked side by side. Computed in float32 (the SVD has no half-precision kernel on CPU).

    Args:
        A: (R, m1, n1); B: (R, m2, n2).

    Returns:
        (U (m1·m2, K), V (K, n1·n2)) in float32 with U V = Σ_r A_r ⊗ B_r up to rounding, K =
        ``kron_sum_rank_bound`` (zero singular values are kept, so K depends on the shapes only).
    """
    R, m1, n1 = A.shape
    _, m2, n2 = B.shape
    Pa, Sa, Qa = torch.linalg.svd(A.detach().float(), full_matrices=False)
    Pb, Sb, Qb = torch.linalg.svd(B.detach().float(), full_matrices=False)
    ka, kb = Sa.shape[1], Sb.shape[1]
    # U[i*m2 + k, (r, p, q)] = Pa[r, i, p] Pb[r, k, q] Sa[r, p] Sb[r, q]; V[(r, p, q), j*n2 + l] = Qa[r, p, j] Qb[r, q, l]
    U = torch.einsum("rip,rkq,rp,rq->ikrpq", Pa, Pb, Sa, Sb).reshape(m1 * m2, R * ka * kb)
    V = torch.einsum("rpj,rql->rpqjl", Qa, Qb).reshape(R * ka * kb, n1 * n2)
    return U, V


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




def contraction_macs(a_shape: tuple[int, int], b_shape: tuple[int, int], rank: int = 1) -> tuple[int, int]:
    """Multiply-adds per token of y = Σ_r A_r X B_rᵀ, as (B first, A first) (kronlm's docs/method.md, "The forward pass never forms W")."""
    (m1, n1), (m2, n2) = a_shape, b_shape
    return rank * (n1 * n2 * m2 + m1 * n1 * m2), rank * (m1 * n1 * n2 + m1 * n2 * m2)


def _factor_shapes(rows: int, cols: int, a_shape, b_shape, name: str) -> tuple[int, int, int, int]:
    (m1, n1), (m2, n2) = (int(v) for v in a_shape), (int(v) for v in b_shape)
    if m1 * m2 != rows or n1 * n2 != cols:
        raise ValueError(f"{name}: A {tuple(a_shape)} ⊗ B {tuple(b_shape)} is not ({rows}, {cols})")
    return m1, n1, m2, n2


class KroneckerLinear(nn.Module):
    """y = x (Σ_r s_r A_r ⊗ B_r)ᵀ + b without forming the (out, in) weight.

    Parameters ``A`` (R, m1, n1), ``B`` (R, m2, n2), ``scales`` (R,) when ``learnable_scales``,
    ``bias`` (out,); out = m1·m2, in = n1·n2. Same state-dict names and forward as kronlm's.

    Raises:
        ValueError: factor shapes that do not multiply to (out, in).
    """

    def __init__(self, in_features, out_features, a_shape, b_shape, rank=1, bias=True, learnable_scales=False, device=None, dtype=None):
        super().__init__()
        m1, n1, m2, n2 = _factor_shapes(out_features, in_features, a_shape, b_shape, "KroneckerLinear")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.a_shape, self.b_shape, self.rank = (m1, n1), (m2, n2), rank
        self.A = nn.Parameter(torch.empty(rank, m1, n1, **kw))
        self.B = nn.Parameter(torch.empty(rank, m2, n2, **kw))
        self.scales = nn.Parameter(torch.ones(rank, **kw)) if learnable_scales else None
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        b_first, a_first = contraction_macs(self.a_shape, self.b_shape, rank)
        self.order = "b_first" if b_first <= a_first else "a_first"
        if not self.A.is_meta:
            with torch.no_grad():
                std = ((3.0 * in_features) ** -0.5 / rank**0.5) ** 0.5
                self.A.normal_(0.0, std)
                self.B.normal_(0.0, std)

    def forward_factors(self, dtype=None):
        """(A, B) with the per-term scalars folded into the smaller factor, in ``dtype``."""
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
        y = kronecker_matmul(x, A, B, self.order, None)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The (out, in) weight Σ_r s_r A_r ⊗ B_r."""
        return kron_sum(self.A, self.B, self.scales)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, A={self.a_shape}, B={self.b_shape}, rank={self.rank}"


class KroneckerLowRankLinear(nn.Module):
    """y = x (Σ_r A_r ⊗ B_r + U V)ᵀ + b without forming the (out, in) weight.

    Parameters ``A`` (R, m1, n1), ``B`` (R, m2, n2), ``U`` (out, k), ``V`` (k, in), ``bias`` (out,);
    same state-dict names and forward as kronlm's ``KroneckerLowRankLinear``.

    Raises:
        ValueError: factor shapes that do not multiply to (out, in).
    """

    def __init__(self, in_features, out_features, a_shape, b_shape, rank=1, lowrank=1, bias=True, device=None, dtype=None):
        super().__init__()
        m1, n1, m2, n2 = _factor_shapes(out_features, in_features, a_shape, b_shape, "KroneckerLowRankLinear")
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
        if not self.A.is_meta:
            with torch.no_grad():
                for p in (self.A, self.B, self.U, self.V):
                    p.normal_(0.0, 0.02)

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
        """The (out, in) weight Σ_r A_r ⊗ B_r + U V."""
        return kron_sum(self.A, self.B) + self.U @ self.V

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, A={self.a_shape}, B={self.b_shape}, "
                f"rank={self.rank}, lowrank={self.lowrank}")


class KroneckerEmbedding(nn.Module):
    """Embedding table E (V, d) = Σ_r A_r ⊗ B_r, A_r (V/m2, d/n2), B_r (m2, n2), looked up row by row.

    Parameters ``A`` (R, V/m2, d/n2) and ``B`` (R, m2, n2); same state-dict names and forward as kronlm's.

    Raises:
        ValueError: factor shapes that do not multiply to (V, d).
    """

    def __init__(self, num_embeddings, embedding_dim, a_shape, b_shape, rank=1, padding_idx=None, device=None, dtype=None):
        super().__init__()
        m1, n1, m2, n2 = _factor_shapes(num_embeddings, embedding_dim, a_shape, b_shape, "KroneckerEmbedding")
        kw = {"device": device, "dtype": dtype}
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.a_shape, self.b_shape, self.rank = (m1, n1), (m2, n2), rank
        self.padding_idx = padding_idx
        self.A = nn.Parameter(torch.empty(rank, m1, n1, **kw))
        self.B = nn.Parameter(torch.empty(rank, m2, n2, **kw))
        if not self.A.is_meta:
            with torch.no_grad():
                self.A.normal_(0.0, rank**-0.25)
                self.B.normal_(0.0, rank**-0.25)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (...) int64 -> (..., d)."""
        R, _, n1 = self.A.shape
        m2, n2 = self.b_shape
        if m2 == 1:
            a_idx, b_idx = input_ids, None
        else:
            a_idx, b_idx = input_ids // m2, input_ids % m2
        a = F.embedding(a_idx, self.A.permute(1, 0, 2).reshape(-1, R * n1)).unflatten(-1, (R, n1))
        if b_idx is None:
            b = self.B[:, 0, :]
        else:
            b = F.embedding(b_idx, self.B.permute(1, 0, 2).reshape(m2, R * n2)).unflatten(-1, (R, n2))
        rows = (a.unsqueeze(-1) * b.unsqueeze(-2)).sum(-3)
        return rows.reshape(*input_ids.shape, self.embedding_dim)

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The (V, d) table Σ_r A_r ⊗ B_r."""
        return kron_sum(self.A, self.B)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, A={self.a_shape}, B={self.b_shape}, rank={self.rank}"


class KroneckerTiedLMHead(nn.Module):
    """LM head tied to a ``KroneckerEmbedding``: logits = h Eᵀ computed from the embedding's factors.

    The embedding is held by reference (not a submodule), so the factors are stored once.
    """

    def __init__(self, embedding: KroneckerEmbedding, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @property
    def embedding(self) -> KroneckerEmbedding:
        """The embedding whose factors this head uses."""
        return self._embedding

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (..., d) -> logits (..., V)."""
        emb = self._embedding
        y = kronecker_matmul(hidden, emb.A.to(hidden.dtype), emb.B.to(hidden.dtype), "b_first")
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y


def _dense_weight(module: nn.Module) -> torch.Tensor:
    # Hugging Face's Conv1D (GPT-2) stores its weight (in, out).
    weight = module.weight
    return weight.t() if type(module).__name__ == "Conv1D" else weight


def build_linear(entry: dict, device, dtype) -> nn.Module:
    """An empty ``KroneckerLinear`` for a plan entry of kind "linear"."""
    return KroneckerLinear(entry["in"], entry["out"], entry["a_shape"], entry["b_shape"], entry.get("rank", 1),
                           bias=bool(entry.get("bias", False)), learnable_scales=bool(entry.get("learnable_scales", False)),
                           device=device, dtype=dtype)


def build_embedding(entry: dict, device, dtype) -> nn.Module:
    """An empty ``KroneckerEmbedding`` for a plan entry of kind "embedding"."""
    return KroneckerEmbedding(entry["out"], entry["in"], entry["a_shape"], entry["b_shape"], entry.get("rank", 1),
                              padding_idx=entry.get("padding_idx"), device=device, dtype=dtype)


def build_kronecker_lowrank(entry: dict, device, dtype) -> nn.Module:
    """An empty ``KroneckerLowRankLinear`` for a plan entry of kind "kronecker_lowrank"."""
    return KroneckerLowRankLinear(entry["in"], entry["out"], entry["a_shape"], entry["b_shape"], entry.get("rank", 1), entry["lowrank"],
                                  bias=bool(entry.get("bias", False)), device=device, dtype=dtype)


# Plan "kind" -> builder of the empty module. A new Kronecker module kind is one entry here.
MODULE_BUILDERS = {"linear": build_linear, "embedding": build_embedding, "kronecker_lowrank": build_kronecker_lowrank}


def resolve_module_name(model: nn.Module, name: str) -> str | None:
    """Map a plan name onto ``model``, allowing for a base-model prefix present on one side only."""
    names = dict(model.named_modules())
    if name in names:
        return name
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix:
        if name.startswith(prefix + ".") and name[len(prefix) + 1 :] in names:
            return name[len(prefix) + 1 :]
        if f"{prefix}.{name}" in names:
            return f"{prefix}.{name}"
    return None


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_plan(model: nn.Module, plan: dict | None) -> None:
    """Replace every module the plan lists by an empty Kronecker module of the planned shape.

    Modules are built on the device and dtype of the dense module they replace (the meta device
    while ``from_pretrained`` builds the model); a tied Kronecker LM head is re-attached to its
    embedding.

    Raises:
        ValueError: an unknown plan version or module kind, a planned module the model lacks, or a
            dense module whose shape differs from the plan's (named).
    """
    if not plan:
        return
    if plan.get("version") != 1:
        raise ValueError(f"kronlm plan version {plan.get('version')!r} is not supported by this modeling file (expected 1)")
    embeddings = {}
    for name, entry in plan["modules"].items():
        kind = entry.get("kind")
        if kind not in MODULE_BUILDERS:
            raise ValueError(f"kronlm plan entry {name!r}: module kind {kind!r} is not supported by this modeling file")
        resolved = resolve_module_name(model, name)
        if resolved is None:
            raise ValueError(f"kronlm plan names module {name!r}, which {type(model).__name__} does not have")
        old = model.get_submodule(resolved)
        weight = _dense_weight(old)
        if tuple(weight.shape) != (entry["out"], entry["in"]):
            raise ValueError(f"kronlm plan: module {name!r} has weight {tuple(weight.shape)} but the plan expects ({entry['out']}, {entry['in']})")
        new = MODULE_BUILDERS[kind](entry, weight.device, weight.dtype)
        set_module(model, resolved, new)
        if kind == "embedding":
            embeddings[name] = new
    head = plan.get("lm_head")
    if head and head.get("mode") == "tied":
        resolved = resolve_module_name(model, head["module"])
        if resolved is not None:  # a base model (no head) loaded from a causal-LM folder has none
            old = model.get_submodule(resolved)
            bias = getattr(old, "bias", None) if head.get("bias") else None
            set_module(model, resolved, KroneckerTiedLMHead(embeddings[head["embedding"]], bias=bias))


def drop_load_guard(kwargs: dict) -> dict:
    """Remove the load guard (see ``LOAD_GUARD_KEY``) from config keyword arguments; returns them."""
    value = kwargs.get(LOAD_GUARD_KEY)
    if isinstance(value, str) and value.startswith(LOAD_GUARD_PREFIX):
        del kwargs[LOAD_GUARD_KEY]
    return kwargs


def write_load_guard(folder: str | os.PathLike, message: str) -> None:
    """Add the load guard to ``folder/config.json`` (after ``save_pretrained`` wrote it)."""
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    config[LOAD_GUARD_KEY] = message
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class KroneckerModelMixin:
    """Model mixin: builds the base architecture, then the Kronecker modules ``config.kronlm`` plans."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_plan(self, getattr(config, PLAN_KEY, None))

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``save_pretrained`` (which copies these code files), plus the load guard in ``config.json``."""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        base = type(self).__mro__[2].__name__
        write_load_guard(save_directory, f"{LOAD_GUARD_PREFIX} ({self.config.model_type}): {base} cannot load it; load it with "
                         f"AutoModel*.from_pretrained(folder, trust_remote_code=True) or kronlm.load(folder)")
        return out
