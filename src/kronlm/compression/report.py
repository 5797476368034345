"""What ``compress`` did: per-module factors and errors, parameter totals."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn


def count_parameters(model: nn.Module, *, exclude_lm_head: bool = False) -> int:
    """Number of distinct parameters (a tied tensor counts once).

    With ``exclude_lm_head``, parameters owned only by the output-embedding module (an untied LM
    head) are left out, as KnGPT2 reports its size; a head tied to the input embedding owns none.
    """
    params = {id(p): p.numel() for p in model.parameters()}
    head = model.get_output_embeddings() if exclude_lm_head and hasattr(model, "get_output_embeddings") else None
    if head is not None:
        head_name = next(name for name, mod in model.named_modules() if mod is head)
        elsewhere = {
            id(p) for name, p in model.named_parameters(remove_duplicate=False) if not name.startswith(head_name + ".")
        }
        for p in head.parameters():
            if id(p) not in elsewhere:
                params.pop(id(p), None)
    return sum(params.values())


@dataclass
class ModuleReport:
    """One replaced module.

    Attributes:
        name: dotted module name.
        kind: "linear" or "embedding".
        weight_shape: (out, in) for linear maps, (vocab, dim) for embeddings.
        a_shape, b_shape: factor shapes (rows, cols).
        rank: number of Kronecker terms R.
        init: initialiser name.
        params_before, params_after: parameters of the module (weight + bias [+ scalars]).
        relative_error: ||W - Ŵ||_F / ||W||_F at initialisation (NaN without weights).
        seconds: wall time spent initialising it.
        lowrank: rank k of the low-rank part U V of a ``KroneckerLowRankLinear``, else 0.
        output_error: E_t ||(W - Ŵ) x_t||² / E_t ||W x_t||² over the calibration inputs x_t the
            module was fitted on (what ``activation_aware`` minimises, and what the budget's
            ``relative_error`` states), or None for a compression without calibration. A fit can
            trade a larger ``relative_error`` for a smaller ``output_error``.
    """

    name: str
    kind: str
    weight_shape: tuple[int, int]
    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    rank: int
    init: str
    params_before: int
    params_after: int
    relative_error: float
    seconds: float
    lowrank: int = 0
    output_error: float | None = None


@dataclass
class CompressionReport:
    """Result of ``kronlm.compress``.

    Attributes:
        modules: one ``ModuleReport`` per replaced module.
        params_before, params_after: distinct parameters of the whole model.
        params_before_no_head, params_after_no_head: the same without an untied LM head.
        lm_head: what happened to a head tied to a factored embedding ("tied", "dense") or None.
        seconds: wall time of the whole compression.
        config: the ``CompressionConfig`` as a dict.
        allocation: the per-module budget choice when the config came from a budget allocation
            (a ``kronlm.compression.budget.BudgetAllocation`` in memory, its dict once read back from
            JSON), else None.
    """

    modules: list[ModuleReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    params_before_no_head: int = 0
    params_after_no_head: int = 0
    lm_head: str | None = None
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    allocation: Any = None

    @property
    def compression_ratio(self) -> float:
        """params_before / params_after for the whole model."""
        return self.params_before / self.params_after if self.params_after else float("inf")

    @property
    def mean_relative_error(self) -> float:
        """Unweighted mean of the modules' relative errors (NaN without modules)."""
        errors = [m.relative_error for m in self.modules]
        return sum(errors) / len(errors) if errors else float("nan")

    @property
    def mean_output_error(self) -> float | None:
        """Unweighted mean of the modules' ``output_error`` (None when no module has one)."""
        errors = [m.output_error for m in self.modules if m.output_error is not None]
        return sum(errors) / len(errors) if errors else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists); :meth:`from_dict` inverts it."""
        allocation = self.allocation.to_dict() if hasattr(self.allocation, "to_dict") else self.allocation
        out = dataclasses.asdict(dataclasses.replace(self, allocation=None))
        out["allocation"] = allocation
        out["compression_ratio"] = self.compression_ratio
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionReport:
        """Rebuild a report written by :meth:`to_dict` (``allocation`` stays a dict).

        Raises:
            ValueError: ``data`` is not a report dict (names the first bad key).
        """
        if not isinstance(data, dict):
            raise ValueError(f"a compression report must be a mapping, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        try:
            modules = [ModuleReport(**{**m, "weight_shape": tuple(m["weight_shape"]), "a_shape": tuple(m["a_shape"]),
                                       "b_shape": tuple(m["b_shape"])}) for m in values.pop("modules", [])]
            return cls(modules=modules, **values)
        except (TypeError, KeyError) as exc:
            raise ValueError(f"not a compression report ({exc})") from None

    def table(self, max_rows: int | None = None) -> str:
        """A fixed-width text table: one row per module, then the totals."""
        header = f"{'module':<44} {'shape':>13} {'A':>13} {'B':>9} {'R':>2} {'params':>21} {'rel.err':>7}"
        lines = [header, "-" * len(header)]
        rows = self.modules if max_rows is None else self.modules[:max_rows]
        for m in rows:
            lines.append(
                f"{m.name[-44:]:<44} {_shape(m.weight_shape):>13} {_shape(m.a_shape):>13} {_shape(m.b_shape):>9} "
                f"{_terms(m):>2} {m.params_before:>10,}->{m.params_after:<10,} {m.relative_error:>7.4f}"
            )
        if max_rows is not None and len(self.modules) > max_rows:
            lines.append(f"... {len(self.modules) - max_rows} more modules")
        lines.append("-" * len(header))
        lines.append(self.summary())
        return "\n".join(lines)

    def summary(self) -> str:
        """Totals in two lines."""
        head = f" (LM head: {self.lm_head})" if self.lm_head else ""
        return (
            f"{len(self.modules)} modules compressed in {self.seconds:.1f} s; params {self.params_before:,} -> "
            f"{self.params_after:,} ({self.compression_ratio:.2f}x){head}\n"
            f"without the LM head: {self.params_before_no_head:,} -> {self.params_after_no_head:,}; "
            f"mean relative error {self.mean_relative_error:.4f}"
            + (f"; mean relative output error on the calibration inputs {self.mean_output_error:.4f}"
               if self.mean_output_error is not None else "")
        )

    def __str__(self) -> str:
        return self.table()


def _terms(m: ModuleReport) -> str:
    return f"{m.rank}" if not m.lowrank else f"{m.rank}+k{m.lowrank}"


def _shape(shape) -> str:
    return f"({shape[0]},{shape[1]})"
