"""``kronlm compress MODEL (--preset NAME | --config FILE | --budget F | --budget-params N) --out DIR [--calibration DATA[=W] ...] [--eval DATA]``."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import click

from kronlm.cli.options import (
    FiniteFloatRange,
    data_options,
    perplexity_options,
    protocol_label,
    window_length,
)
from kronlm.compression import CompressionConfig, count_parameters, get_preset
from kronlm.compression.budget import (
    FACTOR_FAMILIES,
    BudgetAllocation,
    BudgetSettings,
    Pricing,
    check_families,
    plan_budget,
)
from kronlm.compression.calibration import (
    CalibrationSource,
    ModuleCalibration,
    calibration_mix,
)
from kronlm.compression.sequential import SequentialCalibration
from kronlm.data.blocks import build_blocks
from kronlm.data.sources import TEXT_ALIASES, resolve_source
from kronlm.data.text import load_text, load_text_for_tokens
from kronlm.decompose.initializers import get_initializer
from kronlm.distill.stages import RecoveryConfig, default_recovery_config, recover
from kronlm.evaluation.perplexity import perplexity_of_text
from kronlm.modeling import compress, compression_report, save
from kronlm.modeling.loading import load_model_and_tokenizer, resolve_model_spec
from kronlm.utils.io import (
    check_output_folder,
    claim_run_folder,
    folder_lock,
    write_json,
)

DEFAULTS = BudgetSettings()
# Calibration defaults of the command line; the benchmarks import them, so their defaults agree.
CALIBRATION_SEQUENCES = 128
CALIBRATION_LENGTH = 512
RECOVER_TOKENS = 32768
RECOVER_VAL_FRACTION = 0.0625


def recovery_dir(out: str | Path) -> Path:
    """The run folder of ``--recover`` beside the model folder ``out``: ``OUT.recovery``."""
    out = Path(out)
    return out.with_name(out.name + ".recovery")


def compress_with_budget(
    model,
    target_params: int,
    calibration_ids,
    settings: BudgetSettings = DEFAULTS,
    *,
    modules: list[str] | None = None,
    stats: dict[str, ModuleCalibration] | None = None,
    pricing: Pricing | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> BudgetAllocation:
    """The code path of ``kronlm compress --budget``: allocate, then compress ``model`` in place.

    :func:`kronlm.compression.budget.plan_budget` with ``settings`` (calibration statistics and
    pricing are computed unless given, e.g. by a benchmark that allocates several budgets from one
    calibration), then :func:`kronlm.modeling.compress` with the allocation's config, on the dense
    statistics or, with ``settings.sequential``, a :class:`SequentialCalibration` on the same ids.
    The allocation is attached to ``model.compression_report`` (and so saved in
    ``kronlm_compression.json``).

    Args:
        model: dense causal LM (changed in place).
        target_params: parameters allowed for the whole model.
        calibration_ids: (num_sequences, seq_len) token ids.
        settings: ``BudgetSettings``; the CLI's flags build one, the defaults are ``DEFAULTS``.
        modules: name patterns of the candidate modules (default: every linear layer but the head).
        stats, pricing: precomputed ``budget_calibration`` / ``price_modules`` results for the
            same ids, modules and settings.
        batch_size: sequences per forward pass while calibrating.
        progress: tqdm bars.

    Returns:
        The ``BudgetAllocation``.

    Raises:
        ValueError: see ``plan_budget`` and ``compress``.
    """
    config, stats, allocation = plan_budget(
        model, target_params, calibration_ids, modules=modules, settings=settings, batch_size=batch_size, stats=stats,
        options=pricing, progress=progress,
    )
    calibration = stats
    if settings.sequential:
        names = [c.name for c in allocation.choices if c.option.family != "dense"]
        calibration = SequentialCalibration(model, names, calibration_ids, batch_size=batch_size, target=settings.sequential, progress=progress)
    compress(model, config, calibration=calibration, progress=progress)
    compression_report(model).allocation = allocation
    return allocation


def _families(ctx, param, value):
    try:
        return check_families(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _sources(ctx, param, value):
    try:
        return [CalibrationSource.parse(v) for v in value]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


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
@click.option("--svd-solver", type=click.Choice(["auto", "exact", "randomized"]), default=None,
              help="Override the config's SVD solver of the nearest Kronecker product (not the svd factor family of --families).")
@click.option("--init", "init_name", default=None, help="Override every target's initialiser (van_loan, van_loan_rescaled, pruning, random, activation_aware).")
@click.option("--calibration", "calibration_data", multiple=True, callback=_sources,
              help="Calibration text: a text file or dataset (e.g. wikitext2: its --calibration-split), or `self` for sequences sampled "
                   "from the model itself (LLM-QAT's data-free calibration). Repeat with SPEC=WEIGHT to mix sources, "
                   "e.g. --calibration wikitext2=0.5 --calibration self=0.5.")
@click.option("--calibration-split", default="validation", show_default=True, help="Dataset split of the --calibration datasets.")
@click.option("--calibration-field", default=None, help="Column / field of --calibration files (default: --text-field; WikiText aliases always read `text`).")
@click.option("--calibration-sequences", type=click.IntRange(min=1), default=CALIBRATION_SEQUENCES, show_default=True, help="Calibration sequences (all sources together).")
@click.option("--calibration-length", type=click.IntRange(min=2), default=CALIBRATION_LENGTH, show_default=True, help="Tokens per calibration sequence.")
@click.option("--calibration-seed", type=int, default=None, help="Seed: data sources give blocks at seeded random positions instead of their first blocks; `self` samples with it (default 0).")
@click.option("--budget", type=FiniteFloatRange(min=0, max=1, min_open=True, max_open=True), default=None, help="Instead of a preset: keep this fraction of the dense parameters, choosing per-module factors from measured sensitivity (needs --calibration).")
@click.option("--budget-params", type=click.IntRange(min=1), default=None, help="Like --budget, with an absolute parameter count for the whole model.")
@click.option("--budget-modules", multiple=True, help="Name patterns of the modules a budget may factor (default: every linear layer but the LM head).")
@click.option("--families", default=",".join(FACTOR_FAMILIES), show_default=True, callback=_families,
              help=f"Factor families a budget may choose, comma-separated, from {', '.join(FACTOR_FAMILIES)} (dense is always one).")
@click.option("--sensitivity-sequences", type=click.IntRange(min=0), default=DEFAULTS.sensitivity_sequences, show_default=True,
              help="Calibration sequences of the budget's sensitivity (backward) pass; 0 prices by relative output error.")
@click.option("--check-rounds", type=click.IntRange(min=0), default=DEFAULTS.check_rounds, show_default=True,
              help="Rounds of fitting the chosen factors, measuring their output error and allocating again.")
@click.option("--sequential-calibration", type=click.Choice(["off", "output", "weight"]), default="off", show_default=True,
              help="Fit each block on statistics of the partially compressed model (GPTQ order): `output` fits to the dense "
                   "model's outputs, `weight` to W under the compressed model's inputs.")
@click.option("--recover", "recover_data", default=None,
              help="After compressing, recover the student against the dense model on this training text (e.g. wikitext2: its "
                   "train split online, the local validation split offline) in stages: local reconstruction, block-wise, then "
                   "end-to-end distillation; the run folder is OUT.recovery and OUT holds the recovered model.")
@click.option("--recover-tokens", type=click.IntRange(min=2), default=RECOVER_TOKENS, show_default=True,
              help="Tokens of --recover text used (the last 1/16 held out for validation).")
@click.option("--recover-config", type=click.Path(dir_okay=False), default=None,
              help="A recovery config for --recover: stages (defaults + stages) or one training config "
                   "(default: the packaged recipe, a copy of configs/recover.yaml).")
@click.option("--recover-minutes", type=FiniteFloatRange(min=0, min_open=True), default=None,
              help="Wall-clock budget of the whole recovery: the stages' max_minutes are scaled to add up to it.")
@click.option("--rows", type=click.IntRange(min=0), default=12, show_default=True, help="Module rows to print from the report.")
def command(
    model, preset, config_file, out, eval_data, data_config, overwrite, data_dir, text_field, split, max_tokens, max_length, stride, protocol, batch_size, svd_solver,
    init_name, calibration_data, calibration_split, calibration_field, calibration_sequences, calibration_length, calibration_seed, budget,
    budget_params, budget_modules, families, sensitivity_sequences, check_rounds, sequential_calibration, recover_data, recover_tokens,
    recover_config, recover_minutes, rows,
):
    """Replace MODEL's weight matrices with Kronecker products and save the result to --out.

    MODEL is a hub id, a local folder, a .gguf file or an alias (smollm2). With --eval, prints
    dense and compressed perplexity side by side with the parameter counts. With --calibration,
    the dense model is first run on that text and activation-aware inits use the statistics;
    --budget F / --budget-params N (with --calibration) replaces the preset by a per-module choice
    of family and factors (truncated SVD, Kronecker products, Kronecker + low-rank) that keeps F
    of the dense parameters / N parameters.
    """
    if sum(x is not None for x in (preset, config_file, budget, budget_params)) != 1:
        raise click.UsageError("give exactly one of --preset NAME, --config FILE or --budget FRACTION (or --budget-params N)")
    budgeted = budget is not None or budget_params is not None
    if budgeted and not calibration_data:
        raise click.UsageError("--budget needs --calibration DATA to measure sensitivities on")
    inputs = (model, config_file, eval_data, recover_data, recover_config, *(item.spec for item in calibration_data))
    try:
        out = check_output_folder(out, overwrite=overwrite, inputs=inputs, option="--out")
        if recover_data is not None:
            check_output_folder(recovery_dir(out), inputs=inputs, kind="run", option="--recover's run folder")
    except FileExistsError as exc:
        raise click.UsageError(str(exc)) from None
    settings = None
    if budgeted:
        try:
            settings = BudgetSettings(families=families, sensitivity_sequences=sensitivity_sequences, check_rounds=check_rounds,
                                      init=init_name or DEFAULTS.init, sequential=None if sequential_calibration == "off" else sequential_calibration)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    recovery = None
    if recover_data is not None:
        try:
            stages = RecoveryConfig.from_file(recover_config) if recover_config else default_recovery_config()
            if recover_minutes:
                stages = stages.with_budget(recover_minutes)
        except (ValueError, FileNotFoundError) as exc:
            raise click.BadParameter(str(exc), param_hint="--recover-config") from None
        sizes = {s.block_size for s in stages.stages}
        if len(sizes) > 1:
            raise click.BadParameter(f"the recovery's stages use block sizes {sorted(sizes)}; they share one set of training "
                                     "blocks, so give them one block_size", param_hint="--recover-config")
        resolve_source(recover_data, split="train", name=data_config, data_dir=data_dir, text_field=text_field)
        recovery = (stages, recover_data, recover_tokens)
    # Held for the whole run: a second command writing the same --out fails at once, not after compressing.
    with folder_lock(out):
        _run(model, preset, config_file, out, eval_data, data_config, overwrite, data_dir, text_field, split, max_tokens, max_length,
             stride, protocol, batch_size, svd_solver, init_name, calibration_data, calibration_split, calibration_field or text_field,
             calibration_sequences, calibration_length, calibration_seed, budget, budget_params, budget_modules, settings, recovery, rows,
             inputs)


def _run(model, preset, config_file, out, eval_data, data_config, overwrite, data_dir, text_field, split, max_tokens, max_length,
         stride, protocol, batch_size, svd_solver, init_name, calibration_data, calibration_split, calibration_field, calibration_sequences,
         calibration_length, calibration_seed, budget, budget_params, budget_modules, settings, recovery, rows, inputs):
    config = None
    if settings is None:
        config = get_preset(preset) if preset else CompressionConfig.from_file(config_file)
        if svd_solver:
            config.svd_solver = svd_solver
        if init_name:
            get_initializer(init_name)
            for target in config.targets:
                target.init = init_name
        needs = [t.init for t in config.targets if get_initializer(t.init).needs_calibration]
        if needs and not calibration_data:
            raise click.UsageError(f"initialiser {needs[0]!r} needs --calibration DATA")
    for item in calibration_data:  # resolve the data before the slow work, so a typo fails fast
        if item.spec != "self":
            resolve_source(item.spec, split=calibration_split, name=data_config, data_dir=data_dir,
                           text_field="text" if item.spec in TEXT_ALIASES else calibration_field)
    text = None
    if eval_data is not None:
        text_source = resolve_source(eval_data, split=split, name=data_config, data_dir=data_dir, text_field=text_field)
        text = load_text(text_source) if max_tokens is None else ""  # with --max-tokens: read once the tokenizer is known

    source = resolve_model_spec(model)
    t0 = time.perf_counter()
    net, tokenizer = load_model_and_tokenizer(model)
    load_s = time.perf_counter() - t0
    click.echo(f"loaded {source.description} ({count_parameters(net):,} params) in {load_s:.1f} s")
    if recovery is not None:  # tokenised before the slow work, so a corpus too small fails at once
        stages, recover_data, recover_tokens = recovery
        try:
            blocks = build_blocks(recover_data, tokenizer, block_size=stages.stages[0].block_size, val_fraction=RECOVER_VAL_FRACTION,
                                  max_tokens=recover_tokens, min_tokens=recover_tokens, name=data_config, data_dir=data_dir,
                                  text_field=text_field)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--recover / --recover-tokens") from None
        recovery = (stages, blocks, recover_data, recover_tokens)

    results = {}
    if text is not None:
        if max_tokens is not None:
            text = load_text_for_tokens(text_source, tokenizer, max_tokens)
        length = window_length(net, max_length)
        ppl_kwargs = {"max_tokens": max_tokens, "max_length": length, "stride": min(stride, length), "protocol": protocol, "batch_size": batch_size}
        results["dense"] = perplexity_of_text(net, tokenizer, text, desc="dense ppl", **ppl_kwargs)

    # The dense model is the teacher of --recover; compressing changes ``net`` in place.
    teacher = copy.deepcopy(net) if recovery is not None else None
    calibration = None
    if calibration_data:
        try:
            calibration, described = calibration_mix(
                net, tokenizer, list(calibration_data), calibration_sequences, calibration_length, seed=calibration_seed,
                split=calibration_split, data_dir=data_dir, text_field=calibration_field,
            )
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        click.echo(f"calibration: {described}")
    if settings is not None:
        target = budget_params if budget_params is not None else int(budget * count_parameters(net))
        try:
            allocation = compress_with_budget(net, target, calibration, settings, modules=list(budget_modules) or None)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        click.echo(allocation.table(max_rows=rows))
    else:
        compress(net, config, calibration=calibration)
    report = compression_report(net)
    click.echo(report.table(max_rows=rows))
    if recovery is not None:
        if text is not None:  # the zero-shot student, for the side-by-side table
            results["compressed"] = perplexity_of_text(net, tokenizer, text, desc="compressed ppl", **ppl_kwargs)
        _recover(net, teacher, tokenizer, recovery, out, data_config, data_dir, text_field)
        del teacher
    save(net, out, tokenizer=tokenizer, overwrite=overwrite, inputs=inputs)
    click.echo(f"saved to {out}")

    if text is not None:
        final = "recovered" if recovery is not None else "compressed"
        results[final] = perplexity_of_text(net, tokenizer, text, desc=f"{final} ppl", **ppl_kwargs)
        dense = results["dense"]
        click.echo("")
        click.echo(f"perplexity on {text_source.description}, first {dense.tokens_scored + 1:,} tokens, {protocol_label(protocol, length, ppl_kwargs['stride'])}:")
        click.echo(f"{'model':<12} {'params':>13} {'no LM head':>13} {'perplexity':>14} {'seconds':>8}")
        click.echo(f"{'dense':<12} {report.params_before:>13,} {report.params_before_no_head:>13,} {dense.ppl:>14,.2f} {dense.seconds:>8.1f}")
        for name in ("compressed", "recovered"):
            if name in results:
                r = results[name]
                click.echo(f"{name:<12} {report.params_after:>13,} {report.params_after_no_head:>13,} {r.ppl:>14,.2f} {r.seconds:>8.1f}")
        write_json(
            Path(out) / "eval.json",
            {"data": text_source.description, "protocol": protocol, **{k: {**v.to_dict(), "params": report.params_before if k == "dense" else report.params_after} for k, v in results.items()}},
        )


def _recover(student, teacher, tokenizer, recovery, out, data_config, data_dir, text_field) -> None:
    """Staged recovery of ``student`` (in place) against ``teacher``, as ``kronlm distill --config`` with stages."""
    config, blocks, data, max_tokens = recovery
    block_size = config.stages[0].block_size
    run_dir = claim_run_folder(recovery_dir(out))
    plan = " -> ".join(f"{s.mode}" + (f" ({s.max_minutes:.1f} min)" if s.max_minutes else "") for s in config.stages)
    click.echo(f"recovery: {blocks.source}; {blocks.train.shape[0]:,} training and {blocks.val.shape[0]:,} validation blocks "
               f"of {block_size} tokens; {plan} -> {run_dir}")
    settings = {"--recover": str(data), "--recover-tokens": max_tokens, "--data-config": data_config, "--text-field": text_field}
    result = recover(student, teacher, blocks, config, run_dir, tokenizer=tokenizer, run_settings=settings)
    for stage in result.stages:
        before = "-" if stage.val_ppl_before is None else f"{stage.val_ppl_before:,.2f}"
        after = "-" if stage.val_ppl_after is None else f"{stage.val_ppl_after:,.2f}"
        click.echo(f"  stage {stage.index} {stage.mode:<10} {stage.seconds:>6.0f} s  validation perplexity {before} -> {after}")
    click.echo(f"recovered in {result.seconds:.0f} s; kept stage {result.chosen} (validation perplexity {result.val_ppl:,.2f})"
               if result.val_ppl is not None else f"recovered in {result.seconds:.0f} s")
