"""SQuAD v1.1 benchmark of a KroneckerBERT-style MiniLM student (results in docs/benchmarks/squad_minilm.md).

Runs what these ``kronlm`` commands run, by library calls in this process (printing each command
first), each part only when its output folder does not exist:

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
from kronlm.compression import CompressionConfig
from kronlm.distill import RecoveryConfig, distill_on_text
from kronlm.modeling import compress, load_model_and_tokenizer, save
from kronlm.tasks import claim_task_folder
from kronlm.tasks.results import read_report
from kronlm.tasks.squad import LOCAL_SQUAD_DIR, SquadTrainConfig, run_squad
from kronlm.utils import check_output_folder, default_data_dir

WIKITEXT_VALID = "../shared/data/wikitext-2-raw/wiki.valid.raw"
KB8 = "configs/glue-minilm-kb8.yaml"
GENERAL = "configs/distill-minilm-general.yaml"


def run(argv: list[str], step) -> float:
    """Print the ``kronlm`` command that does what ``step`` does, run ``step`` (library calls);
    returns the wall time in seconds."""
    print("$ kronlm " + shlex.join(argv), flush=True)
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    print(f"# {seconds:.0f} s", flush=True)
    return seconds


def compress_minilm(out: Path) -> None:
    """``kronlm compress minilm --config configs/glue-minilm-kb8.yaml --out OUT``."""
    out = check_output_folder(out, inputs=("minilm", KB8), option="--out")
    model, tokenizer = load_model_and_tokenizer("minilm")
    compress(model, CompressionConfig.from_file(KB8))
    save(model, out, tokenizer=tokenizer, inputs=("minilm", KB8))


def squad(out: Path, config_file: str, overrides: dict, **students) -> None:
    """``kronlm squad --out OUT --config FILE`` on the local split, with the flags of
    ``overrides`` and the teacher / student arguments of :func:`kronlm.tasks.squad.run_squad`."""
    config = SquadTrainConfig.from_file(config_file, overrides)
    data_dir = default_data_dir()
    if data_dir is None:
        raise SystemExit(f"no data: set $KRONLM_DATA_DIR to a folder holding {LOCAL_SQUAD_DIR}/")
    folder = Path(data_dir) / LOCAL_SQUAD_DIR
    inputs = (students.get("model"), None, students.get("general_distill"), students.get("student"), config_file, None, None, None, folder)
    run_folder = claim_task_folder(out, students.get("teacher"), inputs)
    report = run_squad(run_folder, config=config, data_dir=folder, **students)
    print(report.markdown())


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
    torch.set_num_threads(int(args.threads))
    out = Path(args.out)
    teacher = out / "teacher-only"
    if not (teacher / "teacher").is_dir():
        subset = {"max_train_examples": int(args.teacher_examples)} if args.teacher_examples else {}
        run(["squad", "--model", "minilm", "--out", str(teacher), "--config", "configs/squad-minilm-teacher.yaml",
             "--threads", args.threads, *(["--max-train-examples", args.teacher_examples] if subset else [])],
            lambda: squad(teacher, "configs/squad-minilm-teacher.yaml", subset, model="minilm"))
    tables = [read_report(teacher).markdown()]
    if not args.teacher_only:
        extra, overrides, students = [], {}, {}
        if args.no_task_kd:
            extra.append("--no-task-kd")
            students["task_kd"] = False
        if args.student_examples:
            extra += ["--max-train-examples", args.student_examples]
            overrides["max_train_examples"] = int(args.student_examples)
        if args.stage1:
            stage1 = out / "stage1"
            if not (stage1 / "run" / "best").is_dir():
                if not (stage1 / "compressed").is_dir():
                    run(["compress", "minilm", "--config", KB8, "--out", str(stage1 / "compressed")],
                        lambda: compress_minilm(stage1 / "compressed"))
                steps = ["--max-steps", args.stage1_steps] if args.stage1_steps else []
                stage_overrides = {"max_steps": int(args.stage1_steps), "epochs": None} if args.stage1_steps else {}
                run(["distill", "--student", str(stage1 / "compressed"), "--teacher", "minilm", "--data", WIKITEXT_VALID,
                     "--out", str(stage1 / "run"), "--config", GENERAL, *steps],
                    lambda: distill_on_text(str(stage1 / "compressed"), "minilm", WIKITEXT_VALID,
                                            RecoveryConfig.from_file(GENERAL, stage_overrides), stage1 / "run", data_dir=default_data_dir()))
            extra += ["--general-distill", str(stage1 / "run" / "best")]
            students["general_distill"] = str(stage1 / "run" / "best")
        run(["squad", "--teacher", str(teacher / "teacher"), "--out", str(out / args.name), "--config",
             "configs/squad-minilm-student.yaml", "--student-config", KB8, "--threads", args.threads, *extra],
            lambda: squad(out / args.name, "configs/squad-minilm-student.yaml", overrides, teacher=str(teacher / "teacher"),
                          student=KB8, **students))
        tables.append(read_report(out / args.name).markdown())
    print("\n".join(tables))
    print("\n" + reproduce_section([command]))


if __name__ == "__main__":
    main()
