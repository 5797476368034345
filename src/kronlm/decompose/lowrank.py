"""Kronecker plus low-rank factors: W ≈ Σ_r A_r ⊗ B_r + U V, fitted jointly under the input
covariance.

A sum of Kronecker products and a truncated SVD fail in different ways: the Kronecker sum ties
blocks of W together and cannot follow the few dominant directions that trained weights carry,
the low-rank part follows exactly those and misses the "bulk". Their sum

    Ŵ = Σ_{r<=R} A_r ⊗ B_r + U V,   A_r (m1, n1), B_r (m2, n2), U (out, k), V (k, in),

costs R·(m1·n1 + m2·n2) + k·(out + in) parameters and is fitted to minimise the output error over
calibration inputs with second moment C (in, in),

    E(Ŵ) = tr((W - Ŵ) C (W - Ŵ)ᵀ),

by block coordinate descent (as in robust-PCA-style "sparse/structured plus low-rank"
decompositions, here with a Kronecker-structured part; the low-rank step is SVD-LLM's
truncation-aware whitened SVD, Wang et al. 2024):

1. Kronecker part from W alone: whitened Van Loan (``kronlm.decompose.activation_aware``), then
   weighted ALS sweeps when both n1 > 1 and n2 > 1.
2. Low-rank part on the Kronecker residual: the best rank-k approximation of W - K under C is
   the truncated SVD of (W - K) C^{1/2}, un-whitened by C^{-1/2}: exact.
3. Kronecker part on the low-rank residual: weighted ALS on W - L, warm-started from the
   current factors (each half-step is an exact block minimisation under C).
4. Repeat 2–3 until E improves by less than ``tol`` (relative). With ALS as the Kronecker step E
   never increases; where ALS is skipped (n1 = 1 or n2 = 1, where whitened Van Loan is already
   exact, or ALS systems above ``ALS_MAX_SIDE``) the step is whitened Van Loan of the residual.
   The best iterate is returned.

The error after step 2 of the first pass is what :func:`kronecker_lowrank_tail` prices for every
k at once (one whitened SVD of the Kronecker residual), so the budget allocation's estimate is an
upper bound of the fitted error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kronlm.decompose.activation_aware import (
    ALS_MAX_SIDE,
    psd_sqrt_and_inverse,
    weighted_als,
    whitened_nearest_kronecker_product,
    whitening_roots,
)
from kronlm.decompose.shapes import check_factor_shapes
from kronlm.decompose.vanloan import kron_sum, squared_singular_values


@dataclass
class KroneckerLowRankFactors:
    """Factors of W ≈ Σ_r A_r ⊗ B_r + U V.

    Attributes:
        A: (R, m1, n1), B: (R, m2, n2) Kronecker factors.
        U: (out, k), V: (k, in) low-rank factors (the singular values split evenly between them).
        relative_error: ||W - Ŵ||_F / ||W||_F (plain Frobenius, like ``KroneckerFactors``).
        history: relative output error tr(ΔW C ΔWᵀ) / tr(W C Wᵀ) after each pass (under the damped
            C the fit used); non-increasing when the Kronecker step is ALS, and the best pass is
            the one returned in any case.
    """

    A: torch.Tensor
    B: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    relative_error: float = float("nan")
    history: list[float] | None = None

    @property
    def rank(self) -> int:
        """Number of Kronecker terms R."""
        return self.A.shape[0]

    @property
    def lowrank(self) -> int:
        """Rank k of the low-rank part."""
        return self.U.shape[1]

    def to_dense(self) -> torch.Tensor:
        """Σ_r A_r ⊗ B_r + U V as an (out, in) matrix."""
        return kron_sum(self.A, self.B) + self.U @ self.V


def damp(covariance: torch.Tensor, damping: float) -> torch.Tensor:
    """C + δ·mean(diag C)·I in float64 (GPTQ's dampening; ``activation_aware`` uses the same)."""
    C = covariance.double()
    return C + damping * C.diagonal().mean().clamp_min(0) * torch.eye(C.shape[0], dtype=C.dtype)


def whitened_truncated_svd(
    residual: torch.Tensor, root: torch.Tensor, root_inv: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-k approximation U V of ``residual`` (out, in) under C = root²: (U (out, k), V (k, in)).

    The truncated SVD of residual · C^{1/2}, un-whitened: V = S^{1/2} Vᵀ C^{-1/2}, U = U S^{1/2}
    (SVD-LLM, Wang et al. 2024). Exact under C (Eckart–Young in the whitened space).

    Args:
        residual: (out, in) float64.
        root, root_inv: C^{1/2} and C^{-1/2} (in, in) from ``psd_sqrt_and_inverse``.
        k: rank, 1 <= k <= min(out, in).

    Raises:
        ValueError: k out of range.
    """
    out_f, in_f = residual.shape
    if not 1 <= k <= min(out_f, in_f):
        raise ValueError(f"low-rank part: rank k={k} is out of range for a ({out_f}, {in_f}) matrix (1 <= k <= {min(out_f, in_f)})")
    U, S, Vh = torch.linalg.svd(residual @ root, full_matrices=False)
    half = S[:k].sqrt()
    return U[:, :k] * half, (half[:, None] * Vh[:k]) @ root_inv


def kronecker_lowrank_tail(residual: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """tail[k] = Σ_{j>k} σ_j² of residual · C^{1/2}: the output error of residual minus its best
    rank-k part under C, for k = 0 .. min(out, in) ((min + 1,) float64, non-increasing)."""
    s2 = squared_singular_values(residual.double() @ root)
    total = s2.sum()
    return torch.cat([total.reshape(1), total - s2.cumsum(0)]).clamp_min(0)


def output_error(delta: torch.Tensor, covariance: torch.Tensor) -> float:
    """tr(ΔW C ΔWᵀ) for ΔW (out, in), C (in, in), float64 (squared output units per token)."""
    d = delta.double()
    return max(((d @ covariance.double()) * d).sum().item(), 0.0)


def kronecker_part(
    target: torch.Tensor,
    covariance: torch.Tensor,
    a_shape: tuple[int, int],
    b_shape: tuple[int, int],
    rank: int,
    *,
    iterations: int = 10,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
    name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kronecker factors (A (R, m1, n1), B (R, m2, n2)) of ``target`` under a damped C.

    Without ``start``: whitened Van Loan with the Kronecker-factored root of C (exact when n1 = 1
    or n2 = 1), then up to ``iterations`` weighted ALS sweeps when n1, n2 > 1 and the ALS systems
    stay below ``ALS_MAX_SIDE``; with ``start``: ALS sweeps from those factors only.

    Raises:
        ValueError: shapes that do not divide the target, R out of range.
    """
    _, n1, _, n2 = check_factor_shapes(tuple(target.shape), a_shape, b_shape, name)
    if start is None:
        L1, L2 = whitening_roots(covariance, a_shape, b_shape)
        fw = whitened_nearest_kronecker_product(target, a_shape, b_shape, rank, L1 @ L1, L2 @ L2, svd_solver="exact", name=name)
        A, B = fw.A, fw.B
    else:
        A, B = start
    if n1 > 1 and n2 > 1 and iterations > 0 and rank * max(n1, n2) <= ALS_MAX_SIDE:
        A, B, _ = weighted_als(target, covariance, A, B, iterations=iterations)
    return A.double(), B.double()


def kronecker_lowrank_factors(
    weight: torch.Tensor,
    a_shape: tuple[int, int],
    b_shape: tuple[int, int],
    rank: int,
    lowrank: int,
    *,
    covariance: torch.Tensor | None = None,
    damping: float = 1e-2,
    iterations: int = 8,
    als_iterations: int = 3,
    tol: float = 1e-4,
    name: str = "weight",
) -> KroneckerLowRankFactors:
    """Fit W ≈ Σ_r A_r ⊗ B_r + U V jointly (module docstring).

    Args:
        weight: (out, in) = (m1·m2, n1·n2), ``nn.Linear`` orientation.
        a_shape, b_shape: (m1, n1), (m2, n2).
        rank: Kronecker terms R >= 1.
        lowrank: rank k >= 1 of U V.
        covariance: (in, in) input second moment; None fits the plain Frobenius norm (C = I).
        damping: δ, adds δ·mean(diag C)·I to C.
        iterations: alternating passes at most.
        als_iterations: ALS sweeps of the Kronecker step per pass.
        tol: stop when a pass lowers the relative error by less than this fraction.
        name: module name for error messages.

    Returns:
        ``KroneckerLowRankFactors`` in the weight's dtype; ``history`` under the damped C.

    Raises:
        ValueError: shapes that do not divide the weight, R or k out of range, a covariance of the
            wrong size (each message names ``name`` and the numbers).
    """
    m1, n1, m2, n2 = check_factor_shapes(tuple(weight.shape), a_shape, b_shape, name)
    out_f, in_f = weight.shape
    if isinstance(rank, bool) or not 1 <= rank <= min(m1 * n1, m2 * n2):
        raise ValueError(f"{name}: Kronecker rank R={rank} is out of range (1 <= R <= {min(m1 * n1, m2 * n2)})")
    if isinstance(lowrank, bool) or not 1 <= lowrank <= min(out_f, in_f):
        raise ValueError(f"{name}: low-rank k={lowrank} is out of range for a ({out_f}, {in_f}) weight (1 <= k <= {min(out_f, in_f)})")
    W = weight.detach().double()
    if covariance is None:
        C = torch.eye(in_f, dtype=torch.float64)
    else:
        if tuple(covariance.shape) != (in_f, in_f):
            raise ValueError(f"{name}: input second moment is {tuple(covariance.shape)}, expected ({in_f}, {in_f})")
        C = damp(covariance, damping)
    root, root_inv = psd_sqrt_and_inverse(C)
    total = output_error(W, C)
    als = n1 > 1 and n2 > 1 and rank * max(n1, n2) <= ALS_MAX_SIDE
    A, B = kronecker_part(W, C, a_shape, b_shape, rank, iterations=als_iterations, name=name)
    best = None
    history: list[float] = []
    for _ in range(max(1, iterations)):
        U, V = whitened_truncated_svd(W - kron_sum(A, B), root, root_inv, lowrank)
        error = output_error(W - kron_sum(A, B) - U @ V, C) / total if total > 0 else 0.0
        history.append(error)
        if best is None or error < best[0]:
            best = (error, A, B, U, V)
        if len(history) > 1 and history[-2] - error <= tol * max(history[-2], 1e-300):
            break
        if als:  # exact block minimisation from the current factors
            A, B = kronecker_part(W - U @ V, C, a_shape, b_shape, rank, iterations=max(1, als_iterations), start=(A, B), name=name)
        else:  # whitened Van Loan of the low-rank residual (exact when n1 = 1 or n2 = 1)
            A, B = kronecker_part(W - U @ V, C, a_shape, b_shape, rank, iterations=0, name=name)
    _, A, B, U, V = best
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    A, B, U, V = A.to(dtype), B.to(dtype), U.to(dtype), V.to(dtype)
    dense = kron_sum(A.double(), B.double()) + U.double() @ V.double()
    norm = W.norm().item()
    rel = (W - dense).norm().item() / norm if norm > 0 else 0.0
    return KroneckerLowRankFactors(A=A, B=B, U=U, V=V, relative_error=rel, history=history)


__all__ = [
    "ALS_MAX_SIDE",
    "KroneckerLowRankFactors",
    "damp",
    "kronecker_lowrank_factors",
    "kronecker_lowrank_tail",
    "kronecker_part",
    "output_error",
    "whitened_truncated_svd",
]
