"""Speed measurement: timers, peak memory, per-layer and per-model benchmarks, their options
(shared by ``kronlm bench`` and ``benchmarks/*.py``), Markdown output. The figures
(:mod:`kronlm.bench.plots`) need the ``plots`` extra."""

from kronlm.bench.layers import (
    LayerShape,
    layer_speed_markdown,
    layer_speed_rows,
    preset_layer_shapes,
)
from kronlm.bench.markdown import (
    MARKDOWN_MARK,
    environment_info,
    machine_info,
    machine_line,
    markdown_table,
    reproduce_header,
    reproduce_section,
    write_markdown,
    written_by_kronlm_markdown,
)
from kronlm.bench.memory import peak_memory
from kronlm.bench.models import (
    FAMILY_LABEL,
    FAMILY_PRESETS,
    attention_macs_per_token,
    build_reference,
    compressed_copy,
    linear_macs_per_token,
    model_speed_markdown,
    model_speed_rows,
    parameter_bytes,
    saved_models,
    speed_model_sets,
)
from kronlm.bench.options import (
    DTYPES,
    command_line,
    common_options,
    layer_speed_options,
    model_speed_options,
    prefill_shapes,
    speed_setup,
)
from kronlm.bench.timing import Timing, calls_for, time_interleaved

__all__ = [
    "DTYPES", "FAMILY_LABEL", "FAMILY_PRESETS", "MARKDOWN_MARK", "LayerShape", "Timing", "attention_macs_per_token",
    "build_reference", "calls_for", "command_line", "common_options", "compressed_copy", "environment_info", "layer_speed_markdown",
    "layer_speed_options", "layer_speed_rows", "linear_macs_per_token", "machine_info", "machine_line", "markdown_table",
    "model_speed_markdown", "model_speed_options", "model_speed_rows", "parameter_bytes", "peak_memory", "prefill_shapes",
    "preset_layer_shapes", "reproduce_header", "reproduce_section", "saved_models", "speed_model_sets", "speed_setup", "time_interleaved", "write_markdown",
    "written_by_kronlm_markdown",
]
