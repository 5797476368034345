"""``kronlm glue --task NAME --model MODEL --out DIR [student options]``: a thin wrapper of
:func:`kronlm.tasks.glue.run_glue`.

Fine-tunes a teacher on a GLUE task and, with a student option, compresses the fine-tuned teacher
and trains the student by task distillation (KroneckerBERT, SPEC §1, §4). Settings come from the
defaults of :class:`kronlm.tasks.glue.GlueTrainConfig`, then ``--config`` (YAML/JSON), then the
flags of :data:`GLUE_FLAGS`. Writes ``OUT/teacher`` (or uses ``--teacher``), ``OUT/student``, the
run folders ``OUT/teacher-run`` / ``OUT/student-run`` (checkpoints, best/, final/, logs/), and
``OUT/report.{json,md}``.
"""

from __future__ import annotations

from pathlib import Path

import click
import torch

from kronlm.cli.distill import config_options, config_overrides
from kronlm.cli.options import DATA_DIR_HELP, default_data_dir
from kronlm.tasks.glue import GlueTrainConfig, run_glue

# Command-line flags of GlueTrainConfig fields (they win over --config and --teacher-config).
GLUE_FLAGS = [
    ("--max-length", "max_length", click.IntRange(min=2), "Tokens per example after truncation."),
    ("--batch-size", "batch_size", click.IntRange(min=1), "Examples per optimizer step."),
    ("--epochs", "epochs", click.FloatRange(min=0, min_open=True), "Passes over the training examples."),
    ("--max-steps", "max_steps", click.IntRange(min=1), "Optimizer steps (wins over --epochs)."),
    ("--lr", "lr", click.FloatRange(min=0, min_open=True), "Peak learning rate."),
    ("--max-train-examples", "max_train_examples", click.IntRange(min=1),
     "Use a seeded random subset of this many training examples (CPU runs)."),
    ("--val-fraction", "val_fraction", click.FloatRange(min=0, max=1, max_open=True),
     "Share of the training examples held out to choose the checkpoint (default 0.1; 0 = the last model)."),
    ("--early-stopping-patience", "early_stopping_patience", click.IntRange(min=1),
     "Stop after this many validations on the held-out examples without a better main metric."),
    ("--seed", "seed", click.IntRange(min=0), "Seed of the head, held-out split, subset and data order."),
]


def _config(config_file: str | None, overrides: dict) -> GlueTrainConfig:
    if config_file:
        return GlueTrainConfig.from_file(config_file, overrides)
    return GlueTrainConfig.from_dict(overrides, source="command line")


@click.command("glue")
@click.option("--task", required=True, help="GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte.")
@click.option("--model", default=None, help="Pretrained model to fine-tune as the teacher (hub id, folder or alias such as minilm). Not needed with --teacher.")
@click.option("--teacher", default=None, type=click.Path(exists=True, file_okay=False), help="An already fine-tuned teacher folder (OUT/teacher of an earlier run); skips teacher fine-tuning.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder.")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=default_data_dir,
              show_default="$KRONLM_DATA_DIR, else ../shared/data", help=DATA_DIR_HELP + " GLUE reads glue/<TASK>/{train,dev}.tsv.")
@click.option("--hf-dataset", is_flag=True, help="Read the task from the Hugging Face `glue` dataset instead of TSV files.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False), help="Run settings, YAML or JSON (see configs/glue-*.yaml).")
@click.option("--teacher-config", "teacher_config_file", default=None, type=click.Path(dir_okay=False), help="Separate settings for teacher fine-tuning (default: --config).")
@config_options(GLUE_FLAGS)
@click.option("--student-preset", default=None, help="Compress the fine-tuned teacher with this preset (kronlm presets), then distil.")
@click.option("--student-config", default=None, type=click.Path(dir_okay=False), help="Compress with this compression config (e.g. configs/glue-minilm-kb8.yaml), then distil.")
@click.option("--general-distill", default=None, type=click.Path(exists=True, file_okay=False), help="A stage-1 student (compressed encoder distilled on plain text) whose encoder weights start the task student.")
@click.option("--no-task-kd", is_flag=True, help="Train the student with CE on the labels only (ablation).")
@click.option("--resume", is_flag=True, help="Continue each stage from its latest checkpoint in --out.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch intra-op threads (default: torch's choice).")
def command(task, model, teacher, out, data_dir, hf_dataset, config_file, teacher_config_file, student_preset, student_config,
            general_distill, no_task_kd, resume, threads, **flags):
    """Fine-tune a teacher on a GLUE task and optionally distil a Kronecker-compressed student.

    Each trained model is chosen on --val-fraction of the training examples by the task's main
    metric; the dev split is evaluated (for the final and the best model) and reported only
    (GLUE test labels are private).
    """
    if threads:
        torch.set_num_threads(threads)
    if student_preset and student_config:
        raise click.BadParameter("give --student-preset or --student-config, not both", param_hint="--student-config")
    student = student_preset or student_config
    if not student and (general_distill or no_task_kd):
        raise click.BadParameter("--general-distill / --no-task-kd need a student (--student-preset or --student-config)")
    if teacher is None and model is None:
        raise click.BadParameter("give --model to fine-tune a teacher, or --teacher with a fine-tuned one", param_hint="--model")
    overrides = config_overrides(GLUE_FLAGS, flags)
    config = _config(config_file, overrides)
    teacher_config = _config(teacher_config_file, overrides) if teacher_config_file else None
    report = run_glue(
        task, out, model=model, teacher=teacher, config=config, teacher_config=teacher_config, student=student,
        general_distill=general_distill, task_kd=not no_task_kd, data_dir=None if data_dir is None else Path(data_dir) / "glue",
        hf_dataset=hf_dataset, resume=resume, log=click.echo,
    )
    click.echo(report.markdown())
    click.echo(f"report -> {Path(out) / 'report.json'}, {Path(out) / 'report.md'}")
