"""GLUE benchmark of a KroneckerBERT-style MiniLM student (results in docs/benchmarks/glue_minilm.md).

For each task: fine-tune all-MiniLM-L6-v2 as the teacher (``kronlm glue --model minilm``), then
compress the fine-tuned teacher with ``configs/glue-minilm-kb8.yaml`` and train the student with
task ILKD (``kronlm glue --teacher ... --student-config ...``); each run writes report.{json,md}.
With ``--stage1`` the student starts from KroneckerBERT's stage 1 instead: the pretrained MiniLM
compressed the same way and distilled on WikiText-2 validation text (``kronlm compress`` +
``kronlm distill --config configs/distill-minilm-general.yaml``, into ``OUT/stage1``, run once).
This script runs the commands with the settings of the committed CPU run (the teacher and stage 1
only when their folders do not exist yet) and prints one combined table. Settings sized for a
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

from kronlm.bench.markdown import reproduce_header, reproduce_section
from kronlm.cli import main as kronlm_main
from kronlm.tasks.glue import read_report

# Per task: (max length, teacher flags, student flags) of the committed run.
SETTINGS = {
    "sst2": ("64", ["--max-train-examples", "8000", "--epochs", "1"], ["--max-train-examples", "8000", "--max-steps", "200"]),
    "mrpc": ("128", ["--epochs", "3", "--lr", "1e-4"], ["--max-steps", "230"]),
}


def run(argv: list[str]) -> float:
    """Run ``kronlm`` with ``argv`` in this process; returns the wall time in seconds."""
    print("$ kronlm " + shlex.join(argv), flush=True)
    start = time.perf_counter()
    status = kronlm_main(argv)
    if status != 0:
        raise SystemExit(f"kronlm exited with status {status}")
    return time.perf_counter() - start


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
    extra = ["--no-task-kd"] if args.no_task_kd else []
    if args.stage1:
        stage1 = Path(args.out) / "stage1"
        if not (stage1 / "run" / "best").is_dir():
            run(["compress", "minilm", "--config", "configs/glue-minilm-kb8.yaml", "--out", str(stage1 / "compressed")])
            run(["distill", "--student", str(stage1 / "compressed"), "--teacher", "minilm",
                 "--data", "../shared/data/wikitext-2-raw/wiki.valid.raw", "--out", str(stage1 / "run"),
                 "--config", "configs/distill-minilm-general.yaml"])
        extra += ["--general-distill", str(stage1 / "run" / "best")]
    tables = []
    for task in args.tasks.split(","):
        if task not in SETTINGS:
            raise SystemExit(f"no benchmark settings for task {task!r}; known: {', '.join(SETTINGS)}")
        length, teacher_flags, student_flags = SETTINGS[task]
        out = Path(args.out) / task
        common = ["--task", task, "--max-length", length, "--threads", args.threads]
        if args.student_steps:
            at = student_flags.index("--max-steps")
            student_flags = [*student_flags[:at], "--max-steps", args.student_steps, *student_flags[at + 2 :]]
        if not (out / "teacher-only" / "teacher").is_dir():
            run(["glue", *common, "--model", "minilm", "--out", str(out / "teacher-only"),
                 "--config", "configs/glue-minilm-teacher.yaml", *teacher_flags])
        run(["glue", *common, "--teacher", str(out / "teacher-only" / "teacher"), "--out", str(out / args.name),
             "--config", args.student_settings, "--student-config", "configs/glue-minilm-kb8.yaml", *student_flags, *extra])
        tables.append(read_report(out / args.name).markdown())
    print("\n".join(tables))
    print("\n" + reproduce_section([command]))


if __name__ == "__main__":
    main()
