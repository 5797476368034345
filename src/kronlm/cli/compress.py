"""``kronlm compress MODEL (--preset NAME | --config FILE | --budget F) --out DIR [--calibration DATA] [--eval DATA]``."""

from __future__ import annotations

import time
from pathlib import Path

import click

from kronlm.cli.options import (
    data_options,
    perplexity_options,
    protocol_label,
    window_length,
)
from kronlm.compress import CompressionConfig, count_parameters, get_preset
from kronlm.compress.calibration import calibration_input_ids
from kronlm.data.sources import resolve_source
from kronlm.data.text import load_text
from kronlm.decompose.initializers import get_initializer
from kronlm.evaluate.perplexity import perplexity_of_text
from kronlm.modeling import (
    budget_allocation,
    compress,
    compress_to_budget,
    compression_report,
    save,
)
from kronlm.modeling.loading import load_model_and_tokenizer, resolve_model_spec
from kronlm.utils.io import check_output_folder, folder_lock, write_json


@click.command("compress")
@click.argument("model")
@click.option("--preset", default=None, help="A named preset (see `kronlm presets`).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None, help="A compression config, YAML or JSON.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to save the compressed model to.")
@click.option("--eval", "eval_data", default=None, help="Also measure dense and compressed perplexity on this text file or dataset.")
@click.option("--data-config", default=None, help="Dataset config name for --eval.")
@click.option("--overwrite", is_flag=True, help="Replace --out even when it holds something other than a model.")
@data_options
@perplexity_options
@click.option("--svd", type=click.Choice(["auto", "exact", "randomized"]), default=None, help="Override the config's SVD method.")
@click.option("--init", "init_name", default=None, help="Override every target's initialiser (van_loan, van_loan_rescaled, pruning, random, activation_aware).")
@click.option("--calibration", "calibration_data", default=None, help="Text file or dataset to calibrate activation-aware inits on (e.g. wikitext2: its validation split).")
@click.option("--calibration-split", default="validation", show_default=True, help="Dataset split for --calibration.")
@click.option("--calibration-sequences", type=click.IntRange(min=1), default=128, show_default=True, help="Calibration sequences.")
@click.option("--calibration-length", type=click.IntRange(min=2), default=512, show_default=True, help="Tokens per calibration sequence.")
@click.option("--budget", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True), default=None, help="Instead of a preset: keep this fraction of the dense parameters, choosing per-module factors from measured sensitivity (needs --calibration).")
@click.option("--budget-modules", multiple=True, help="Name patterns of the modules --budget may factor (default: every linear layer but the LM head).")
@click.option("--rows", type=click.IntRange(min=0), default=12, show_default=True, help="Module rows to print from the report.")
def command(
    model, preset, config_file, out, eval_data, data_config, overwrite, data_dir, text_field, split, max_tokens, max_length, stride, protocol, batch_size, svd,
    init_name, calibration_data, calibration_split, calibration_sequences, calibration_length, budget, budget_modules, rows,
):
    """Replace MODEL's weight matrices with Kronecker products and save the result to --out.

    MODEL is a hub id, a local folder, a .gguf file or an alias (smollm2). With --eval, prints
    dense and compressed perplexity side by side with the parameter counts. With --calibration,
    the dense model is first run on that text and activation-aware inits use the statistics;
    --budget F (with --calibration) replaces the preset by a per-module choice of factors that
    keeps F of the dense parameters.
    """
    if sum(x is not None for x in (preset, config_file, budget)) != 1:
        raise click.UsageError("give exactly one of --preset NAME, --config FILE or --budget FRACTION")
    if budget is not None and calibration_data is None:
        raise click.UsageError("--budget needs --calibration DATA to measure sensitivities on")
    try:
        check_output_folder(out, overwrite=overwrite)
    except FileExistsError as exc:
        raise click.UsageError(str(exc)) from None
    # Held for the whole run: a second command writing the same --out fails at once, not after compressing.
    with folder_lock(out):
        _run(model, preset, config_file, out, eval_data, data_config, overwrite, data_dir, text_field, split, max_tokens, max_length,
             stride, protocol, batch_size, svd, init_name, calibration_data, calibration_split, calibration_sequences,
             calibration_length, budget, budget_modules, rows)


def _run(model, preset, config_file, out, eval_data, data_config, overwrite, data_dir, text_field, split, max_tokens, max_length,
         stride, protocol, batch_size, svd, init_name, calibration_data, calibration_split, calibration_sequences,
         calibration_length, budget, budget_modules, rows):
    config = None
    if budget is None:
        config = get_preset(preset) if preset else CompressionConfig.from_file(config_file)
        if svd:
            config.svd = svd
        if init_name:
            get_initializer(init_name)
            for target in config.targets:
                target.init = init_name
        needs = [t.init for t in config.targets if get_initializer(t.init).needs_calibration]
        if needs and calibration_data is None:
            raise click.UsageError(f"initialiser {needs[0]!r} needs --calibration DATA")
    calibration_text = None
    if calibration_data is not None:
        calibration_source = resolve_source(calibration_data, split=calibration_split, name=data_config, data_dir=data_dir, text_field=text_field)
        calibration_text = load_text(calibration_source)
    text = None
    if eval_data is not None:  # read the data before the slow work, so a typo fails fast
        text_source = resolve_source(eval_data, split=split, name=data_config, data_dir=data_dir, text_field=text_field)
        text = load_text(text_source)

    source = resolve_model_spec(model)
    t0 = time.perf_counter()
    net, tokenizer = load_model_and_tokenizer(model)
    load_s = time.perf_counter() - t0
    click.echo(f"loaded {source.description} ({count_parameters(net):,} params) in {load_s:.1f} s")

    results = {}
    if text is not None:
        length = window_length(net, max_length)
        ppl_kwargs = {"max_tokens": max_tokens, "max_length": length, "stride": min(stride, length), "protocol": protocol, "batch_size": batch_size}
        results["dense"] = perplexity_of_text(net, tokenizer, text, desc="dense ppl", **ppl_kwargs)

    calibration = None
    if calibration_text is not None:
        calibration = calibration_input_ids(tokenizer, calibration_text, calibration_sequences, calibration_length)
        click.echo(f"calibration: {calibration_sequences} x {calibration_length} tokens of {calibration_source.description}")
    if budget is not None:
        compress_to_budget(
            net, int(budget * count_parameters(net)), calibration, modules=list(budget_modules) or None, init=init_name or "activation_aware"
        )
        click.echo(budget_allocation(net).table(max_rows=rows))
    else:
        compress(net, config, calibration=calibration)
    report = compression_report(net)
    click.echo(report.table(max_rows=rows))
    save(net, out, tokenizer=tokenizer, overwrite=overwrite)
    click.echo(f"saved to {out}")

    if text is not None:
        results["compressed"] = perplexity_of_text(net, tokenizer, text, desc="compressed ppl", **ppl_kwargs)
        dense, comp = results["dense"], results["compressed"]
        click.echo("")
        click.echo(f"perplexity on {text_source.description}, first {dense.tokens_scored + 1:,} tokens, {protocol_label(protocol, length, ppl_kwargs['stride'])}:")
        click.echo(f"{'model':<12} {'params':>13} {'no LM head':>13} {'perplexity':>14} {'seconds':>8}")
        click.echo(f"{'dense':<12} {report.params_before:>13,} {report.params_before_no_head:>13,} {dense.ppl:>14,.2f} {dense.seconds:>8.1f}")
        click.echo(f"{'compressed':<12} {report.params_after:>13,} {report.params_after_no_head:>13,} {comp.ppl:>14,.2f} {comp.seconds:>8.1f}")
        write_json(
            Path(out) / "eval.json",
            {"data": text_source.description, "protocol": protocol, **{k: {**v.to_dict(), "params": report.params_before if k == "dense" else report.params_after} for k, v in results.items()}},
        )
