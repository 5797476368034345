"""The options of the speed benchmarks, shared by ``kronlm bench layers|models`` and the scripts
``benchmarks/layer_speed.py`` and ``benchmarks/model_speed.py`` (which add a figure), so that a
script and the command take the same flags with the same defaults."""

from __future__ import annotations

from collections.abc import Callable

import click

DTYPES = ("float32", "bfloat16", "float16")


def common_options(fn: Callable) -> Callable:
    """--threads, --device, --dtype, --repeats, --out, --overwrite."""
    fn = click.option("--overwrite", is_flag=True, help="Replace --out even when kronlm did not write it.")(fn)
    fn = click.option("--out", type=click.Path(dir_okay=False), default=None,
                      help="Also write the Markdown section to this file (atomically; an existing file only when kronlm wrote it, or with --overwrite).")(fn)
    fn = click.option("--repeats", type=click.IntRange(min=1), default=None, help="Timed rounds per measurement (median reported).")(fn)
    fn = click.option("--dtype", type=click.Choice(list(DTYPES)), default="float32", show_default=True)(fn)
    fn = click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")(fn)
    fn = click.option("--threads", type=click.IntRange(min=1), default=None, help="torch intra-op threads (default: torch's choice); printed with the table.")(fn)
    return fn


def layer_speed_options(fn: Callable) -> Callable:
    """--presets, --tokens, --backward, --autotune and :func:`common_options`."""
    fn = common_options(fn)
    fn = click.option("--autotune/--no-autotune", default=False, show_default=True, help="Also time the plan a one-time measurement picks.")(fn)
    fn = click.option("--backward/--no-backward", default=True, show_default=True, help="Also time forward+backward.")(fn)
    fn = click.option("--tokens", default="1,16,512,4096", show_default=True, help="Comma-separated token counts.")(fn)
    fn = click.option("--presets", default=None, help="Comma-separated preset names (default: all presets).")(fn)
    return fn


def model_speed_options(fn: Callable) -> Callable:
    """--family, --presets, --prefill, --new-tokens, --prompt-tokens and :func:`common_options`."""
    fn = common_options(fn)
    fn = click.option("--prompt-tokens", type=click.IntRange(min=1), default=8, show_default=True, help="Prompt length of the decode measurement.")(fn)
    fn = click.option("--new-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="Tokens generated in the decode measurement.")(fn)
    fn = click.option("--prefill", default="1x512,8x512", show_default=True, help="Comma-separated BATCHxSEQ prefill shapes.")(fn)
    fn = click.option("--presets", default=None, help="Comma-separated presets to compare (default: the family's list in kronlm.bench.models).")(fn)
    fn = click.option("--family", type=click.Choice(["llama", "gpt2", "all"]), default="all", show_default=True,
                      help="llama: SmolLM2-135M configuration with the Llama MLP presets; gpt2: GPT2Config() with the GPT-2 presets.")(fn)
    return fn


__all__ = ["DTYPES", "common_options", "layer_speed_options", "model_speed_options"]
