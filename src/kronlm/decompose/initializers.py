"""Pluggable initialisers: how the Kronecker factors of a module start from its pretrained weight.

An initialiser is a callable

    init(weight (out, in), a_shape (m1, n1), b_shape (m2, n2), rank, *, svd_solver, calibration, name)
        -> KroneckerFactors

registered under a name with ``@register_initializer(name)``. ``calibration`` carries per-module
activation statistics when ``compress`` is given calibration data (for activation-aware methods);
an initialiser that needs it sets ``needs_calibration = True``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import torch

from kronlm.decompose.activation_aware import activation_aware_factors, corrected_target
from kronlm.decompose.pruning import pruning_factors
from kronlm.decompose.vanloan import (
    KroneckerFactors,
    nearest_kronecker_product,
    relative_error,
    rescale_to_norm,
)


class Initializer(Protocol):
    """Signature of a registered initialiser (see the module docstring)."""

    needs_calibration: bool

    def __call__(
        self,
        weight: torch.Tensor,
        a_shape: tuple[int, int],
        b_shape: tuple[int, int],
        rank: int,
        *,
        svd_solver: str = "auto",
        calibration: Any = None,
        name: str = "weight",
    ) -> KroneckerFactors: ...


INITIALIZERS: dict[str, Initializer] = {}


def register_initializer(name: str, *, needs_calibration: bool = False) -> Callable:
    """Decorator registering an initialiser under ``name`` (overwrites an existing one)."""

    def wrap(fn: Callable) -> Callable:
        fn.needs_calibration = needs_calibration
        INITIALIZERS[name] = fn
        return fn

    return wrap


def get_initializer(name: str) -> Initializer:
    """Return the initialiser registered as ``name``.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    try:
        return INITIALIZERS[name]
    except KeyError:
        raise ValueError(f"unknown initialiser {name!r}; registered: {', '.join(sorted(INITIALIZERS))}") from None


@register_initializer("van_loan")
def van_loan_init(weight, a_shape, b_shape, rank, *, svd_solver="auto", calibration=None, name="weight"):
    """Nearest Kronecker product (Van Loan), scales 1 (KnGPT2, KroneckerBERT, Krony-PT)."""
    return nearest_kronecker_product(weight, a_shape, b_shape, rank, svd_solver=svd_solver, name=name)


@register_initializer("van_loan_rescaled")
def van_loan_rescaled_init(weight, a_shape, b_shape, rank, *, svd_solver="auto", calibration=None, name="weight"):
    """Krony-PT's modified Van Loan: nearest Kronecker product rescaled to W's Frobenius norm."""
    factors = nearest_kronecker_product(weight, a_shape, b_shape, rank, svd_solver=svd_solver, name=name)
    return rescale_to_norm(factors, weight)


@register_initializer("pruning")
def pruning_init(weight, a_shape, b_shape, rank, *, svd_solver="auto", calibration=None, name="weight"):
    """Krony-PT's pruning-based init for a B of 2 elements: keep every other row/column, B = [1, 0.1]."""
    if rank != 1:
        raise ValueError(f"{name}: pruning init makes one Kronecker term, got rank R={rank}")
    return pruning_factors(weight, a_shape, b_shape, name=name)


@register_initializer("random")
def random_init(weight, a_shape, b_shape, rank, *, svd_solver="auto", calibration=None, name="weight"):
    """Random factors whose sum has the dense weight's per-entry standard deviation (a baseline)."""
    gen = torch.Generator().manual_seed(0)
    (m1, n1), (m2, n2) = a_shape, b_shape
    std = weight.detach().float().std().item() if weight.numel() > 1 else 1.0
    # Var(Σ_r a·b) = R·σa²·σb²: split the target variance evenly between the two factors.
    per_factor = math.sqrt(std / math.sqrt(rank)) if std > 0 else 0.0
    A = torch.randn(rank, m1, n1, generator=gen) * per_factor
    B = torch.randn(rank, m2, n2, generator=gen) * per_factor
    scales = torch.ones(rank)
    return KroneckerFactors(A=A, B=B, scales=scales, relative_error=relative_error(weight.float(), A, B, scales))


@register_initializer("activation_aware", needs_calibration=True)
def activation_aware_init(weight, a_shape, b_shape, rank, *, svd_solver="auto", calibration=None, name="weight"):
    """Minimise the output error over calibration inputs: whitened Van Loan, then weighted ALS.

    ``calibration`` is the module's ``kronlm.compression.calibration.ModuleCalibration`` (or anything
    with ``.inputs.covariance()`` / ``.inputs.partial_traces()``); see
    ``kronlm.decompose.activation_aware`` for the method (after ASVD / SVD-LLM). When the
    statistics carry a ``cross_moment`` (sequential calibration, ``kronlm.compression.sequential``),
    the factors fit ``corrected_target`` instead of W.
    """
    if calibration is None:
        raise ValueError(f"{name}: the activation_aware init needs calibration statistics")
    stats = getattr(calibration, "inputs", calibration)
    covariance = stats.covariance()
    cross = getattr(calibration, "cross_moment", None)
    if cross is not None and covariance is not None:
        # Sequential calibration: fit the weight that maps the compressed model's inputs onto the
        # dense model's outputs (``corrected_target``); the reported error stays against W.
        target = corrected_target(weight, covariance, cross).to(weight.dtype)
        factors = activation_aware_factors(target, a_shape, b_shape, rank, covariance=covariance, svd_solver=svd_solver, name=name)
        factors.relative_error = relative_error(weight, factors.A, factors.B, factors.scales)
        return factors
    if covariance is not None:
        return activation_aware_factors(weight, a_shape, b_shape, rank, covariance=covariance, svd_solver=svd_solver, name=name)
    p1, p2 = stats.partial_traces()
    return activation_aware_factors(weight, a_shape, b_shape, rank, p1=p1, p2=p2, svd_solver=svd_solver, name=name)
