"""``kronlm distill --student DIR_OR_MODEL --data TEXT_OR_DATASET --out DIR [--teacher MODEL] ...``.

Recovery training of a compressed or truncated student (SPEC §4): a causal LM (KnGPT2, Krony-PT),
or an encoder such as a compressed ``BertModel`` (KroneckerBERT's general distillation, stage 1 of
``kronlm glue``), validated by held-out distillation loss instead of perplexity. Settings come from the
defaults of :class:`kronlm.distill.config.TrainingConfig`, then a ``--config`` YAML/JSON file,
then the command-line flags (which win). The same command runs on one device or, under
``accelerate launch`` / ``torchrun``, on several processes.
"""

from __future__ import annotations

import re
from pathlib import Path

import click

# A data file whose name marks it as a test split ("wiki.test.raw", "test.txt", "ptb-test.txt").
_TEST_SPLIT_NAME = re.compile(r"(^|[._\-])test([._\-]|$)", re.IGNORECASE)


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


def _context_length(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


@click.command("distill")
@click.option("--student", required=True, help="The model to train: a kronlm folder (from `kronlm compress` / `kronlm truncate`), a hub id, a folder or an alias.")
@click.option("--teacher", default=None, help="The frozen reference model (same tokenizer); not needed for --recipe ce.")
@click.option("--data", required=True, help="Training text: a text file, a dataset folder or a Hugging Face dataset id (train split; the last blocks are held out for validation).")
@click.option("--data-config", default=None, help="Dataset configuration name (e.g. wikitext-103-raw-v1).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder: checkpoints/, best/, final/, logs/.")
@click.option("--recipe", default=None, help="Loss recipe: ilkd-kroneckerbert, ilkd-kngpt2, distilgpt2 or ce (overrides the config).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None, help="A training config, YAML or JSON (see configs/distill-*.yaml).")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Optimizer steps (replaces the config's max_steps / epochs).")
@click.option("--block-size", type=click.IntRange(min=2), default=None, help="Tokens per training block.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Blocks per micro-batch and process.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=None, help="Micro-batches accumulated per optimizer step.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Peak learning rate (of the non-Kronecker parameters, and of all when the config sets no other).")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=None, help="Linear warm-up steps before the cosine decay.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --out.")
@click.option("--max-tokens", type=click.IntRange(min=2), default=None, help="Use only the first N tokens of the data.")
@click.option("--val-fraction", type=click.FloatRange(min=0, max=1, max_open=True), default=0.05, show_default=True, help="Share of the tokens held out for validation.")
@click.option("--layer-map", default=None, help="Teacher layer for each student layer, e.g. 1,3,5 (needed when the depths differ).")
@click.option("--streaming", is_flag=True, help="Stream a hub dataset (OpenWebText-size corpora, with --max-tokens).")
def command(student, teacher, data, data_config, out, recipe, config_file, max_steps, block_size, batch_size, grad_accum, lr, warmup_steps, resume, max_tokens, val_fraction, layer_map, streaming):
    """Recover a compressed or truncated STUDENT by distillation from TEACHER (or plain CE).

    Writes checkpoints (safetensors + JSON) to OUT/checkpoints, the best student by validation
    perplexity (by held-out distillation loss for an encoder, e.g. --recipe ilkd-kroneckerbert on
    a compressed MiniLM) to OUT/best, the last one to OUT/final (loadable by `kronlm eval`, or by
    `kronlm glue --general-distill` for an encoder), and TensorBoard logs to OUT/logs.
    """
    import kronlm  # noqa: F401  (registers the Kronecker Auto classes, so kronlm folders load)
    from kronlm.distill.config import TrainingConfig

    overrides = {
        "recipe": recipe,
        "block_size": block_size,
        "micro_batch_size": batch_size,
        "grad_accum_steps": grad_accum,
        "lr": lr,
        "warmup_steps": warmup_steps,
        "layer_map": parse_index_list(layer_map, "--layer-map"),
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if max_steps is not None:
        overrides.update(max_steps=max_steps, epochs=None)
    if config_file:
        config = TrainingConfig.from_file(config_file, overrides)
    else:
        config = TrainingConfig.from_dict(overrides, source="command line")
    from kronlm.distill.objective import DistillationObjective

    needs_teacher = DistillationObjective(config.loss_weights_resolved()).needs_teacher
    if needs_teacher and teacher is None:
        raise click.BadParameter(f"recipe {config.recipe!r} distils from a teacher: give --teacher MODEL", param_hint="--teacher")
    if _TEST_SPLIT_NAME.search(Path(str(data)).name):
        raise click.BadParameter(
            f"{data!r} looks like a test split; train and select checkpoints on training data only", param_hint="--data"
        )

    from kronlm.data.blocks import build_blocks
    from kronlm.distill import make_accelerator, train
    from kronlm.models.loading import has_lm_head, load_model, load_tokenizer, resolve_model_spec

    accelerator = make_accelerator(config, out)
    tokenizer = load_tokenizer(teacher if needs_teacher else student)
    # Tokenise once: the main process fills the cache, the others read it.
    with accelerator.main_process_first():
        blocks = build_blocks(
            data, tokenizer, block_size=config.block_size, val_fraction=val_fraction, max_tokens=max_tokens,
            name=data_config, streaming=streaming,
        )
    student_model = load_model(student)
    teacher_model = load_model(teacher) if needs_teacher else None
    for role, model in (("student", student_model), ("teacher", teacher_model)):
        if model is None:
            continue
        limit = _context_length(model)
        if limit is not None and config.block_size > limit:
            raise ValueError(f"block size {config.block_size} exceeds the {role}'s context length {limit}")
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the {role}'s vocabulary only {model.config.vocab_size}")
    if teacher_model is not None and has_lm_head(teacher_model) != has_lm_head(student_model):
        kinds = {True: "a language model", False: "an encoder without an LM head"}
        raise ValueError(
            f"the student ({type(student_model).__name__}) is {kinds[has_lm_head(student_model)]} but the teacher "
            f"({type(teacher_model).__name__}) is {kinds[has_lm_head(teacher_model)]}; distil like from like"
        )
    if teacher_model is not None and teacher_model.config.vocab_size != student_model.config.vocab_size:
        raise ValueError(
            f"student vocabulary {student_model.config.vocab_size} differs from teacher vocabulary "
            f"{teacher_model.config.vocab_size}"
        )
    if accelerator.is_main_process:
        click.echo(f"student: {resolve_model_spec(student).description}")
        if teacher_model is not None:
            click.echo(f"teacher: {resolve_model_spec(teacher).description}")
        click.echo(f"data: {blocks.train.shape[0]:,} training and {blocks.val.shape[0]:,} validation blocks of {config.block_size} tokens")

    result = train(student_model, teacher_model, blocks, config, out, resume=resume, accelerator=accelerator, tokenizer=tokenizer)
    if accelerator.is_main_process:
        click.echo(
            f"done: {result.steps} steps, {result.tokens_seen:,} tokens, last loss {result.losses[-1]:.4f}"
            if result.losses
            else f"done: nothing to do, the run already reached step {result.steps}"
        )
        if result.best_val is not None:
            what = "perplexity" if result.val_metric == "ppl" else "distillation loss"
            click.echo(f"best validation {what} {result.best_val:.4f} at step {result.best_step} -> {Path(out) / 'best'}")
        click.echo(f"final student -> {result.final_dir}")
    accelerator.end_training()
