"""Per-layer speed of KroneckerLinear vs nn.Linear for every preset's factor shapes.

    python benchmarks/layer_speed.py --threads 2 [--tokens 1,16,512,4096] [--autotune] [--out FILE.md] [--plot FILE.png]

Same options and table as ``kronlm bench layers``; also draws the forward speed-up against tokens,
one line per factor shape (``kronlm.bench.plots.layer_speed_plot``), into ``--plot`` or, with
``--out``, into the PNG beside it (same name, ``.png``).
"""

import click

from kronlm.bench.layers import (
    layer_speed_markdown,
    layer_speed_rows,
    preset_layer_shapes,
)
from kronlm.bench.options import command_line, layer_speed_options, speed_setup
from kronlm.bench.plots import layer_speed_plot, png_beside
from kronlm.bench.markdown import reproduce_header, reproduce_section, write_markdown


@click.command()
@layer_speed_options
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="PNG of the forward speed-up (default with --out: beside it).")
def main(presets, tokens, backward, autotune, threads, device, dtype, repeats, out, overwrite, plot):
    """KroneckerLinear vs nn.Linear of the same (out, in) for every preset's factor shapes, with a figure."""
    # --overwrite comes with the shared options; this script replaces --out whatever it holds.
    dev, dt = speed_setup(threads, device, dtype)
    click.echo(reproduce_header(command_line()), err=True)
    shapes = preset_layer_shapes([p.strip() for p in presets.split(",")] if presets else None)
    rows = layer_speed_rows(shapes, [int(v) for v in tokens.split(",") if v.strip()], backward=backward, autotune=autotune, repeats=repeats or 5,
                            dtype=dt, device=dev, progress=True)
    text = layer_speed_markdown(rows, title=f"Per-layer speed, {dtype} on {dev.type}", command=command_line(), device=dev)
    text += "\n\n" + reproduce_section([command_line()]) + "\n"
    click.echo(text)
    if out:
        click.echo(f"wrote {write_markdown(text, out)}", err=True)
    if plot or out:
        path = layer_speed_plot(rows, plot or png_beside(out), title=f"KroneckerLinear vs nn.Linear, {dtype} on {dev.type}")
        click.echo(f"wrote {path}", err=True)


if __name__ == "__main__":
    main()
