"""GLUE benchmark of decoder students of SmolLM2-135M at 70 % of its parameters (results in docs/benchmarks/glue_decoders.md).

The claim of KnGPT2 (Edalati et al., ACL 2022) and of the layer-truncation study it answers: at the
same size, a Kronecker-compressed decoder keeps more of the teacher's GLUE accuracy than one whose
blocks were dropped. Three students of SmolLM2-135M-Instruct, built by
``benchmarks/recovery.py``'s builders at its size 0.70 (equal parameter counts within 1 %; each
builder prints the ``kronlm compress`` / ``kronlm truncate`` command it runs):

- ``kron-vlr``: Krony-PT-style Kronecker MLPs on all 30 blocks (gate/up B (2,1), down B (1,2)),
  modified Van Loan init; or, with ``--kron-student FOLDER``, a Kronecker student recovered
  beforehand (e.g. a ``best/`` folder of the recovery benchmark), row ``kron-student``;
- ``budget-svd``: the per-module budget allocation to the same parameter count, truncated SVDs only;
- ``truncate``: 19 of the 30 blocks kept (evenly spaced).

Per task (``--tasks``): the dense SmolLM2 fine-tuned with cross-entropy is the teacher (row
``dense``); each compressed student gets the teacher's head and is distilled from it with
KnGPT2's task ILKD (recipe ``ilkd-kngpt2`` with ``hidden_loss: relative_mse``, the project's
setting for Llama-family hidden states); the truncated student with the DistilGPT2 recipe (KD at
T = 2, CE, cosine on the last hidden state: no layer-wise term, so no layer map). Every model is
chosen on ``val_fraction`` (0.1) of its training rows; the dev split is only reported. Each row
runs what the printed ``kronlm glue`` command runs (``kronlm.tasks.glue.run_glue``; its settings
file goes to ``WORK/configs/``), in ``WORK/runs/TASK/MODEL``.

Results are appended to ``--results`` (default ``docs/benchmarks/glue_decoders.jsonl``, committed
beside the page), one row per (task, model) as each finishes; rows already there are skipped (on a
fresh clone too) and an interrupted row resumes from its checkpoints, so the benchmark
runs in parts (``--tasks``, ``--models``). Rows of one task must share their size settings (a
different ``--max-train-examples`` needs another ``--work``). ``--out`` (and the PNG beside it) is
rewritten after every row; ``--report-only`` only rewrites them.

Defaults sized for one thread of a shared CPU: SST-2 on a seeded 8,000-row subset of its 67,349
training rows at max length 64, one epoch; MRPC on all 3,668 rows at max length 128, two epochs;
batch 32, learning rate 5e-5 for the teacher and 1e-4 for the students, four held-out validations
per run.

    python benchmarks/glue_decoders.py --tasks mrpc --models dense,kron,truncate   # one part
    python benchmarks/glue_decoders.py                                               # the rest
    python benchmarks/glue_decoders.py --report-only
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from kronlm.bench.markdown import (
    append_result_row,
    environment_info,
    markdown_table,
    read_result_rows,
    reproduce_header,
    reproduce_section,
    write_markdown,
)
from kronlm.bench.plots import bar_plot, png_beside
from kronlm.compression import count_parameters
from kronlm.modeling import load
from kronlm.tasks import claim_task_folder
from kronlm.tasks.glue import GlueTrainConfig, get_task, load_glue_split, run_glue
from kronlm.tasks.glue.metrics import compute_metrics

REPO = Path(__file__).resolve().parents[1]
SIZE = 0.70
MODELS = ("dense", "kron", "budget-svd", "truncate")
# Per task, the size settings of the CPU run (GlueTrainConfig fields; the flags replace them).
TASKS = {
    "sst2": {"max_train_examples": 8000, "max_length": 64, "epochs": 1.0},
    "mrpc": {"max_train_examples": None, "max_length": 128, "epochs": 2.0},
}
TEACHER = {"lr": 5e-5, "recipe": "ce"}  # a teacher trains with CE on the labels whatever the recipe
STUDENT = {"lr": 1e-4}
RECIPES = {
    "compressed": {"recipe": "ilkd-kngpt2", "loss_weights": {"hidden_loss": "relative_mse"}},
    "truncate": {"recipe": "distilgpt2", "loss_weights": {}},
}
# Fields that rows of one task must share to be compared.
SHARED = ("max_train_examples", "max_dev_examples", "max_length", "epochs", "max_steps", "batch_size", "val_fraction", "seed")
TASK_NAMES = {"sst2": "SST-2", "mrpc": "MRPC"}
CLAIM = ("KnGPT2's claim, tested here: at the same size, the Kronecker student keeps more of the dense teacher's "
         "accuracy than the truncated one.")
STUDENTS_TEXT = (
    "Students (`benchmarks/recovery.py`'s builders at size 0.70, parameter counts equal within 1 %): `kron-vlr` "
    "(Krony-PT-style Kronecker MLPs on all 30 blocks, modified Van Loan init) or `kron-student` (a Kronecker "
    "student given with `--kron-student`, named in its row), `budget-svd` (budget allocation to the same count, "
    "truncated SVDs only), `truncate` (19 of 30 blocks). `dense` is the teacher: SmolLM2-135M-Instruct "
    "fine-tuned with cross-entropy. The compressed students learn from it with KnGPT2's task ILKD "
    "(`ilkd-kngpt2`, hidden-state MSE relative to the teacher's mean square), the truncated one with the "
    "DistilGPT2 recipe; every student starts from the teacher's task head. Students are not recovered on "
    "plain text first unless their row says so. `kron-vlr`'s factors: stored balanced (each term's scale split "
    "evenly between A and B, as kronlm stores them now) in the SST-2 rows; its MRPC row was measured earlier "
    "with the split the init left (the same weights; only the steps training takes differ)."
)
PROTOCOL_TEXT = (
    "Protocol: each model is the checkpoint with the best main metric on held-out training rows (10 % of "
    "the task's training rows or of their subset, seeded, never trained on); the GLUE dev split is evaluated and reported only. Params: all "
    "parameters of the sequence classifier. Retention: main metric over the dense teacher's. Train s: wall "
    "seconds of the training loop (held-out validations included); CPU s: the process's CPU seconds for "
    "the whole row (training, validation, dev evaluation) in the invocation that finished it, \"resumed\" when "
    "an earlier one was interrupted (GPU rows: wall seconds). One seed."
)


def recovery_builders():
    """``benchmarks/recovery.py`` loaded as a module: its student builders (``build_student``,
    ``SIZES``, ``show``), so that both benchmarks build the same students."""
    spec = importlib.util.spec_from_file_location("recovery_benchmark", REPO / "benchmarks" / "recovery.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RECOVERY = recovery_builders()


def row_name(model: str, args) -> str:
    """The row of ``model`` (one of :data:`MODELS`): ``kron`` is ``kron-vlr``, or ``kron-student``
    with ``--kron-student``."""
    if model == "kron":
        return "kron-student" if args.kron_student else "kron-vlr"
    return model


def build_students(names: list[str], args, log: list[str]) -> dict[str, Path]:
    """The student folder of each row name in ``names`` (built once under ``WORK/students``), their
    parameter counts checked equal to the Kronecker student's within 1 %.

    Raises:
        SystemExit: ``--kron-student`` is not a model folder, or a student's parameter count is
            more than 1 % away from the Kronecker student's (both named).
    """
    if not names:
        return {}
    kron = RECOVERY.build_student("kron-vlr", SIZE, args.work, args, log)
    folders = {"kron-vlr": kron}
    if args.kron_student:
        if not (Path(args.kron_student) / "config.json").is_file():
            raise SystemExit(f"--kron-student {args.kron_student}: not a model folder (no config.json)")
        folders["kron-student"] = Path(args.kron_student)
    for name in names:
        if name not in folders:
            folders[name] = RECOVERY.build_student(name, SIZE, args.work, args, log)
    reference = count_parameters(load(kron))
    for name in names:
        params = count_parameters(load(folders[name]))
        if abs(params - reference) > 0.01 * reference:
            raise SystemExit(f"student {name} ({folders[name]}): {params:,} parameters, more than 1 % away from the "
                             f"Kronecker student's {reference:,} at size {SIZE}")
    return {name: folders[name] for name in names}


def train_rows(task: str, config: GlueTrainConfig, glue_dir: Path) -> int:
    """Training rows of a run of ``config`` on ``task`` after the subset and the held-out split.

    Raises:
        FileNotFoundError / ValueError: missing or malformed TSV files, too large a val_fraction.
    """
    examples = load_glue_split(get_task(task), "train", glue_dir)
    if config.max_train_examples is not None:
        examples = examples.subset(config.max_train_examples, config.seed)
    return len(examples.hold_out(config.val_fraction, config.seed)[0])


def task_config(task: str, name: str, args, glue_dir: Path) -> GlueTrainConfig:
    """The settings of one row: the task's size settings and the flags, the teacher's or the
    students' learning rate, the row's recipe, ``--validations`` held-out validations per run
    (and as many checkpoints on a CPU, where runs are long enough to be interrupted)."""
    size = {**TASKS[task]}
    for field in ("max_train_examples", "max_length", "epochs", "max_steps", "batch_size", "max_dev_examples"):
        if getattr(args, field) is not None:
            size[field] = None if getattr(args, field) == "all" else getattr(args, field)
    role = TEACHER if name == "dense" else {**STUDENT, **RECIPES["truncate" if name == "truncate" else "compressed"]}
    config = GlueTrainConfig.from_dict({**size, **role, "mixed_precision": "auto" if args.device == "cuda" else "no"},
                                       source="benchmark settings")
    steps = config.training_config(train_rows(task, config, glue_dir)).max_steps
    every = max(1, math.ceil(steps / args.validations))
    return config.replace(eval_every=every, save_every=every if args.device == "cpu" else 0)


def run_row(task: str, name: str, config: GlueTrainConfig, student: Path | None, args, glue_dir: Path, builds: list[str],
            command: str) -> dict:
    """Train and evaluate one (task, model) row with ``config`` in ``WORK/runs/TASK/NAME`` (resuming
    its checkpoints); returns the row that goes to ``--results``, with the ``kronlm`` commands
    that built the students (``builds``) and ran the row."""
    folder = args.work / "runs" / task / name
    teacher = args.work / "runs" / task / "dense" / "teacher"
    config_file = config.to_file(args.work / "configs" / f"{task}-{name}.yaml")
    who = {"model": args.model} if name == "dense" else {"teacher": str(teacher), "student_init": str(student)}
    flags = ["--model", args.model] if name == "dense" else ["--teacher", str(teacher), "--student-init", str(student)]
    log = list(builds)
    RECOVERY.show(["glue", "--task", task, *flags, "--config", str(config_file), "--data-dir", str(args.data_dir),
                   "--out", str(folder), "--resume", "--threads", str(args.threads)], log)
    resumed = any((folder / run / "checkpoints").is_dir() for run in ("teacher-run", "student-run"))
    out = claim_task_folder(folder, who.get("teacher"), (who.get("model"), who.get("student_init"), None, None, str(config_file), None))
    clock = time.process_time if args.device == "cpu" else time.perf_counter
    started = clock()
    report = run_glue(task, out, config=config, data_dir=glue_dir, resume=True, **who)
    seconds = clock() - started
    result = report.row("teacher" if name == "dense" else "student")
    dev = load_glue_split(get_task(task), "dev", glue_dir)
    return {
        "task": task, "model": name, "student": None if student is None else str(student), "main_metric": report.main_metric,
        "metrics": result.metrics, "metrics_final": result.metrics_final, "metrics_best": result.metrics_best,
        "params": result.params, "selection": result.selection, "train_examples": result.train_examples,
        "val_examples": result.selection.get("val_examples", 0),
        "dev_examples": min(len(dev), config.max_dev_examples or len(dev)), "train_steps": result.train_steps,
        "train_seconds": result.train_seconds, "row_seconds": seconds, "clock": "cpu" if args.device == "cpu" else "wall",
        "resumed": resumed, "recipe": None if name == "dense" else config.recipe, "notes": result.notes,
        "settings": {k: config.to_dict()[k] for k in SHARED}, "config": config.to_dict(), "device": args.device,
        "kronlm_commands": log, "command": command, "env": environment_info(args.device),
    }


def refit_teacher(task: str, name: str, done: set, args, glue_dir: Path, builds: list[str], command: str) -> str | None:
    """Before a student's row: when the task's dense row was measured but its teacher folder is not in
    this work folder (an earlier machine's ``runs/``), fine-tune the teacher again with the row's
    settings and seed, keeping the recorded dense row. Returns the note for the student's row, or None."""
    teacher = args.work / "runs" / task / "dense" / "teacher"
    if name == "dense" or (task, "dense") not in done or (teacher / "config.json").is_file():
        return None
    print(f"{task}: the dense row is measured but its teacher {teacher} is not here; fine-tuning it again "
          "(same settings and seed; the recorded dense row stays)", flush=True)
    again = run_row(task, "dense", task_config(task, "dense", args, glue_dir), None, args, glue_dir, builds, command)
    metric = again["main_metric"]
    return f"teacher fine-tuned again in this work folder (same settings and seed): dev {metric} {100 * again['metrics'][metric]:.2f}"


def check_settings(rows: list[dict], task: str, config: GlueTrainConfig, device: str, results: Path) -> None:
    """Refuse a row whose size settings or device differ from those of the task's rows already measured.

    Raises:
        SystemExit: names the task, the field and both values.
    """
    mine = {k: config.to_dict()[k] for k in SHARED}
    for row in rows:
        if row["task"] != task:
            continue
        for key in SHARED:
            if row["settings"].get(key) != mine[key]:
                raise SystemExit(f"{results}: {task} rows were measured with {key}={row['settings'].get(key)!r}, this "
                                 f"invocation asks for {mine[key]!r}; use another --work for other settings")
        if row["device"] != device:
            raise SystemExit(f"{results}: {task} rows were measured on {row['device']}, this invocation runs on {device}; "
                             "use another --work")


def fmt(value: float | None) -> str:
    """A metric fraction in percent, 2 decimals ("-" for none)."""
    return "-" if value is None else f"{100 * value:.2f}"


def claim_verdicts(task: str, by_model: dict[str, dict]) -> list[str]:
    """One line per Kronecker row of ``task``: does it keep more of the main metric than the
    truncated row, with the dev standard error of the difference (from the accuracies, one seed)."""
    krons = [m for m in by_model if m.startswith("kron")]
    if not krons or "truncate" not in by_model:
        needed = " and ".join(n for n, have in (("a Kronecker row", krons), ("the truncate row", "truncate" in by_model)) if not have)
        verb = "are" if " and " in needed else "is"
        return [f"Claim on {TASK_NAMES.get(task, task)}: not measured yet ({needed} {verb} needed)."]
    return [claim_verdict(task, by_model[kron], by_model["truncate"]) for kron in krons]


def claim_verdict(task: str, k: dict, t: dict) -> str:
    """One line: Kronecker row ``k`` against truncated row ``t`` on ``task`` (see :func:`claim_verdicts`).

    Judged on dev accuracy, the metric whose standard error is known in closed form (two
    independent binomial proportions: conservative, as both rows score the same examples); the
    task's main metric (F1 for MRPC) is given beside it.
    """
    acc_k, acc_t = k["metrics"]["accuracy"], t["metrics"]["accuracy"]
    diff = 100 * (acc_k - acc_t)
    p = (acc_k + acc_t) / 2
    se = 100 * math.sqrt(2 * p * (1 - p) / k["dev_examples"])
    if abs(diff) < 2 * se:
        verdict = "not separated: the difference is within two standard errors"
    else:
        verdict = "holds" if diff > 0 else "does not hold"
    main = k["main_metric"]
    beside = "" if main == "accuracy" else (f"; {main} {fmt(k['metrics'][main])} against {fmt(t['metrics'][main])}, "
                                           f"{100 * (k['metrics'][main] - t['metrics'][main]):+.2f}")
    return (f"Claim on {TASK_NAMES.get(task, task)}: {k['model']} accuracy {fmt(acc_k)} against truncate {fmt(acc_t)} "
            f"({diff:+.2f} points; standard error of the difference about {se:.2f} points, one seed{beside}): **{verdict}**.")


def majority_baseline(task: str, glue_dir: Path | None) -> str:
    """One sentence: the dev metrics of always answering the dev split's most frequent class (what
    a model that learned nothing scores), or "" without the data."""
    if glue_dir is None:
        return ""
    glue_task = get_task(task)
    try:
        dev = load_glue_split(glue_task, "dev", glue_dir)
    except (FileNotFoundError, OSError, ValueError):
        return ""
    majority = max(set(dev.labels), key=dev.labels.count)
    metrics = compute_metrics(glue_task, [majority] * len(dev), dev.labels)
    return (f"Always answering the most frequent dev class (label {glue_task.labels[majority]}) scores "
            + ", ".join(f"{m} {fmt(v)}" for m, v in metrics.items()) + f" on all {len(dev):,} dev examples.")


def describe_settings(row: dict) -> str:
    """One sentence: the data and size settings a task's rows share (from one of its rows)."""
    size = row["settings"]
    subset = "all" if size["max_train_examples"] is None else f"a seeded subset of {size['max_train_examples']:,}"
    length = f"{size['max_steps']} steps" if size["max_steps"] else f"{size['epochs']:g} epoch{'' if size['epochs'] == 1 else 's'}"
    dev = f"{row['dev_examples']:,} examples" + (" (a seeded subset)" if size["max_dev_examples"] else " (all)")
    return (f"Training rows: {subset} of the training split, {row['val_examples']:,} of them held out and "
            f"{row['train_examples']:,} trained on; max length {size['max_length']}, batch {size['batch_size']}, {length}; "
            f"dev: {dev}; device {row['device']}.")


def report(rows: list[dict], tasks: list[str], models: list[str], png: Path | None, command: str, work: Path,
           glue_dir: Path | None = None) -> str:
    """The Markdown page of ``rows``: one table per task, the claim, missing rows, how to reproduce."""
    lines = ["# GLUE with decoder students of SmolLM2-135M at 70 % of the parameters", "", CLAIM, "", STUDENTS_TEXT, "",
             PROTOCOL_TEXT, ""]
    headers = ["model", "recipe", "dev metric", "params", "of dense", "compression", "retention", "steps", "train s",
               "CPU s", "checkpoint"]
    for task in tasks:
        of_task = {r["model"]: r for r in rows if r["task"] == task}
        if not of_task:
            continue
        dense = of_task.get("dense")
        main = next(iter(of_task.values()))["main_metric"]
        lines += [f"## {TASK_NAMES.get(task, task)}", "", describe_settings(next(iter(of_task.values()))), ""]
        table = []
        for name in ["dense", *[m for m in of_task if m != "dense"]]:
            r = of_task.get(name)
            if r is None:
                continue
            metrics = ", ".join(f"{m} {fmt(v)}" for m, v in r["metrics"].items())
            of_dense = f"{r['params'] / dense['params']:.1%}" if dense else "-"
            ratio = f"{dense['params'] / r['params']:.2f}x" if dense else "-"
            keep = f"{r['metrics'][main] / dense['metrics'][main]:.1%}" if dense and dense["metrics"][main] else "-"
            step = r["selection"].get("step")
            table.append([name + (f" (`{r['student']}`)" if name == "kron-student" else ""), r["recipe"] or "ce",
                          metrics, f"{r['params']:,}", of_dense, ratio, keep, str(r["train_steps"]),
                          f"{r['train_seconds']:,.0f}", f"{r['row_seconds']:,.0f}" + (" (resumed)" if r["resumed"] else ""), f"{r['selection'].get('checkpoint', '?')} (step {step})"])
        baseline = majority_baseline(task, glue_dir)
        lines += [markdown_table(headers, table, align=["l", "l", "l", *"r" * 7, "l"]), "", *([baseline, ""] if baseline else []),
                  *claim_verdicts(task, of_task), ""]
    if png is not None:
        lines += [f"![dev metrics per model]({png.name})", ""]
    lines += missing(rows, tasks, models, work)
    runs = sorted({r["command"] for r in rows}) or ["python benchmarks/glue_decoders.py"]  # no row yet: the whole grid
    kronlm_lines = []
    for r in rows:
        kronlm_lines += [c for c in r["kronlm_commands"] if c not in kronlm_lines]
    if kronlm_lines:
        lines += ["## What each row ran", "", "```bash", *kronlm_lines, "```", ""]
    info = rows[0]["env"] if rows else None
    machines = list(dict.fromkeys(f"{r['env']['cpu']}, device {r['env']['device']}" for r in rows))
    notes = [f"Also measured on: {m}." for m in machines[1:]] + [f"This page written by `{command}`."]
    lines.append(reproduce_section(runs, info=info, notes=notes))
    return "\n".join(lines) + "\n"


def missing(rows: list[dict], tasks: list[str], models: list[str], work: Path) -> list[str]:
    """Markdown lines naming every (task, model) of ``tasks`` x ``models`` without a row yet, and
    whether an interrupted run of it left checkpoints in ``WORK/runs/TASK/MODEL``."""
    done = {(r["task"], r["model"]) for r in rows}
    lines = []
    for task in tasks:
        for model in models:
            if (task, model) in done:
                continue
            folder = work / "runs" / task / model
            started = any((folder / run / "checkpoints").is_dir() for run in ("teacher-run", "student-run"))
            lines.append(f"- {TASK_NAMES.get(task, task)}: {model}" + (" (interrupted; resumes from its checkpoint)" if started else ""))
    if not lines:
        return []
    text = "Each is a part of the command below (`--tasks`, `--models`); an interrupted row resumes from its checkpoints."
    return ["## Not measured yet", "", text, "", *lines, ""]


def write_outputs(rows: list[dict], models: list[str], out: Path, command: str, work: Path, glue_dir: Path | None = None) -> None:
    """Write the Markdown page to ``out`` and the bar chart of every row's dev metrics beside it;
    the page covers every task of :data:`TASKS`, whatever part of the grid one invocation ran."""
    tasks = list(TASKS)
    png = png_beside(out)
    chart: dict[str, dict[str, float]] = {}
    for r in rows:
        for metric, value in r["metrics"].items():
            chart.setdefault(r["model"], {})[f"{TASK_NAMES.get(r['task'], r['task'])} {metric}"] = 100 * value
    categories = list(dict.fromkeys(c for values in chart.values() for c in values))
    if chart:
        out.parent.mkdir(parents=True, exist_ok=True)
        bar_plot(categories, {m: [v.get(c, float("nan")) for c in categories] for m, v in chart.items()}, png,
                 title="SmolLM2-135M and its students at 70 % of the parameters on GLUE dev", ylabel="dev metric (%)")
    write_markdown(report(rows, tasks, models, png if chart else None, command, work, glue_dir), out)
    print(f"report -> {out}" + (f", {png}" if chart else ""), flush=True)


def positive_or_all(text: str) -> int | str:
    """``--max-train-examples``: a positive integer, or ``all``.

    Raises:
        argparse.ArgumentTypeError: anything else.
    """
    if text.strip().lower() == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring); ``argv`` None reads ``sys.argv``.

    Raises:
        SystemExit: an unknown task or model row, a bad value, or a data folder without glue/.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="sst2,mrpc", help="Comma-separated GLUE tasks among " + ", ".join(TASKS))
    parser.add_argument("--models", default=",".join(MODELS), help="Comma-separated rows among " + ", ".join(MODELS)
                        + " (a student's task needs the dense teacher: its row runs first when missing)")
    parser.add_argument("--kron-student", default=None, help="Kronecker student folder to use instead of building kron-vlr "
                        "(e.g. a recovered best/ of benchmarks/recovery.py at size 0.70); row kron-student")
    parser.add_argument("--model", default="smollm2", help="The dense model (teacher and students' source).")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data", help="Data folder holding glue/ and wikitext-2-raw/.")
    parser.add_argument("--max-train-examples", type=positive_or_all, default=None, help="Seeded subset of each task's training "
                        "rows, the same for every model, or 'all' (default: 8,000 for SST-2, all for MRPC).")
    parser.add_argument("--max-dev-examples", type=int, default=None, help="Seeded subset of the dev rows (smoke runs; default all).")
    parser.add_argument("--epochs", type=float, default=None, help="Epochs of every run (default: SST-2 1, MRPC 2).")
    parser.add_argument("--max-steps", type=int, default=None, help="Optimizer steps of every run (wins over --epochs).")
    parser.add_argument("--max-length", type=int, default=None, help="Tokens per example (default: SST-2 64, MRPC 128).")
    parser.add_argument("--batch-size", type=int, default=None, help="Examples per optimizer step (default 32).")
    parser.add_argument("--validations", type=int, default=4, help="Held-out validations per run (checkpoint choice).")
    parser.add_argument("--calibration-sequences", type=int, default=32, help="Calibration sequences of the budget-svd student.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu hides any GPU from this process; cuda "
                        "trains with bf16 autocast.")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads.")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "glue_decoders", help="Results, students and run folders.")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "glue_decoders.md", help="Markdown page (PNG beside it).")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "benchmarks" / "glue_decoders.jsonl",
                        help="One JSON row per finished (task, model); rows present are not run again.")
    parser.add_argument("--report-only", action="store_true", help="Only rewrite --out and its PNG from --results.")
    args = parser.parse_args(argv)
    args.task_list = [t.strip().lower() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in args.task_list if t not in TASKS]
    if unknown or not args.task_list:
        parser.error(f"--tasks: unknown task {', '.join(unknown) or '(none given)'}; known: {', '.join(TASKS)}")
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.model_list if m not in MODELS]
    if unknown or not args.model_list:
        parser.error(f"--models: unknown row {', '.join(unknown) or '(none given)'}; known: {', '.join(MODELS)}")
    for name in ("max_dev_examples", "max_steps", "max_length", "batch_size", "validations",
                 "calibration_sequences", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.epochs is not None and not (math.isfinite(args.epochs) and args.epochs > 0):
        parser.error(f"--epochs must be a positive number, got {args.epochs}")
    if not (args.data_dir / "glue").is_dir():
        parser.error(f"--data-dir {args.data_dir}: no glue/ folder in it")
    return args


def main() -> None:
    """Parse the arguments, build the students, run the missing rows, write the page."""
    args = parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the task pipeline and accelerate take a GPU when they see one
    elif not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("KRONLM_DATA_DIR", str(args.data_dir))
    command = f"python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}".strip()
    results = args.results
    rows = read_result_rows(results)
    names = [row_name(m, args) for m in args.model_list]
    expected = [row_name(m, args) for m in MODELS]
    glue_dir = args.data_dir / "glue"
    if args.report_only:
        write_outputs(rows, expected, args.out, command, args.work, glue_dir)
        return
    print(reproduce_header(command, environment_info(args.device)), flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    done = {(r["task"], r["model"]) for r in rows}
    todo = []
    for task in args.task_list:
        for name in names:
            todo += [(task, "dense"), (task, name)]  # a student's task needs the dense teacher first
    todo = [key for key in dict.fromkeys(todo) if key not in done]
    builds: list[str] = []
    students = build_students(sorted({n for _, n in todo if n != "dense"}), args, builds)
    for task, name in todo:
        config = task_config(task, name, args, glue_dir)
        check_settings(rows, task, config, args.device, results)
        refit = refit_teacher(task, name, done, args, glue_dir, builds, command)
        row = run_row(task, name, config, students.get(name), args, glue_dir, builds, command)
        if refit:
            row["notes"] = "; ".join(filter(None, [row["notes"], refit]))
        rows.append(row)
        append_result_row(results, row)
        # Read back: a part running beside this one may have appended rows meanwhile.
        write_outputs(read_result_rows(results), expected, args.out, command, args.work, glue_dir)
    if not todo:
        write_outputs(rows, expected, args.out, command, args.work, glue_dir)


if __name__ == "__main__":
    main()
