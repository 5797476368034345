"""``kronlm squad --model MODEL --out DIR [student options]``: a thin wrapper of
:func:`kronlm.tasks.squad.run_squad`.

Fine-tunes a span-prediction teacher (``AutoModelForQuestionAnswering``) on SQuAD v1.1 or v2.0
and, with a student option, compresses the fine-tuned teacher and trains the student by
KroneckerBERT's task ILKD (embedding, attention-score and hidden MSE, KD on the start and end
logits, CE on the gold span). The options are those of ``kronlm glue`` (:mod:`kronlm.cli.glue`)
plus the windowing and decoding settings; settings come from the defaults of
:class:`kronlm.tasks.squad.SquadTrainConfig`, then ``--config``, then the flags. Data: the
local ``squad-v1.1-dev-split`` under ``--data-dir`` (default), official-format files
(``--train-file`` / ``--dev-file``), or ``--hf-dataset squad|squad_v2``.
"""

from __future__ import annotations

from pathlib import Path

import click
import torch

from kronlm.cli.distill import config_options, config_overrides
from kronlm.cli.glue import (
    TASK_FLAGS,
    claim_task_folder,
    load_task_config,
    student_choice,
    task_run_options,
)
from kronlm.cli.options import DATA_DIR_HELP, default_data_dir
from kronlm.tasks.squad import LOCAL_SQUAD_DIR, SquadTrainConfig, run_squad

SQUAD_FLAGS = [
    *TASK_FLAGS,
    ("--doc-stride", "doc_stride", click.IntRange(min=0), "Context tokens shared by consecutive windows of a long context."),
    ("--max-answer-length", "max_answer_length", click.IntRange(min=1), "Longest answer span decoded, in tokens."),
    ("--n-best-size", "n_best_size", click.IntRange(min=1), "Start and end candidates per window in span decoding."),
    ("--version", "version", click.Choice(["1.1", "2.0"]), "SQuAD version (2.0: unanswerable questions, no-answer threshold)."),
]


@click.command("squad")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=default_data_dir,
              show_default="$KRONLM_DATA_DIR, else ../shared/data",
              help=DATA_DIR_HELP + f" SQuAD reads {LOCAL_SQUAD_DIR}/{{train,dev}}.json unless --train-file / --dev-file are given.")
@click.option("--train-file", default=None, type=click.Path(exists=True, dir_okay=False), help="Official-format SQuAD JSON to train on (e.g. train-v1.1.json).")
@click.option("--dev-file", default=None, type=click.Path(exists=True, dir_okay=False), help="Official-format SQuAD JSON to report on (e.g. dev-v1.1.json).")
@click.option("--hf-dataset", type=click.Choice(["squad", "squad_v2"]), default=None, help="Read the Hugging Face dataset instead of files (train / validation splits).")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False), help="Run settings, YAML or JSON (see configs/squad-*.yaml).")
@config_options(SQUAD_FLAGS)
@task_run_options
def command(model, teacher, out, data_dir, train_file, dev_file, hf_dataset, config_file, teacher_config_file, student_preset,
            student_config, student_init, general_distill, layer_map, no_task_kd, resume, threads, **flags):
    """Fine-tune a QA teacher on SQuAD and optionally distil a compressed student.

    Each trained model is chosen by F1 on --val-fraction of the training questions (held out in
    whole paragraphs; for v2.0 they also choose the no-answer threshold); the evaluation split
    is scored (final and best model) and reported only.
    """
    if threads:
        torch.set_num_threads(threads)
    student, layers = student_choice(model, teacher, student_preset, student_config, student_init, general_distill,
                                     layer_map, no_task_kd)
    overrides = config_overrides(SQUAD_FLAGS, flags)
    config = load_task_config(SquadTrainConfig, config_file, overrides)
    teacher_config = load_task_config(SquadTrainConfig, teacher_config_file, overrides) if teacher_config_file else None
    folder = None
    if hf_dataset is None and (train_file is None or dev_file is None):
        if data_dir is None:
            raise click.BadParameter(f"no data: give --data-dir (holding {LOCAL_SQUAD_DIR}/), --train-file and --dev-file, "
                                     "or --hf-dataset", param_hint="--data-dir")
        folder = Path(data_dir) / LOCAL_SQUAD_DIR
    out = claim_task_folder(out, teacher, (model, student_init, general_distill, student_config, config_file, teacher_config_file,
                                           train_file, dev_file, folder))
    report = run_squad(
        out, model=model, teacher=teacher, config=config, teacher_config=teacher_config, student=student,
        student_init=student_init, general_distill=general_distill, layer_map=layers, task_kd=not no_task_kd,
        data_dir=folder, train_file=train_file, dev_file=dev_file, hf_dataset=hf_dataset, resume=resume, log=click.echo,
    )
    click.echo(report.markdown())
    click.echo(f"report -> {Path(out) / 'report.json'}, {Path(out) / 'report.md'}")
