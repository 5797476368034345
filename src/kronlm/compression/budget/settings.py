"""What a budget compression is asked to do: the factor families, the knobs of pricing and
allocation (:class:`BudgetSettings`), and the target and candidate modules on top of them
(:class:`BudgetConfig`). One set of defaults serves ``kronlm compress --budget``,
``kronlm.compress(model, BudgetConfig(...))`` and the benchmarks, so a figure's command
reproduces it; the packaged ``defaults/budget.yaml`` (copied to ``configs/budget.yaml``) writes
them down.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from kronlm.compression.sequential import TARGETS as SEQUENTIAL_TARGETS
from kronlm.decompose.initializers import INITIALIZERS
from kronlm.utils.config import ConfigBase

FAMILIES = ("dense", "svd", "kronecker", "kronecker_lowrank")
FACTOR_FAMILIES = FAMILIES[1:]
# None: the shape window of ``kronecker_shape_window``. A tuple of small-factor shapes (m2, n2)
# instead restricts the Kronecker family to B of those shapes (the allocation before the window).
DEFAULT_B_SHAPES = None
DEFAULT_BUDGET = Path(__file__).resolve().parents[1] / "defaults" / "budget.yaml"


def check_families(families) -> tuple[str, ...]:
    """The factor families as a tuple, in ``FACTOR_FAMILIES`` order ("dense" is always a candidate).

    Args:
        families: names as a sequence or one comma- or space-separated string.

    Raises:
        ValueError: an unknown family name (named, with the valid ones), or none at all.
    """
    if isinstance(families, str):
        families = [f for f in re.split(r"[,\s]+", families) if f]
    names = list(families or [])
    for name in names:
        if name not in FAMILIES:
            raise ValueError(f"unknown factor family {name!r}; choose from {', '.join(FACTOR_FAMILIES)}")
    picked = tuple(f for f in FACTOR_FAMILIES if f in names)
    if not picked:
        raise ValueError(f"give at least one factor family of {', '.join(FACTOR_FAMILIES)}, got {names}")
    return picked


def parse_max_macs(text: str) -> float | None:
    """A multiply-add cap as the command line spells it (``kronlm compress --max-macs``): a
    positive multiple of the dense multiply-adds, or ``none`` (also ``null``, ``off``) for no cap.

    Raises:
        ValueError: anything else (the text is named).
    """
    if text.strip().lower() in ("none", "null", "off"):
        return None
    try:
        cap = float(text)
    except ValueError:
        cap = float("nan")
    if not 0 < cap < float("inf"):
        raise ValueError(f"give a positive multiple of the dense multiply-adds (e.g. 1.0) or `none`, got {text!r}")
    return cap


def max_macs_text(cap: float | None) -> str:
    """The command line's spelling of a multiply-add cap (``parse_max_macs`` reads it back)."""
    return "none" if cap is None else str(float(cap))


def _count(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass
class BudgetSettings(ConfigBase):
    """How a parameter budget is priced and allocated (docs/compression.md, "Compressing to a
    parameter budget"), with the defaults of ``kronlm compress --budget``.

    Attributes:
        families: factor families offered (``FACTOR_FAMILIES``); "dense" is always a candidate.
        sensitivity_sequences: calibration sequences of the sensitivity (backward) pass; 0 prices
            by relative output error instead of estimated nats.
        svd_step: ranks of the truncated SVD and of the low-rank part are multiples of this.
        damping: δ of the damped C = C + δ·mean(diag C)·I used for pricing and fitting.
        b_shapes: None for the shape window; else only Kronecker factors B of these (m2, n2).
        small_factor, balanced_slack: the shape window (``kronecker_shape_window``).
        screen_blocks: blocks whose modules price the whole window (``kronlm.compression.budget``);
            None: the first, middle and last block of the candidates.
        lowrank_fractions: sizes of the Kronecker parts of the ``kronecker_lowrank`` candidates,
            as fractions of the dense matrix.
        check_rounds: rounds of fit-measure-reallocate (0: trust the estimates).
        init: initialiser of the chosen factors.
        sequential: "weight" (the default: fit each block's W under the partially compressed
            model's inputs, ``kronlm.compression.sequential``), "output" (fit toward the dense
            model's outputs on those inputs) or None (fit on the dense model's statistics). "weight"
            was better than None on WikiText-2 and GLUE sentences at 80 % and 70 % for every family
            set measured (docs/benchmarks/pareto.md).
        subset_check: with more than one family, also allocate the budget with each family alone
            and keep whichever allocation has the lowest NLL on held-out calibration sequences
            (``kronlm.compression.budget.subset_check``).
        held_out_sequences: calibration sequences the subset check holds out of the pricing (the
            last ones of the calibration ids).
        tie_break_modules: after the subset check, try swapping at most this many modules to a
            close option of another family, keeping each swap that lowers the held-out NLL
            (``kronlm.compression.budget.tie_break``); 0 turns it off. Needs the subset check
            (more than one family).
        tie_break_margin: an alternative is close when its estimated NLL increase is at most
            (1 + margin) times the chosen option's (and it is no larger).
        max_macs: offer only factorisations whose forward pass needs at most this many
            multiply-adds per token, as a multiple of the dense matrix's out·in (the cheaper
            contraction order; ``kronlm.decompose.shapes.contraction_macs``). 1.0 keeps every
            factored module no slower than dense in multiply-adds: without the cap, Kronecker
            factors of 100-300 terms win on parameters and cost up to several times the dense
            multiply-adds at inference. None: no cap. Truncated SVD below the dense size always fits.

    Raises:
        ValueError: an unknown family or initialiser, or a value out of range (named).
    """

    families: tuple[str, ...] = FACTOR_FAMILIES
    sensitivity_sequences: int = 32
    svd_step: int = 8
    damping: float = 1e-2
    b_shapes: tuple[tuple[int, int], ...] | None = DEFAULT_B_SHAPES
    small_factor: int = 8
    balanced_slack: float = 1.05
    screen_blocks: tuple[int, ...] | None = None
    lowrank_fractions: tuple[float, ...] = (0.02, 0.08)
    check_rounds: int = 2
    init: str = "activation_aware"
    sequential: str | None = "weight"
    subset_check: bool = True
    held_out_sequences: int = 8
    tie_break_modules: int = 0
    tie_break_margin: float = 0.1
    max_macs: float | None = 1.0

    config_name = "budget settings"

    @property
    def checks_subsets(self) -> bool:
        """Whether a budget with these settings runs the subset check (more than one family offered)."""
        return self.subset_check and len(self.families) > 1

    def validate(self) -> None:
        """Normalise the sequences to tuples and check every value (see the class docstring)."""
        self.families = check_families(self.families)
        if self.b_shapes is not None:
            self.b_shapes = tuple((int(a), int(b)) for a, b in self.b_shapes)
        if self.screen_blocks is not None:
            self.screen_blocks = tuple(int(b) for b in self.screen_blocks)
        self.lowrank_fractions = tuple(float(f) for f in self.lowrank_fractions)
        if not isinstance(self.subset_check, bool):
            raise ValueError(f"subset_check must be true or false, got {self.subset_check!r}")
        for name, low in (("sensitivity_sequences", 0), ("svd_step", 1), ("small_factor", 2), ("check_rounds", 0),
                          ("held_out_sequences", 1), ("tie_break_modules", 0)):
            _count(name, getattr(self, name), low)
        margin = self.tie_break_margin
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin >= 0:
            raise ValueError(f"tie_break_margin must be a number >= 0, got {margin!r}")
        self.tie_break_margin = float(margin)
        cap = self.max_macs
        if cap is not None:
            if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 < cap < float("inf"):
                raise ValueError(f"max_macs must be a positive number (multiples of the dense multiply-adds) or null, got {cap!r}")
            self.max_macs = float(cap)
        if self.tie_break_modules and not self.checks_subsets:
            raise ValueError(f"tie_break_modules={self.tie_break_modules} swaps modules between families after the subset check, "
                             f"which runs only with subset_check and more than one family (families: {', '.join(self.families)}, "
                             f"subset_check: {str(self.subset_check).lower()})")
        if not self.damping >= 0 or not self.balanced_slack >= 1:
            raise ValueError(f"damping must be >= 0 and balanced_slack >= 1, got {self.damping}, {self.balanced_slack}")
        if any(not 0 < f < 1 for f in self.lowrank_fractions):
            raise ValueError(f"lowrank_fractions must lie in (0, 1), got {self.lowrank_fractions}")
        if self.init not in INITIALIZERS:
            raise ValueError(f"unknown initialiser {self.init!r}; registered: {', '.join(sorted(INITIALIZERS))}")
        if self.sequential not in (None, *SEQUENTIAL_TARGETS):
            raise ValueError(f"sequential must be None or one of {', '.join(SEQUENTIAL_TARGETS)}, got {self.sequential!r}")


@dataclass
class BudgetConfig(BudgetSettings):
    """A compression to a parameter budget: ``kronlm.compress(model, BudgetConfig(...),
    calibration=ids)`` (``kronlm compress --budget F`` / ``--budget-params N``).

    Every :class:`BudgetSettings` field (same defaults), plus:

    Attributes:
        target_fraction: keep this fraction of the dense model's parameters, in (0, 1);
            ``int(target_fraction * dense parameters)`` parameters are allowed.
        target_params: or allow this many parameters for the whole model (>= 1). Give exactly one
            of the two to compress; a config with neither (the packaged defaults) only holds
            settings.
        modules: name patterns of the candidate modules (``budget_candidates``); None: every
            ``nn.Linear`` / ``Conv1D`` of the base model (no LM head, no task head).

    Raises:
        ValueError: both targets given, a fraction outside (0, 1), a count below 1, an empty
            pattern list, or a bad setting (named).
    """

    target_fraction: float | None = None
    target_params: int | None = None
    modules: list[str] | None = None

    config_name = "budget config"

    def validate(self) -> None:
        """The settings' checks, then the target and the module patterns."""
        super().validate()
        if self.target_fraction is not None and self.target_params is not None:
            raise ValueError(f"give target_fraction or target_params, not both ({self.target_fraction}, {self.target_params})")
        fraction = self.target_fraction
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1):
            raise ValueError(f"target_fraction must lie in (0, 1), got {fraction!r}")
        if self.target_params is not None:
            _count("target_params", self.target_params, 1)
        if self.modules is not None:
            if isinstance(self.modules, str):
                self.modules = [self.modules]
            self.modules = list(self.modules)
            if not self.modules or not all(isinstance(p, str) and p for p in self.modules):
                raise ValueError(f"modules must be a non-empty list of name patterns, got {self.modules!r}")

    def target_for(self, dense_params: int) -> int:
        """Parameters allowed for a model of ``dense_params`` parameters.

        Raises:
            ValueError: neither ``target_fraction`` nor ``target_params`` is set.
        """
        if self.target_params is not None:
            return int(self.target_params)
        if self.target_fraction is None:
            raise ValueError("budget config: give target_fraction (e.g. 0.8) or target_params (a parameter count)")
        return int(self.target_fraction * dense_params)


def default_budget_config() -> BudgetConfig:
    """The packaged ``defaults/budget.yaml`` (no target; ``configs/budget.yaml`` is a copy): the
    settings of ``kronlm compress --budget``, equal to ``BudgetConfig()``."""
    return BudgetConfig.from_file(DEFAULT_BUDGET)


__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_B_SHAPES",
    "FACTOR_FAMILIES",
    "FAMILIES",
    "BudgetConfig",
    "BudgetSettings",
    "check_families",
    "default_budget_config",
    "max_macs_text",
    "parse_max_macs",
]
