"""GLUE benchmark of a KroneckerBERT-style MiniLM student (issue 4; results in docs/benchmarks/glue_minilm.md).

For each task: fine-tune all-MiniLM-L6-v2 as the teacher (``kronlm glue --model minilm``), then
compress the fine-tuned teacher with ``configs/glue-minilm-kb8.yaml`` and train the student with
task ILKD (``kronlm glue --teacher ... --student-config ...``); each run writes report.{json,md}.
This script runs both commands per task with the settings of the committed CPU run (the teacher
only when ``OUT/<task>/teacher-only/teacher`` does not exist yet) and prints one combined table.
Settings sized for a shared 2-core CPU: SST-2 on a random 8,000-example subset of its 67,349
training rows at max length 64, MRPC on all 3,668 rows at max length 128.

    python benchmarks/glue_minilm.py --out runs/glue [--tasks sst2,mrpc]
    python benchmarks/glue_minilm.py --out runs/glue --tasks sst2 --name kb8-balanced-500 \
        --student-settings configs/glue-minilm-student-balanced.yaml --student-steps 500
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

# Per task: (max length, teacher flags, student flags) of the committed run.
SETTINGS = {
    "sst2": ("64", ["--max-train-examples", "8000", "--epochs", "1"], ["--max-train-examples", "8000", "--max-steps", "200"]),
    "mrpc": ("128", ["--max-steps", "115", "--lr", "1e-4"], ["--max-steps", "90"]),
}


def run(argv: list[str]) -> float:
    """Run ``kronlm`` with ``argv`` in this process; returns the wall time in seconds."""
    from kronlm.cli import main

    print("$ kronlm " + shlex.join(argv), flush=True)
    start = time.perf_counter()
    status = main(argv)
    if status != 0:
        raise SystemExit(f"kronlm exited with status {status}")
    return time.perf_counter() - start


def main() -> None:
    """Parse the arguments, run teacher and student per task, print the combined Markdown table."""
    from kronlm.glue import read_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run folder (one sub-folder per task)")
    parser.add_argument("--tasks", default="sst2,mrpc", help="comma-separated GLUE tasks among " + ", ".join(SETTINGS))
    parser.add_argument("--threads", default="1", help="torch threads per run")
    parser.add_argument("--student-settings", default="configs/glue-minilm-student.yaml",
                        help="student run settings (configs/glue-minilm-student-balanced.yaml for the rebalanced ILKD weights)")
    parser.add_argument("--student-steps", default=None, help="replace the student's step count of every task")
    parser.add_argument("--name", default="kb8", help="sub-folder of the student run")
    args = parser.parse_args()
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
             "--config", args.student_settings, "--student-config", "configs/glue-minilm-kb8.yaml", *student_flags])
        tables.append(read_report(out / args.name).markdown())
    print("\n".join(tables))


if __name__ == "__main__":
    main()
