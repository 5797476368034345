"""The options of the speed benchmarks, shared by ``kronlm bench layers|models`` and the scripts
``benchmarks/layer_speed.py`` and ``benchmarks/model_speed.py`` (which add a figure), so that a
script and the command take the same flags with the same defaults."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable

import click
import torch

from kronlm.utils import resolve_device

DTYPES = ("float32", "bfloat16", "float16")


def speed_setup(threads: int | None, device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """Apply ``--threads`` and resolve ``--device`` / ``--dtype`` of a speed benchmark.

    Args:
        threads: torch intra-op threads, or None for torch's choice.
        device: ``cpu`` or ``cuda[:N]``.
        dtype: one of :data:`DTYPES`.

    Returns:
        (device, dtype) as torch objects.

    Raises:
        click.BadParameter: a device this machine lacks (``kronlm.utils.resolve_device``).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        resolved = resolve_device(device)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--device'") from None
    return resolved, getattr(torch, dtype)


def prefill_shapes(text: str) -> list[tuple[int, int]]:
    """``--prefill`` as (batch, seq) pairs: ``"1x512,8x512"`` -> [(1, 512), (8, 512)].

    Raises:
        click.BadParameter: not comma-separated BATCHxSEQ pairs of integers >= 1.
    """
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"--prefill must look like 1x512,8x512, got {text!r}") from None
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise click.BadParameter(f"--prefill must look like 1x512,8x512, got {text!r}")
    return shapes


def command_line(default: str = "kronlm bench") -> str:
    """The running command line as a reader would type it again: ``kronlm ...`` for the console
    script, ``python script.py ...`` for a benchmark script; ``default`` when there is no argv."""
    if not sys.argv or not sys.argv[0]:
        return default
    argv = [os.path.basename(sys.argv[0]) if sys.argv[0].endswith("kronlm") else sys.argv[0], *sys.argv[1:]]
    prefix = "python " if argv[0].endswith(".py") else ""
    return prefix + " ".join(shlex.quote(a) for a in argv)


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
    """--family, --presets, --model, --dense, --prefill, --new-tokens, --prompt-tokens and :func:`common_options`."""
    fn = common_options(fn)
    fn = click.option("--dense", default=None,
                      help="Baseline of the --model folders: a hub id, folder, .gguf file or alias (default: the first folder merged back to dense).")(fn)
    fn = click.option("--model", "model_paths", multiple=True, type=click.Path(),
                      help="A saved model folder to time (repeatable) instead of the presets, e.g. the output of kronlm compress.")(fn)
    fn = click.option("--prompt-tokens", type=click.IntRange(min=1), default=8, show_default=True, help="Prompt length of the decode measurement.")(fn)
    fn = click.option("--new-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="Tokens generated in the decode measurement.")(fn)
    fn = click.option("--prefill", default="1x512,8x512", show_default=True, help="Comma-separated BATCHxSEQ prefill shapes.")(fn)
    fn = click.option("--presets", default=None, help="Comma-separated presets to compare (default: the family's list in kronlm.bench.models).")(fn)
    fn = click.option("--family", type=click.Choice(["llama", "gpt2", "all"]), default="all", show_default=True,
                      help="llama: SmolLM2-135M configuration with the Llama MLP presets; gpt2: GPT2Config() with the GPT-2 presets.")(fn)
    return fn


__all__ = ["DTYPES", "command_line", "common_options", "layer_speed_options", "model_speed_options", "prefill_shapes", "speed_setup"]
