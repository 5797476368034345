"""The pure parts of benchmarks/recovery.py: a budget-all student whose plan equals a single
family's student takes that student's rows (no training here)."""

import importlib.util
import sys
from pathlib import Path

from conftest import tiny_llama

from kronlm.compression import CompressionConfig, KroneckerTarget
from kronlm.modeling import compress, save

REPO = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("recovery_benchmark", REPO / "benchmarks" / "recovery.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["recovery_benchmark"] = module
    spec.loader.exec_module(module)
    return module


bench = _benchmark()


def _student(folder: Path, targets: list[KroneckerTarget]) -> None:
    save(compress(tiny_llama(), CompressionConfig(targets=targets)), folder)


def test_a_budget_all_student_with_a_single_familys_plan_is_that_students_twin(tmp_path):
    mlp = ["**.mlp.gate_proj", "**.mlp.up_proj"]
    students = tmp_path / "students"
    # Written in another order: the plan is a set of targets, not a list.
    _student(students / "budget-svd-85", [KroneckerTarget(mlp[:1], b_shape=(4, 1)), KroneckerTarget(mlp[1:], b_shape=(4, 1))])
    _student(students / "budget-all-85", [KroneckerTarget(mlp[1:], b_shape=(4, 1)), KroneckerTarget(mlp[:1], b_shape=(4, 1))])
    _student(students / "budget-klr-85", [KroneckerTarget(mlp, b_shape=(2, 2))])
    assert bench.same_plan_as("budget-all", 0.85, tmp_path) == "budget-svd"
    assert bench.same_plan_as("budget-svd", 0.85, tmp_path) is None  # only the all-families student has twins

    _student(students / "budget-all-85", [KroneckerTarget(mlp[:1], b_shape=(4, 1)), KroneckerTarget(mlp[1:], b_shape=(4, 1), rank=2)])
    assert bench.same_plan_as("budget-all", 0.85, tmp_path) is None  # one rank differs: its own rows


def test_the_missing_section_names_every_unmeasured_row_and_the_block_wise_continuity_row(tmp_path):
    size, student = bench.BLOCKWISE_ALONE
    before = "\n".join(bench.missing_section([], tmp_path))
    assert f"- {int(size * 100)} %, {student}, blockwise: not run yet" in before
    assert "truncate, staged" not in before  # truncation has one recipe: end to end
    rows = [{"size": size, "student": student, "recovery": "blockwise"}]
    after = "\n".join(bench.missing_section(rows, tmp_path))
    assert "blockwise" not in after
    assert f"- {int(size * 100)} %, {student}, end_to_end: not run yet" in after
