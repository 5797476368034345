"""Compression: which dense modules become which Kronecker modules (configs, presets, budget
allocation from calibration statistics), the module surgery itself, and layer truncation.

The Hugging Face side (a compressed model that saves and loads like any other) is
:mod:`kronlm.modeling`; the function ``kronlm.compress`` at the top level does both. (The
subpackage is ``kronlm.compression`` so that the name ``kronlm.compress`` means only that
function.)
"""

from kronlm.compression.budget import (
    FACTOR_FAMILIES,
    BudgetAllocation,
    BudgetConfig,
    BudgetSettings,
    Pricing,
    allocate_budget,
    budget_candidates,
    budget_statistics,
    check_families,
    default_budget_config,
    price_modules,
)
from kronlm.compression.calibration import (
    DEFAULT_CALIBRATION_LENGTH,
    DEFAULT_CALIBRATION_SEQUENCES,
    CalibrationSource,
    ModuleCalibration,
    calibration_input_ids,
    calibration_mix,
    collect_calibration,
    generate_calibration,
    load_calibration,
    save_calibration,
)
from kronlm.compression.config import CompressionConfig, KroneckerTarget
from kronlm.compression.presets import (
    PRESETS,
    Preset,
    get_preset,
    list_presets,
    preset_parameter_counts,
)
from kronlm.compression.report import CompressionReport, ModuleReport, count_parameters
from kronlm.compression.sequential import SequentialCalibration
from kronlm.compression.surgery import FactorChoice, balance_factors, compress_modules, plan_compression
from kronlm.compression.truncate import save_truncated, truncate_layers

__all__ = [
    "DEFAULT_CALIBRATION_LENGTH",
    "DEFAULT_CALIBRATION_SEQUENCES",
    "FACTOR_FAMILIES",
    "PRESETS",
    "BudgetAllocation",
    "BudgetConfig",
    "BudgetSettings",
    "CalibrationSource",
    "CompressionConfig",
    "CompressionReport",
    "FactorChoice",
    "KroneckerTarget",
    "ModuleCalibration",
    "ModuleReport",
    "Pricing",
    "Preset",
    "SequentialCalibration",
    "allocate_budget",
    "balance_factors",
    "budget_candidates",
    "budget_statistics",
    "calibration_input_ids",
    "calibration_mix",
    "check_families",
    "collect_calibration",
    "compress_modules",
    "count_parameters",
    "default_budget_config",
    "generate_calibration",
    "get_preset",
    "list_presets",
    "load_calibration",
    "plan_compression",
    "preset_parameter_counts",
    "price_modules",
    "save_calibration",
    "save_truncated",
    "truncate_layers",
]
