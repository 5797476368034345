"""``kronlm eval MODEL_OR_DIR [--data FILE_OR_DATASET] [--tasks T1,T2] [--baseline DENSE]``: perplexity and lm-eval task scores.

A thin wrapper: per model ``kronlm.load_model_and_tokenizer``, then ``kronlm.evaluate`` (perplexity)
and ``kronlm.evaluation.run_harness`` (lm-eval tasks), printed side by side.
"""

from __future__ import annotations

import time

import click

from kronlm.cli.options import (
    FiniteFloatRange,
    data_options,
    device_option,
    perplexity_options,
    resolve_device,
)
from kronlm.compression import count_parameters
from kronlm.data import resolve_source
from kronlm.evaluation import (
    evaluate,
    harness_table,
    lambada_task,
    require_lm_eval,
    run_harness,
)
from kronlm.modeling import load_model_and_tokenizer, resolve_model_spec
from kronlm.utils import (
    WRITTEN_BY_KEY,
    check_output_file,
    write_json,
    written_by_kronlm_json,
)


@click.command("eval")
@click.argument("model")
@click.option("--data", default=None, help="Perplexity on a text file, a dataset alias (wikitext2, wikitext103) or a Hugging Face dataset name.")
@click.option("--data-config", default=None, help="Dataset config name (e.g. wikitext-2-raw-v1).")
@click.option("--tasks", default=None, help="Comma-separated lm-evaluation-harness tasks (lambada_openai, hellaswag, ...), run in this process.")
@click.option("--include-path", type=click.Path(exists=True, file_okay=False), default=None, help="Folder of extra lm-eval task YAMLs (e.g. tasks over local files).")
@click.option("--lambada-jsonl", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Offline LAMBADA: last-word accuracy and perplexity (lm-eval's lambada_openai task) on a local JSON Lines file of {\"text\": ...} lines.")
@click.option("--limit", type=FiniteFloatRange(min=0, min_open=True), default=None, help="lm-eval: documents per task (>= 1) or a fraction (< 1).")
@click.option("--num-fewshot", type=click.IntRange(min=0), default=None, help="lm-eval: few-shot examples (default: each task's own).")
@click.option("--baseline", default=None, help="Also evaluate this model (e.g. the dense original) and print both side by side.")
@data_options
@perplexity_options
@device_option
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the results to this JSON file (an existing file only when kronlm wrote it, or with --overwrite).")
@click.option("--overwrite", is_flag=True, help="Replace --json even when kronlm did not write it.")
def command(model, data, data_config, tasks, include_path, lambada_jsonl, limit, num_fewshot, baseline, data_dir, text_field, split,
            max_tokens, max_length, stride, protocol, batch_size, device, json_out, overwrite):
    """Perplexity and/or lm-eval task scores of MODEL (hub id, folder, kronlm folder, .gguf file or alias such as smollm2).

    --data DATA measures token perplexity: a text file (.txt, .raw), a JSON Lines / CSV / TSV /
    Parquet file (--text-field names the column; records are joined with a blank line), an alias
    (wikitext2, wikitext103), a dataset folder or a Hugging Face dataset id. --tasks runs
    lm-evaluation-harness in this process on the loaded model (compressed models included; the
    tasks download their data unless cached), --lambada-jsonl runs LAMBADA on a local file.
    --baseline DENSE evaluates a second model the same way and prints both side by side.
    """
    device = resolve_device(device)
    task_list = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if data is None and not task_list and lambada_jsonl is None:
        raise click.UsageError("give --data (perplexity), --tasks or --lambada-jsonl (lm-eval tasks), or several")
    if json_out:
        try:
            json_out = check_output_file(json_out, overwrite=overwrite, inputs=(model, baseline, data, lambada_jsonl, include_path),
                                         written_by_kronlm=written_by_kronlm_json, option="--json")
        except FileExistsError as exc:
            raise click.UsageError(str(exc)) from None
    harness_tasks: list = list(task_list)
    if lambada_jsonl is not None:
        harness_tasks.append(lambada_task(lambada_jsonl))  # checks the file before the slow model load
    if harness_tasks:
        require_lm_eval()
    text_source = None
    if data is not None:  # resolve the text before the slow model load, so a typo fails fast
        text_source = resolve_source(data, split=split, name=data_config, data_dir=data_dir, text_field=text_field)
    specs = {"model": model} if baseline is None else {"baseline": baseline, "model": model}
    report: dict = {WRITTEN_BY_KEY: "kronlm eval", "model": model, "baseline": baseline, "results": {}}
    perplexities, harness = {}, {}
    for label, spec in specs.items():
        source = resolve_model_spec(spec)
        t0 = time.perf_counter()
        net, tokenizer = load_model_and_tokenizer(spec, device=device)
        params = count_parameters(net)
        click.echo(f"{label}: loaded {source.description} ({params:,} params) on {device} in {time.perf_counter() - t0:.1f} s")
        if text_source is not None:
            result = evaluate(net, tokenizer, data, split=split, data_config=data_config, text_field=text_field, data_dir=data_dir,
                              max_tokens=max_tokens, max_length=max_length, stride=stride, protocol=protocol, batch_size=batch_size,
                              desc=f"{label} ppl")
            perplexities[label] = (params, result)
            click.echo(f"data: {text_source.description}")
            click.echo(f"protocol: {result.protocol_label()}")
            click.echo(
                f"perplexity {result.ppl:.4f} over {result.tokens_scored:,} tokens scored in {result.windows} windows, "
                f"{result.seconds:.1f} s ({result.tokens_per_second:,.0f} tokens/s)"
            )
        if harness_tasks:
            limit_value = None if limit is None else (int(limit) if limit >= 1 else limit)
            harness[label] = run_harness(net, tokenizer, harness_tasks, include_path=include_path, limit=limit_value,
                                         num_fewshot=num_fewshot, batch_size=batch_size)
        report["results"][label] = {"spec": spec, "params": params}
        del net
    if len(perplexities) > 1:
        click.echo("")
        click.echo(f"{'model':<10} {'params':>13} {'perplexity':>12}")
        for label, (params, result) in perplexities.items():
            click.echo(f"{label:<10} {params:>13,} {result.ppl:>12,.4f}")
    if harness:
        click.echo("")
        click.echo(harness_table(harness))
    if json_out:
        for label in specs:
            if label in perplexities:
                report["results"][label]["perplexity"] = {"data": text_source.description, **perplexities[label][1].to_dict()}
            if label in harness:
                report["results"][label]["tasks"] = harness[label].to_dict()
        if data is not None:  # MODEL's perplexity also at the top level: the layout before --tasks existed
            report.update({"data": text_source.description, "params": report["results"]["model"]["params"], **perplexities["model"][1].to_dict()})
        write_json(json_out, report)
