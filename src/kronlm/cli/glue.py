"""``kronlm glue --task NAME --model MODEL --out DIR [student options]``.

Fine-tunes a teacher on a GLUE task and, with a student option, compresses the fine-tuned teacher
and trains the student by task distillation (KroneckerBERT, SPEC §1, §4). Settings come from the
defaults of :class:`kronlm.glue.config.GlueTrainConfig`, then ``--config`` (YAML/JSON), then the
flags. Writes ``OUT/teacher`` (or uses ``--teacher``), ``OUT/student``, checkpoints under each
run folder, and ``OUT/report.{json,md}`` (dev metrics, parameters, ratios, retention).
"""

from __future__ import annotations

import time
from pathlib import Path

import click


def _build_config(config_file, overrides):
    from kronlm.glue.config import GlueTrainConfig

    overrides = {k: v for k, v in overrides.items() if v is not None}
    if config_file:
        return GlueTrainConfig.from_file(config_file, overrides)
    return GlueTrainConfig.from_dict(overrides, source="command line")


@click.command("glue")
@click.option("--task", required=True, help="GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte.")
@click.option("--model", default=None, help="Pretrained model to fine-tune as the teacher (hub id, folder or alias such as minilm). Not needed with --teacher.")
@click.option("--teacher", default=None, type=click.Path(exists=True, file_okay=False), help="An already fine-tuned teacher folder (OUT/teacher of an earlier run); skips teacher fine-tuning.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder.")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False), help="Folder with <TASK>/{train,dev}.tsv in GLUE format (default: the shared data folder's glue/).")
@click.option("--hf-dataset", is_flag=True, help="Read the task from the Hugging Face `glue` dataset instead of TSV files.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False), help="Run settings, YAML or JSON (see configs/glue-*.yaml).")
@click.option("--teacher-config", "teacher_config_file", default=None, type=click.Path(dir_okay=False), help="Separate settings for teacher fine-tuning (default: --config).")
@click.option("--max-length", type=click.IntRange(min=2), default=None, help="Tokens per example after truncation.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Examples per optimizer step.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=None, help="Passes over the training examples.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Optimizer steps (wins over --epochs).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Peak learning rate.")
@click.option("--max-train-examples", type=click.IntRange(min=1), default=None, help="Train on a seeded random subset of this many examples (CPU runs).")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Seed of the head, data order and subset.")
@click.option("--student-preset", default=None, help="Compress the fine-tuned teacher with this preset (kronlm presets), then distil.")
@click.option("--student-config", default=None, type=click.Path(dir_okay=False), help="Compress with this compression config (e.g. configs/glue-minilm-kb8.yaml), then distil.")
@click.option("--general-distill", default=None, type=click.Path(exists=True, file_okay=False), help="A stage-1 student (compressed encoder distilled on plain text) whose encoder weights start the task student.")
@click.option("--no-task-kd", is_flag=True, help="Train the student with CE on the labels only (ablation).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch intra-op threads (default: torch's choice).")
def command(task, model, teacher, out, data_dir, hf_dataset, config_file, teacher_config_file, max_length, batch_size, epochs,
            max_steps, lr, max_train_examples, seed, student_preset, student_config, general_distill, no_task_kd, threads):
    """Fine-tune a teacher on a GLUE task and optionally distil a Kronecker-compressed student.

    The dev split is evaluated and reported (GLUE test labels are private); the reported models
    are those after the last training step, never chosen on dev.
    """
    import torch

    import kronlm
    from kronlm.glue import (
        GlueBatchCollator,
        GlueReport,
        ModelResult,
        build_classifier,
        count_embedding_linear_parameters,
        encode_examples,
        evaluate_classifier,
        get_task,
        load_general_distilled,
        load_glue_split,
        load_hf_glue_split,
        make_student,
        task_distillation_loss,
        train_classifier,
        write_report,
    )
    from kronlm.glue.heads import check_classifier
    from kronlm.models.loading import load_tokenizer

    if threads:
        torch.set_num_threads(threads)
    glue_task = get_task(task)
    if student_preset and student_config:
        raise click.BadParameter("give --student-preset or --student-config, not both", param_hint="--student-config")
    student_mode = bool(student_preset or student_config)
    if not student_mode and (general_distill or no_task_kd):
        raise click.BadParameter("--general-distill / --no-task-kd need a student (--student-preset or --student-config)")
    if teacher is None and model is None:
        raise click.BadParameter("give --model to fine-tune a teacher, or --teacher with a fine-tuned one", param_hint="--model")
    overrides = {"max_length": max_length, "batch_size": batch_size, "epochs": epochs, "max_steps": max_steps, "lr": lr,
                 "max_train_examples": max_train_examples, "seed": seed}
    config = _build_config(config_file, overrides)
    teacher_config = _build_config(teacher_config_file, overrides) if teacher_config_file else config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def load_split(split):
        return load_hf_glue_split(glue_task, split) if hf_dataset else load_glue_split(glue_task, split, data_dir)

    train_examples, dev_examples = load_split("train"), load_split("dev")
    tokenizer = load_tokenizer(teacher or model)
    click.echo(f"{glue_task.name}: {len(train_examples):,} train examples ({train_examples.source}), {len(dev_examples):,} dev examples")
    collator = GlueBatchCollator(tokenizer.pad_token_id, regression=glue_task.is_regression)
    settings = {"task": glue_task.name, "data": train_examples.source, "dev": dev_examples.source,
                "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    rows_out = []

    def encode(examples, cfg):
        if cfg.max_train_examples is not None and examples.split == "train":
            examples = examples.subset(cfg.max_train_examples, cfg.seed)
        return encode_examples(examples, tokenizer, cfg.max_length), examples.source

    # ---- teacher
    if teacher is None:
        teacher_model = build_classifier(model, glue_task, pad_token_id=tokenizer.pad_token_id, seed=teacher_config.seed)
        rows, source = encode(train_examples, teacher_config)
        click.echo(f"fine-tuning teacher {model} on {len(rows):,} examples")
        t_summary = train_classifier(teacher_model, rows, collator, teacher_config, out / "teacher-run", desc="teacher")
        teacher_dir = kronlm.save(teacher_model, out / "teacher", tokenizer=tokenizer,
                                  extra={"glue": {"task": glue_task.name, "train": source, "config": teacher_config.to_dict(),
                                                  "steps": t_summary.steps, "seconds": t_summary.seconds}})
        t_steps, t_seconds, t_examples, t_name = t_summary.steps, t_summary.seconds, len(rows), f"{model} fine-tuned"
        settings["teacher_config"] = teacher_config.to_dict()
        click.echo(f"teacher: {t_summary.steps} steps in {t_summary.seconds:.0f} s -> {teacher_dir}")
    else:
        from transformers import AutoModelForSequenceClassification

        teacher_model = kronlm.load(teacher, auto_class=AutoModelForSequenceClassification)
        check_classifier(teacher_model, glue_task)
        t_steps, t_seconds, t_examples, t_name = 0, 0.0, 0, str(teacher)
        # A teacher written by an earlier `kronlm glue` run records its own training run.
        meta_file = Path(teacher) / "kronlm_compression.json"
        if meta_file.is_file():
            from kronlm.utils.io import read_json

            glue_meta = read_json(meta_file).get("glue") or {}
            t_steps, t_seconds = int(glue_meta.get("steps", 0)), float(glue_meta.get("seconds", 0.0))
    dev_rows = encode_examples(dev_examples, tokenizer, config.max_length)
    t_metrics, _ = evaluate_classifier(teacher_model, dev_rows, collator, glue_task, batch_size=config.eval_batch_size)
    click.echo(f"teacher dev: {t_metrics}")
    rows_out.append(ModelResult("teacher", t_name, t_metrics, sum(p.numel() for p in teacher_model.parameters()),
                                count_embedding_linear_parameters(teacher_model), t_examples, t_steps, t_seconds))

    # ---- student
    if student_mode:
        from kronlm.compress.config import CompressionConfig
        from kronlm.compress.presets import get_preset

        comp = get_preset(student_preset) if student_preset else CompressionConfig.from_file(student_config)
        student_model, comp_report = make_student(teacher_model, comp)
        stages = []
        if general_distill:
            load_general_distilled(student_model, general_distill)
            stages.append(f"stage 1 from {general_distill}")
        loss_fn = task_distillation_loss(teacher_model, config.loss_weights_resolved(), task_kd=not no_task_kd)
        stages.append("task CE only" if no_task_kd else f"task ILKD ({config.recipe})")
        rows, source = encode(train_examples, config)
        click.echo(f"student: {comp_report.params_before:,} -> {comp_report.params_after:,} params; {', '.join(stages)} on {len(rows):,} examples")
        s_summary = train_classifier(student_model, rows, collator, config, out / "student-run", loss_fn=loss_fn, desc="student")
        kronlm.save(student_model, out / "student", tokenizer=tokenizer, report=comp_report,
                    extra={"glue": {"task": glue_task.name, "train": source, "config": config.to_dict(), "stages": stages,
                                    "steps": s_summary.steps, "seconds": s_summary.seconds,
                                    "first_losses": s_summary.losses[:5], "last_losses": s_summary.losses[-5:]}})
        s_metrics, _ = evaluate_classifier(student_model, dev_rows, collator, glue_task, batch_size=config.eval_batch_size)
        click.echo(f"student dev: {s_metrics}")
        rows_out.append(ModelResult("student", f"{comp.name or student_config or student_preset}", s_metrics,
                                    sum(p.numel() for p in student_model.parameters()),
                                    count_embedding_linear_parameters(student_model), len(rows), s_summary.steps,
                                    s_summary.seconds, notes="; ".join(stages)))
        settings["student_config"] = config.to_dict()
        settings["compression"] = comp.to_dict()

    report = GlueReport(glue_task.name, "dev", glue_task.main_metric, rows_out, settings)
    json_path, md_path = write_report(report, out)
    click.echo(report.markdown())
    click.echo(f"report -> {json_path}, {md_path}")
