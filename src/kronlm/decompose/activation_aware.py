"""Activation-aware Kronecker factors: minimise the output error on calibration inputs.

Van Loan's nearest Kronecker product minimises ||W - Ŵ||_F, which weighs every input direction
alike. A layer only ever sees its inputs x, and LLM activations are far from isotropic (a few
channels carry most of the energy), so what matters is the output error over the calibration
inputs X (in, N):

    E(Ŵ) = ||(W - Ŵ) X||_F² / N = tr((W - Ŵ) C (W - Ŵ)ᵀ),   C = X Xᵀ / N  (in, in),

with Ŵ = Σ_r A_r ⊗ B_r, A_r (m1, n1), B_r (m2, n2), W (out, in) = (m1·m2, n1·n2). This is the
idea of ASVD (Yuan et al. 2023) and SVD-LLM (Wang et al. 2024) for low-rank factors, carried over
to Kronecker factors in two steps.

1. **Whitening with a Kronecker-factored covariance.** Index an input as (i, k), i < n1, k < n2,
   and let P1 = Σ_k C[(i,k),(j,k)] (n1, n1) and P2 = Σ_i C[(i,k),(i,l)] (n2, n2) be the partial
   traces of C. If C = C1 ⊗ C2 exactly, then C = P1 ⊗ P2 / tr(C), and in general this is the
   Kronecker-factored approximation (as in K-FAC). With L1 = P1^{1/2}, L2 = (P2 / tr C)^{1/2}
   we have C^{1/2} ≈ L1 ⊗ L2 and, because (A ⊗ B)(L1 ⊗ L2) = (A L1) ⊗ (B L2),

       E(Ŵ) ≈ ||W (L1 ⊗ L2) - Σ_r (A_r L1) ⊗ (B_r L2)||_F²,

   a nearest-Kronecker-product problem in the whitened weight W' = W (L1 ⊗ L2). Van Loan on W'
   gives A'_r, B'_r; un-whitening gives A_r = A'_r L1⁻¹, B_r = B'_r L2⁻¹. When n1 = 1 or n2 = 1
   the factorisation of C is exact, so this step alone is optimal (with n1 = 1 and m2 = 1 it is
   SVD-LLM's truncation-aware whitened SVD).

2. **Alternating least squares with the full covariance.** E is quadratic in A for fixed B and
   in B for fixed A. Stack A = [A_1 … A_R] (m1, R·n1); setting the gradient to zero gives
   A G_A = H_A with
       G_A[(r,i),(s,j)] = Σ_{k,l} C[(i,k),(j,l)] (B_rᵀ B_s)[k,l],
       H_A[a,(r,i)]     = Σ_{b,k} (W C)[(a,b),(i,k)] B_r[b,k],
   and symmetrically B G_B = H_B with
       G_B[(r,k),(s,l)] = Σ_{i,j} C[(i,k),(j,l)] (A_rᵀ A_s)[i,j],
       H_B[b,(r,k)]     = Σ_{a,i} (W C)[(a,b),(i,k)] A_r[a,i].
   Each half-step is an exact block minimisation, so E never increases; we stop when it improves
   by less than ``tol`` (relative).

``damping`` adds δ·mean(diag C)·I to C (as GPTQ does): it keeps the inverses finite for dead
input channels and pulls the fit slightly towards the plain Frobenius one, which generalises
better beyond the calibration text. The returned factors are never worse than plain Van Loan on
the undamped objective: both are scored and the better one is kept.
"""

from __future__ import annotations

import torch

from kronlm.decompose.shapes import check_factor_shapes
from kronlm.decompose.vanloan import (
    KroneckerFactors,
    kron_sum,
    nearest_kronecker_product,
    rearrange,
    relative_error,
    squared_singular_values,
)

# ALS solves (R·n1, R·n1) and (R·n2, R·n2) systems (float64): above this side one sweep costs
# minutes and gigabytes on a CPU (an 8192-side system is 0.5 GB and ~2e11 flops), so the
# whitened Van Loan factors are kept as they are.
ALS_MAX_SIDE = 2048


def partial_traces(covariance: torch.Tensor, n1: int, n2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial traces of an (n1·n2, n1·n2) second-moment matrix: P1 (n1, n1) and P2 (n2, n2).

    P1 = Σ_k C[(i,k),(j,k)] and P2 = Σ_i C[(i,k),(i,l)]; C ≈ P1 ⊗ P2 / tr(C), exactly when C is a
    Kronecker product. The same two matrices are what ``collect_calibration`` stores for inputs too
    large to keep C itself.

    Raises:
        ValueError: C is not square of side n1·n2.
    """
    n = n1 * n2
    if covariance.shape != (n, n):
        raise ValueError(f"covariance has shape {tuple(covariance.shape)}, expected ({n}, {n}) for input factors n1={n1}, n2={n2}")
    C4 = covariance.reshape(n1, n2, n1, n2)
    return torch.einsum("ikjk->ij", C4), torch.einsum("ikil->kl", C4)


def psd_sqrt_and_inverse(P: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root of a PSD matrix P (n, n) and its inverse, both (n, n).

    Eigenvalues below ``eps`` times the largest are clamped, so the inverse stays finite for
    dead input channels.
    """
    evals, evecs = torch.linalg.eigh(P)
    floor = max(evals.max().item(), 0.0) * eps + torch.finfo(P.dtype).tiny
    root = evals.clamp_min(floor).sqrt()
    return (evecs * root) @ evecs.mT, (evecs / root) @ evecs.mT


def corrected_target(weight: torch.Tensor, covariance: torch.Tensor, cross_moment: torch.Tensor, damping: float = 1e-2) -> torch.Tensor:
    """The weight that the compressed model's inputs should meet: W* = W (S + δI)(C̃ + δI)⁻¹.

    With x the dense model's input to a module and x̃ the partially compressed model's input to
    the same module on the same tokens, C̃ = E[x̃ x̃ᵀ] and S = E[x x̃ᵀ] (both (in, in)), the output
    error against the dense model's output, E||W x - Ŵ x̃||² + δ||Ŵ - W||²_F (the ridge towards W
    that ``damping`` adds everywhere in kronlm), equals tr((Ŵ - W*)(C̃ + δI)(Ŵ - W*)ᵀ) plus a
    constant. So fitting W* under C̃ corrects the error that earlier compressed blocks put into
    x̃, as far as a linear map can; with x̃ = x, W* = W. δ = damping·mean(diag C̃).

    Args:
        weight: (out, in) W.
        covariance: (in, in) C̃.
        cross_moment: (in, in) S = E[x x̃ᵀ].
        damping: δ relative to mean(diag C̃).

    Returns:
        (out, in) float64 W*.

    Raises:
        ValueError: moments whose shape is not (in, in).
    """
    in_f = weight.shape[1]
    if tuple(covariance.shape) != (in_f, in_f) or tuple(cross_moment.shape) != (in_f, in_f):
        raise ValueError(
            f"corrected target: moments are {tuple(covariance.shape)} and {tuple(cross_moment.shape)}, expected ({in_f}, {in_f})"
        )
    C = covariance.double()
    delta = damping * C.diagonal().mean().clamp_min(0).item()
    eye = torch.eye(in_f, dtype=torch.float64)
    rhs = weight.detach().double() @ (cross_moment.double() + delta * eye)
    # X (C̃ + δI) = rhs, C̃ + δI symmetric positive definite.
    return torch.linalg.solve(C + delta * eye, rhs.mT).mT


def weighted_error(weight: torch.Tensor, factors: KroneckerFactors, covariance: torch.Tensor) -> float:
    """Relative output error tr(ΔW C ΔWᵀ) / tr(W C Wᵀ) with ΔW = W - Σ s_r A_r ⊗ B_r (float64).

    Args:
        weight: (out, in).
        factors: the approximation.
        covariance: (in, in) input second moment C = X Xᵀ / N.

    Returns:
        The squared relative error over the calibration inputs; 0 when W C Wᵀ = 0 and Ŵ = W.
    """
    W = weight.detach().double()
    C = covariance.double()
    delta = W - kron_sum(factors.A.double(), factors.B.double(), factors.scales.double())
    num = ((delta @ C) * delta).sum().item()
    den = ((W @ C) * W).sum().item()
    if den <= 0:
        return 0.0 if num <= 0 else float("inf")
    return max(num, 0.0) / den


def whitened_nearest_kronecker_product(
    weight: torch.Tensor,
    a_shape: tuple[int, int],
    b_shape: tuple[int, int],
    rank: int,
    p1: torch.Tensor,
    p2: torch.Tensor,
    *,
    svd_solver: str = "auto",
    name: str = "weight",
) -> KroneckerFactors:
    """Step 1 of the module docstring: Van Loan on W (L1 ⊗ L2), then un-whiten.

    Args:
        weight: (out, in) = (m1·m2, n1·n2), ``nn.Linear`` orientation.
        a_shape, b_shape: (m1, n1), (m2, n2).
        rank: number of terms R.
        p1: (n1, n1), p2: (n2, n2) partial traces of the (damped) input second moment; only their
            Kronecker product matters, so their relative scale is free.
        svd_solver: passed to ``nearest_kronecker_product``.
        name: module name for error messages.

    Returns:
        ``KroneckerFactors`` (float64) with ``singular_values`` of the whitened rearrangement and
        ``relative_error`` the plain Frobenius error ||W - Ŵ||_F / ||W||_F.

    Raises:
        ValueError: shapes that do not divide the weight, R out of range, P1/P2 of the wrong side.
    """
    m1, n1, m2, n2 = check_factor_shapes(tuple(weight.shape), a_shape, b_shape, name)
    if p1.shape != (n1, n1) or p2.shape != (n2, n2):
        raise ValueError(f"{name}: input statistics are {tuple(p1.shape)} and {tuple(p2.shape)}, expected ({n1}, {n1}) and ({n2}, {n2})")
    W = weight.detach().double()
    L1, L1_inv = psd_sqrt_and_inverse(p1.double())
    L2, L2_inv = psd_sqrt_and_inverse(p2.double())
    whitened = torch.einsum("qik,ij,kl->qjl", W.reshape(m1 * m2, n1, n2), L1, L2).reshape(m1 * m2, n1 * n2)
    fw = nearest_kronecker_product(whitened, a_shape, b_shape, rank, svd_solver=svd_solver, name=name)
    A = fw.A @ L1_inv
    B = fw.B @ L2_inv
    scales = torch.ones(rank, dtype=torch.float64)
    return KroneckerFactors(A=A, B=B, scales=scales, relative_error=relative_error(W, A, B, scales), singular_values=fw.singular_values)


def whitening_roots(
    covariance: torch.Tensor, a_shape: tuple[int, int], b_shape: tuple[int, int], full_root: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Kronecker-factored square root L1 (n1, n1), L2 (n2, n2) of an input second moment C.

    With n1 = 1 or n2 = 1 the factorisation of C is exact and the root is C^{1/2} itself (pass
    ``full_root`` to reuse one computed for several shapes); otherwise L1 = P1^{1/2},
    L2 = (P2 / tr C)^{1/2} from the partial traces (module docstring, step 1).

    Args:
        covariance: (in, in) = (n1·n2, n1·n2), already damped if wanted.
        a_shape, b_shape: (m1, n1), (m2, n2).
        full_root: C^{1/2} (in, in), or None to compute it when needed.
    """
    n1, n2 = a_shape[1], b_shape[1]
    one = torch.ones(1, 1, dtype=covariance.dtype)
    if n1 == 1 or n2 == 1:
        root = full_root if full_root is not None else psd_sqrt_and_inverse(covariance)[0]
        return (one, root) if n1 == 1 else (root, one)
    p1, p2 = partial_traces(covariance, n1, n2)
    return psd_sqrt_and_inverse(p1)[0], psd_sqrt_and_inverse(p2 / covariance.trace())[0]


def whitened_tail_energies(
    weight: torch.Tensor, roots: tuple[torch.Tensor, torch.Tensor], a_shape: tuple[int, int], b_shape: tuple[int, int]
) -> torch.Tensor:
    """tail[R] = Σ_{j>R} σ_j² of the whitened rearrangement R(W (L1 ⊗ L2)), for R = 0 .. rank.

    This is the output error tr(ΔW C ΔWᵀ) of the best activation-aware factors with R terms:
    exact when n1 = 1 or n2 = 1, an estimate otherwise (module docstring). One spectrum prices
    every R at once (the budget allocation's pricing).

    Args:
        weight: (out, in) = (m1·m2, n1·n2), float64 preferred.
        roots: (L1 (n1, n1), L2 (n2, n2)) from :func:`whitening_roots`.
        a_shape, b_shape: (m1, n1), (m2, n2).

    Returns:
        (min(m1·n1, m2·n2) + 1,) float64, non-increasing, tail[0] = tr(W C Wᵀ).
    """
    m1, n1, m2, n2 = check_factor_shapes(tuple(weight.shape), a_shape, b_shape, "weight")
    L1, L2 = roots
    whitened = torch.einsum("qik,ij,kl->qjl", weight.reshape(m1 * m2, n1, n2), L1, L2).reshape(m1 * m2, n1 * n2)
    s2 = squared_singular_values(rearrange(whitened, a_shape, b_shape))
    total = s2.sum()
    return torch.cat([total.reshape(1), total - s2.cumsum(0)]).clamp_min(0)


def _solve_spd(G: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """X with X G = H for a symmetric PSD G (Cholesky, least squares if G is singular)."""
    chol, info = torch.linalg.cholesky_ex(G)
    if info.item() == 0:
        return torch.cholesky_solve(H.mT, chol).mT
    return torch.linalg.lstsq(G, H.mT).solution.mT


def weighted_als(
    weight: torch.Tensor,
    covariance: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    iterations: int = 10,
    tol: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Step 2 of the module docstring: alternating least squares on A and B under covariance C.

    Args:
        weight: (out, in) = (m1·m2, n1·n2).
        covariance: (in, in) second moment C (already damped if wanted).
        A: (R, m1, n1), B: (R, m2, n2) starting factors (per-term scalars folded into A).
        iterations: at most this many (A, B) sweeps.
        tol: stop when a sweep lowers the relative error by less than this fraction.

    Returns:
        (A, B, history) in float64; ``history`` holds the relative error tr(ΔW C ΔWᵀ)/tr(W C Wᵀ)
        before the first sweep and after each one, non-increasing up to rounding.
    """
    R, m1, n1 = A.shape
    _, m2, n2 = B.shape
    W = weight.detach().double()
    C = covariance.double()
    C4 = C.reshape(n1, n2, n1, n2)
    WC4 = (W @ C).reshape(m1, m2, n1, n2)
    total = ((W @ C) * W).sum().item()
    A, B = A.double().clone(), B.double().clone()
    ones = torch.ones(R, dtype=torch.float64)

    def error() -> float:
        delta = W - kron_sum(A, B, ones)
        return max(((delta @ C) * delta).sum().item(), 0.0) / total if total > 0 else 0.0

    history = [error()]
    for _ in range(iterations):
        N = torch.einsum("rbk,sbl->rskl", B, B)
        G_A = torch.einsum("ikjl,rskl->risj", C4, N).reshape(R * n1, R * n1)
        H_A = torch.einsum("abik,rbk->ari", WC4, B).reshape(m1, R * n1)
        A = _solve_spd(G_A, H_A).reshape(m1, R, n1).permute(1, 0, 2).contiguous()
        P = torch.einsum("rai,saj->rsij", A, A)
        G_B = torch.einsum("ikjl,rsij->rksl", C4, P).reshape(R * n2, R * n2)
        H_B = torch.einsum("abik,rai->brk", WC4, A).reshape(m2, R * n2)
        B = _solve_spd(G_B, H_B).reshape(m2, R, n2).permute(1, 0, 2).contiguous()
        history.append(error())
        if history[-2] - history[-1] <= tol * max(history[-2], 1e-300):
            break
    return A, B, history


def activation_aware_factors(
    weight: torch.Tensor,
    a_shape: tuple[int, int],
    b_shape: tuple[int, int],
    rank: int,
    *,
    covariance: torch.Tensor | None = None,
    p1: torch.Tensor | None = None,
    p2: torch.Tensor | None = None,
    damping: float = 1e-2,
    iterations: int = 10,
    svd_solver: str = "auto",
    name: str = "weight",
) -> KroneckerFactors:
    """Kronecker factors minimising the output error over calibration inputs (module docstring).

    Give either the full input second moment ``covariance`` (in, in) — whitening by its partial
    traces, then ALS when both n1 > 1 and n2 > 1 and R·max(n1, n2) <= ``ALS_MAX_SIDE`` — or only its partial traces ``p1`` (n1, n1) and
    ``p2`` (n2, n2) for inputs too wide to keep C (whitening only; exact if C is Kronecker).

    Args:
        weight: (out, in) = (m1·m2, n1·n2), ``nn.Linear`` orientation.
        a_shape, b_shape: (m1, n1), (m2, n2).
        rank: number of terms R.
        damping: δ, adds δ·mean(diag C)·I to C (δ·mean(diag) of each partial trace for p1/p2).
        iterations: ALS sweeps at most.
        svd_solver: SVD method for the whitened Van Loan step.
        name: module name for error messages.

    Returns:
        ``KroneckerFactors`` in the weight's dtype, scales of ones; ``relative_error`` is the plain
        Frobenius error, ``weighted_error`` is not stored (use ``weighted_error``).

    Raises:
        ValueError: neither statistics given, statistics of the wrong size, or the shape errors of
            ``nearest_kronecker_product``.
    """
    _m1, n1, _m2, n2 = check_factor_shapes(tuple(weight.shape), a_shape, b_shape, name)
    if covariance is None and (p1 is None or p2 is None):
        raise ValueError(f"{name}: activation-aware init needs the input second moment or both of its partial traces")
    if covariance is not None:
        if covariance.shape != (n1 * n2, n1 * n2):
            raise ValueError(f"{name}: input second moment is {tuple(covariance.shape)}, expected ({n1 * n2}, {n1 * n2})")
        C = covariance.double()
        damped = C + damping * C.diagonal().mean().clamp_min(0) * torch.eye(C.shape[0], dtype=C.dtype)
        p1, p2 = partial_traces(damped, n1, n2)
    else:
        damped = None
        p1, p2 = p1.double(), p2.double()
        p1 = p1 + damping * p1.diagonal().mean().clamp_min(0) * torch.eye(n1, dtype=p1.dtype)
        p2 = p2 + damping * p2.diagonal().mean().clamp_min(0) * torch.eye(n2, dtype=p2.dtype)
    factors = whitened_nearest_kronecker_product(weight, a_shape, b_shape, rank, p1, p2, svd_solver=svd_solver, name=name)
    if damped is not None:
        if n1 > 1 and n2 > 1 and iterations > 0 and rank * max(n1, n2) <= ALS_MAX_SIDE:
            A, B, _ = weighted_als(weight, damped, factors.A, factors.B, iterations=iterations)
            factors = KroneckerFactors(A=A, B=B, scales=factors.scales, singular_values=factors.singular_values)
        # Keep the promise of never doing worse than Van Loan on the calibration data.
        plain = nearest_kronecker_product(weight, a_shape, b_shape, rank, svd_solver=svd_solver, name=name)
        if weighted_error(weight, plain, C) < weighted_error(weight, factors, C):
            factors = plain
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    A, B = factors.A.to(dtype), factors.B.to(dtype)
    scales = torch.ones(rank, dtype=dtype)
    return KroneckerFactors(
        A=A, B=B, scales=scales, relative_error=relative_error(weight, A, B, scales), singular_values=factors.singular_values
    )
