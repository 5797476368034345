"""``kronlm compress MODEL (--preset NAME | --config FILE | --budget F | --budget-params N) --out DIR [--calibration DATA[=W] ...] [--eval DATA]``.

A thin wrapper: the flags become a :class:`CompressJob` (a ``CompressionConfig`` or a
``BudgetConfig``, the calibration, the optional recovery and evaluation), and :func:`run` calls the
library in pipeline order: ``kronlm.load_model_and_tokenizer`` -> ``kronlm.evaluate`` (dense) ->
``kronlm.compress`` -> ``kronlm.recover`` -> ``kronlm.save`` -> ``kronlm.evaluate``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import click

from kronlm.cli.compress_resume import check_resumable, compression_settings, load_student, save_student
from kronlm.cli.options import FiniteFloatRange, data_options, perplexity_options, resolve_device
from kronlm.compression import (
    DEFAULT_CALIBRATION_LENGTH,
    DEFAULT_CALIBRATION_SEQUENCES,
    FACTOR_FAMILIES,
    BudgetConfig,
    CalibrationSource,
    CompressionConfig,
    calibration_mix,
    check_families,
    count_parameters,
    get_preset,
)
from kronlm.compression.budget import max_macs_text, parse_max_macs
from kronlm.data import TEXT_ALIASES, build_blocks, resolve_source
from kronlm.decompose import get_initializer
from kronlm.distill import (
    DEFAULT_RECOVER_TOKENS,
    RECOVER_VAL_FRACTION,
    RecoveryConfig,
    default_recovery_config,
    recover,
    recovery_folder,
)
from kronlm.evaluation import evaluate, protocol_label, window_length
from kronlm.modeling import (
    budget_allocation,
    compress,
    compression_report,
    load_model_and_tokenizer,
    resolve_model_spec,
    save,
)
from kronlm.utils import check_output_folder, claim_run_folder, folder_lock, write_json

DEFAULTS = BudgetConfig()


@dataclass
class Evaluation:
    """``--eval``: the text and protocol of the side-by-side perplexities."""

    data: str
    split: str
    max_tokens: int | None
    max_length: int
    stride: int
    protocol: str
    batch_size: int


@dataclass
class Recovery:
    """``--recover``: the stages, the training text and how much of it."""

    config: RecoveryConfig
    data: str
    tokens: int


@dataclass
class CompressJob:
    """One ``kronlm compress`` run, from its flags (checked before any slow work)."""

    model: str
    out: Path
    config: CompressionConfig | BudgetConfig | None  # None: the preset or file is read inside the lock
    preset: str | None
    config_file: str | None
    svd_solver: str | None
    init_name: str | None
    calibration: list[CalibrationSource]
    calibration_split: str
    calibration_field: str
    calibration_sequences: int
    calibration_length: int
    calibration_seed: int | None
    evaluation: Evaluation | None
    recovery: Recovery | None
    data_config: str | None
    data_dir: Path | None
    text_field: str
    overwrite: bool
    rows: int
    inputs: tuple
    resume: bool = False
    device: str = "cpu"


def _families(ctx, param, value):
    try:
        return check_families(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _max_macs(ctx, param, value):
    try:
        return parse_max_macs(value)
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
@click.option("--calibration-sequences", type=click.IntRange(min=1), default=DEFAULT_CALIBRATION_SEQUENCES, show_default=True, help="Calibration sequences (all sources together).")
@click.option("--calibration-length", type=click.IntRange(min=2), default=DEFAULT_CALIBRATION_LENGTH, show_default=True, help="Tokens per calibration sequence.")
@click.option("--calibration-seed", type=int, default=None, help="Seed: data sources give blocks at seeded random positions instead of their first blocks; `self` samples with it (default 0).")
@click.option("--budget", type=FiniteFloatRange(min=0, max=1, min_open=True, max_open=True), default=None, help="Instead of a preset: keep this fraction of the dense parameters, choosing per-module factors from measured sensitivity on the --calibration text (default: samples of the model itself).")
@click.option("--budget-params", type=click.IntRange(min=1), default=None, help="Like --budget, with an absolute parameter count for the whole model.")
@click.option("--budget-modules", multiple=True, help="Name patterns of the modules a budget may factor (default: every linear layer of the base model: no LM head, no task head).")
@click.option("--families", default=",".join(FACTOR_FAMILIES), show_default=True, callback=_families,
              help=f"Factor families a budget may choose, comma-separated, from {', '.join(FACTOR_FAMILIES)} (dense is always one).")
@click.option("--sensitivity-sequences", type=click.IntRange(min=0), default=DEFAULTS.sensitivity_sequences, show_default=True,
              help="Calibration sequences of the budget's sensitivity (backward) pass; 0 prices by relative output error.")
@click.option("--check-rounds", type=click.IntRange(min=0), default=DEFAULTS.check_rounds, show_default=True,
              help="Rounds of fitting the chosen factors, measuring their output error and allocating again.")
@click.option("--subset-check/--no-subset-check", default=DEFAULTS.subset_check, show_default=True,
              help="With more than one family: also allocate the budget with each family alone and keep the allocation "
                   "with the lowest NLL on held-out calibration sequences.")
@click.option("--held-out-sequences", type=click.IntRange(min=1), default=DEFAULTS.held_out_sequences, show_default=True,
              help="Calibration sequences the subset check holds out, read beyond --calibration-sequences.")
@click.option("--tie-break-modules", type=click.IntRange(min=0), default=DEFAULTS.tie_break_modules, show_default=True,
              help="After the subset check: try swapping at most this many modules to a close option of another family "
                   "(no larger) and keep each swap that lowers the held-out NLL; 0 turns it off.")
@click.option("--tie-break-margin", type=FiniteFloatRange(min=0), default=DEFAULTS.tie_break_margin, show_default=True,
              help="An alternative is close when its estimated NLL increase is at most (1 + margin) times the chosen one's.")
@click.option("--max-macs", callback=_max_macs, default=max_macs_text(DEFAULTS.max_macs), show_default=True, metavar="X|none",
              help="Offer only factorisations needing at most this many multiply-adds per token, as a multiple of the dense "
                   "matrix's (1.0: no factored module slower than dense in multiply-adds); `none`: no cap.")
@click.option("--sequential-calibration", type=click.Choice(["off", "output", "weight"]), default=DEFAULTS.sequential or "off",
              show_default=True,
              help="Fit each block on statistics of the partially compressed model (GPTQ order): `weight` fits W under the "
                   "compressed model's inputs, `output` the dense model's outputs; `off` fits on the dense model's statistics "
                   "(faster: no pass of the partly compressed model).")
@click.option("--recover", "recover_data", default=None,
              help="After compressing, recover the student against the dense model on this training text (e.g. wikitext2: its "
                   "train split online, the local validation split offline) in stages: local reconstruction, block-wise, then "
                   "end-to-end distillation; the run folder is OUT.recovery and OUT holds the recovered model.")
@click.option("--recover-tokens", type=click.IntRange(min=2), default=DEFAULT_RECOVER_TOKENS, show_default=True,
              help="Tokens of --recover text used (the last 1/16 held out for validation).")
@click.option("--recover-config", type=click.Path(dir_okay=False), default=None,
              help="A recovery config for --recover: stages (defaults + stages) or one training config "
                   "(default: the packaged recipe, a copy of configs/recover.yaml).")
@click.option("--recover-minutes", type=FiniteFloatRange(min=0, min_open=True), default=None,
              help="Wall-clock budget of the whole recovery: the stages' max_minutes are scaled to add up to it.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted --recover: the compressed student saved in OUT.recovery is loaded instead of "
                   "compressing again, finished stages are kept and the interrupted one continues from its checkpoints "
                   "(the same command otherwise).")
@click.option("--rows", type=click.IntRange(min=0), default=12, show_default=True, help="Module rows to print from the report.")
@click.option("--device", default="auto", show_default=True,
              help="Where the model's passes run (calibration, sensitivity, evaluation): auto (a GPU when one is visible, else "
                   "the CPU), cpu, cuda, cuda:N. Factor fits run on the CPU beside the calibration statistics; --recover trains "
                   "where Accelerate puts it (a GPU when there is one).")
def command(model, preset, config_file, out, eval_data, data_config, overwrite, data_dir, text_field, split, max_tokens, max_length,
            stride, protocol, batch_size, svd_solver, init_name, calibration_data, calibration_split, calibration_field,
            calibration_sequences, calibration_length, calibration_seed, budget, budget_params, budget_modules, families,
            sensitivity_sequences, check_rounds, subset_check, held_out_sequences, tie_break_modules, tie_break_margin, max_macs, sequential_calibration,
            recover_data, recover_tokens, recover_config, recover_minutes,
            resume, rows, device):
    """Replace MODEL's weight matrices with Kronecker products and save the result to --out.

    MODEL is a hub id, a local folder, a .gguf file or an alias (smollm2). With --eval, prints
    dense and compressed perplexity side by side with the parameter counts. With --calibration,
    the dense model is first run on that text and activation-aware inits use the statistics;
    --budget F / --budget-params N (calibrated on --calibration, by default on the model's own
    samples) replaces the preset by a per-module choice
    of family and factors (truncated SVD, Kronecker products, Kronecker + low-rank) that keeps F
    of the dense parameters / N parameters. The model's passes (calibration, evaluation) run on
    --device; the factor fits run on the CPU, beside the calibration statistics.
    """
    device = resolve_device(device)
    if sum(x is not None for x in (preset, config_file, budget, budget_params)) != 1:
        raise click.UsageError("give exactly one of --preset NAME, --config FILE or --budget FRACTION (or --budget-params N)")
    budgeted = budget is not None or budget_params is not None
    if budgeted and not calibration_data:
        # Without text of the served domain, the model's own samples: they priced the allocation best
        # for text that no calibration source resembled (docs/compression.md, "Calibration text": measured on the 80 % Pareto point).
        calibration_data = [CalibrationSource.parse("self")]
        click.echo("calibration: none given, so sequences sampled from the model itself (`--calibration self`); "
                   "text of the domain the model will serve does better on that domain")
    inputs = (model, config_file, eval_data, recover_data, recover_config, *(item.spec for item in calibration_data))
    try:
        out = check_output_folder(out, overwrite=overwrite, inputs=inputs, option="--out")
        if recover_data is not None:
            check_output_folder(recovery_folder(out), inputs=inputs, kind="run", option="--recover's run folder")
    except FileExistsError as exc:
        raise click.UsageError(str(exc)) from None
    if recover_data is not None:
        check_resumable(recovery_folder(out), resume)
    elif resume:
        raise click.UsageError("--resume continues an interrupted --recover; this command has no --recover")
    config = None
    if budgeted:
        try:
            config = BudgetConfig(target_fraction=budget, target_params=budget_params, modules=list(budget_modules) or None,
                                  families=families, sensitivity_sequences=sensitivity_sequences, check_rounds=check_rounds,
                                  subset_check=subset_check, held_out_sequences=held_out_sequences,
                                  tie_break_modules=tie_break_modules, tie_break_margin=tie_break_margin, max_macs=max_macs,
                                  init=init_name or DEFAULTS.init, sequential=None if sequential_calibration == "off" else sequential_calibration)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    recovery = None
    if recover_data is not None:
        recovery = Recovery(_recovery_config(recover_config, recover_minutes), recover_data, recover_tokens)
        resolve_source(recover_data, split="train", name=data_config, data_dir=data_dir, text_field=text_field)
    evaluation = None if eval_data is None else Evaluation(eval_data, split, max_tokens, max_length, stride, protocol, batch_size)
    job = CompressJob(model, out, config, preset, config_file, svd_solver, init_name, list(calibration_data), calibration_split,
                      calibration_field or text_field, calibration_sequences, calibration_length, calibration_seed, evaluation, recovery,
                      data_config, data_dir, text_field, overwrite, rows, inputs, resume, device)
    # Held for the whole run: a second command writing the same --out fails at once, not after compressing.
    with folder_lock(out):
        run(job)


def _recovery_config(path: str | None, minutes: float | None) -> RecoveryConfig:
    """The stages of ``--recover``: ``--recover-config`` or the packaged recipe, scaled to ``--recover-minutes``."""
    try:
        stages = RecoveryConfig.from_file(path) if path else default_recovery_config()
        if minutes:
            stages = stages.with_budget(minutes)
    except (ValueError, FileNotFoundError) as exc:
        raise click.BadParameter(str(exc), param_hint="--recover-config") from None
    sizes = {s.block_size for s in stages.stages}
    if len(sizes) > 1:
        raise click.BadParameter(f"the recovery's stages use block sizes {sorted(sizes)}; they share one set of training "
                                 "blocks, so give them one block_size", param_hint="--recover-config")
    return stages


def run(job: CompressJob) -> None:
    """The pipeline of one ``kronlm compress`` (module docstring), printing as it goes."""
    config = job.config if job.config is not None else _preset_or_file(job)
    _check_inputs(job)
    source = resolve_model_spec(job.model)
    t0 = time.perf_counter()
    net, tokenizer = load_model_and_tokenizer(job.model, device=job.device)
    click.echo(f"loaded {source.description} ({count_parameters(net):,} params) on {job.device} in {time.perf_counter() - t0:.1f} s")
    blocks = _recovery_blocks(job, tokenizer) if job.recovery is not None else None
    results = {}
    if job.evaluation is not None:
        results["dense"] = _perplexity(net, tokenizer, job, "dense")
    settings = compression_settings(job, config) if job.recovery is not None else None
    if job.resume:
        teacher, net = net, load_student(recovery_folder(job.out), settings).to(job.device)
        click.echo(compression_report(net).table(max_rows=job.rows))
    else:
        # The dense model is the teacher of --recover; compressing changes ``net`` in place.
        teacher = copy.deepcopy(net) if job.recovery is not None else None
        _compress(net, tokenizer, config, job)
        if job.recovery is not None:
            save_student(net, tokenizer, recovery_folder(job.out), settings)
    if job.recovery is not None:
        if job.evaluation is not None:  # the zero-shot student, for the side-by-side table
            results["compressed"] = _perplexity(net, tokenizer, job, "compressed")
        _recover(net, teacher, tokenizer, blocks, job)
        del teacher
    save(net, job.out, tokenizer=tokenizer, overwrite=job.overwrite, inputs=job.inputs)
    click.echo(f"saved to {job.out}")
    if job.evaluation is not None:
        final = "recovered" if job.recovery is not None else "compressed"
        results[final] = _perplexity(net, tokenizer, job, final)
        _print_perplexities(net, job, results)


def _preset_or_file(job: CompressJob) -> CompressionConfig:
    """The ``--preset`` or ``--config`` config with ``--svd-solver`` and ``--init`` applied."""
    config = get_preset(job.preset) if job.preset else CompressionConfig.from_file(job.config_file)
    if job.svd_solver:
        config.svd_solver = job.svd_solver
    if job.init_name:
        get_initializer(job.init_name)
        for target in config.targets:
            target.init = job.init_name
    needs = [t.init for t in config.targets if get_initializer(t.init).needs_calibration]
    if needs and not job.calibration:
        raise click.UsageError(f"initialiser {needs[0]!r} needs --calibration DATA")
    return config


def _check_inputs(job: CompressJob) -> None:
    """Resolve the calibration and evaluation data before the slow work, so a typo fails fast."""
    for item in job.calibration:
        if item.spec != "self":
            resolve_source(item.spec, split=job.calibration_split, name=job.data_config, data_dir=job.data_dir,
                           text_field="text" if item.spec in TEXT_ALIASES else job.calibration_field)
    if job.evaluation is not None:
        resolve_source(job.evaluation.data, split=job.evaluation.split, name=job.data_config, data_dir=job.data_dir,
                       text_field=job.text_field)


def _recovery_blocks(job: CompressJob, tokenizer):
    """The training blocks of ``--recover``, tokenised before the slow work so that a corpus too
    small fails at once."""
    recovery = job.recovery
    try:
        return build_blocks(recovery.data, tokenizer, block_size=recovery.config.stages[0].block_size, val_fraction=RECOVER_VAL_FRACTION,
                            max_tokens=recovery.tokens, min_tokens=recovery.tokens, name=job.data_config, data_dir=job.data_dir,
                            text_field=job.text_field)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--recover / --recover-tokens") from None


def _perplexity(net, tokenizer, job: CompressJob, label: str):
    e = job.evaluation
    return evaluate(net, tokenizer, e.data, split=e.split, data_config=job.data_config, text_field=job.text_field, data_dir=job.data_dir,
                    max_tokens=e.max_tokens, max_length=e.max_length, stride=e.stride, protocol=e.protocol, batch_size=e.batch_size,
                    desc=f"{label} ppl")


def _compress(net, tokenizer, config: CompressionConfig | BudgetConfig, job: CompressJob) -> None:
    """Calibration ids (when ``--calibration`` is given), then ``kronlm.compress``; prints the
    allocation of a budget and the compression report."""
    ids = None
    if job.calibration:
        # The subset check's held-out sequences come on top of the ones the budget is priced on.
        held_out = config.held_out_sequences if isinstance(config, BudgetConfig) and config.checks_subsets else 0
        try:
            ids, described = calibration_mix(
                net, tokenizer, job.calibration, job.calibration_sequences + held_out, job.calibration_length, seed=job.calibration_seed,
                split=job.calibration_split, data_dir=job.data_dir, text_field=job.calibration_field,
            )
        except ValueError as exc:
            note = (f" ({job.calibration_sequences} --calibration-sequences + {held_out} --held-out-sequences of the budget's "
                    "subset check)") if held_out else ""
            raise click.UsageError(f"{exc}{note}") from None
        click.echo(f"calibration: {described}" + (f"; the last {held_out} held out for the subset check" if held_out else ""))
    if isinstance(config, BudgetConfig):
        try:
            compress(net, config, calibration=ids)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        click.echo(budget_allocation(net).table(max_rows=job.rows))
    else:
        compress(net, config, calibration=ids)
    click.echo(compression_report(net).table(max_rows=job.rows))


def _recover(student, teacher, tokenizer, blocks, job: CompressJob) -> None:
    """``kronlm.recover`` of ``student`` (in place) against ``teacher`` in ``OUT.recovery``."""
    config = job.recovery.config
    run_dir = claim_run_folder(recovery_folder(job.out))
    plan = " -> ".join(f"{s.mode}" + (f" ({s.max_minutes:.1f} min)" if s.max_minutes else "") for s in config.stages)
    click.echo(f"recovery: {blocks.source}; {blocks.train.shape[0]:,} training and {blocks.val.shape[0]:,} validation blocks "
               f"of {config.stages[0].block_size} tokens; {plan} -> {run_dir}")
    settings = {"--recover": str(job.recovery.data), "--recover-tokens": job.recovery.tokens, "--data-config": job.data_config,
                "--text-field": job.text_field}
    result = recover(student, teacher, blocks, config, run_dir, resume=job.resume, tokenizer=tokenizer, run_settings=settings)
    for stage in result.stages:
        before = "-" if stage.val_ppl_before is None else f"{stage.val_ppl_before:,.2f}"
        after = "-" if stage.val_ppl_after is None else f"{stage.val_ppl_after:,.2f}"
        click.echo(f"  stage {stage.index} {stage.mode:<10} {stage.seconds:>6.0f} s  validation perplexity {before} -> {after}")
    click.echo(f"recovered in {result.seconds:.0f} s; kept stage {result.chosen} (validation perplexity {result.val_ppl:,.2f})"
               if result.val_ppl is not None else f"recovered in {result.seconds:.0f} s")


def _print_perplexities(net, job: CompressJob, results: dict) -> None:
    """The side-by-side table of ``--eval`` and ``OUT/eval.json``."""
    e, report = job.evaluation, compression_report(net)
    dense = results["dense"]
    description = resolve_source(e.data, split=e.split, name=job.data_config, data_dir=job.data_dir, text_field=job.text_field).description
    length = window_length(net, e.max_length)
    click.echo("")
    click.echo(f"perplexity on {description}, first {dense.tokens_scored + 1:,} tokens, {protocol_label(e.protocol, length, min(e.stride, length))}:")
    click.echo(f"{'model':<12} {'params':>13} {'no LM head':>13} {'perplexity':>14} {'seconds':>8}")
    click.echo(f"{'dense':<12} {report.params_before:>13,} {report.params_before_no_head:>13,} {dense.ppl:>14,.2f} {dense.seconds:>8.1f}")
    for name in ("compressed", "recovered"):
        if name in results:
            r = results[name]
            click.echo(f"{name:<12} {report.params_after:>13,} {report.params_after_no_head:>13,} {r.ppl:>14,.2f} {r.seconds:>8.1f}")
    write_json(
        Path(job.out) / "eval.json",
        {"data": description, "protocol": e.protocol,
         **{k: {**v.to_dict(), "params": report.params_before if k == "dense" else report.params_after} for k, v in results.items()}},
    )
