"""SQuAD v1.1 benchmark of a KroneckerBERT-style MiniLM student (results in docs/benchmarks/squad_minilm.md).

Runs ``kronlm`` commands in this process, each part only when its output folder does not exist:

1. teacher: all-MiniLM-L6-v2 with a new span head fine-tuned on the local split's training
   questions (``kronlm squad --model minilm --config configs/squad-minilm-teacher.yaml``);
2. stage 1 (``--stage1``): the pretrained MiniLM compressed with ``configs/glue-minilm-kb8.yaml``
   and distilled on WikiText-2 validation text (``kronlm compress`` + ``kronlm distill --config
   configs/distill-minilm-general.yaml``), shared with the GLUE benchmark's layout (``OUT/stage1``);
3. student: the fine-tuned teacher compressed with the same config, task ILKD with
   ``configs/squad-minilm-student.yaml`` (``--name`` sub-folder; ``--stage1`` starts it from
   stage 1's weights).

Then prints the report tables. Data: ``../shared/data/squad-v1.1-dev-split`` (the official v1.1
*dev* set split by article), so figures are not comparable with published SQuAD dev numbers.

    python benchmarks/squad_minilm.py --out runs/squad --student-examples 3000 --name kb8
    python benchmarks/squad_minilm.py --out runs/squad --student-examples 3000 --stage1 --stage1-steps 200 --name kb8-s1
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from kronlm.bench.markdown import reproduce_header, reproduce_section
from kronlm.cli import main as kronlm_main
from kronlm.tasks.results import read_report

WIKITEXT_VALID = "../shared/data/wikitext-2-raw/wiki.valid.raw"


def run(argv: list[str]) -> float:
    """Run ``kronlm`` with ``argv`` in this process; returns the wall time in seconds.

    Raises:
        SystemExit: the command failed (its status).
    """
    print("$ kronlm " + shlex.join(argv), flush=True)
    start = time.perf_counter()
    status = kronlm_main(argv)
    if status != 0:
        raise SystemExit(f"kronlm exited with status {status}")
    seconds = time.perf_counter() - start
    print(f"# {seconds:.0f} s", flush=True)
    return seconds


def main() -> None:
    """Parse the arguments, run the missing parts, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument("--threads", default="1", help="torch threads per run")
    parser.add_argument("--teacher-only", action="store_true", help="stop after the teacher")
    parser.add_argument("--teacher-examples", default=None, help="seeded subset of training questions for the teacher")
    parser.add_argument("--student-examples", default=None, help="seeded subset of training questions for the student")
    parser.add_argument("--name", default="kb8", help="sub-folder of the student run")
    parser.add_argument("--stage1", action="store_true", help="start the student from the stage-1 (general distillation) encoder")
    parser.add_argument("--stage1-steps", default=None, help="replace the stage-1 config's step count")
    parser.add_argument("--no-task-kd", action="store_true", help="train the student with CE on the gold spans only")
    args = parser.parse_args()
    command = "python benchmarks/squad_minilm.py " + shlex.join(sys.argv[1:])
    print(reproduce_header(command), flush=True)
    torch.set_num_threads(int(args.threads))  # kronlm distill has no --threads flag
    out = Path(args.out)
    teacher = out / "teacher-only"
    if not (teacher / "teacher").is_dir():
        subset = ["--max-train-examples", args.teacher_examples] if args.teacher_examples else []
        run(["squad", "--model", "minilm", "--out", str(teacher), "--config", "configs/squad-minilm-teacher.yaml",
             "--threads", args.threads, *subset])
    tables = [read_report(teacher).markdown()]
    if not args.teacher_only:
        extra = ["--no-task-kd"] if args.no_task_kd else []
        if args.student_examples:
            extra += ["--max-train-examples", args.student_examples]
        if args.stage1:
            stage1 = out / "stage1"
            if not (stage1 / "run" / "best").is_dir():
                if not (stage1 / "compressed").is_dir():
                    run(["compress", "minilm", "--config", "configs/glue-minilm-kb8.yaml", "--out", str(stage1 / "compressed")])
                steps = ["--max-steps", args.stage1_steps] if args.stage1_steps else []
                run(["distill", "--student", str(stage1 / "compressed"), "--teacher", "minilm", "--data", WIKITEXT_VALID,
                     "--out", str(stage1 / "run"), "--config", "configs/distill-minilm-general.yaml", *steps])
            extra += ["--general-distill", str(stage1 / "run" / "best")]
        run(["squad", "--teacher", str(teacher / "teacher"), "--out", str(out / args.name), "--config",
             "configs/squad-minilm-student.yaml", "--student-config", "configs/glue-minilm-kb8.yaml",
             "--threads", args.threads, *extra])
        tables.append(read_report(out / args.name).markdown())
    print("\n".join(tables))
    print("\n" + reproduce_section([command]))


if __name__ == "__main__":
    main()
