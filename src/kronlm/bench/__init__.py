"""Speed measurement: timers, peak memory, per-layer and per-model benchmarks, Markdown output."""

from kronlm.bench.layers import (
    LayerShape,
    layer_speed_markdown,
    layer_speed_rows,
    preset_layer_shapes,
)
from kronlm.bench.markdown import (
    machine_info,
    machine_line,
    markdown_table,
    write_markdown,
)
from kronlm.bench.memory import peak_memory
from kronlm.bench.models import (
    attention_macs_per_token,
    build_reference,
    compressed_copy,
    linear_macs_per_token,
    model_speed_markdown,
    model_speed_rows,
    parameter_bytes,
)
from kronlm.bench.timing import Timing, calls_for, time_interleaved

__all__ = [
    "LayerShape", "Timing", "attention_macs_per_token", "build_reference", "calls_for", "compressed_copy",
    "layer_speed_markdown", "layer_speed_rows", "linear_macs_per_token", "machine_info", "machine_line",
    "markdown_table", "model_speed_markdown", "model_speed_rows", "parameter_bytes", "peak_memory",
    "preset_layer_shapes", "time_interleaved", "write_markdown",
]
