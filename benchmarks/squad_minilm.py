"""SQuAD v1.1 benchmark of KroneckerBERT's claims with all-MiniLM-L6-v2 (report: docs/benchmarks/squad_minilm.md).

One row per configuration, appended to ``--results`` (default ``docs/benchmarks/squad_minilm.jsonl``,
committed beside the report) when it finishes; rows already there are skipped (on a fresh clone too), so the script runs in parts (``--only``) and an interrupted row resumes from
the checkpoints in ``WORK/runs/NAME``:

- ``teacher-lrLR-LLEN-SSTRIDE``, one per setting the teacher search tries: by default
  (``--teacher-search coordinate``) every ``--teacher-lrs`` at the first of ``--teacher-windows``,
  then the learning rate with the best held-out F1 there at each other window; ``grid`` tries
  every pair. Each is all-MiniLM-L6-v2 with a new span head fine-tuned on train.json
  (``configs/squad-minilm-teacher.yaml``) for up to ``--teacher-epochs`` epochs, the held-out
  F1 / EM recorded after each epoch, the best epoch kept (early stop after ``--teacher-patience``
  epochs without a better held-out F1). Last, when the best of those settings still had its best
  held-out F1 at its last epoch, that setting again with up to ``--teacher-more-epochs`` epochs
  (row ``teacher-...-E8`` at the default 8; 0 skips it). The students learn from the row whose best
  epoch has the best held-out F1; a work folder without its checkpoint (a fresh clone) trains it
  again, seeded, before the first student.
- students, each trained by task ILKD from that teacher (``configs/squad-minilm-student.yaml`` at
  the teacher's max length and doc stride): ``ffn2x`` (FFN-only Kronecker 2x,
  ``configs/minilm-ffn2x.yaml``), ``linear4x`` (linear layers 4x, ``configs/minilm-linear4x.yaml``),
  ``kb8`` (KroneckerBERT8 shapes, ``configs/glue-minilm-kb8.yaml``), ``kb8-s1`` (the same started
  from stage 1: the compressed *pretrained* encoder distilled from MiniLM on enwiki-sample text,
  ``configs/distill-minilm-general.yaml``, ``--stage1-steps`` steps; the paper's ablation), and
  ``truncated3`` (the teacher's layers 0, 2, 4, layer map 1, 3, 5: the layer-dropping baseline,
  17.2 M parameters, between ``ffn2x`` and ``linear4x``), and two budget students at ``ffn2x``'s
  parameter count (``kronlm compress --budget-params N`` on the FFN matrices, calibrated on
  enwiki-sample): ``lowrank2x`` (truncated SVDs only: the low-rank baseline) and ``kron2x-budget``
  (Kronecker factors only, shapes and terms chosen per matrix), each also at a peak learning rate
  of 5e-5 (``lowrank2x-lr5e-5``, ``kron2x-budget-lr5e-5``, from the same initial student); and
  ``ffn2x-aa``, ``ffn2x``'s shapes with activation-aware factors fitted on the same calibration
  (``kronlm compress --config ... --init activation_aware``).

``--device cuda`` sizes the runs for a GPU (32 windows a step, bf16 where supported; ``--batch-size``,
``--eval-batch-size``, ``--mixed-precision`` override); ``--device cpu`` (default) hides any GPU.
``--train-questions`` / ``--dev-questions`` take subsets for smoke runs (the report says so). The
report (``--out``, the teacher curve as a PNG beside it) is written after every invocation and
by ``--report-only``. The rows are defined in ``squad_minilm_rows.py`` and the page is written by
``squad_minilm_report.py``, both beside this script.

Each student row also records its per-question dev F1 (``squad_minilm_scores.py``), from which the
report gives the paired standard error of each comparison the papers' claims rest on;
``--question-scores`` adds them to rows recorded without them by scoring each row's kept
checkpoint again (its run folder must still hold it; the mean must equal the recorded dev F1).

Every checkpoint and setting is chosen on held-out training questions (``val_fraction`` 0.1 of
train.json in whole paragraphs, seeded: the same questions for every row); dev.json is evaluated
and reported only. Each part runs by library calls in this process and first prints the
``kronlm`` command that does the same (settings go to ``WORK/configs/NAME.yaml``).

    # CPU, in parts (one row per invocation), then the report
    python benchmarks/squad_minilm.py --work runs/squad-minilm --only teacher-lr0.0001-L256-S96
    python benchmarks/squad_minilm.py --work runs/squad-minilm --only kb8-s1
    python benchmarks/squad_minilm.py --work runs/squad-minilm --report-only --out docs/benchmarks/squad_minilm.md
    # GPU, everything
    python benchmarks/squad_minilm.py --work runs/squad-minilm-gpu --device cuda --out docs/benchmarks/squad_minilm.md
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# The rows and the report live beside this script; found the same way whether it runs or is imported.
sys.path.insert(0, str(Path(__file__).resolve().parent))
# Names the report module defines are read through this one too (tests, notebooks): one import for the benchmark.
from squad_minilm_report import MEMORY_METHODS, pct, report_markdown, retention, write_reports  # noqa: F401
from squad_minilm_scores import DECIMALS, question_f1
from squad_minilm_rows import (
    BUDGET_CALIBRATION_SEQUENCES,
    ENWIKI,
    FFN_MODULES,
    GENERAL,
    KB8,
    REPO,
    REPORT,
    STUDENT_CONFIG,
    STUDENT_KEYS,
    STUDENTS,
    TEACHER_CONFIG,
    TEACHER_KEYS,
    StudentSpec,
    TeacherSetting,
    chosen_teacher,
    held_out_f1,
    setting_of,
    still_improving,
)

from kronlm.bench.markdown import (
    append_result_row,
    environment_info,
    portable_paths,
    read_result_rows,
    reproduce_header,
)
from kronlm.bench.memory import peak_memory
from kronlm.compression import BudgetConfig, CompressionConfig, calibration_mix, save_truncated
from kronlm.distill import TrainingConfig, distill_on_text, latest_checkpoint, uniform_layer_map
from kronlm.modeling import compress, load, load_model, load_tokenizer, save
from kronlm.tasks import TaskReport, claim_task_folder, count_embedding_linear_parameters
from kronlm.tasks.squad import LOCAL_SQUAD_DIR, SquadTrainConfig, read_squad_json, run_squad
from kronlm.utils import default_data_dir
from kronlm.utils.atomic import atomic_path, write_json
from kronlm.utils.files import read_json

# Sizing per device: (windows per step, windows per evaluation pass, mixed precision).
DEVICE_DEFAULTS = {"cpu": (16, 64, "no"), "cuda": (32, 256, "auto")}


def _glue_benchmark():
    """benchmarks/glue_minilm.py as a module: its ``timed`` and ``compress_minilm`` helpers are shared."""
    spec = importlib.util.spec_from_file_location("glue_minilm", Path(__file__).with_name("glue_minilm.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("glue_minilm", module)
    spec.loader.exec_module(module)
    return module


glue_benchmark = _glue_benchmark()


@dataclass
class SquadData:
    """Where the questions come from: the local split's folder, or its train.json and a dev subset file."""

    folder: Path
    dev_file: Path | None = None

    def run_arguments(self) -> dict[str, Any]:
        """The data arguments of :func:`kronlm.tasks.squad.run_squad`."""
        if self.dev_file is None:
            return {"data_dir": self.folder}
        return {"train_file": self.folder / "train.json", "dev_file": self.dev_file}

    def flags(self) -> list[str]:
        """The same as ``kronlm squad`` flags."""
        if self.dev_file is None:
            return ["--data-dir", str(self.folder.parent)]
        return ["--train-file", str(self.folder / "train.json"), "--dev-file", str(self.dev_file)]

    def inputs(self) -> tuple:
        """What the run reads, for :func:`kronlm.tasks.claim_task_folder`."""
        args = self.run_arguments()
        return (args.get("train_file"), args.get("dev_file"), args.get("data_dir"))


def parse_float_list(text: str, option: str) -> list[float]:
    """Positive floats from a comma-separated list.

    Raises:
        SystemExit: an empty list, or an item that is not a positive number (names ``option``).
    """
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise SystemExit(f"{option}: {item!r} is not a number (expected e.g. 5e-5,1e-4)") from None
        if not (math.isfinite(value) and value > 0):
            raise SystemExit(f"{option}: {item!r} is not a positive number")
        values.append(value)
    return values


def parse_windows(text: str) -> list[tuple[int, int]]:
    """(max length, doc stride) pairs from ``"256:96,384:128"``.

    Raises:
        SystemExit: an item that is not two integers joined by ``:``.
    """
    pairs = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise SystemExit(f"--teacher-windows: expected LENGTH:STRIDE pairs such as 256:96, got {item!r}")
        pairs.append((int(parts[0]), int(parts[1])))
    return pairs


def teacher_grid(args, rows: dict[str, dict] | None = None) -> list[TeacherSetting]:
    """The teacher settings the search tries, as far as ``rows`` (the measured rows) decide them.

    ``args.teacher_search == "grid"``: every (learning rate, window) pair, learning rate first.
    ``"coordinate"``: every learning rate at the first window; once all of those are measured, the
    one with the best held-out F1 at each other window (a window changes how a context is cut, not
    which step size suits the encoder, so the learning rate is chosen once: 3 + 1 rows instead of
    3 x 2 at the defaults).
    """
    searched, _ = searched_settings(args, rows or {})
    return searched + longer_setting(args, searched, rows or {})


def searched_settings(args, rows: dict[str, dict]) -> tuple[list[TeacherSetting], bool]:
    """The (learning rate, window) settings of the search as far as ``rows`` decide them, and
    whether every one is decided (the coordinate search's other windows wait for its first)."""
    lrs, windows = parse_float_list(args.teacher_lrs, "--teacher-lrs"), parse_windows(args.teacher_windows)
    if args.teacher_search == "grid":
        return [TeacherSetting(lr, length, stride) for length, stride in windows for lr in lrs], True
    first = [TeacherSetting(lr, *windows[0]) for lr in lrs]
    if any(s.name not in rows for s in first):
        return first, len(windows) == 1
    best = max(first, key=lambda s: held_out_f1(rows[s.name]))
    return first + [TeacherSetting(best.lr, length, stride) for length, stride in windows[1:]], True


def longer_setting(args, searched: list[TeacherSetting], rows: dict[str, dict]) -> list[TeacherSetting]:
    """The search's last step: once every searched setting is measured, the best one trained again
    with up to ``--teacher-more-epochs`` epochs when its held-out F1 was still best at its last
    epoch, so that the teacher trains for as many epochs as held-out questions reward; else nothing."""
    more = args.teacher_more_epochs
    if more <= args.teacher_epochs or any(s.name not in rows for s in searched):
        return []
    best = max(searched, key=lambda s: held_out_f1(rows[s.name]))
    if not still_improving(rows[best.name]):
        return []
    return [TeacherSetting(best.lr, best.max_length, best.doc_stride, more)]


def pending_settings(args, rows: dict[str, dict]) -> list[str]:
    """The settings of the search not yet decided (coordinate search before its first window's rows
    are all measured), one line each for the report."""
    windows = parse_windows(args.teacher_windows)
    searched, decided = searched_settings(args, rows)
    first = "{}:{}".format(*windows[0])
    lines = [] if decided else [f"the learning rate with the best held-out F1 at {first}, at window {length}:{stride} "
                                f"(after the {first} rows)" for length, stride in windows[1:]]
    if args.teacher_more_epochs > args.teacher_epochs and (not decided or any(s.name not in rows for s in searched)):
        lines.append(f"the best of those again with up to {args.teacher_more_epochs} epochs, if its held-out F1 is still "
                     "best at its last epoch (after the other teacher rows)")
    return lines


def settings_of(args) -> dict[str, Any]:
    """The invocation's settings that rows depend on (:data:`TEACHER_KEYS`, :data:`STUDENT_KEYS`)."""
    return {"train_questions": args.train_questions, "dev_questions": args.dev_questions, "batch_size": args.batch_size,
            "mixed_precision": args.mixed_precision, "teacher_epochs": args.teacher_epochs,
            "teacher_more_epochs": args.teacher_more_epochs,
            "teacher_patience": args.teacher_patience, "student_epochs": args.student_epochs,
            "student_steps": args.student_steps, "stage1_steps": args.stage1_steps}


def check_rows_match(rows: dict[str, dict], settings: dict[str, Any], results: Path) -> None:
    """Refuse to add rows to a results file whose rows were measured with other settings.

    Raises:
        SystemExit: a row whose recorded setting differs (names the row, the setting, both values).
    """
    for name, row in rows.items():
        keys = TEACHER_KEYS if row["kind"] == "teacher" else STUDENT_KEYS
        for key in keys:
            if key in row["settings"] and row["settings"][key] != settings[key]:
                raise SystemExit(f"{results}: row {name} was measured with {key} = {row['settings'][key]!r}, "
                                 f"this invocation has {settings[key]!r}; use the same settings or another --results")


def task_overrides(args, row_settings: dict[str, Any]) -> dict[str, Any]:
    """The :class:`SquadTrainConfig` fields every row sets from the invocation (device sizing, subsets)."""
    return {"batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size, "mixed_precision": args.mixed_precision,
            "max_train_examples": row_settings["train_questions"]}


def teacher_config(args, setting: TeacherSetting) -> SquadTrainConfig:
    """The teacher settings of one grid point: configs/squad-minilm-teacher.yaml, validated once per
    epoch, ``--teacher-epochs`` epochs, the early stop of ``--teacher-patience``.

    Raises:
        SystemExit: settings the config refuses (a doc stride not below the length, ...), named.
    """
    overrides = {**task_overrides(args, settings_of(args)), "lr": setting.lr, "max_length": setting.max_length,
                 "doc_stride": setting.doc_stride, "epochs": float(setting.epochs or args.teacher_epochs), "max_steps": None, "eval_every": 0,
                 "early_stopping_patience": args.teacher_patience or None}
    try:
        return SquadTrainConfig.from_file(REPO / TEACHER_CONFIG, overrides)
    except ValueError as exc:
        raise SystemExit(f"{setting.name}: {exc}") from None


def student_config(args, teacher_row: dict, spec: StudentSpec | None = None) -> SquadTrainConfig:
    """The student settings: configs/squad-minilm-student.yaml at the teacher's window length and
    stride, ``--student-epochs`` epochs or ``--student-steps`` steps, ``spec.lr`` where it sets one."""
    overrides = {**task_overrides(args, settings_of(args)), "max_length": teacher_row["max_length"],
                 "doc_stride": teacher_row["doc_stride"], "epochs": float(args.student_epochs), "max_steps": args.student_steps}
    if spec is not None and spec.lr is not None:
        overrides["lr"] = spec.lr
    try:
        return SquadTrainConfig.from_file(REPO / STUDENT_CONFIG, overrides)
    except ValueError as exc:
        raise SystemExit(f"student settings: {exc}") from None


def write_dev_subset(source: Path, questions: int, out: Path) -> Path:
    """The first ``questions`` questions of an official-format SQuAD file, written to ``out`` in
    the same format (for smoke runs); returns ``out``.

    Raises:
        SystemExit: ``questions`` < 1.
    """
    if questions < 1:
        raise SystemExit(f"--dev-questions must be at least 1, got {questions}")
    root = read_json(source)
    left, articles = questions, []
    for article in root["data"]:
        paragraphs = []
        for paragraph in article["paragraphs"]:
            if left <= 0:
                break
            qas = paragraph["qas"][:left]
            left -= len(qas)
            paragraphs.append({**paragraph, "qas": qas})
        if paragraphs:
            articles.append({**article, "paragraphs": paragraphs})
        if left <= 0:
            break
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"version": root.get("version", "1.1"), "data": articles})
    return out


def timed(argv: list[str], step) -> tuple[float, float]:
    """Print and run one ``kronlm`` command's library calls (``glue_minilm.timed``); returns
    (wall seconds, CPU seconds of this process)."""
    cpu = time.process_time()
    wall = glue_benchmark.timed(argv, step)
    cpu = time.process_time() - cpu
    print(f"# {wall:,.0f} s wall, {cpu:,.0f} s CPU", flush=True)
    return wall, cpu


def squad_run(out: Path, config: SquadTrainConfig, data: SquadData, argv: list[str], threads: int,
              **models) -> tuple[TaskReport, float, float, bool, dict]:
    """``kronlm squad ... --config WORK/configs/NAME.yaml --out OUT --resume``: write the settings
    file, claim ``out``, run :func:`kronlm.tasks.squad.run_squad` (continuing from checkpoints left
    by an interrupted call).

    Returns:
        (report, wall seconds, CPU seconds, whether a checkpoint was resumed, peak memory of this
        call: {"bytes", "method"} from :func:`kronlm.bench.memory.peak_memory`: the process's peak
        resident set on CPU, the allocator's peak on a GPU).
    """
    config_file = out.parent.parent / "configs" / f"{out.name}.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config.to_file(config_file)
    resumed = any(latest_checkpoint(out / run) is not None for run in ("teacher-run", "student-run") if (out / run).is_dir())
    inputs = (models.get("model"), models.get("student_init"), models.get("general_distill"), models.get("student"),
              str(config_file), None, *data.inputs())
    folder = claim_task_folder(out, models.get("teacher"), inputs)
    argv = ["squad", *argv, "--config", str(config_file), *data.flags(), "--out", str(out), "--threads", str(threads), "--resume"]
    holder = {}

    def run():
        holder["report"] = run_squad(folder, config=config, resume=True, **data.run_arguments(), **models)

    device = "cuda" if torch.cuda.is_available() else "cpu"  # --device cpu hides every GPU
    wall, cpu = timed(argv, lambda: holder.setdefault("memory", peak_memory(run, device)))
    peak, _, method = holder["memory"]
    return holder["report"], wall, cpu, resumed, {"bytes": peak, "method": method}


def validation_curve(run_dir: Path, history: list[dict]) -> list[dict]:
    """Held-out F1 / EM at every validation of a training run, across resumed calls.

    ``history`` is the run's ``val_history`` (``training_summary.json``; checkpoints carry it
    across resumes); for runs whose checkpoints predate that, the validations of earlier calls
    come from the run's TensorBoard logs (``val/f1``, ``val/exact_match``). Returns
    ``[{"step", "f1", "exact_match"}]`` by step, fractions.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, dict[str, float]] = {}
    for events in sorted((run_dir / "logs").rglob("events.out.tfevents*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags = accumulator.Tags().get("scalars", [])
        for key in ("f1", "exact_match"):
            if f"val/{key}" in tags:
                for event in accumulator.Scalars(f"val/{key}"):
                    points.setdefault(int(event.step), {})[key] = float(event.value)
    for entry in history:
        points[int(entry["step"])] = {"f1": float(entry["f1"]), "exact_match": float(entry["exact_match"])}
    return [{"step": step, **values} for step, values in sorted(points.items()) if "f1" in values]


def run_curve(folder: Path) -> list[dict] | None:
    """Held-out F1 / EM at every validation of the training run that wrote the model ``folder``
    (``OUT/teacher`` or ``OUT/student``; :func:`validation_curve` of ``OUT/teacher-run`` or
    ``OUT/student-run``), or None when the folder has no training summary (a row measured elsewhere)."""
    summary = folder / "training_summary.json"
    if not summary.is_file():
        return None
    return validation_curve(folder.parent / f"{folder.name}-run", read_json(summary)["run"].get("val_history") or [])


def model_row(report: TaskReport, role: str) -> dict[str, Any]:
    """The fields of one model of a task report that the tables show."""
    row = report.row(role)
    return {"metrics": row.metrics, "metrics_final": row.metrics_final, "metrics_best": row.metrics_best, "params": row.params,
            "params_embedding_linear": row.params_embedding_linear, "train_examples": row.train_examples,
            "train_steps": row.train_steps, "train_seconds": row.train_seconds, "train_tokens": row.train_tokens,
            "selection": row.selection, "model": row.model}


def run_teacher(setting: TeacherSetting, args, work: Path, data: SquadData) -> dict:
    """Fine-tune one teacher of the grid; returns its row (curve, choice, dev scores, times)."""
    out = work / "runs" / setting.name
    config = teacher_config(args, setting)
    report, wall, cpu, resumed, memory = squad_run(out, config, data, ["--model", "minilm"], args.threads, model="minilm")
    teacher = model_row(report, "teacher")
    summary = read_json(out / "teacher" / "training_summary.json")
    per_epoch = max(1, teacher["train_examples"] // config.batch_size)
    curve = [{**point, "epoch": round(point["step"] / per_epoch, 2)} for point in run_curve(out / "teacher")]
    return {"name": setting.name, "kind": "teacher", "lr": setting.lr, "max_length": setting.max_length,
            "doc_stride": setting.doc_stride, "epochs": int(config.epochs), "curve": curve, "steps_per_epoch": per_epoch,
            "stopped_early": bool(summary["run"].get("stopped_early")), "teacher": teacher,
            "folder": str(out / "teacher"), "data": report.settings.get("data"), "peak_memory": memory, "wall_seconds": wall,
            "cpu_seconds": cpu, "resumed": resumed}


def teacher_checkpoint(row: dict, args, work: Path, data: SquadData, train=None) -> dict:
    """The chosen teacher's row with its checkpoint on disk.

    A work folder without it (a fresh clone: the results file is committed, checkpoints are not)
    trains the row's setting again into ``work`` (``train``: :func:`run_teacher`). The run is seeded
    (held-out split, data order, head initialisation), so the same machine and versions give the
    same teacher; the held-out F1 of both is printed, and each student row records the dev scores of
    the teacher it actually learnt from, so its retention is always against its own teacher.

    Returns:
        ``row`` with ``folder`` pointing at the checkpoint (a ``retrained`` entry when trained again).
    """
    if (Path(row["folder"]) / "config.json").is_file():
        return row
    setting = setting_of(row)
    print(f"# {row['folder']}: the chosen teacher's checkpoint is not in this work folder; training {setting.name} again",
          flush=True)
    again = (train or run_teacher)(setting, args, work, data)
    print(f"# {setting.name} again: held-out F1 {pct(held_out_f1(again))} (row: {pct(held_out_f1(row))}), "
          f"dev F1 {pct(again['teacher']['metrics'].get('f1'))} (row: {pct(row['teacher']['metrics'].get('f1'))})", flush=True)
    return {**row, "folder": again["folder"], "retrained": {k: again[k] for k in ("teacher", "wall_seconds", "cpu_seconds")}}


def stage1_encoder(args, work: Path) -> dict:
    """KroneckerBERT's stage 1, run once per work folder: MiniLM compressed with the KroneckerBERT8
    shapes and distilled from MiniLM on enwiki-sample text (``--stage1-steps`` steps of
    configs/distill-minilm-general.yaml, one pass over fresh text). Returns its record
    (``WORK/stage1/stage1.json``: folder of the chosen encoder, steps, held-out loss, seconds).

    Raises:
        SystemExit: a stage 1 of another step count already in the work folder.
    """
    folder = work / "stage1"
    record_file = folder / "stage1.json"
    if record_file.is_file():
        record = read_json(record_file)
        if record["steps"] != args.stage1_steps:
            raise SystemExit(f"{record_file}: stage 1 ran {record['steps']} steps, this invocation asks for "
                             f"{args.stage1_steps} (--stage1-steps); use the same or another --work")
        return record
    compressed = folder / "compressed"
    if not (compressed / "config.json").is_file():
        timed(["compress", "minilm", "--config", KB8, "--out", str(compressed)], lambda: glue_benchmark.compress_minilm(compressed))
    steps = args.stage1_steps
    config = TrainingConfig.from_file(REPO / GENERAL, {"max_steps": steps, "epochs": None, "warmup_steps": min(steps // 10, steps - 1),
                                                       "mixed_precision": args.mixed_precision})
    tokens_per_step = config.micro_batch_size * config.grad_accum_steps * config.block_size
    val_fraction = 0.05
    max_tokens = math.ceil(steps * tokens_per_step / (1 - val_fraction)) + tokens_per_step
    config_file = work / "configs" / "stage1.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config.to_file(config_file)
    text = Path(args.data_dir) / ENWIKI
    run_dir = folder / "run"
    resume = run_dir.is_dir() and latest_checkpoint(run_dir) is not None
    holder = {}
    wall, cpu = timed(
        ["distill", "--student", str(compressed), "--teacher", "minilm", "--data", str(text), "--max-tokens", str(max_tokens),
         "--val-fraction", str(val_fraction), "--out", str(run_dir), "--config", str(config_file), *(["--resume"] if resume else [])],
        lambda: holder.setdefault("result", distill_on_text(str(compressed), "minilm", text, config, run_dir, resume=resume,
                                                            max_tokens=max_tokens, val_fraction=val_fraction)))
    result = holder["result"]
    if result.best_dir is None:
        raise SystemExit(f"{run_dir}: stage 1 wrote no best/ (no finite held-out loss); see its log above")
    record = {"folder": str(run_dir / "best"), "steps": steps, "tokens": result.tokens_seen, "max_tokens": max_tokens,
              "best_step": result.best_step, "held_out_loss": result.best_val, "val_metric": result.val_metric,
              "train_seconds": result.seconds, "wall_seconds": wall, "cpu_seconds": cpu, "resumed": resume}
    write_json(record_file, record)
    return record


def truncated_init(spec: StudentSpec, teacher_row: dict, work: Path) -> Path:
    """``kronlm truncate TEACHER --layers ...``: the chosen teacher's encoder cut to
    ``spec.keep_layers`` (the pipeline gives it the teacher's span head); returns its folder."""
    out = work / "models" / f"{spec.name}-from-{teacher_row['name']}"
    if not (out / "config.json").is_file():
        layers = ",".join(str(i) for i in spec.keep_layers)
        timed(["truncate", teacher_row["folder"], "--layers", layers, "--out", str(out)],
              lambda: save_truncated(load_model(teacher_row["folder"]), list(spec.keep_layers), out,
                                     tokenizer=load_tokenizer(teacher_row["folder"])))
    return out


def budget_init(spec: StudentSpec, teacher_row: dict, args, work: Path) -> Path:
    """``kronlm compress TEACHER --budget-params N --budget-modules FFN --families ...``: the chosen
    teacher's FFN matrices compressed by the budget allocation to the parameter count ``spec.compression``
    gives it (no sensitivity pass and no subset check: both score a causal LM's loss, which a QA
    model has not); returns the folder, shared by the rows that differ in their recipe alone (the
    first such row names it)."""
    first = next(s for s in STUDENTS.values() if (s.compression, s.budget_families) == (spec.compression, spec.budget_families))
    out = work / "models" / f"{first.name}-from-{teacher_row['name']}"
    if (out / "config.json").is_file():
        return out
    folder = teacher_row["folder"]
    reference = compress(load_model(folder, task="question-answering"), CompressionConfig.from_file(REPO / spec.compression))
    target = reference.compression_report.params_after
    del reference
    config = BudgetConfig(target_params=target, modules=list(FFN_MODULES), families=spec.budget_families, sensitivity_sequences=0,
                          subset_check=False)
    flags = ["--budget-params", str(target), *[f for m in FFN_MODULES for f in ("--budget-modules", m)],
             "--families", ",".join(spec.budget_families), "--sensitivity-sequences", "0", "--no-subset-check"]
    return compress_calibrated(teacher_row, config, flags, args, out)


def compress_calibrated(teacher_row: dict, config: CompressionConfig | BudgetConfig, flags: list[str], args, out: Path) -> Path:
    """``kronlm compress TEACHER FLAGS --calibration ENWIKI --out OUT``: the chosen teacher (its span
    head kept) compressed by ``config`` on ``BUDGET_CALIBRATION_SEQUENCES`` enwiki-sample windows of
    the teacher's max length, saved to ``out``; returns ``out``."""
    folder = teacher_row["folder"]
    model, tokenizer = load_model(folder, task="question-answering"), load_tokenizer(folder)
    text, length = args.data_dir / ENWIKI, teacher_row["max_length"]
    argv = ["compress", folder, *flags, "--calibration", str(text), "--calibration-sequences", str(BUDGET_CALIBRATION_SEQUENCES),
            "--calibration-length", str(length), "--out", str(out)]

    def step():
        ids, _ = calibration_mix(model, tokenizer, [str(text)], BUDGET_CALIBRATION_SEQUENCES, length)
        compress(model, config, calibration=ids)
        save(model, out, tokenizer=tokenizer, report=model.compression_report)

    timed(argv, step)
    return out


def calibrated_init(spec: StudentSpec, teacher_row: dict, args, work: Path) -> Path:
    """``kronlm compress TEACHER --config COMPRESSION --init INIT --calibration ENWIKI``: the chosen
    teacher compressed by ``spec.compression`` with every factor fitted by ``spec.init`` on the
    budget students' calibration windows; returns the folder."""
    out = work / "models" / f"{spec.name}-from-{teacher_row['name']}"
    if (out / "config.json").is_file():
        return out
    config = CompressionConfig.from_file(REPO / spec.compression)
    for target in config.targets:
        target.init = spec.init
    return compress_calibrated(teacher_row, config, ["--config", spec.compression, "--init", spec.init], args, out)


def encoder_linear_parameters(folder: Path) -> int:
    """Parameters of the linear layers (dense or Kronecker, biases included) in a QA model's
    encoder layers: what the "linear layers" ratio is stated on (embeddings, pooler and head apart)."""
    from transformers import AutoModelForQuestionAnswering

    model = load(folder, auto_class=AutoModelForQuestionAnswering)
    return count_embedding_linear_parameters(model.base_model.encoder)


def rewrite_rows(results: Path, lines: list[dict]) -> None:
    """Replace ``results`` with ``lines`` (one JSON row per line, paths portable), atomically."""
    with atomic_path(results) as tmp:
        tmp.write_text("".join(portable_paths(json.dumps(row)) + "\n" for row in lines))


def fill_student_curves(results: Path) -> None:
    """Give the student rows of ``results`` recorded without a held-out curve the curve their run
    folder still holds (the latest row of each name: the one the folder belongs to), and rewrite
    the file atomically when one changed."""
    lines = read_result_rows(results)
    latest = {row["name"]: row for row in lines}
    changed = False
    for row in latest.values():
        if row["kind"] == "student" and row.get("curve") is None:
            row["curve"] = run_curve(REPO / row["folder"])
            changed |= row["curve"] is not None
    if changed:
        rewrite_rows(results, lines)


def student_question_f1(name: str, folder: Path, recorded_f1: float, config: SquadTrainConfig, args, data: SquadData) -> list[float]:
    """Per-question dev F1 of the student in ``folder`` (fractions, dev.json's order, rounded to
    ``DECIMALS``), decoded with ``config``: what the report's paired comparisons use.

    Raises:
        SystemExit: their mean is not ``recorded_f1``, the row's dev F1 (the folder no longer
            holds the checkpoint the row measured): within 1e-6 on the CPU, whose float32 forward
            repeats bit for bit; within 1e-3 (0.1 F1) on a GPU, whose kernels may not, and where a
            near-tie between two spans may then flip.
    """
    dev = data.dev_file or data.folder / "dev.json"
    scores = question_f1(folder, read_squad_json(dev), config, load_tokenizer(folder), str(dev), args.device)
    mean = sum(scores) / len(scores)
    if abs(mean - recorded_f1) > (1e-6 if args.device == "cpu" else 1e-3):
        raise SystemExit(f"{name}: {folder} scores dev F1 {100 * mean:.4f} now but its row recorded {100 * recorded_f1:.4f}: "
                         "the folder no longer holds the checkpoint the row measured")
    return [round(v, DECIMALS) for v in scores]


def fill_question_scores(results: Path, args, data: SquadData) -> None:
    """Give the student rows of ``results`` recorded without per-question dev F1
    (``dev_f1_questions``) the scores of their kept checkpoint (the latest row of each name; its
    folder must still hold it), and rewrite the file atomically after each (an interrupted fill
    keeps what it did)."""
    lines = read_result_rows(results)
    rows = {row["name"]: row for row in lines}
    for row in rows.values():
        if row["kind"] != "student" or row.get("dev_f1_questions") is not None:
            continue
        config = student_config(args, rows[row["teacher_name"]], STUDENTS.get(row["name"]))
        print(f"# {row['name']}: per-question dev F1 of {row['folder']}", flush=True)
        row["dev_f1_questions"] = student_question_f1(row["name"], Path(row["folder"]), row["student"]["metrics"]["f1"],
                                                      config, args, data)
        rewrite_rows(results, lines)


def run_student(spec: StudentSpec, teacher_row: dict, args, work: Path, data: SquadData) -> dict:
    """Distil one student from the chosen teacher by task ILKD; returns its row."""
    out = work / "runs" / spec.name
    config = student_config(args, teacher_row, spec)
    models: dict[str, Any] = {"teacher": teacher_row["folder"]}
    argv = ["--teacher", teacher_row["folder"]]
    stage1 = None
    if spec.budget_families is not None or spec.init is not None:
        init = budget_init if spec.budget_families is not None else calibrated_init
        models["student_init"] = str(init(spec, teacher_row, args, work))
        argv += ["--student-init", models["student_init"]]
    elif spec.compression is not None:
        models["student"] = str(REPO / spec.compression)
        argv += ["--student-config", spec.compression]
    if spec.stage1:
        stage1 = stage1_encoder(args, work)
        models["general_distill"] = stage1["folder"]
        argv += ["--general-distill", stage1["folder"]]
    if spec.keep_layers is not None:
        depth = read_json(Path(teacher_row["folder"]) / "config.json")["num_hidden_layers"]
        layer_map = uniform_layer_map(len(spec.keep_layers), depth)
        models.update(student_init=str(truncated_init(spec, teacher_row, work)), layer_map=layer_map)
        argv += ["--student-init", models["student_init"], "--layer-map", ",".join(str(i) for i in layer_map)]
    report, wall, cpu, resumed, memory = squad_run(out, config, data, argv, args.threads, **models)
    student = model_row(report, "student")
    return {"name": spec.name, "kind": "student", "teacher_name": teacher_row["name"], "teacher": model_row(report, "teacher"),
            "student": student, "curve": run_curve(out / "student"),
            "dev_f1_questions": student_question_f1(spec.name, out / "student", student["metrics"]["f1"], config, args, data),
            "linear_params": encoder_linear_parameters(out / "student"),
            "teacher_linear_params": encoder_linear_parameters(Path(teacher_row["folder"])), "stage1": stage1,
            "folder": str(out / "student"), "lr": config.lr, "peak_memory": memory, "wall_seconds": wall, "cpu_seconds": cpu,
            "resumed": resumed}


def read_rows(path: Path) -> dict[str, dict]:
    """The rows of a results file by name (a later row of the same name wins)."""
    return {row["name"]: row for row in read_result_rows(path)}


def parse_args(argv: list[str] | None = None):
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/squad-minilm"), help="run folder: runs/, configs/, data/")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "benchmarks" / "squad_minilm.jsonl",
                        help="one JSON row per finished configuration; rows present are not run again")
    parser.add_argument("--out", type=Path, default=None, help=f"report to write (e.g. {REPORT}; the PNG goes beside it); default: print it")
    parser.add_argument("--only", default="all",
                        help="comma-separated rows to run: all, teacher (the grid), students, or row names (teacher-lr..., "
                             + ", ".join(STUDENTS) + "); stage1: kb8-s1's stage-1 encoder alone (needs no teacher)")
    parser.add_argument("--report-only", action="store_true", help="only write the report from --results")
    parser.add_argument("--question-scores", action="store_true",
                        help="give the student rows recorded without them their per-question dev F1 (re-scoring each "
                             "row's kept checkpoint, which its run folder must hold), then write the report")
    parser.add_argument("--device", choices=sorted(DEVICE_DEFAULTS), default="cpu", help="where training and evaluation run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--data-dir", type=Path, default=None, help=f"folder holding {LOCAL_SQUAD_DIR}/ and {ENWIKI} "
                        "(default $KRONLM_DATA_DIR, else ../shared/data)")
    parser.add_argument("--teacher-lrs", default=None, help="teacher learning rates tried (default 5e-5,1e-4,2e-4; "
                        "--report-only: the grid the rows were run with)")
    parser.add_argument("--teacher-windows", default=None, help="teacher MAX_LENGTH:DOC_STRIDE pairs tried (default "
                        "256:96,384:128; --report-only: the grid the rows were run with)")
    parser.add_argument("--teacher-search", choices=["coordinate", "grid"], default=None,
                        help="coordinate (default): every learning rate at the first window, then the best of them at "
                             "the other windows; grid: every pair (--report-only: the search the rows were run with)")
    parser.add_argument("--teacher-epochs", type=int, default=4, help="teacher epochs at most (held-out F1 after each)")
    parser.add_argument("--teacher-patience", type=int, default=1,
                        help="stop a teacher after this many epochs without a better held-out F1 (0 = never)")
    parser.add_argument("--teacher-more-epochs", type=int, default=8,
                        help="the search's last step: when the best setting's held-out F1 was still best at its last "
                             "epoch, train it again with up to this many epochs (same early stop; 0 = never)")
    parser.add_argument("--student-epochs", type=float, default=3.0, help="task-distillation epochs of each student")
    parser.add_argument("--student-steps", type=int, default=None, help="task-distillation steps instead (smoke runs)")
    parser.add_argument("--stage1-steps", type=int, default=1000, help="stage-1 steps of 2,048 tokens (kb8-s1)")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per step (default: cpu 16, cuda 32)")
    parser.add_argument("--eval-batch-size", type=int, default=None, help="windows per evaluation pass (default: cpu 64, cuda 256)")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "auto"], default=None, help="default: cpu no, cuda auto")
    parser.add_argument("--train-questions", type=int, default=None, help="seeded subset of train.json's questions (smoke runs)")
    parser.add_argument("--dev-questions", type=int, default=None, help="first N questions of dev.json only (smoke runs)")
    args = parser.parse_args(argv)
    args.grid_given = any(v is not None for v in (args.teacher_lrs, args.teacher_windows, args.teacher_search))
    args.teacher_lrs = args.teacher_lrs or "5e-5,1e-4,2e-4"
    args.teacher_windows = args.teacher_windows or "256:96,384:128"
    args.teacher_search = args.teacher_search or "coordinate"
    batch, eval_batch, precision = DEVICE_DEFAULTS[args.device]
    args.batch_size = args.batch_size or batch
    args.eval_batch_size = args.eval_batch_size or eval_batch
    args.mixed_precision = args.mixed_precision or precision
    for name in ("threads", "teacher_epochs", "stage1_steps", "batch_size", "eval_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("student_steps", "train_questions", "dev_questions"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.teacher_patience < 0 or args.teacher_more_epochs < 0 or not args.student_epochs > 0:
        parser.error("--teacher-patience and --teacher-more-epochs must be >= 0 and --student-epochs > 0")
    args.work = args.work.resolve()
    args.out = None if args.out is None else args.out.resolve()
    data_dir = args.data_dir or default_data_dir()
    if data_dir is None:
        parser.error(f"no data: give --data-dir (a folder holding {LOCAL_SQUAD_DIR}/) or set $KRONLM_DATA_DIR")
    args.data_dir = Path(data_dir).resolve()
    return args


def teachers_to_run(args, rows: dict[str, dict], named: list[TeacherSetting], wanted: set[str], search: bool) -> list[TeacherSetting]:
    """The teacher settings still without a row, in order: the search's settings as far as ``rows``
    decide them (``search``: ``--only`` asked for it) and those of ``named`` that ``wanted`` names
    (a setting named runs even where the search would not try it; its row competes too)."""
    decided = teacher_grid(args, rows)
    searched = {s.name for s in decided} if search else set()
    pool = named + [s for s in decided if s not in named]
    return [s for s in pool if (s.name in searched or s.name in wanted) and s.name not in rows]


def selected(only: str, grid: list[TeacherSetting]) -> set[str]:
    """Row names ``--only`` asks for by name: students, and teacher settings named one by one
    (``grid``: every setting that may be named). ``all`` and ``teacher`` name no teacher setting:
    they ask for the search, whose settings the rows decide as they land (:func:`teacher_grid`).

    Raises:
        SystemExit: an unknown name (lists the known ones).
    """
    teachers, students = [s.name for s in grid], list(STUDENTS)
    names: set[str] = set()
    for item in only.split(","):
        if item == "all":
            names |= set(students)
        elif item == "teacher":
            pass
        elif item == "students":
            names |= set(students)
        elif item in teachers or item in students:
            names.add(item)
        elif item != "stage1":  # not a row: kb8-s1's encoder, which needs no teacher (main runs it)
            raise SystemExit(f"--only: unknown row {item!r}; known: all, teacher, students, stage1, {', '.join(teachers + students)}")
    return names


def report_from_rows(rows: dict[str, dict], args, base: str) -> None:
    """Write the report of ``rows`` alone, with the teacher search the rows were run with unless
    the command gave one."""
    searched = [r["search"] for r in rows.values() if r.get("search")]
    if not args.grid_given and searched:
        args.teacher_lrs, args.teacher_windows, args.teacher_search = (searched[-1][k] for k in ("lrs", "windows", "kind"))
        args.teacher_more_epochs = searched[-1].get("more_epochs", args.teacher_more_epochs)
    grid = teacher_grid(args, rows)
    write_reports(rows, [s.name for s in grid], args, base, pending_settings(args, rows))


def main() -> None:
    """Run the rows ``--only`` asks for that ``--results`` lacks, then write the report."""
    args = parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything touches CUDA: the runs pick CUDA when they see it
    elif not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    torch.set_num_threads(args.threads)
    os.chdir(REPO)
    command = "python benchmarks/squad_minilm.py " + shlex.join(sys.argv[1:])
    work = args.work.relative_to(REPO) if args.work.is_relative_to(REPO) else args.work
    base = shlex.join(["python", "benchmarks/squad_minilm.py", "--work", str(work),
                       *([] if args.device == "cpu" else ["--device", args.device])])
    results = args.results
    fill_student_curves(results)  # rows recorded before students kept their curve
    rows = read_rows(results)
    if args.report_only:
        report_from_rows(rows, args, base)
        return
    print(reproduce_header(command), flush=True)
    lrs, windows = parse_float_list(args.teacher_lrs, "--teacher-lrs"), parse_windows(args.teacher_windows)
    every = [TeacherSetting(lr, length, stride) for length, stride in windows for lr in lrs]
    every += [s for s in teacher_grid(args, rows) if s not in every]  # the longer run, once the search has decided it
    wanted = selected(args.only, every)
    every_teacher = any(item in ("all", "teacher") for item in args.only.split(","))
    settings = settings_of(args)
    check_rows_match(rows, settings, args.results)
    for setting in every:
        teacher_config(args, setting)  # refuses bad settings before any work
    folder = args.data_dir / LOCAL_SQUAD_DIR
    for name in ("train.json", "dev.json"):
        if not (folder / name).is_file():
            raise SystemExit(f"{folder / name}: SQuAD file not found (see --data-dir)")
    dev_file = None
    if args.dev_questions:
        dev_file = write_dev_subset(folder / "dev.json", args.dev_questions, args.work / "data" / f"dev-first-{args.dev_questions}.json")
    data = SquadData(folder, dev_file)
    if args.question_scores:
        fill_question_scores(results, args, data)
        report_from_rows(read_rows(results), args, base)
        return
    env = environment_info(args.device)

    search = {"kind": args.teacher_search, "lrs": args.teacher_lrs, "windows": args.teacher_windows,
              "more_epochs": args.teacher_more_epochs}

    def record(row: dict, keys: tuple[str, ...]) -> None:
        row.update(settings={k: settings[k] for k in keys}, environment=env, command=command,
                   grid=[s.name for s in teacher_grid(args, rows)], search=search)
        rows[row["name"]] = row
        append_result_row(results, row)

    args.work.mkdir(parents=True, exist_ok=True)
    if "stage1" in args.only.split(","):
        # Stage 1 distils from pretrained MiniLM, not from the SQuAD teacher: it can run beside the
        # teacher rows, and kb8-s1 then finds it done.
        record = stage1_encoder(args, args.work)
        print(f"# stage 1: {record['steps']} steps, best held-out loss {record['held_out_loss']} at step {record['best_step']}: "
              f"{record['folder']}", flush=True)
        if args.only == "stage1":
            return  # no row changed: the report stays the one the row runs write
    while True:  # one row at a time: a coordinate search decides its later settings from the rows of its first window
        rows.update(read_rows(results))  # with the rows a part running beside this one appended meanwhile
        todo_teachers = teachers_to_run(args, rows, every, wanted, every_teacher)
        if not todo_teachers:
            break
        record(run_teacher(todo_teachers[0], args, args.work, data), TEACHER_KEYS)
    grid = teacher_grid(args, rows)
    todo = [spec for spec in STUDENTS.values() if spec.name in wanted and spec.name not in rows]
    if todo:
        missing = [s.name for s in grid if s.name not in rows] + pending_settings(args, rows)
        if missing:
            raise SystemExit(f"students need the chosen teacher: run the teacher rows first ({'; '.join(missing)}; "
                             f"`{base} --only teacher`)")
        teacher = teacher_checkpoint(chosen_teacher(rows), args, args.work, data)
        print(f"# students learn from {teacher['name']} (best held-out F1 {pct(teacher['teacher']['selection'].get('value'))})",
              flush=True)
        for spec in todo:
            record(run_student(spec, teacher, args, args.work, data),
                   STUDENT_KEYS if spec.stage1 else tuple(k for k in STUDENT_KEYS if k != "stage1_steps"))
    rows = read_rows(results)  # with the rows a part running beside this one appended meanwhile
    write_reports(rows, [s.name for s in teacher_grid(args, rows)], args, base, pending_settings(args, rows))


if __name__ == "__main__":
    main()
