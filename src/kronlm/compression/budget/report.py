"""The text table of a budget allocation: per module its family, factor shapes, R and k, the
estimated and measured errors, then the counts per family and the totals (what ``kronlm compress
--budget`` prints and ``docs/benchmarks/pareto.md`` quotes)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from kronlm.compression.budget.pricing import BudgetOption

if TYPE_CHECKING:  # the allocation imports this module for its table
    from kronlm.compression.budget.allocation import BudgetAllocation, ModuleChoice

HEADER = (f"{'module':<36} {'shape':>11} {'family':>17} {'A':>11} {'B':>9} {'R':>4} {'k':>4} {'params':>9} "
          f"{'rel.err est/meas':>17} {'est. dNLL':>9}")


def family_key(option: BudgetOption) -> str:
    """The family of an option, with the small-factor shape for the Kronecker ones
    (``kronecker B (2, 1)``): how the table counts the choices."""
    if option.family in ("kronecker", "kronecker_lowrank"):
        return f"{option.family} B {tuple(option.b_shape)}"
    return option.family


def choice_row(choice: ModuleChoice) -> str:
    """One module's row: relative output errors are the estimate, then the measured one after
    "/" when the option was checked."""
    o = choice.option
    shape = f"({choice.weight_shape[0]},{choice.weight_shape[1]})"
    a = "-" if o.a_shape is None else f"({o.a_shape[0]},{o.a_shape[1]})"
    b = "-" if o.b_shape is None else f"({o.b_shape[0]},{o.b_shape[1]})"
    energy = choice.energy
    est = o.estimated_error / energy if energy > 0 else 0.0
    err = f"{est:.4f}" + (f"/{o.measured_error / energy:.4f}" if o.measured_error is not None and energy > 0 else "")
    return (f"{choice.name[-36:]:<36} {shape:>11} {o.family:>17} {a:>11} {b:>9} {o.rank or '-':>4} {o.lowrank or '-':>4} "
            f"{o.params:>9,} {err:>17} {o.loss:>9.5f}")


def allocation_table(allocation: BudgetAllocation, max_rows: int | None = None) -> str:
    """Per-module choice as a fixed-width text table (dense modules included), then counts of the
    choices by family (and small-factor shape), the factored modules' multiply-adds per token against
    dense, and the totals; ``max_rows`` cuts the per-module
    part. Columns: family, A, B, R, k (low rank), params, relative output error (estimate;
    measured after "/" when checked), estimated NLL increase (nats per token)."""
    choices = allocation.choices
    lines = [HEADER] + [choice_row(c) for c in choices[:max_rows]]
    if max_rows is not None and len(choices) > max_rows:
        lines.append(f"... {len(choices) - max_rows} more modules")
    counts: dict[str, int] = {}
    for c in choices:
        counts[family_key(c.option)] = counts.get(family_key(c.option), 0) + 1
    lines.append("choices: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    check = allocation.estimate_check()
    if check:
        lines.append("measured / estimated output error of the chosen options: " + ", ".join(
            f"{f} median {v['median']:.2f} (max {v['max']:.2f}, {v['modules']} modules)" for f, v in check.items()))
    factored = [c for c in choices if c.option.family != "dense"]
    if factored:
        dense_macs = sum(c.weight_shape[0] * c.weight_shape[1] for c in factored)
        slower = sum(c.option.macs > c.weight_shape[0] * c.weight_shape[1] for c in factored)
        lines.append(f"multiply-adds per token of the factored modules: {sum(c.option.macs for c in factored) / dense_macs:.2f}x "
                     f"their dense ones; {slower} of {len(factored)} modules above dense")
    lines.append(
        f"params {allocation.params_before:,} -> {allocation.params_after:,} (budget {allocation.target_params:,}); "
        f"estimated NLL increase {allocation.estimated_loss:.4f} nats/token (x{math.exp(allocation.estimated_loss):.3f} perplexity); "
        f"families {', '.join(allocation.families)}; {allocation.check_rounds} check rounds"
    )
    if allocation.held_out_nll:
        lines.append("subset check (held-out NLL, nats/token): " + ", ".join(
            f"{label} {'cannot reach the budget' if nll is None else f'{nll:.4f}'}" for label, nll in allocation.held_out_nll.items())
            + f"; {allocation.decided_by}")
    kept = [t for t in allocation.tie_break if t["kept"]]
    if kept:
        lines.append("tie-break swaps kept: " + ", ".join(f"{t['module']} {t['from']} -> {t['to']} ({t['held_out_nll']:.4f})" for t in kept))
    return "\n".join(lines)


__all__ = ["allocation_table", "choice_row", "family_key"]
