"""``kronlm bench``: speed of Kronecker layers and compressed models against dense.

``kronlm bench layers`` times ``KroneckerLinear`` against ``nn.Linear`` for every preset's factor
shapes; ``kronlm bench models`` times prefill, KV-cache decode and peak memory of dense and
compressed models (presets with random weights in reference configurations, or saved folders
against the same model merged back to dense). Both print a Markdown section
(machine, command, table) and with ``--out FILE.md`` also write it atomically.
"""

from __future__ import annotations

import click

from kronlm.bench import (
    MARKDOWN_MARK,
    command_line,
    layer_speed_markdown,
    layer_speed_options,
    layer_speed_rows,
    model_speed_markdown,
    model_speed_options,
    model_speed_rows,
    prefill_shapes,
    preset_layer_shapes,
    speed_model_sets,
    speed_setup,
    write_markdown,
    written_by_kronlm_markdown,
)
from kronlm.utils import check_output_file


def _setup(threads: int | None, device: str, dtype: str, out: str | None = None, overwrite: bool = False):
    if out:
        try:
            check_output_file(out, overwrite=overwrite, written_by_kronlm=written_by_kronlm_markdown, option="--out")
        except FileExistsError as exc:
            raise click.UsageError(str(exc)) from None
    return speed_setup(threads, device, dtype)


def _emit(text: str, out: str | None) -> None:
    click.echo(text)
    if out:
        click.echo(f"wrote {write_markdown(MARKDOWN_MARK + chr(10) + text, out)}", err=True)


def _int_list(value: str, name: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{name} must be comma-separated integers, got {value!r}") from None
    if not items or any(v < 1 for v in items):
        raise click.BadParameter(f"{name} must list integers >= 1, got {value!r}")
    return items


@click.group("bench")
def command():
    """Measure Kronecker layers and compressed models against dense ones (Markdown tables)."""


@command.command("layers")
@layer_speed_options
def layers_command(presets, tokens, backward, autotune, threads, device, dtype, repeats, out, overwrite):
    """KroneckerLinear vs nn.Linear of the same (out, in) for every preset's factor shapes."""
    dev, dt = _setup(threads, device, dtype, out, overwrite)
    token_counts = _int_list(tokens, "--tokens")
    shapes = preset_layer_shapes([p.strip() for p in presets.split(",")] if presets else None)
    rows = layer_speed_rows(shapes, token_counts, backward=backward, autotune=autotune, repeats=repeats or 5, dtype=dt, device=dev, progress=True)
    title = f"Per-layer speed, {dtype} on {dev.type}"
    _emit(layer_speed_markdown(rows, title=title, command=command_line(), device=dev), out)


@command.command("models")
@model_speed_options
def models_command(family, presets, model_paths, dense, prefill, new_tokens, prompt_tokens, threads, device, dtype, repeats, out, overwrite):
    """Prefill tokens/s, decode tokens/s and peak memory, dense vs compressed: presets with random
    weights, or saved folders (--model) against the same model merged back to dense."""
    dev, dt = _setup(threads, device, dtype, out, overwrite)
    shapes = prefill_shapes(prefill)
    sections = []
    for _, title, models, weights in speed_model_sets(family, presets, model_paths, dense, device=dev, dtype=dt):
        click.echo(f"bench models: {', '.join(models)}", err=True)
        rows = model_speed_rows(models, prefill_shapes=shapes, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                                repeats=repeats or 3, device=dev)
        sections.append(model_speed_markdown(rows, title=title, command=command_line(), new_tokens=new_tokens,
                                             prompt_tokens=prompt_tokens, device=dev, weights=weights))
        del models
    _emit("\n\n".join(sections), out)
