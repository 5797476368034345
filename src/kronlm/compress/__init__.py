"""Compress: model surgery that swaps dense modules for Kronecker modules, configs and presets."""

from kronlm.compress.budget import BudgetAllocation, allocate_budget, compress_to_budget
from kronlm.compress.calibration import calibration_input_ids, collect_calibration
from kronlm.compress.config import CompressionConfig, KroneckerTarget
from kronlm.compress.presets import PRESETS, Preset, get_preset, list_presets, preset_parameter_counts
from kronlm.compress.report import CompressionReport, ModuleReport, count_parameters
from kronlm.compress.surgery import compress, plan_compression

__all__ = [
    "BudgetAllocation",
    "allocate_budget",
    "calibration_input_ids",
    "collect_calibration",
    "compress_to_budget",
    "PRESETS",
    "CompressionConfig",
    "CompressionReport",
    "KroneckerTarget",
    "ModuleReport",
    "Preset",
    "compress",
    "count_parameters",
    "get_preset",
    "list_presets",
    "plan_compression",
    "preset_parameter_counts",
]
