"""Pruning-based initialisation for a 2-element factor (Krony-PT's 96M model; docs/method.md, "Pruning-based initialisation")."""

from __future__ import annotations

import torch

from kronlm.decompose.shapes import check_factor_shapes
from kronlm.decompose.vanloan import KroneckerFactors, relative_error


def pruning_factors(
    weight: torch.Tensor,
    a_shape: tuple[int, int],
    b_shape: tuple[int, int],
    *,
    second: float = 0.1,
    name: str = "weight",
) -> KroneckerFactors:
    """Initialise A ⊗ B with B of 2 elements by keeping every other row (or column) of W.

    With B = [1, 0]ᵀ of shape (2, 1), A ⊗ B keeps the even output rows of W exactly and zeroes
    the odd ones; for B of shape (1, 2) the same holds for input columns. Krony-PT uses
    B = [1, 0.1] instead so that no factor starts at zero (the odd rows then start as 0.1× the
    even ones).

    Args:
        weight: (out, in) in the ``nn.Linear`` orientation.
        a_shape: (out/2, in) for b_shape (2, 1), or (out, in/2) for b_shape (1, 2).
        b_shape: (2, 1) or (1, 2).
        second: value of B's second element (Krony-PT: 0.1).

    Returns:
        ``KroneckerFactors`` with R = 1: A = W[0::2, :] (or W[:, 0::2]), B = [1, second].

    Raises:
        ValueError: b_shape is not (2, 1) or (1, 2), or the shapes do not match the weight.
    """
    if tuple(b_shape) not in ((2, 1), (1, 2)):
        raise ValueError(f"{name}: pruning init needs a B factor of shape (2, 1) or (1, 2), got {tuple(b_shape)}")
    _m1, _n1, m2, n2 = check_factor_shapes(tuple(weight.shape), a_shape, b_shape, name)
    W = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    # (A ⊗ B)[i*m2 + k, j*n2 + l] = A[i, j] B[k, l]: with B's first element 1, the k = l = 0
    # entries are the even rows (m2 = 2) or even columns (n2 = 2) of W.
    A = (W[0::2, :] if m2 == 2 else W[:, 0::2]).clone().unsqueeze(0)
    B = torch.tensor([1.0, second], dtype=W.dtype).reshape(1, m2, n2)
    scales = torch.ones(1, dtype=W.dtype)
    return KroneckerFactors(A=A, B=B, scales=scales, relative_error=relative_error(W, A, B, scales))
