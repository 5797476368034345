"""``kronlm eval MODEL_OR_DIR --data FILE_OR_DATASET``: token perplexity of a dense or compressed model."""

from __future__ import annotations

import time

import click

from kronlm.cli.options import perplexity_options, protocol_label, window_length


@click.command("eval")
@click.argument("model")
@click.option("--data", required=True, help="A text file, a dataset alias (wikitext2, wikitext103) or a Hugging Face dataset name.")
@click.option("--data-config", default=None, help="Dataset config name (e.g. wikitext-2-raw-v1).")
@perplexity_options
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the result to this JSON file.")
def command(model, data, data_config, split, max_tokens, max_length, stride, protocol, batch_size, json_out):
    """Perplexity of MODEL (hub id, folder, kronlm folder, .gguf file or alias such as smollm2) on DATA."""
    import kronlm  # noqa: F401  (registers the Kronecker Auto classes)
    from kronlm.compress.report import count_parameters
    from kronlm.data.text import load_text, resolve_text_source
    from kronlm.evaluate.perplexity import perplexity_of_text
    from kronlm.models.loading import load_model_and_tokenizer, resolve_model_spec

    source = resolve_model_spec(model)
    t0 = time.perf_counter()
    net, tokenizer = load_model_and_tokenizer(model)
    click.echo(f"loaded {source.description} ({count_parameters(net):,} params) in {time.perf_counter() - t0:.1f} s")
    text_source = resolve_text_source(data, split=split, name=data_config)
    text = load_text(data, split=split, name=data_config)
    length = window_length(net, max_length)
    result = perplexity_of_text(net, tokenizer, text, max_tokens=max_tokens, max_length=length, stride=min(stride, length), protocol=protocol, batch_size=batch_size)
    click.echo(f"data: {text_source.description}")
    click.echo(f"protocol: {protocol_label(protocol, length, min(stride, length))}")
    click.echo(
        f"perplexity {result.ppl:.4f} over {result.tokens_scored:,} tokens scored in {result.windows} windows, "
        f"{result.seconds:.1f} s ({result.tokens_per_second:,.0f} tokens/s)"
    )
    if json_out:
        from kronlm.utils.io import write_json

        write_json(json_out, {"model": model, "data": text_source.description, "params": count_parameters(net), **result.to_dict()})
