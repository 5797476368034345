"""``kronlm distill --student DIR_OR_MODEL --data TEXT_OR_DATASET --out DIR [--teacher MODEL] ...``.

Recovery training of a compressed or truncated student (docs/recovery.md): a causal LM (KnGPT2, Krony-PT),
or an encoder such as a compressed ``BertModel`` (KroneckerBERT's general distillation, stage 1 of
``kronlm glue``), validated by held-out distillation loss instead of perplexity. Settings come from the
defaults of :class:`kronlm.distill.config.TrainingConfig`, then a ``--config`` YAML/JSON file,
then the command-line flags (which win). The same command runs on one device or, under
``accelerate launch`` / ``torchrun``, on several processes. A thin wrapper: the run's stages are
the library's (:mod:`kronlm.distill.text_runs`); this module parses flags and prints.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from kronlm.cli.options import FiniteFloatRange, data_options
from kronlm.data import build_blocks
from kronlm.distill import (
    RUN_OUTPUTS,
    BlockwiseResult,
    LocalResult,
    RecoveryConfig,
    RecoveryResult,
    TrainingConfig,
    distillation_settings,
    load_student_and_teacher,
    looks_like_test_split,
    make_accelerator,
    run_distillation,
    single_stage,
    teacher_reason,
)
from kronlm.modeling import load_tokenizer, resolve_model_spec
from kronlm.utils import claim_run_folder


def config_options(flags: list[tuple[str, str, Any, str]]) -> Callable:
    """Add one click option per ``(flag, config field, click type, help)``, default None (not given).

    The command then receives each value under the field's name; :func:`config_overrides` takes
    them out again. This is the one place a command maps flags to config fields.
    """

    def decorate(fn):
        for flag, name, kind, text in reversed(flags):
            if kind is bool:
                fn = click.option(flag, name, is_flag=True, default=None, help=text)(fn)
            else:
                fn = click.option(flag, name, type=kind, default=None, help=text)(fn)
        return fn

    return decorate


def config_overrides(flags: list[tuple[str, str, Any, str]], values: dict[str, Any]) -> dict[str, Any]:
    """Remove the config flags from a command's keyword arguments; return those given, by field.

    A field name ``section__key`` is the key of a nested section (``blockwise__inputs`` ->
    ``{"blockwise": {"inputs": ...}}``).
    """
    taken = {name: values.pop(name) for _, name, _, _ in flags}
    out: dict[str, Any] = {}
    for name, value in taken.items():
        if value is None:
            continue
        section, _, key = name.partition("__")
        if key:
            out.setdefault(section, {})[key] = value
        else:
            out[name] = value
    return out


# Command-line flags of TrainingConfig fields (they win over --config).
TRAINING_FLAGS = [
    ("--recipe", "recipe", str, "Loss recipe: ilkd-kroneckerbert, ilkd-kngpt2, distilgpt2, ce or kd."),
    ("--max-steps", "max_steps", click.IntRange(min=1), "Optimizer steps (replaces the config's max_steps / epochs)."),
    ("--epochs", "epochs", FiniteFloatRange(min=0, min_open=True),
     "Passes over the training blocks (replaces the config's max_steps / epochs; per block in the block modes)."),
    ("--block-size", "block_size", click.IntRange(min=2), "Tokens per training block."),
    ("--batch-size", "micro_batch_size", click.IntRange(min=1), "Blocks per micro-batch and process."),
    ("--grad-accum", "grad_accum_steps", click.IntRange(min=1), "Micro-batches accumulated per optimizer step."),
    ("--lr", "lr", FiniteFloatRange(min=0, min_open=True),
     "Peak learning rate (of the non-Kronecker parameters, and of all when the config sets no other)."),
    ("--warmup-steps", "warmup_steps", click.IntRange(min=0), "Linear warm-up steps before the cosine decay."),
    ("--mixed-precision", "mixed_precision", click.Choice(["auto", "no", "bf16"]),
     "bf16 autocast (float32 weights and optimizer): auto = on a GPU that supports it and on a CPU with AMX-BF16 or AVX512-BF16."),
    ("--layer-map", "layer_map", str, "Teacher layer for each student layer, e.g. 1,3,5 (needed when the depths differ)."),
    ("--max-minutes", "max_minutes", FiniteFloatRange(min=0, min_open=True),
     "Stop after the step that ends this many minutes into the run (wall clock), validating and exporting as at the end."),
    ("--early-stopping-patience", "early_stopping_patience", click.IntRange(min=1),
     "Stop after this many validations without a better validation metric."),
    ("--mode", "mode", click.Choice(["end_to_end", "blockwise", "local"]),
     "end_to_end: the whole student against the teacher's outputs; blockwise: one compressed block at a time on "
     "cached teacher hidden states; local: each compressed module alone on its captured inputs (step counts are "
     "then per block in both)."),
    ("--local-target", "local__target", click.Choice(["teacher", "dense"]),
     "Local: fit each module to the teacher module's output on the teacher's inputs (teacher) or to the dense weight "
     "applied to the student's inputs (dense)."),
    ("--local-refit", "local__refit", click.BOOL,
     "Local: start each module with its closed-form refit (true, the default) or not (false)."),
    ("--block-inputs", "blockwise__inputs", click.Choice(["student", "teacher"]),
     "Block-wise: train block l on the recovered student prefix's outputs (student, sequential) or on the teacher's (teacher)."),
    ("--block-loss", "blockwise__loss", click.Choice(["mse", "relative_mse"]), "Block-wise: the block output loss."),
    ("--train-norms", "blockwise__train_norms", bool, "Block-wise: also train each block's norm weights."),
    ("--cache-dir", "blockwise__cache_dir", click.Path(file_okay=False),
     "Block-wise: folder of the teacher hidden-state cache (default OUT/teacher_cache; reused when it matches)."),
    ("--end-to-end-steps", "blockwise__end_to_end_steps", click.IntRange(min=0),
     "Block-wise: steps of end-to-end distillation after the block-wise pass."),
]


def parse_index_list(text: str | None, option: str) -> list[int] | None:
    """Parse ``"0,2,4"`` into ``[0, 2, 4]`` (None stays None).

    Raises:
        click.BadParameter: an entry is not a non-negative integer (names the option and entry).
    """
    if text is None:
        return None
    entries = [part.strip() for part in text.split(",")]
    if not entries or any(not e for e in entries):
        raise click.BadParameter(f"expected comma-separated layer indices like 0,2,4, got {text!r}", param_hint=option)
    out = []
    for entry in entries:
        if not entry.isdigit():
            raise click.BadParameter(f"{entry!r} is not a non-negative layer index (in {text!r})", param_hint=option)
        out.append(int(entry))
    return out


@click.command("distill")
@click.option("--student", required=True, help="The model to train: a kronlm folder (from `kronlm compress` / `kronlm truncate`), a hub id, a folder or an alias.")
@click.option("--teacher", default=None, help="The frozen reference model (same tokenizer); not needed for --recipe ce.")
@click.option("--data", required=True, help="Training text: a text file, a dataset folder or a Hugging Face dataset id (train split; the last blocks are held out for validation).")
@click.option("--data-config", default=None, help="Dataset configuration name (e.g. wikitext-103-raw-v1).")
@data_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder: checkpoints/, best/, final/, logs/.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None, help="A training config, YAML or JSON (see configs/distill-*.yaml).")
@config_options(TRAINING_FLAGS)
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --out.")
@click.option("--max-tokens", type=click.IntRange(min=2), default=None, help="Use the first N tokens of the data (a corpus with fewer is refused).")
@click.option("--val-fraction", type=FiniteFloatRange(min=0, max=1, max_open=True), default=0.05, show_default=True, help="Share of the tokens held out for validation (choosing OUT/best).")
@click.option("--streaming", is_flag=True, help="Stream a hub dataset (OpenWebText-size corpora, with --max-tokens).")
def command(student, teacher, data, data_config, data_dir, text_field, out, config_file, resume, max_tokens, val_fraction,
            streaming, **flags):
    """Recover a compressed or truncated STUDENT by distillation from TEACHER (or plain CE).

    Writes checkpoints (safetensors + JSON) to OUT/checkpoints, the best student by validation
    perplexity (by held-out distillation loss for an encoder, e.g. --recipe ilkd-kroneckerbert on
    a compressed MiniLM) to OUT/best, the last one to OUT/final (loadable by `kronlm eval`, or by
    `kronlm glue --general-distill` for an encoder), and TensorBoard logs to OUT/logs.
    """

    config = _training_config(config_file, flags)
    staged = isinstance(config, RecoveryConfig)
    first = config.stages[0] if staged else config
    reason = teacher_reason(first, staged)
    if reason is not None and teacher is None:
        raise click.BadParameter(f"{reason} from a teacher: give --teacher MODEL", param_hint="--teacher")
    if looks_like_test_split(data):
        raise click.BadParameter(
            f"{data!r} looks like a test split; train and select checkpoints on training data only", param_hint="--data"
        )
    try:
        out = str(claim_run_folder(out, inputs=(student, teacher, data, config_file), option="--out", replaced=RUN_OUTPUTS))
    except FileExistsError as exc:
        raise click.UsageError(str(exc)) from None
    accelerator = make_accelerator(first, out)
    if (staged or first.mode != "end_to_end") and accelerator.num_processes > 1:
        raise click.UsageError(f"{'staged' if staged else first.mode} recovery runs in one process (the CPU or one GPU); start it without "
                               "accelerate launch / torchrun")
    tokenizer = load_tokenizer(teacher if reason is not None else student)
    # Tokenise once: the main process fills the cache, the others read it.
    with accelerator.main_process_first():
        blocks = build_blocks(
            data, tokenizer, block_size=first.block_size, val_fraction=val_fraction, max_tokens=max_tokens, min_tokens=max_tokens,
            name=data_config, data_dir=data_dir, text_field=text_field, streaming=streaming,
        )
    student_model, teacher_model = load_student_and_teacher(student, teacher if reason is not None else None, tokenizer, first.block_size)
    if accelerator.is_main_process:
        click.echo(f"student: {resolve_model_spec(student).description}")
        if teacher_model is not None:
            click.echo(f"teacher: {resolve_model_spec(teacher).description}")
        click.echo(f"data: {blocks.source}")
        click.echo(f"      {blocks.train.shape[0]:,} training and {blocks.val.shape[0]:,} validation blocks of {first.block_size} tokens")
    run_settings = distillation_settings(data, data_config=data_config, text_field=text_field, max_tokens=max_tokens,
                                         val_fraction=val_fraction, streaming=streaming)
    result = run_distillation(student_model, teacher_model, blocks, config, out, resume=resume, accelerator=accelerator,
                              tokenizer=tokenizer, run_settings=run_settings)
    if accelerator.is_main_process:
        _print_result(result, config, out)
    accelerator.end_training()


def _training_config(config_file: str | None, flags: dict[str, Any]) -> TrainingConfig | RecoveryConfig:
    """The run's settings: the TrainingConfig defaults, then ``--config`` (one training config, or
    stages sharing one block size), then the flags."""
    overrides = config_overrides(TRAINING_FLAGS, flags)
    if "layer_map" in overrides:
        overrides["layer_map"] = parse_index_list(overrides["layer_map"], "--layer-map")
    if "max_steps" in overrides and "epochs" in overrides:
        raise click.UsageError("give --max-steps or --epochs, not both")
    if "max_steps" in overrides:
        overrides["epochs"] = None
    elif "epochs" in overrides:
        overrides["max_steps"] = None
    if not config_file:
        return TrainingConfig.from_dict(overrides, source="command line")
    config = single_stage(RecoveryConfig.from_file(config_file, overrides))
    if isinstance(config, RecoveryConfig):
        sizes = {s.block_size for s in config.stages}
        if len(sizes) > 1:
            raise click.BadParameter(f"{config_file}: the stages use block sizes {sorted(sizes)}; they share one set of "
                                     "training blocks, so give them one block_size", param_hint="--config")
    return config


def _print_result(result, config, out: str) -> None:
    """What the run did, by mode."""
    if isinstance(result, RecoveryResult):
        _print_stages(result)
    elif isinstance(result, LocalResult):
        _print_local(result)
    elif isinstance(result, BlockwiseResult):
        _print_blockwise(result, config)
    else:
        click.echo(
            f"done: {result.steps} steps, {result.tokens_seen:,} tokens, last loss {result.losses[-1]:.4f}"
            if result.losses
            else f"done: nothing to do, the run already reached step {result.steps}"
        )
        if result.best_val is not None:
            what = "perplexity" if result.val_metric == "ppl" else "distillation loss"
            click.echo(f"best validation {what} {result.best_val:.4f} at step {result.best_step} -> {Path(out) / 'best'}")
        click.echo(f"final student -> {result.final_dir}")


def _print_blockwise(result: BlockwiseResult, config: TrainingConfig) -> None:
    trained = [b for b in result.blocks if b.trained]
    click.echo(f"teacher hidden-state cache: {result.cache_seconds:.0f} s; block-wise training of {len(trained)} of "
               f"{len(result.blocks)} blocks: {result.train_seconds:.0f} s, {result.tokens_per_second:,.0f} tokens/s "
               f"through the whole stack")
    click.echo(f"{'block':>5} {'steps':>6} {'first loss':>11} {'last loss':>11} {'best val':>11} {'chosen':>8}")
    for b in trained:
        click.echo(f"{b.index:>5} {b.steps:>6} {b.first_loss:>11.4g} {b.last_loss:>11.4g} "
                   f"{(b.best_val if b.best_val is not None else float('nan')):>11.4g} {b.chosen:>8}")
    if result.val_ppl_before is not None:
        line = f"validation perplexity: {result.val_ppl_before:,.3f} before, {result.val_ppl_blockwise:,.3f} after the block-wise pass"
        if result.val_ppl_end_to_end is not None:
            line += f", {result.val_ppl_end_to_end:,.3f} after {config.blockwise.end_to_end_steps} end-to-end steps"
        click.echo(line)
    click.echo(f"final student -> {result.final_dir}; best by validation perplexity -> {result.best_dir}")


def _print_local(result: LocalResult) -> None:
    trained = [b for b in result.blocks if b.trained]
    click.echo(f"teacher hidden-state cache: {result.cache_seconds:.0f} s; local reconstruction of {len(trained)} of "
               f"{len(result.blocks)} blocks: {result.train_seconds:.0f} s")
    click.echo("held-out relative error of each block's output against the teacher block's:")
    click.echo(f"{'block':>5} {'steps':>6} {'before':>8} {'refit':>8} {'after':>8} {'chosen':>8}")
    for b in trained:
        cells = [f"{v:.4f}" if v is not None else "-" for v in (b.error_before, b.error_refit, b.error_after)]
        click.echo(f"{b.index:>5} {b.steps:>6} {cells[0]:>8} {cells[1]:>8} {cells[2]:>8} {b.chosen:>8}")
    if result.val_ppl_before is not None:
        click.echo(f"validation perplexity: {result.val_ppl_before:,.3f} before, {result.val_ppl_after:,.3f} after")
    click.echo(f"recovered student -> {result.final_dir}")


def _print_stages(result: RecoveryResult) -> None:
    click.echo(f"{'stage':>5} {'mode':<10} {'seconds':>8} {'tokens':>9} {'val ppl before':>15} {'after':>10}")
    for s in result.stages:
        cells = [f"{v:,.3f}" if v is not None else "-" for v in (s.val_ppl_before, s.val_ppl_after)]
        click.echo(f"{s.index:>5} {s.mode:<10} {s.seconds:>8.0f} {s.tokens:>9,} {cells[0]:>15} {cells[1]:>10}")
    kept = f"stage {result.chosen}" if result.chosen else "the starting student (no stage improved it)"
    click.echo(f"kept {kept}; recovered student -> {result.best_dir or 'unchanged'}")
