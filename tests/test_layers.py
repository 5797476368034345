"""KroneckerLinear / KroneckerEmbedding / tied head against dense references built with torch.kron."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from kronlm.layers import KroneckerEmbedding, KroneckerLinear, KroneckerTiedLMHead


def dense_weight(A, B, s=None):
    return sum((1.0 if s is None else s[r]) * torch.kron(A[r], B[r]) for r in range(A.shape[0]))


SHAPES = [
    ((4, 3), (5, 2), 1),  # B first
    ((2, 6), (8, 1), 3),
    ((16, 2), (1, 6), 2),
    ((3, 1), (1, 5), 1),
    ((1, 4), (6, 3), 2),  # A first
]


@pytest.mark.parametrize("a_shape,b_shape,rank", SHAPES)
@pytest.mark.parametrize("scales", [False, True])
def test_linear_forward_and_grads_match_dense(a_shape, b_shape, rank, scales):
    torch.manual_seed(0)
    out_f, in_f = a_shape[0] * b_shape[0], a_shape[1] * b_shape[1]
    layer = KroneckerLinear(in_f, out_f, a_shape, b_shape, rank, bias=True, learnable_scales=scales, dtype=torch.float64)
    with torch.no_grad():
        layer.bias.normal_()
        if scales:
            layer.scales.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, in_f, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    A = layer.A.detach().clone().requires_grad_()
    B = layer.B.detach().clone().requires_grad_()
    s = layer.scales.detach().clone().requires_grad_() if scales else None
    b = layer.bias.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    ref = x2 @ dense_weight(A, B, s).T + b
    assert y.shape == (2, 3, out_f)
    assert torch.allclose(y, ref, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    assert torch.allclose(layer.A.grad, A.grad, atol=1e-12)
    assert torch.allclose(layer.B.grad, B.grad, atol=1e-12)
    assert torch.allclose(layer.bias.grad, b.grad, atol=1e-12)
    assert torch.allclose(x.grad, x2.grad, atol=1e-12)
    if scales:
        assert torch.allclose(layer.scales.grad, s.grad, atol=1e-12)


def test_both_contraction_orders_agree():
    torch.manual_seed(1)
    layer = KroneckerLinear(12, 10, (5, 3), (2, 4), rank=2, dtype=torch.float64)
    x = torch.randn(7, 12, dtype=torch.float64)
    y = layer(x)
    layer.order = "a_first" if layer.order == "b_first" else "b_first"
    assert torch.allclose(layer(x), y, atol=1e-12)


def test_cheaper_order_is_chosen():
    # A (1, 4) tiny and B (6, 3) large: contracting A first is cheaper; the opposite for A (16, 2) ⊗ B (1, 6).
    assert KroneckerLinear(12, 6, (1, 4), (6, 3)).order == "a_first"
    assert KroneckerLinear(12, 16, (16, 2), (1, 6)).order == "b_first"


def test_any_leading_dims_and_no_bias():
    layer = KroneckerLinear(6, 4, (2, 3), (2, 2), bias=False, dtype=torch.float64)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    assert torch.allclose(layer(x), x @ layer.to_dense().T, atol=1e-12)
    assert layer(torch.randn(6, dtype=torch.float64)).shape == (4,)


def test_from_linear_and_from_conv1d_and_merge_back():
    torch.manual_seed(2)
    linear = nn.Linear(8, 6).double()
    full = KroneckerLinear.from_linear(linear, (3, 2), (2, 4), rank=6)  # full rank of R(W): exact
    x = torch.randn(4, 8, dtype=torch.float64)
    assert torch.allclose(full(x), linear(x), atol=1e-10)
    merged = full.to_linear()
    assert torch.allclose(merged.weight, linear.weight, atol=1e-10)

    conv = Conv1D(6, 8).double()  # (in=8, out=6), weight stored (8, 6)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    k = KroneckerLinear.from_conv1d(conv, (3, 2), (2, 4), rank=6)
    assert torch.allclose(k(x), conv(x), atol=1e-10)
    assert k.num_parameters() == 6 * (3 * 2 + 2 * 4) + 6


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"KroneckerLinear: factor shapes A \(3, 2\) ⊗ B \(2, 2\) give \(6, 4\), but the weight is \(6, 8\)"):
        KroneckerLinear(8, 6, (3, 2), (2, 2))
    with pytest.raises(ValueError, match=r"KroneckerEmbedding: factor shapes A \(10, 3\) ⊗ B \(1, 2\) give \(10, 6\), but the weight is \(10, 8\)"):
        KroneckerEmbedding(10, 8, (10, 3), (1, 2))


@pytest.mark.parametrize("a_shape,b_shape,rank", [((10, 4), (1, 2), 1), ((10, 2), (1, 4), 2), ((5, 4), (2, 2), 2)])
def test_embedding_matches_dense_lookup(a_shape, b_shape, rank):
    torch.manual_seed(3)
    V, d = a_shape[0] * b_shape[0], a_shape[1] * b_shape[1]
    emb = KroneckerEmbedding(V, d, a_shape, b_shape, rank, dtype=torch.float64)
    ids = torch.randint(0, V, (3, 7))
    A = emb.A.detach().clone().requires_grad_()
    B = emb.B.detach().clone().requires_grad_()
    ref = torch.nn.functional.embedding(ids, dense_weight(A, B))
    out = emb(ids)
    assert torch.allclose(out, ref, atol=1e-12)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    assert torch.allclose(emb.A.grad, A.grad, atol=1e-12) and torch.allclose(emb.B.grad, B.grad, atol=1e-12)
    assert torch.allclose(emb.to_embedding().weight, dense_weight(A, B).detach())
    assert sum(p.numel() for p in emb.parameters()) == rank * (a_shape[0] * a_shape[1] + b_shape[0] * b_shape[1])


def test_tied_head_equals_hidden_times_embedding_transpose():
    torch.manual_seed(4)
    emb = KroneckerEmbedding(12, 8, (12, 4), (1, 2), rank=2, dtype=torch.float64)
    bias = torch.randn(12, dtype=torch.float64)
    head = KroneckerTiedLMHead(emb, bias=bias)
    h = torch.randn(2, 5, 8, dtype=torch.float64)
    assert torch.allclose(head(h), h @ emb.to_dense().T + bias, atol=1e-12)
    assert [n for n, _ in head.named_parameters()] == ["bias"]  # factors are the embedding's
    # Gradients from the head reach the shared factors.
    head(h).sum().backward()
    assert emb.A.grad is not None and emb.A.grad.abs().sum() > 0


@pytest.mark.parametrize("scales", [False, True])
def test_every_init_is_stored_with_balanced_terms_and_the_same_weight(scales):
    """Krony-PT's pruning init gives A = W[0::2] and B = [1, 0.1]; the layer keeps A ⊗ B exactly but
    splits its scale evenly, as Van Loan does (the step size Adam gives each term depends on it)."""
    torch.manual_seed(5)
    linear = nn.Linear(6, 8).double()
    layer = KroneckerLinear.from_linear(linear, (4, 6), (2, 1), rank=1, init="pruning", learnable_scales=scales)
    assert torch.allclose(layer.A.norm(), layer.B.norm())
    expected = torch.kron(linear.weight[0::2], torch.tensor([[1.0], [0.1]], dtype=torch.float64))
    assert torch.allclose(layer.to_linear().weight, expected, atol=1e-12)


def test_truncated_svd_terms_keep_the_split_of_their_init():
    """A (out, 1) ⊗ B (1, in) terms are a truncated SVD: stored as the init left them."""
    torch.manual_seed(6)
    linear = nn.Linear(6, 8).double()
    with torch.no_grad():
        linear.weight[:, :3] *= 40.0  # uneven singular vectors
    layer = KroneckerLinear.from_linear(linear, (8, 1), (1, 6), rank=3)
    with torch.no_grad():  # as an activation-aware (whitened) SVD leaves them: one side far larger
        layer.A.mul_(5.0)
        layer.B.div_(5.0)
    A, B = layer.A.clone(), layer.B.clone()
    assert layer.balance_() is layer and torch.equal(layer.A, A) and torch.equal(layer.B, B)
