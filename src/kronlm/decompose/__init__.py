"""Decompose: nearest Kronecker products, their initialisers and the choice of factor shapes.

First stage of the pipeline decompose -> compress -> distill -> evaluate -> export.
"""

from kronlm.decompose.activation_aware import (
    activation_aware_factors,
    partial_traces,
    weighted_als,
    weighted_error,
    whitened_nearest_kronecker_product,
)
from kronlm.decompose.initializers import (
    INITIALIZERS,
    Initializer,
    get_initializer,
    register_initializer,
)
from kronlm.decompose.lowrank import KroneckerLowRankFactors, kronecker_lowrank_factors
from kronlm.decompose.pruning import pruning_factors
from kronlm.decompose.shapes import (
    FactorShape,
    choose_factor_shapes,
    factor_shapes,
    is_low_rank_shape,
    kronecker_shape_window,
    resolve_factor_shapes,
    shapes_within_ratio,
)
from kronlm.decompose.vanloan import (
    KroneckerFactors,
    balance_terms,
    kron_sum,
    kron_sum_lowrank,
    kron_sum_rank_bound,
    nearest_kronecker_product,
    rearrange,
    rescale_to_norm,
)

__all__ = [
    "INITIALIZERS",
    "FactorShape",
    "Initializer",
    "KroneckerFactors",
    "KroneckerLowRankFactors",
    "activation_aware_factors",
    "balance_terms",
    "choose_factor_shapes",
    "factor_shapes",
    "get_initializer",
    "is_low_rank_shape",
    "kron_sum",
    "kron_sum_lowrank",
    "kron_sum_rank_bound",
    "kronecker_lowrank_factors",
    "kronecker_shape_window",
    "nearest_kronecker_product",
    "partial_traces",
    "pruning_factors",
    "rearrange",
    "register_initializer",
    "rescale_to_norm",
    "resolve_factor_shapes",
    "shapes_within_ratio",
    "weighted_als",
    "weighted_error",
    "whitened_nearest_kronecker_product",
]
