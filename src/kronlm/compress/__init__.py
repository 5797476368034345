"""Compress: which dense modules become which Kronecker modules (configs, presets, budget
allocation from calibration statistics), the module surgery itself, and layer truncation.

The Hugging Face side (a compressed model that saves and loads like any other) is
:mod:`kronlm.modeling`; ``kronlm.compress`` at the top level does both.
"""

from kronlm.compress.budget import (
    FACTOR_FAMILIES,
    BudgetAllocation,
    BudgetSettings,
    allocate_budget,
    budget_candidates,
    plan_budget,
    price_modules,
)
from kronlm.compress.calibration import (
    CalibrationSource,
    calibration_input_ids,
    calibration_mix,
    collect_calibration,
    generate_calibration,
)
from kronlm.compress.config import CompressionConfig, KroneckerTarget
from kronlm.compress.presets import (
    PRESETS,
    Preset,
    get_preset,
    list_presets,
    preset_parameter_counts,
)
from kronlm.compress.report import CompressionReport, ModuleReport, count_parameters
from kronlm.compress.sequential import SequentialCalibration
from kronlm.compress.surgery import FactorChoice, compress_modules, plan_compression

__all__ = [
    "FACTOR_FAMILIES",
    "PRESETS",
    "BudgetAllocation",
    "BudgetSettings",
    "CalibrationSource",
    "CompressionConfig",
    "CompressionReport",
    "FactorChoice",
    "KroneckerTarget",
    "ModuleReport",
    "Preset",
    "SequentialCalibration",
    "allocate_budget",
    "budget_candidates",
    "calibration_input_ids",
    "calibration_mix",
    "collect_calibration",
    "compress_modules",
    "count_parameters",
    "generate_calibration",
    "get_preset",
    "list_presets",
    "plan_budget",
    "plan_compression",
    "preset_parameter_counts",
    "price_modules",
]
