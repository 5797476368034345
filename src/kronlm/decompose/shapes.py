"""Valid Kronecker factor shapes of an (out, in) matrix, their cost, and the choice for a target
compression ratio."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FactorShape:
    """One factorisation (out, in) = (m1*m2, n1*n2) with R terms.

    Attributes:
        a_shape: (m1, n1).
        b_shape: (m2, n2).
        rank: number of terms R.
        params: R·(m1·n1 + m2·n2) factor parameters (no bias, no scalars).
        macs: multiply-adds per token with the cheaper contraction order (docs/method.md, "The forward pass never forms W").
        max_rank: upper bound on rank(Σ A_r⊗B_r) = min(R·min(m1,n1)·min(m2,n2), out, in).
        compression_ratio: out·in / params.
    """

    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    rank: int
    params: int
    macs: int
    max_rank: int
    compression_ratio: float

    @property
    def full_rank(self) -> bool:
        """True when the factorisation can represent a full-rank matrix."""
        m1, n1 = self.a_shape
        m2, n2 = self.b_shape
        return self.max_rank == min(m1 * m2, n1 * n2)


def check_factor_shapes(
    weight_shape: tuple[int, int], a_shape: tuple[int, int], b_shape: tuple[int, int], name: str = "weight"
) -> tuple[int, int, int, int]:
    """Check that A (m1, n1) ⊗ B (m2, n2) has the weight's shape (out, in) = (m1·m2, n1·n2).

    The one shape check behind every factorisation, layer and shape listing in kronlm.

    Args:
        weight_shape: (rows, cols) of the weight in the ``nn.Linear`` (out, in) orientation, or
            (vocab, dim) for an embedding.
        a_shape, b_shape: the factor shapes (rows, cols).
        name: the module or tensor named in the error.

    Returns:
        (m1, n1, m2, n2).

    Raises:
        ValueError: a shape that is not two positive integers, or factors whose Kronecker product
            has another shape (the message names ``name`` and all numbers).
    """
    pairs = []
    for label, shape in (("A", a_shape), ("B", b_shape), ("weight", weight_shape)):
        shape = tuple(shape) if isinstance(shape, (list, tuple)) else shape
        if label == "weight" and isinstance(shape, tuple) and len(shape) != 2:
            raise ValueError(f"{name}: expected a 2-D weight, got shape {shape}")
        if not isinstance(shape, tuple) or len(shape) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
            raise ValueError(f"{name}: {label} shape must be two positive integers (rows, cols), got {shape!r}")
        pairs.append(shape)
    (m1, n1), (m2, n2), (rows, cols) = pairs
    if m1 * m2 != rows or n1 * n2 != cols:
        raise ValueError(
            f"{name}: factor shapes A {(m1, n1)} ⊗ B {(m2, n2)} give ({m1 * m2}, {n1 * n2}), "
            f"but the weight is ({rows}, {cols})"
        )
    return m1, n1, m2, n2


def contraction_macs(a_shape: tuple[int, int], b_shape: tuple[int, int], rank: int = 1) -> tuple[int, int]:
    """Multiply-adds per token of y = Σ_r A_r X B_rᵀ, as (B first, A first) (docs/method.md, "The forward pass never forms W")."""
    (m1, n1), (m2, n2) = a_shape, b_shape
    b_first = rank * (n1 * n2 * m2 + m1 * n1 * m2)
    a_first = rank * (m1 * n1 * n2 + m1 * n2 * m2)
    return b_first, a_first


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def factor_shapes(out_features: int, in_features: int, rank: int = 1, *, include_trivial: bool = False) -> list[FactorShape]:
    """All (A, B) shape pairs with m1·m2 = out and n1·n2 = in, sorted by parameter count.

    Args:
        out_features, in_features: the weight shape (out, in).
        rank: terms R used for params and multiply-adds.
        include_trivial: also list A or B equal to the whole matrix (A (out,in) ⊗ B (1,1)).

    Raises:
        ValueError: non-positive sizes or rank.
    """
    if out_features < 1 or in_features < 1 or rank < 1:
        raise ValueError(f"factor_shapes needs positive sizes and rank, got ({out_features}, {in_features}), R={rank}")
    shapes = []
    for m1 in _divisors(out_features):
        for n1 in _divisors(in_features):
            m2, n2 = out_features // m1, in_features // n1
            trivial = (m1, n1) == (out_features, in_features) or (m2, n2) == (out_features, in_features)
            if trivial and not include_trivial:
                continue
            if rank > min(m1 * n1, m2 * n2):
                continue
            params = rank * (m1 * n1 + m2 * n2)
            macs = min(contraction_macs((m1, n1), (m2, n2), rank))
            max_rank = min(rank * min(m1, n1) * min(m2, n2), out_features, in_features)
            shapes.append(
                FactorShape((m1, n1), (m2, n2), rank, params, macs, max_rank, out_features * in_features / params)
            )
    shapes.sort(key=lambda s: (s.params, s.macs))
    return shapes


def is_low_rank_shape(a_shape: tuple[int, int], b_shape: tuple[int, int]) -> bool:
    """True when A ⊗ B is an outer product u vᵀ, i.e. a rank-1 term of a truncated SVD:
    A (out, 1) ⊗ B (1, in) or A (1, in) ⊗ B (out, 1) (n1 = 1, m2 = 1 or the mirror; docs/method.md, "Truncated SVD is a Kronecker product")."""
    (m1, n1), (m2, n2) = a_shape, b_shape
    return (n1 == 1 and m2 == 1) or (m1 == 1 and n2 == 1)


def kronecker_shape_window(
    out_features: int, in_features: int, *, small_factor: int = 8, balanced_slack: float = 1.05
) -> list[FactorShape]:
    """The Kronecker factor shapes worth pricing for an (out, in) matrix, R = 1 entries.

    Every pair of ``factor_shapes`` whose Kronecker product is not an outer product
    (``is_low_rank_shape``: the truncated-SVD family) and which is either

    - a *small-factor* shape: the smaller of the two factors has at most ``small_factor``
      elements, in every orientation (output-side B (k, 1), input-side B (1, k), B (2, 2), and the
      mirrored small A); such shapes offer only coarse sizes (R terms keep about R/k of W); or
    - a *balanced* shape: the rearranged matrix (m1·n1, m2·n2) is nearly square, its per-term cost
      m1·n1 + m2·n2 at most ``balanced_slack`` times the minimum 2·√(out·in) (e.g. A (48, 24) ⊗
      B (32, 24) for (1536, 576)); such shapes offer fine steps of rank.

    Args:
        out_features, in_features: the weight shape (out, in).
        small_factor: largest element count of the small factor (>= 2).
        balanced_slack: >= 1.

    Returns:
        ``FactorShape`` entries (rank 1), sorted as ``factor_shapes`` sorts them.

    Raises:
        ValueError: non-positive sizes, ``small_factor`` < 2 or ``balanced_slack`` < 1.
    """
    if small_factor < 2 or balanced_slack < 1:
        raise ValueError(f"kronecker_shape_window: small_factor must be >= 2 and balanced_slack >= 1, got {small_factor}, {balanced_slack}")
    floor = 2.0 * (out_features * in_features) ** 0.5
    out = []
    for shape in factor_shapes(out_features, in_features):
        p = shape.a_shape[0] * shape.a_shape[1]
        q = shape.b_shape[0] * shape.b_shape[1]
        if is_low_rank_shape(shape.a_shape, shape.b_shape) or min(p, q) < 2:
            continue
        if min(p, q) <= small_factor or p + q <= balanced_slack * floor:
            out.append(shape)
    return out


# Halving a matrix with a 2-element B adds 2 parameters to exactly half: 0.5 % slack counts it as 2x.
RATIO_SLACK = 1.005


def shapes_within_ratio(out_features: int, in_features: int, compression_ratio: float, rank: int = 1) -> list[FactorShape]:
    """Shapes whose parameters fit out·in/ratio (with ``RATIO_SLACK``), most parameters first."""
    budget = out_features * in_features / compression_ratio * RATIO_SLACK
    return sorted((s for s in factor_shapes(out_features, in_features, rank) if s.params <= budget), key=lambda s: -s.params)


def choose_factor_shapes(
    out_features: int, in_features: int, compression_ratio: float, rank: int = 1, *, prefer: str = "params", name: str = "weight"
) -> FactorShape:
    """Pick factor shapes that compress an (out, in) matrix at least ``compression_ratio`` times.

    The budget is out·in/ratio with ``RATIO_SLACK`` (0.5 %), so that halving a matrix with a
    2-element B (2 parameters above exactly half) counts as 2x. Among the shapes within budget,
    ``prefer="params"`` takes the one with the most parameters (the closest to the budget, so the most capacity), ``prefer="speed"`` the one
    with the fewest multiply-adds; ties go to full-rank shapes, then to balanced ones.

    Raises:
        ValueError: ratio <= 1, unknown ``prefer``, or no shape reaches the ratio (the message
            gives the best ratio available).
    """
    if compression_ratio <= 1:
        raise ValueError(f"{name}: compression ratio must be > 1, got {compression_ratio}")
    if prefer not in ("params", "speed"):
        raise ValueError(f"{name}: prefer must be 'params' or 'speed', got {prefer!r}")
    candidates = shapes_within_ratio(out_features, in_features, compression_ratio, rank)
    if not candidates:
        best = max((s.compression_ratio for s in factor_shapes(out_features, in_features, rank)), default=1.0)
        raise ValueError(
            f"{name}: no Kronecker factorisation of ({out_features}, {in_features}) with R={rank} reaches "
            f"compression ratio {compression_ratio}; the highest is {best:.1f}"
        )

    def balance(s: FactorShape) -> float:
        return abs((s.a_shape[0] * s.a_shape[1]) - (s.b_shape[0] * s.b_shape[1]))

    if prefer == "params":
        return max(candidates, key=lambda s: (s.params, s.full_rank, -s.macs, -balance(s)))
    return min(candidates, key=lambda s: (s.macs, not s.full_rank, -s.params, balance(s)))


def resolve_factor_shapes(
    weight_shape: tuple[int, int],
    a_shape: tuple[int, int] | None,
    b_shape: tuple[int, int] | None,
    *,
    name: str = "weight",
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Complete a factorisation from one or both factor shapes for a weight (out, in).

    Given only A (m1, n1), B is (out/m1, in/n1); given only B, A likewise.

    Raises:
        ValueError: neither shape given, or a shape that does not divide the weight (the message
            names the module and the numbers).
    """
    rows, cols = weight_shape
    if a_shape is None and b_shape is None:
        raise ValueError(f"{name}: give a_shape, b_shape or a compression ratio")
    if a_shape is not None and b_shape is not None:
        m1, n1, m2, n2 = check_factor_shapes((rows, cols), a_shape, b_shape, name)
        return (m1, n1), (m2, n2)
    given, label = (tuple(a_shape), "A") if a_shape is not None else (tuple(b_shape), "B")
    if len(given) != 2 or given[0] < 1 or given[1] < 1 or rows % given[0] or cols % given[1]:
        raise ValueError(f"{name}: factor {label} {given} does not divide the weight ({rows}, {cols})")
    other = (rows // given[0], cols // given[1])
    return (given, other) if label == "A" else (other, given)
