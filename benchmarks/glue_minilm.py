"""GLUE benchmark of a KroneckerBERT-style MiniLM student (results in docs/benchmarks/glue_minilm.md).

For each task: fine-tune all-MiniLM-L6-v2 as the teacher (``kronlm glue --model minilm``), then
compress the fine-tuned teacher with ``configs/glue-minilm-kb8.yaml`` and train the student with
task ILKD (``kronlm glue --teacher ... --student-config ...``); each run writes report.{json,md}.
With ``--stage1`` the student starts from KroneckerBERT's stage 1 instead: the pretrained MiniLM
compressed the same way and distilled on WikiText-2 validation text (``kronlm compress`` +
``kronlm distill --config configs/distill-minilm-general.yaml``, into ``OUT/stage1``, run once).
This script runs what those commands run, by library calls (``kronlm.tasks.glue.run_glue``,
``kronlm.compress``, ``kronlm.distill.distill_on_text``), with the settings of the committed CPU run
(the teacher and stage 1 only when their folders do not exist yet), prints each equivalent
``kronlm`` command before it, and prints one combined table. Settings sized for a
shared 2-core CPU: SST-2 on a random 8,000-example subset of its 67,349 training rows at max
length 64, MRPC on all 3,668 rows at max length 128 (teacher 3 epochs). Each stage holds out
``val_fraction`` (0.1 in the configs) of its training examples to choose its checkpoint; runs
committed before that choice existed trained on all of them and reported the last step.

    python benchmarks/glue_minilm.py --out runs/glue [--tasks sst2,mrpc]              # no stage 1
    python benchmarks/glue_minilm.py --out runs/glue --stage1 --name kb8-s1           # both stages
    python benchmarks/glue_minilm.py --out runs/glue --stage1 --no-task-kd --name kb8-s1-ce-only
    python benchmarks/glue_minilm.py --out runs/glue --tasks sst2 --name kb8-balanced-500 \
        --student-settings configs/glue-minilm-student-balanced.yaml --student-steps 500
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from kronlm.bench.markdown import reproduce_header, reproduce_section
from kronlm.compression import CompressionConfig
from kronlm.distill import RecoveryConfig, distill_on_text
from kronlm.modeling import compress, load_model_and_tokenizer, save
from kronlm.tasks import claim_task_folder
from kronlm.tasks.glue import GlueTrainConfig, read_report, run_glue
from kronlm.utils import check_output_folder, default_data_dir

KB8 = "configs/glue-minilm-kb8.yaml"
GENERAL = "configs/distill-minilm-general.yaml"
WIKITEXT_VALID = "../shared/data/wikitext-2-raw/wiki.valid.raw"
# Per task: (max length, teacher settings, student settings) of the committed run, as the
# GlueTrainConfig fields that the `kronlm glue` flags of the printed commands set.
SETTINGS = {
    "sst2": (64, {"max_train_examples": 8000, "epochs": 1.0}, {"max_train_examples": 8000, "max_steps": 200}),
    "mrpc": (128, {"epochs": 3.0, "lr": 1e-4}, {"max_steps": 230}),
}


def flags(settings: dict) -> list[str]:
    """The `kronlm glue` / `kronlm distill` flags that set these config fields."""
    out = []
    for field, value in settings.items():
        out += ["--" + field.replace("_", "-"), f"{value:g}" if isinstance(value, float) else str(value)]
    return out


def timed(argv: list[str], step) -> float:
    """Print the ``kronlm`` command that does what ``step`` does, run ``step`` (library calls), and
    return the wall time in seconds."""
    print("$ kronlm " + shlex.join(argv), flush=True)
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def compress_minilm(out: Path) -> None:
    """``kronlm compress minilm --config configs/glue-minilm-kb8.yaml --out OUT``."""
    out = check_output_folder(out, inputs=("minilm", KB8), option="--out")
    model, tokenizer = load_model_and_tokenizer("minilm")
    compress(model, CompressionConfig.from_file(KB8))
    save(model, out, tokenizer=tokenizer, inputs=("minilm", KB8))


def glue(task: str, out: Path, config_file: str, overrides: dict, **students) -> None:
    """``kronlm glue --task TASK --out OUT --config FILE`` with the flags of ``overrides`` and
    the teacher / student arguments of :func:`kronlm.tasks.glue.run_glue`."""
    config = GlueTrainConfig.from_file(config_file, overrides)
    inputs = (students.get("model"), None, students.get("general_distill"), students.get("student"), config_file, None)
    folder = claim_task_folder(out, students.get("teacher"), inputs)
    data_dir = default_data_dir()
    report = run_glue(task, folder, config=config, data_dir=None if data_dir is None else Path(data_dir) / "glue", **students)
    print(report.markdown())


def main() -> None:
    """Parse the arguments, run teacher and student per task, print the combined Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run folder (one sub-folder per task)")
    parser.add_argument("--tasks", default="sst2,mrpc", help="comma-separated GLUE tasks among " + ", ".join(SETTINGS))
    parser.add_argument("--threads", default="1", help="torch threads per run")
    parser.add_argument("--student-settings", default="configs/glue-minilm-student.yaml",
                        help="student run settings (configs/glue-minilm-student-balanced.yaml for the rebalanced ILKD weights)")
    parser.add_argument("--student-steps", default=None, help="replace the student's step count of every task")
    parser.add_argument("--name", default="kb8", help="sub-folder of the student run")
    parser.add_argument("--stage1", action="store_true", help="start the student from the stage-1 (general distillation) encoder")
    parser.add_argument("--no-task-kd", action="store_true", help="train the student with CE on the labels only")
    args = parser.parse_args()
    command = "python benchmarks/glue_minilm.py " + shlex.join(sys.argv[1:])
    print(reproduce_header(command), flush=True)
    torch.set_num_threads(int(args.threads))
    extra, student_args = (["--no-task-kd"], {"task_kd": False}) if args.no_task_kd else ([], {})
    if args.stage1:
        stage1 = Path(args.out) / "stage1"
        if not (stage1 / "run" / "best").is_dir():
            timed(["compress", "minilm", "--config", KB8, "--out", str(stage1 / "compressed")],
                  lambda: compress_minilm(stage1 / "compressed"))
            timed(["distill", "--student", str(stage1 / "compressed"), "--teacher", "minilm", "--data", WIKITEXT_VALID,
                   "--out", str(stage1 / "run"), "--config", GENERAL],
                  lambda: distill_on_text(str(stage1 / "compressed"), "minilm", WIKITEXT_VALID, RecoveryConfig.from_file(GENERAL),
                                          stage1 / "run", data_dir=default_data_dir()))
        extra += ["--general-distill", str(stage1 / "run" / "best")]
        student_args["general_distill"] = str(stage1 / "run" / "best")
    tables = []
    for task in args.tasks.split(","):
        if task not in SETTINGS:
            raise SystemExit(f"no benchmark settings for task {task!r}; known: {', '.join(SETTINGS)}")
        length, teacher_settings, student_settings = SETTINGS[task]
        out = Path(args.out) / task
        if args.student_steps:
            student_settings = {**student_settings, "max_steps": int(args.student_steps)}
        common = ["--task", task, "--max-length", str(length), "--threads", args.threads]
        if not (out / "teacher-only" / "teacher").is_dir():
            timed(["glue", *common, "--model", "minilm", "--out", str(out / "teacher-only"), "--config", "configs/glue-minilm-teacher.yaml",
                   *flags(teacher_settings)],
                  lambda: glue(task, out / "teacher-only", "configs/glue-minilm-teacher.yaml", {"max_length": length, **teacher_settings},
                               model="minilm"))
        teacher = str(out / "teacher-only" / "teacher")
        timed(["glue", *common, "--teacher", teacher, "--out", str(out / args.name), "--config", args.student_settings,
               "--student-config", KB8, *flags(student_settings), *extra],
              lambda: glue(task, out / args.name, args.student_settings, {"max_length": length, **student_settings}, teacher=teacher,
                           student=KB8, **student_args))
        tables.append(read_report(out / args.name).markdown())
    print("\n".join(tables))
    print("\n" + reproduce_section([command]))


if __name__ == "__main__":
    main()
