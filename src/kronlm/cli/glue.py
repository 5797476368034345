"""``kronlm glue --task NAME --model MODEL --out DIR [student options]``: a thin wrapper of
:func:`kronlm.tasks.glue.run_glue`.

Fine-tunes a teacher on a GLUE task and, with a student option, trains a student by task
distillation: the fine-tuned teacher compressed (``--student-preset`` / ``--student-config``,
KroneckerBERT, docs/tasks.md), or a compressed / truncated pretrained model (``--student-init``,
KnGPT2 / DistilGPT2-style decoder students). Settings come from the defaults of
:class:`kronlm.tasks.glue.GlueTrainConfig`, then ``--config`` (YAML/JSON), then the flags of
:data:`GLUE_FLAGS`. Writes ``OUT/teacher`` (or uses ``--teacher``), ``OUT/student``, the run
folders ``OUT/teacher-run`` / ``OUT/student-run`` (checkpoints, best/, final/, logs/), and
``OUT/report.{json,md}``.

:data:`TASK_FLAGS`, :func:`task_run_options` and :func:`student_choice` are shared with
``kronlm squad`` (:mod:`kronlm.cli.squad`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import click
import torch

from kronlm.cli.distill import config_options, config_overrides, parse_index_list
from kronlm.cli.options import DATA_DIR_HELP, FiniteFloatRange, default_data_dir
from kronlm.tasks import claim_task_folder as claim_folder
from kronlm.tasks.glue import GlueTrainConfig, run_glue

# Command-line flags of TaskTrainConfig fields (they win over --config and --teacher-config).
TASK_FLAGS = [
    ("--max-length", "max_length", click.IntRange(min=2), "Tokens per example after truncation."),
    ("--batch-size", "batch_size", click.IntRange(min=1), "Examples per optimizer step."),
    ("--epochs", "epochs", FiniteFloatRange(min=0, min_open=True), "Passes over the training examples."),
    ("--max-steps", "max_steps", click.IntRange(min=1), "Optimizer steps (wins over --epochs)."),
    ("--lr", "lr", FiniteFloatRange(min=0, min_open=True), "Peak learning rate."),
    ("--max-train-examples", "max_train_examples", click.IntRange(min=1),
     "Use a seeded random subset of this many training examples (CPU runs)."),
    ("--val-fraction", "val_fraction", FiniteFloatRange(min=0, max=1, max_open=True),
     "Share of the training examples held out to choose the checkpoint (default 0.1; 0 = the last model)."),
    ("--early-stopping-patience", "early_stopping_patience", click.IntRange(min=1),
     "Stop after this many validations on the held-out examples without a better main metric."),
    ("--eval-every", "eval_every", click.IntRange(min=0), "Validate on the held-out examples every N steps (0 = once per epoch)."),
    ("--recipe", "recipe", str, "Student loss recipe: ilkd-kroneckerbert, ilkd-kngpt2, distilgpt2, ce or kd."),
    ("--seed", "seed", click.IntRange(min=0), "Seed of the head, held-out split, subset and data order."),
]
# GLUE's flags: the task flags plus the dev subset of smoke runs.
GLUE_FLAGS = [
    *TASK_FLAGS,
    ("--max-dev-examples", "max_dev_examples", click.IntRange(min=1),
     "Evaluate on a seeded random subset of this many dev examples (smoke runs; reported figures use all)."),
]


def task_run_options(fn: Callable) -> Callable:
    """The options every task command shares: teacher, run folder, settings, student, resume, threads."""
    options = [
        click.option("--model", default=None, help="Pretrained model to fine-tune as the teacher (hub id, folder or alias such as minilm). Not needed with --teacher."),
        click.option("--teacher", default=None, type=click.Path(exists=True, file_okay=False), help="An already fine-tuned teacher folder (OUT/teacher of an earlier run); skips teacher fine-tuning."),
        click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder."),
        click.option("--teacher-config", "teacher_config_file", default=None, type=click.Path(dir_okay=False), help="Separate settings for teacher fine-tuning (default: --config)."),
        click.option("--student-preset", default=None, help="Compress the fine-tuned teacher with this preset (kronlm presets), then distil."),
        click.option("--student-config", default=None, type=click.Path(dir_okay=False), help="Compress the fine-tuned teacher with this compression config (e.g. configs/glue-minilm-kb8.yaml), then distil."),
        click.option("--student-init", default=None, type=click.Path(exists=True, file_okay=False), help="Instead: a compressed or truncated pretrained model folder (kronlm compress / truncate / distill output) that gets the teacher's head, then distil."),
        click.option("--general-distill", default=None, type=click.Path(exists=True, file_okay=False), help="A stage-1 student (compressed encoder distilled on plain text) whose encoder weights start the task student."),
        click.option("--layer-map", default=None, help="Teacher layer of each student layer for the layer-wise terms of a shallower student, e.g. 0,2,4."),
        click.option("--no-task-kd", is_flag=True, help="Train the student with CE on the labels only (ablation)."),
        click.option("--resume", is_flag=True, help="Continue each stage from its latest checkpoint in --out."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="torch intra-op threads (default: torch's choice)."),
    ]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def student_choice(model, teacher, student_preset, student_config, student_init, general_distill, layer_map, no_task_kd):
    """Check the teacher and student options; returns (compression spec or None, layer map or None).

    Raises:
        click.BadParameter: neither --model nor --teacher; two student kinds; --general-distill
            without a compression; --no-task-kd / --layer-map without a student.
    """
    if teacher is None and model is None:
        raise click.BadParameter("give --model to fine-tune a teacher, or --teacher with a fine-tuned one", param_hint="--model")
    given = [name for name, value in (("--student-preset", student_preset), ("--student-config", student_config),
                                      ("--student-init", student_init)) if value]
    if len(given) > 1:
        raise click.BadParameter(f"give one student option, not {' and '.join(given)}", param_hint=given[-1])
    if general_distill and not (student_preset or student_config):
        raise click.BadParameter("--general-distill needs a compressed student (--student-preset or --student-config)")
    if not given and (no_task_kd or layer_map):
        raise click.BadParameter("--no-task-kd / --layer-map need a student (--student-preset, --student-config or --student-init)")
    return student_preset or student_config, parse_index_list(layer_map, "--layer-map")


def claim_task_folder(out: str, teacher: str | None, inputs: tuple) -> str:
    """:func:`kronlm.tasks.claim_task_folder` with the refusal as a usage error.

    Raises:
        click.UsageError: the folder is refused (the message names it and why).
    """
    try:
        return claim_folder(out, teacher, inputs)
    except FileExistsError as exc:
        raise click.UsageError(str(exc)) from None


def load_task_config(config_class, config_file: str | None, overrides: dict):
    """``config_class`` from ``config_file`` with the flag overrides, or from the flags alone."""
    if config_file:
        return config_class.from_file(config_file, overrides)
    return config_class.from_dict(overrides, source="command line")


@click.command("glue")
@click.option("--task", required=True, help="GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte.")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=default_data_dir,
              show_default="$KRONLM_DATA_DIR, else ../shared/data", help=DATA_DIR_HELP + " GLUE reads glue/<TASK>/{train,dev}.tsv.")
@click.option("--hf-dataset", is_flag=True, help="Read the task from the Hugging Face `glue` dataset instead of TSV files.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False), help="Run settings, YAML or JSON (see configs/glue-*.yaml).")
@config_options(GLUE_FLAGS)
@task_run_options
def command(task, model, teacher, out, data_dir, hf_dataset, config_file, teacher_config_file, student_preset, student_config,
            student_init, general_distill, layer_map, no_task_kd, resume, threads, **flags):
    """Fine-tune a teacher on a GLUE task and optionally distil a compressed or truncated student.

    Each trained model is chosen on --val-fraction of the training examples by the task's main
    metric; the dev split is evaluated (for the final and the best model) and reported only
    (GLUE test labels are private).
    """
    if threads:
        torch.set_num_threads(threads)
    student, layers = student_choice(model, teacher, student_preset, student_config, student_init, general_distill,
                                     layer_map, no_task_kd)
    overrides = config_overrides(GLUE_FLAGS, flags)
    config = load_task_config(GlueTrainConfig, config_file, overrides)
    teacher_config = load_task_config(GlueTrainConfig, teacher_config_file, overrides) if teacher_config_file else None
    out = claim_task_folder(out, teacher, (model, student_init, general_distill, student_config, config_file, teacher_config_file))
    report = run_glue(
        task, out, model=model, teacher=teacher, config=config, teacher_config=teacher_config, student=student,
        student_init=student_init, general_distill=general_distill, layer_map=layers, task_kd=not no_task_kd,
        data_dir=None if data_dir is None else Path(data_dir) / "glue", hf_dataset=hf_dataset, resume=resume, log=click.echo,
    )
    click.echo(report.markdown())
    click.echo(f"report -> {Path(out) / 'report.json'}, {Path(out) / 'report.md'}")
