"""Nearest Kronecker product of a matrix (Van Loan & Pitsianis, 1993) and Krony-PT's norm rescale.

For W of shape (out, in) = (m1*m2, n1*n2) the problem
    min over A_r (m1, n1), B_r (m2, n2) of || W - sum_{r<=R} A_r ⊗ B_r ||_F
is a rank-R approximation of the rearranged matrix R(W) of shape (m1*n1, m2*n2), whose rows are
the vectorised (m2, n2) blocks of W. Its SVD gives the optimum (docs/method.md, "Nearest Kronecker product").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kronlm.decompose.shapes import check_factor_shapes

SVD_METHODS = ("auto", "exact", "randomized")


@dataclass
class KroneckerFactors:
    """Factors of W ≈ Σ_r scales[r] · A[r] ⊗ B[r].

    Attributes:
        A: (R, m1, n1) left Kronecker factors.
        B: (R, m2, n2) right Kronecker factors.
        scales: (R,) per-term scalars (ones unless an initialiser rescales).
        relative_error: ||W - Ŵ||_F / ||W||_F of the returned approximation (NaN when unknown).
        singular_values: (R,) leading singular values of the rearranged matrix, or None.
    """

    A: torch.Tensor
    B: torch.Tensor
    scales: torch.Tensor
    relative_error: float = float("nan")
    singular_values: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        """Number of Kronecker terms R."""
        return self.A.shape[0]

    def to_dense(self) -> torch.Tensor:
        """Materialise Σ_r s_r A_r ⊗ B_r as an (m1*m2, n1*n2) matrix."""
        return kron_sum(self.A, self.B, self.scales)


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


def rearrange(weight: torch.Tensor, a_shape: tuple[int, int], b_shape: tuple[int, int]) -> torch.Tensor:
    """Van Loan's rearrangement R(W): (m1*m2, n1*n2) -> (m1*n1, m2*n2).

    Row i*n1 + j of R(W) is the (i, j)-th (m2, n2) block of W, flattened, so that
    R(A ⊗ B) = vec(A) vec(B)ᵀ.

    Raises:
        ValueError: the weight is not 2-D or the factor shapes do not multiply to its shape.
    """
    m1, n1, m2, n2 = check_factor_shapes(tuple(weight.shape), a_shape, b_shape, "weight")
    return weight.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


# Below this smaller side, with the other side at least GRAM_ASPECT times longer, the eigenvalues
# of the small Gram matrix (float64) give the spectrum far faster than an SVD of the tall matrix.
GRAM_MAX_SIDE = 64
GRAM_ASPECT = 8


def uses_gram(M: torch.Tensor) -> bool:
    """True for a matrix elongated enough that its spectrum is best read off its Gram matrix."""
    small = min(M.shape)
    return small <= GRAM_MAX_SIDE and max(M.shape) >= GRAM_ASPECT * small


def squared_singular_values(M: torch.Tensor) -> torch.Tensor:
    """σ_j² of a matrix (rows, cols), descending, float64: (min(rows, cols),).

    For elongated matrices (``uses_gram``) the eigenvalues of the small Gram matrix, otherwise
    ``torch.linalg.svdvals``; both in float64.
    """
    M64 = M.double()
    if uses_gram(M64):
        gram = M64.mT @ M64 if M64.shape[0] >= M64.shape[1] else M64 @ M64.mT
        return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
    return torch.linalg.svdvals(M64).square()


def _top_singular_triplets(M: torch.Tensor, rank: int, method: str, n_iter: int, oversample: int):
    """(U (rows, R), S (R,), V (cols, R), tail) with tail = Σ_{j>R} σ_j² or None when unknown."""
    small = min(M.shape)
    if method == "auto":
        # Exact SVD costs O(rows·cols·min); randomized pays off once the smaller side is large and
        # only a few terms are wanted.
        method = "randomized" if small > 1024 and rank <= small // 16 else "exact"
    if method == "randomized":
        q = min(rank + oversample, small)
        U, S, V = torch.svd_lowrank(M, q=q, niter=n_iter)
        return U[:, :rank], S[:rank], V[:, :rank], None
    if uses_gram(M):
        # Very elongated R(W) (factor shapes like B (2, 1)): the eigenvectors of the small Gram
        # matrix give the same triplets, and its eigenvalues are the squared singular values.
        M64 = M.double()
        tall = M.shape[0] >= M.shape[1]
        gram = M64.mT @ M64 if tall else M64 @ M64.mT
        evals, evecs = torch.linalg.eigh(gram)
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)[:, :rank]
        S = evals[:rank].sqrt()
        other = (M64 @ evecs if tall else M64.mT @ evecs) / S.clamp_min(torch.finfo(torch.float64).tiny)
        U, V = (other, evecs) if tall else (evecs, other)
        return U.to(M.dtype), S.to(M.dtype), V.to(M.dtype), evals[rank:].sum().item()
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    tail = S[rank:].double().square().sum().item()
    return U[:, :rank], S[:rank], Vh[:rank].mT, tail


def nearest_kronecker_product(
    weight: torch.Tensor,
    a_shape: tuple[int, int],
    b_shape: tuple[int, int],
    rank: int = 1,
    *,
    svd_solver: str = "auto",
    n_iter: int = 6,
    oversample: int = 8,
    name: str = "weight",
) -> KroneckerFactors:
    """Best rank-R sum of Kronecker products of a weight (Van Loan & Pitsianis 1993; docs/method.md, "Nearest Kronecker product").

    Args:
        weight: (out, in) = (m1*m2, n1*n2), in the ``nn.Linear`` orientation (transpose a
            ``Conv1D`` weight first). Any float dtype; the SVD runs in float32 or float64.
        a_shape: (m1, n1), shape of each A_r.
        b_shape: (m2, n2), shape of each B_r.
        rank: number of terms R, 1 <= R <= min(m1*n1, m2*n2) (the rank of the rearranged matrix).
        svd_solver: "exact" (``torch.linalg.svd``), "randomized" (``torch.svd_lowrank``, Halko et al. 2011,
            with ``n_iter`` power iterations) or "auto" (randomized when the rearranged matrix's
            smaller side exceeds 1024 and R is at most 1/16 of it).
        name: module name used in error messages.

    Returns:
        ``KroneckerFactors`` with A (R, m1, n1) = √σ_r·u_r, B (R, m2, n2) = √σ_r·v_r, scales of
        ones, the leading singular values and the relative Frobenius error ||W - Ŵ||_F / ||W||_F,
        which for the exact SVD equals sqrt(Σ_{j>R} σ_j²) / ||W||_F.

    Raises:
        ValueError: a non-2-D weight, shapes that do not divide the weight, R out of range, or an
            unknown ``svd_solver``; the message names ``name`` and the numbers.
    """
    m1, n1, m2, n2 = check_factor_shapes(tuple(weight.shape), a_shape, b_shape, name)
    max_rank = min(m1 * n1, m2 * n2)
    if not 1 <= rank <= max_rank:
        raise ValueError(
            f"{name}: rank R={rank} is out of range; the rearranged matrix of A {tuple(a_shape)} ⊗ "
            f"B {tuple(b_shape)} is ({m1 * n1}, {m2 * n2}), so 1 <= R <= {max_rank}"
        )
    if svd_solver not in SVD_METHODS:
        raise ValueError(f"{name}: unknown svd_solver {svd_solver!r}; choose one of {', '.join(SVD_METHODS)}")
    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(work_dtype)
    M = rearrange(W, a_shape, b_shape)
    U, S, V, tail = _top_singular_triplets(M, rank, svd_solver, n_iter, oversample)
    root = S.clamp_min(0).sqrt()
    A = (U * root).mT.reshape(rank, m1, n1)
    B = (V * root).mT.reshape(rank, m2, n2)
    scales = torch.ones(rank, dtype=work_dtype)
    if tail is None:
        error = relative_error(W, A, B, scales)
    else:  # Eckart–Young: the error of the best rank-R approximation is the spectrum's tail.
        norm2 = M.double().square().sum().item()
        error = (tail / norm2) ** 0.5 if norm2 > 0 else 0.0
    return KroneckerFactors(A=A, B=B, scales=scales, relative_error=error, singular_values=S)


def relative_error(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor | None) -> float:
    """||W - Σ_r s_r A_r⊗B_r||_F / ||W||_F for W (m1*m2, n1*n2), without forming the sum.

    Uses ||W - Ŵ||² = ||W||² - 2⟨R(W), Σ s_r vec(A_r) vec(B_r)ᵀ⟩ + Σ_{r,t} s_r s_t ⟨A_r,A_t⟩⟨B_r,B_t⟩
    in float64, which costs one pass over W. Returns 0 for a zero W approximated by zero.
    """
    R = A.shape[0]
    s = torch.ones(R, dtype=torch.float64) if scales is None else scales.detach().double().cpu()
    A64, B64 = A.detach().double().reshape(R, -1).cpu(), B.detach().double().reshape(R, -1).cpu()
    M = rearrange(weight.detach().double().cpu(), tuple(A.shape[1:]), tuple(B.shape[1:]))
    w2 = (M * M).sum()
    cross = (s * ((A64 @ M) * B64).sum(-1)).sum()
    approx2 = (torch.outer(s, s) * (A64 @ A64.T) * (B64 @ B64.T)).sum()
    err2 = (w2 - 2 * cross + approx2).clamp_min(0).item()
    if w2.item() == 0.0:
        return 0.0 if err2 == 0.0 else float("inf")
    return (err2 / w2.item()) ** 0.5


def rescale_to_norm(factors: KroneckerFactors, weight: torch.Tensor) -> KroneckerFactors:
    """Krony-PT's "modified Van Loan": scale every term by α = ||W||_F / ||Ŵ||_F (docs/method.md, "Modified Van Loan").

    The truncated nearest Kronecker product keeps only part of W's Frobenius norm; rescaling
    restores it, which Krony-PT found to help recovery. α goes into ``scales`` (so a layer with
    learnable scalars starts every s_r at α); A and B are unchanged.

    Args:
        factors: an approximation of ``weight``.
        weight: (out, in) the matrix it approximates.

    Returns:
        New ``KroneckerFactors`` with scales multiplied by α and the error of the rescaled sum.
    """
    W = weight.detach().to(factors.A.dtype)
    R = factors.rank
    A64, B64 = factors.A.double().reshape(R, -1), factors.B.double().reshape(R, -1)
    s = factors.scales.double()
    # ||Σ s_r A_r⊗B_r||² = Σ_{r,t} s_r s_t ⟨A_r,A_t⟩⟨B_r,B_t⟩: no need to form the sum.
    approx_norm = (torch.outer(s, s) * (A64 @ A64.T) * (B64 @ B64.T)).sum().clamp_min(0).sqrt().item()
    alpha = torch.linalg.matrix_norm(W.double()).item() / approx_norm if approx_norm > 0 else 1.0
    scales = factors.scales * alpha
    return KroneckerFactors(
        A=factors.A,
        B=factors.B,
        scales=scales,
        relative_error=relative_error(W, factors.A, factors.B, scales),
        singular_values=factors.singular_values,
    )


def balance_terms(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each term so that ||A_r||_F = ||B_r||_F; every product A_r ⊗ B_r is unchanged.

    A Kronecker (or low-rank) term has a free scale: c·A_r ⊗ B_r/c is the same matrix. Van Loan
    splits it evenly (A_r = √σ_r·u_r, B_r = √σ_r·v_r), but un-whitening an activation-aware fit, or
    Krony-PT's pruning init (B = [1, 0.1]), leaves one factor far larger than the other. Adam moves
    every entry by about the learning rate whatever its size, so the split sets how fast
    distillation changes the product: with a large A, the same learning rate changes A ⊗ B several
    times more slowly than with the even split. Balancing gives every init the step size of Van
    Loan's split. kronlm's layers balance Kronecker terms when their factors are loaded, not the
    terms of a truncated SVD, whose own split distilled faster (docs/method.md, "How the factors
    are stored", has the measurements).

    Args:
        A: (R, m1, n1) and B: (R, m2, n2) factors (any float dtype); a low-rank U (out, k) and
            V (k, in) fit as A = Uᵀ.unsqueeze(-1), B = V.unsqueeze(1).

    Returns:
        (A', B') of the same shapes and dtypes; a term with a zero factor is left as it is.

    Raises:
        ValueError: A and B with different numbers of terms.
    """
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"balance_terms: A has {A.shape[0]} terms but B has {B.shape[0]}")
    A64, B64 = A.detach().double(), B.detach().double()
    a_norm, b_norm = A64.flatten(1).norm(dim=1), B64.flatten(1).norm(dim=1)
    scale = torch.where((a_norm > 0) & (b_norm > 0), (b_norm / a_norm.clamp_min(1e-300)).sqrt(), torch.ones_like(a_norm))
    shape = (-1,) + (1,) * (A.dim() - 1)
    return (A64 * scale.view(shape)).to(A.dtype), (B64 / scale.view(shape)).to(B.dtype)
