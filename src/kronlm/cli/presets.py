"""``kronlm presets``: the named compression configs with their parameter counts."""

from __future__ import annotations

import click

from kronlm.compression import list_presets, preset_parameter_counts


@click.command("presets")
@click.option("--counts/--no-counts", default=True, show_default=True, help="Compute parameter counts on each reference architecture (a few seconds).")
def command(counts):
    """List the presets, computing their parameter counts from the reference configurations alone."""

    header = f"{'preset':<28} {'family':<6} {'dense':>12} {'compressed':>12} {'no LM head':>12}  {'paper':<22} description"
    click.echo(header)
    click.echo("-" * len(header))
    for preset in list_presets():
        if counts:
            c = preset_parameter_counts(preset.name)
            nums = f"{c['before']:>12,} {c['after']:>12,} {c['after_no_head']:>12,}"
        else:
            nums = f"{'':>12} {'':>12} {'':>12}"
        click.echo(f"{preset.name:<28} {preset.family:<6} {nums}  {preset.reference or '-':<22} {preset.description}")
    click.echo("dense = reference model: gpt2 = GPT-2 124M (tied), bert = BERT-base with pooler, llama = SmolLM2-135M")
