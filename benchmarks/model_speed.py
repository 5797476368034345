"""Prefill / decode throughput and peak memory of dense vs compressed models: presets with random
weights, or saved folders (``--model``) against the same model merged back to dense.

    python benchmarks/model_speed.py --threads 2 [--family llama|gpt2|all] [--out FILE.md] [--plot FILE.png]
    python benchmarks/model_speed.py --threads 2 --model runs/smollm2-85 --out docs/benchmarks/model_speed_saved.md

Same options and tables as ``kronlm bench models``; also draws each family's prefill and decode
speed-up over dense beside the multiply-add ratio (``kronlm.bench.plots.model_speed_plot``) into
``--plot`` or, with ``--out``, into the PNG beside it (one file per family when there are several:
``NAME-llama.png``, ``NAME-gpt2.png``).
"""

from pathlib import Path

import click

from kronlm.bench.models import model_speed_markdown, model_speed_rows, speed_model_sets
from kronlm.bench.options import command_line, model_speed_options, prefill_shapes, speed_setup
from kronlm.bench.plots import model_speed_plot, png_beside
from kronlm.bench.markdown import reproduce_header, reproduce_section, write_markdown


@click.command()
@model_speed_options
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="PNG of the speed-ups (default with --out: beside it).")
def main(family, presets, model_paths, dense, prefill, new_tokens, prompt_tokens, threads, device, dtype, repeats, out, overwrite, plot):
    """Prefill tokens/s, decode tokens/s and peak memory, dense vs compressed, with a figure."""
    # --overwrite comes with the shared options; this script replaces --out whatever it holds.
    dev, dt = speed_setup(threads, device, dtype)
    click.echo(reproduce_header(command_line()), err=True)
    shapes = prefill_shapes(prefill)
    sections, figures = [], []
    for key, title, models, weights in speed_model_sets(family, presets, model_paths, dense, device=dev, dtype=dt):
        rows = model_speed_rows(models, prefill_shapes=shapes, prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats or 3, device=dev)
        sections.append(model_speed_markdown(rows, title=title, command=command_line(), new_tokens=new_tokens, prompt_tokens=prompt_tokens,
                                             device=dev, weights=weights))
        figures.append((key, rows, title))
        del models
    text = "\n\n".join(sections)
    text += "\n\n" + reproduce_section([command_line()]) + "\n"
    click.echo(text)
    if out:
        click.echo(f"wrote {write_markdown(text, out)}", err=True)
    if plot or out:
        base = Path(plot) if plot else png_beside(out)
        for key, rows, title in figures:
            path = base if len(figures) == 1 else base.with_name(f"{base.stem}-{key}{base.suffix}")
            click.echo(f"wrote {model_speed_plot(rows, path, title=title)}", err=True)


if __name__ == "__main__":
    main()
