"""Nearest Kronecker product, rescale, pruning init and factor-shape helpers (docs/method.md, "The Kronecker-factored linear map"; docs/method.md, "Initialisation from the pretrained weights")."""

import math

import pytest
import torch

from kronlm.decompose import (
    balance_terms,
    choose_factor_shapes,
    factor_shapes,
    get_initializer,
    kron_sum,
    nearest_kronecker_product,
    pruning_factors,
    rearrange,
    rescale_to_norm,
    resolve_factor_shapes,
)


def test_kron_sum_matches_torch_kron():
    g = torch.Generator().manual_seed(0)
    A, B, s = torch.randn(3, 4, 5, generator=g, dtype=torch.float64), torch.randn(3, 2, 3, generator=g, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    expected = sum(s[r] * torch.kron(A[r], B[r]) for r in range(3))
    assert torch.allclose(kron_sum(A, B, s), expected, atol=1e-12)


def test_rearrange_maps_kron_to_outer_product():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64)
    M = rearrange(torch.kron(A, B), (3, 4), (5, 2))
    assert torch.allclose(M, torch.outer(A.flatten(), B.flatten()))


@pytest.mark.parametrize("svd_solver", ["exact", "randomized"])
def test_exact_kronecker_product_is_recovered(svd_solver):
    g = torch.Generator().manual_seed(2)
    A, B = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    f = nearest_kronecker_product(torch.kron(A, B), (6, 4), (3, 5), svd_solver=svd_solver)
    assert torch.allclose(f.to_dense(), torch.kron(A, B), atol=1e-9)
    assert f.relative_error < 1e-8


def test_error_equals_singular_value_tail_and_is_optimal():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(12, 20, generator=g, dtype=torch.float64)
    sigma = torch.linalg.svdvals(rearrange(W, (3, 4), (4, 5)))
    for R in (1, 2, 5):
        f = nearest_kronecker_product(W, (3, 4), (4, 5), R, svd_solver="exact")
        direct = torch.linalg.matrix_norm(W - f.to_dense()) / torch.linalg.matrix_norm(W)
        tail = math.sqrt((sigma[R:] ** 2).sum() / (sigma**2).sum())
        assert f.relative_error == pytest.approx(tail, rel=1e-9)
        assert direct.item() == pytest.approx(tail, rel=1e-9)
        # Any other rank-R Kronecker sum (a perturbed one) is no closer.
        worse = kron_sum(f.A + 0.01 * torch.randn_like(f.A), f.B)
        assert torch.linalg.matrix_norm(W - worse) > torch.linalg.matrix_norm(W - f.to_dense())
    full = nearest_kronecker_product(W, (3, 4), (4, 5), 12, svd_solver="exact")
    assert torch.allclose(full.to_dense(), W, atol=1e-10)


def test_elongated_rearrangement_uses_fast_path_with_same_answer():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(64, 48, generator=g, dtype=torch.float64)  # B (2, 1): R(W) is (32*48, 2)
    f = nearest_kronecker_product(W, (32, 48), (2, 1), 1)
    U, S, Vh = torch.linalg.svd(rearrange(W, (32, 48), (2, 1)), full_matrices=False)
    ref = S[0] * torch.outer(U[:, 0], Vh[0])
    got = torch.outer(f.A.flatten(), f.B.flatten())
    assert torch.allclose(got, ref, atol=1e-10)
    assert f.relative_error == pytest.approx(math.sqrt((S[1:] ** 2).sum() / (S**2).sum()), rel=1e-8)


def test_randomized_matches_exact_on_low_rank_structure():
    g = torch.Generator().manual_seed(5)
    W = sum(torch.kron(torch.randn(40, 30, generator=g), torch.randn(30, 40, generator=g)) * (0.5**r) for r in range(3))
    exact = nearest_kronecker_product(W, (40, 30), (30, 40), 2, svd_solver="exact")
    rand = nearest_kronecker_product(W, (40, 30), (30, 40), 2, svd_solver="randomized")
    assert rand.relative_error == pytest.approx(exact.relative_error, rel=1e-4)


def test_rescale_restores_frobenius_norm():
    g = torch.Generator().manual_seed(6)
    W = torch.randn(16, 16, generator=g, dtype=torch.float64)
    f = nearest_kronecker_product(W, (4, 4), (4, 4), 2)
    r = rescale_to_norm(f, W)
    assert torch.linalg.matrix_norm(r.to_dense()).item() == pytest.approx(torch.linalg.matrix_norm(W).item(), rel=1e-10)
    sigma = torch.linalg.svdvals(rearrange(W, (4, 4), (4, 4)))
    alpha = math.sqrt((sigma**2).sum() / (sigma[:2] ** 2).sum())
    assert torch.allclose(r.scales, torch.full((2,), alpha, dtype=torch.float64))
    direct = torch.linalg.matrix_norm(W - r.to_dense()) / torch.linalg.matrix_norm(W)
    assert r.relative_error == pytest.approx(direct.item(), rel=1e-9)


@pytest.mark.parametrize("b_shape", [(2, 1), (1, 2)])
def test_pruning_init_keeps_every_other_row_or_column(b_shape):
    W = torch.arange(48, dtype=torch.float64).reshape(8, 6)
    a_shape = (4, 6) if b_shape == (2, 1) else (8, 3)
    f = pruning_factors(W, a_shape, b_shape)
    approx = f.to_dense()
    if b_shape == (2, 1):
        assert torch.equal(approx[0::2], W[0::2]) and torch.allclose(approx[1::2], 0.1 * W[0::2])
    else:
        assert torch.equal(approx[:, 0::2], W[:, 0::2]) and torch.allclose(approx[:, 1::2], 0.1 * W[:, 0::2])
    with pytest.raises(ValueError, match=r"\(2, 1\) or \(1, 2\)"):
        pruning_factors(W, (2, 3), (4, 2))


def test_bad_requests_name_the_module_and_numbers():
    W = torch.randn(12, 10)
    with pytest.raises(ValueError, match=r"mlp\.fc.*\(5, 2\).*\(1, 5\).*\(12, 10\)"):
        nearest_kronecker_product(W, (5, 2), (1, 5), name="mlp.fc")
    with pytest.raises(ValueError, match=r"R=7.*1 <= R <= 6"):
        nearest_kronecker_product(W, (3, 2), (4, 5), 7, name="mlp.fc")
    with pytest.raises(ValueError, match=r"2-D.*\(2, 3, 4\)"):
        nearest_kronecker_product(torch.randn(2, 3, 4), (1, 1), (2, 3))
    with pytest.raises(ValueError, match="unknown initialiser 'svdd'"):
        get_initializer("svdd")


def test_factor_shapes_lists_all_divisor_pairs_with_costs():
    shapes = factor_shapes(6, 4)
    pairs = {(s.a_shape, s.b_shape) for s in shapes}
    expected = {((m1, n1), (6 // m1, 4 // n1)) for m1 in (1, 2, 3, 6) for n1 in (1, 2, 4)} - {((6, 4), (1, 1)), ((1, 1), (6, 4))}
    assert pairs == expected
    for s in shapes:
        (m1, n1), (m2, n2) = s.a_shape, s.b_shape
        assert s.params == m1 * n1 + m2 * n2
        assert s.macs == min(n1 * n2 * m2 + m1 * n1 * m2, m1 * n1 * n2 + m1 * n2 * m2)


def test_choose_factor_shapes_meets_ratio():
    s = choose_factor_shapes(3072, 768, 2.0)
    assert s.params <= 3072 * 768 / 2 * 1.005 and s.compression_ratio > 1.99
    assert s.full_rank  # A (2, 1) ⊗ B (1536, 768) keeps rank 768, unlike B (1, 2)
    fastest = choose_factor_shapes(3072, 768, 2.0, prefer="speed")
    assert fastest.macs <= s.macs
    with pytest.raises(ValueError, match="highest is"):
        choose_factor_shapes(4, 4, 100.0)


def test_resolve_factor_shapes():
    assert resolve_factor_shapes((3072, 768), None, (2, 1)) == ((1536, 768), (2, 1))
    assert resolve_factor_shapes((3072, 768), (64, 32), None) == ((64, 32), (48, 24))
    with pytest.raises(ValueError, match=r"h\.0\.mlp.*\(5, 1\).*\(3072, 768\)"):
        resolve_factor_shapes((3072, 768), None, (5, 1), name="h.0.mlp")


def test_balance_terms_equalises_factor_norms_and_keeps_every_product():
    W = torch.randn(8, 6, dtype=torch.float64)
    f = pruning_factors(W, (4, 6), (2, 1))  # B = [1, 0.1]: A is W's every other row, far larger
    A = torch.cat([f.A, torch.randn(1, 4, 6, dtype=torch.float64) * 50])
    B = torch.cat([f.B, torch.zeros(1, 2, 1, dtype=torch.float64)])  # a term with a zero factor
    A2, B2 = balance_terms(A, B)
    assert A2.shape == A.shape and B2.shape == B.shape and A2.dtype == A.dtype
    assert torch.allclose(A2[0].norm(), B2[0].norm()) and not torch.allclose(A[0].norm(), B[0].norm())
    assert torch.allclose(kron_sum(A2, B2), kron_sum(A, B))
    assert torch.equal(A2[1], A[1]) and torch.equal(B2[1], B[1])  # left as it was
    U, V = torch.randn(8, 3) * 100, torch.randn(3, 6) * 0.01  # low rank as terms u_j ⊗ v_jᵀ
    U2, V2 = balance_terms(U.mT.unsqueeze(-1), V.unsqueeze(1))
    assert torch.allclose(U2.squeeze(-1).mT @ V2.squeeze(1), U @ V, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="A has 2 terms but B has 1"):
        balance_terms(A, B[:1])
