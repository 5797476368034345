"""Per-module budget allocation: which modules to factor, with which family, factor shapes and R
(docs/compression.md, "Compressing to a parameter budget").

The pipeline, one module per stage: :mod:`~kronlm.compression.budget.settings` (what is asked:
``BudgetSettings``, ``BudgetConfig``), :mod:`~kronlm.compression.budget.pricing` (the estimate of
every option), :mod:`~kronlm.compression.budget.allocation` (the choice and its check),
:mod:`~kronlm.compression.budget.report` (the table). ``kronlm.compress(model, BudgetConfig(...),
calibration=ids)`` runs them all (``kronlm.modeling.compress_to_budget``).

One shape everywhere wastes parameters: some modules' outputs barely move the loss, others are
fragile, and different matrices suit different factorisations. Given calibration statistics
(``kronlm.compression.calibration``) we estimate, for every candidate factorisation of every module,
its increase of the mean token NLL and pick the set of candidates that minimises the total
increase under a parameter budget.

Estimate. For a module with input second moment C and output-gradient energy s (per output unit,
see ``collect_calibration(sensitivity=True)``), the diagonal-Fisher approximation gives
ΔL ≈ ½ · s · E_t||ΔW x_t||² = ½ · s · tr(ΔW C ΔWᵀ). Every family is priced with the same
activation-aware error estimate, under the damped C the fits use:

- ``svd``: truncated SVD, the degenerate Kronecker product A (out, 1) ⊗ B (1, in) (docs/method.md, "Truncated SVD is a Kronecker product") with
  R terms; the tail Σ_{j>R} σ_j² of W C^{1/2} is its exact error (SVD-LLM).
- ``kronecker``: Σ_{r<=R} A_r ⊗ B_r for every factor-shape pair of
  ``kronecker_shape_window`` (small input-side, output-side and square factors, and balanced
  shapes such as A (48, 24) ⊗ B (32, 24)); the tail of the whitened rearrangement
  R(W (L1 ⊗ L2)) (``kronlm.decompose.activation_aware``): exact when n1 = 1 or n2 = 1, an
  estimate otherwise (the Kronecker-factored root of C).
- ``kronecker_lowrank``: Σ_r A_r ⊗ B_r + U V (``kronlm.decompose.lowrank``): for a few Kronecker
  parts (the best Kronecker option within each of ``lowrank_fractions`` of the dense size), the
  whitened SVD tail of W minus that part prices every k at once; the joint fit only improves on it.
- ``dense``: keep the module.

One spectrum prices every R (or k) of a shape at once.

Speed. Every option also carries its multiply-adds per token (the cheaper contraction order of
its Kronecker part plus k·(out + in)); ranks above ``max_macs`` times the dense out·in are not
offered (default 1.0), so no factored module costs more than the dense one. Without it, thin
Kronecker factors with 100-300 terms win on parameters at several times the dense multiply-adds.

Screening. Pricing every shape of the window on all of SmolLM2's 210 matrices takes over ten
minutes on one CPU thread, so the window is priced in full only on the modules of the
``screen_blocks`` blocks; a shape is kept for a module class (the name with its block index
removed, e.g. ``model.layers.*.mlp.up_proj``) when it gives a vertex of the lower convex hull of
the Kronecker family's (parameters, error) points on a screened module of that class. Only hull
vertices can ever be chosen by the allocation below, so this drops the shapes that no screened
matrix would pick. It is a screen, not a proof: a shape useless on the screened blocks is assumed
useless on the others of the same class.

Choice. Minimising Σ_m ΔL_m subject to Σ_m params_m ≤ budget is a multiple-choice knapsack; we
solve its Lagrangian relaxation: for a price λ every module independently takes the candidate
with the least ΔL + λ·params, and λ is bisected until the model fits the budget. This picks
points of each module's lower convex hull, the standard rate–distortion allocation.

Check. Each chosen option is then fitted (``kronlm.compression.surgery.fit_factors``, cached for the
compression that follows) and its output error measured on the calibration statistics. Where it
differs from the estimate, every rank of that module's shape is rescaled by the measured /
estimated ratio, the chosen option keeps its measured error, and the allocation runs again, up to
``check_rounds`` times; the table reports both numbers.

Subset check. With several families offered, the same budget is also allocated with each family
alone, every distinct allocation is applied to the model in place (its dense modules put back
after), and the one with the lowest
next-token NLL on held-out calibration sequences is kept
(:mod:`~kronlm.compression.budget.subset_check`), so offering more families never measures worse
than any one of them alone.

Tie-break. Optionally (``tie_break_modules``), the modules where another offered family has an
option no larger than the chosen one and estimated within a margin of it are tried one at a time
on the model compressed in place, and each swap that lowers the held-out NLL is kept
(:mod:`~kronlm.compression.budget.tie_break`).
"""

from __future__ import annotations

from kronlm.compression.budget.allocation import (
    BudgetAllocation,
    ModuleChoice,
    allocate_budget,
    budget_candidates,
    budget_statistics,
    check_choices,
    measure_option,
    option_target,
    solve_budget,
)
from kronlm.compression.budget.pricing import (
    BudgetOption,
    ModulePricing,
    Pricing,
    PricingSummary,
    Spectrum,
    default_screen_blocks,
    hull_shapes,
    kronecker_spectrum,
    lowrank_spectrum,
    module_class,
    module_options,
    price_modules,
    shape_window,
)
from kronlm.compression.budget.report import allocation_table, family_key
from kronlm.compression.budget.subset_check import choose_by_held_out, held_out_nll
from kronlm.compression.budget.tie_break import Swap, break_ties, close_alternatives
from kronlm.compression.budget.settings import (
    DEFAULT_BUDGET,
    DEFAULT_B_SHAPES,
    FACTOR_FAMILIES,
    FAMILIES,
    BudgetConfig,
    BudgetSettings,
    check_families,
    default_budget_config,
    max_macs_text,
    parse_max_macs,
)

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_B_SHAPES",
    "FACTOR_FAMILIES",
    "FAMILIES",
    "BudgetAllocation",
    "BudgetConfig",
    "BudgetOption",
    "BudgetSettings",
    "ModuleChoice",
    "ModulePricing",
    "Pricing",
    "PricingSummary",
    "Spectrum",
    "Swap",
    "allocate_budget",
    "allocation_table",
    "budget_candidates",
    "choose_by_held_out",
    "held_out_nll",
    "break_ties",
    "budget_statistics",
    "check_choices",
    "check_families",
    "close_alternatives",
    "default_budget_config",
    "default_screen_blocks",
    "family_key",
    "hull_shapes",
    "kronecker_spectrum",
    "lowrank_spectrum",
    "max_macs_text",
    "measure_option",
    "module_class",
    "module_options",
    "option_target",
    "parse_max_macs",
    "price_modules",
    "shape_window",
    "solve_budget",
]
