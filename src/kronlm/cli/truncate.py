"""``kronlm truncate MODEL --layers 0,2,4,6,8,10 --out DIR``: a shallower student from teacher blocks.

Li et al., "A Short Study on Compressing Decoder-Based Language Models" (arXiv 2110.08460): keep
every other GPT-2 block ([0,2,4,6,8,10] trained best) and copy the embeddings, final norm and
head; then recover with ``kronlm distill --recipe distilgpt2 --layer-map 0,2,4,6,8,10``.
"""

from __future__ import annotations

import click

from kronlm.cli.distill import parse_index_list
from kronlm.compression import count_parameters, save_truncated
from kronlm.modeling import load_model, load_tokenizer, resolve_model_spec
from kronlm.utils import check_output_folder


@click.command("truncate")
@click.argument("model")
@click.option("--layers", required=True, help="Teacher blocks to keep, in order, e.g. 0,2,4,6,8,10.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the truncated model.")
@click.option("--overwrite", is_flag=True, help="Replace --out even when kronlm did not write it.")
def command(model, layers, out, overwrite):
    """Keep only the --layers blocks of MODEL (hub id, folder, .gguf file or alias) and save it to --out."""

    keep = parse_index_list(layers, "--layers")
    try:
        out = check_output_folder(out, overwrite=overwrite, inputs=(model,), option="--out")
    except FileExistsError as exc:
        raise click.UsageError(str(exc)) from None
    net = load_model(model)
    try:
        tokenizer = load_tokenizer(model)
    except (OSError, ValueError) as exc:
        click.echo(f"warning: no tokenizer for {model} ({str(exc).splitlines()[0]}); saving the model without one", err=True)
        tokenizer = None
    before = count_parameters(net)
    depth = net.config.num_hidden_layers
    student = save_truncated(net, keep, out, tokenizer=tokenizer, overwrite=overwrite)
    click.echo(
        f"{resolve_model_spec(model).description}: kept blocks {keep} of {depth}, "
        f"{before:,} -> {count_parameters(student):,} parameters; saved to {out}"
    )
