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
