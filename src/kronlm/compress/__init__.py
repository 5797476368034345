"""Compress: model surgery that swaps dense modules for Kronecker modules, configs and presets."""

from kronlm.compress.config import CompressionConfig, KroneckerTarget
from kronlm.compress.presets import PRESETS, Preset, get_preset, list_presets, preset_parameter_counts
from kronlm.compress.report import CompressionReport, ModuleReport, count_parameters
from kronlm.compress.surgery import compress, plan_compression

__all__ = [
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
