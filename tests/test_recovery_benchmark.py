"""The pure parts of benchmarks/recovery.py: a budget-all student whose plan equals a single
family's student takes that student's rows (no training here)."""

import importlib.util
import json
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
    # Written in another order: the plan is a set of targets, not a list.
    _student(bench.student_folder(tmp_path, "budget-svd", 0.85), [KroneckerTarget(mlp[:1], b_shape=(4, 1)), KroneckerTarget(mlp[1:], b_shape=(4, 1))])
    _student(bench.student_folder(tmp_path, "budget-all", 0.85), [KroneckerTarget(mlp[1:], b_shape=(4, 1)), KroneckerTarget(mlp[:1], b_shape=(4, 1))])
    _student(bench.student_folder(tmp_path, "budget-klr", 0.85), [KroneckerTarget(mlp, b_shape=(2, 2))])
    assert bench.same_plan_as("budget-all", 0.85, tmp_path) == "budget-svd"
    assert bench.same_plan_as("budget-svd", 0.85, tmp_path) is None  # only the all-families student has twins
    _student(bench.student_folder(tmp_path, "budget-svd", 0.85), [KroneckerTarget(mlp, b_shape=(2, 1))])
    _student(bench.student_folder(tmp_path, "budget-kron", 0.85), [KroneckerTarget(mlp[1:], b_shape=(4, 1)), KroneckerTarget(mlp[:1], b_shape=(4, 1))])
    assert bench.same_plan_as("budget-all", 0.85, tmp_path) == "budget-kron"  # every single-family student is a candidate

    _student(bench.student_folder(tmp_path, "budget-all", 0.85), [KroneckerTarget(mlp[:1], b_shape=(4, 1)), KroneckerTarget(mlp[1:], b_shape=(4, 1), rank=2)])
    assert bench.same_plan_as("budget-all", 0.85, tmp_path) is None  # one rank differs: its own rows


def test_the_missing_section_names_every_unmeasured_row_and_the_block_wise_continuity_row(tmp_path):
    size, student = bench.BLOCKWISE_ALONE
    before = "\n".join(bench.missing_section([], tmp_path))
    assert f"- {int(size * 100)} %, {student}, blockwise: not run yet" in before
    assert "truncate, staged" not in before  # truncation has one recipe: end to end
    rows = [{"size": size, "student": student, "recovery": "blockwise", "factors": "balanced"}]
    after = "\n".join(bench.missing_section(rows, tmp_path))
    assert "blockwise" not in after
    assert f"- {int(size * 100)} %, {student}, end_to_end: not run yet" in after
    # A recovery outside the grid is named once a run of it has started, with its points so far.
    assert "staged_all" not in after
    started = bench.run_folder(tmp_path, "kron-prune", 0.85, "staged_all") / "points.json"
    started.parent.mkdir(parents=True)
    started.write_text('[{"label": "local", "minutes": 11.3, "test": 93.98}]')
    assert "- 85 %, kron-prune, staged_all: running or interrupted; so far: local 93.98 (11 min)" in bench.missing_section(rows, tmp_path)


def test_rows_measured_before_balanced_storage_stay_apart_and_truncation_counts_for_both(tmp_path):
    old = {"size": 0.85, "student": "kron-prune", "recovery": "end_to_end"}  # no "factors": measured before
    truncated = {"size": 0.85, "student": "truncate", "recovery": "end_to_end"}
    assert bench.factors_of(old) == "unbalanced" and bench.series_label(old) == "kron-prune, unbalanced"
    assert bench.factors_of({**old, "factors": "balanced"}) == "balanced"
    missing = "\n".join(bench.missing_section([old, truncated], tmp_path))
    assert "85 %, kron-prune, end_to_end: not run yet" in missing  # the balanced row is still to measure
    assert "85 %, truncate" not in missing
    assert bench.student_folder(tmp_path, "kron-prune", 0.85).name == "kron-prune-85-balanced"
    assert bench.student_folder(tmp_path, "kron-prune", 0.85, "unbalanced").name == "kron-prune-85"
    assert bench.student_folder(tmp_path, "truncate", 0.85).name == "truncate-85"
    assert bench.run_folder(tmp_path, "budget-kron", 0.7, "staged").name == "budget-kron-70-staged-balanced"
    # Truncated-SVD terms keep their split: the SVD budget's rows, and its twin's, stand for both storages.
    assert bench.student_folder(tmp_path, "budget-svd", 0.85).name == "budget-svd-85"
    svd = {"size": 0.85, "student": "budget-svd", "recovery": "staged"}
    twin = {"size": 0.85, "student": "budget-all", "recovery": "staged", "same_as": "budget-svd"}
    missing = "\n".join(bench.missing_section([svd, twin], tmp_path))
    assert "85 %, budget-svd, staged" not in missing and "85 %, budget-all, staged" not in missing
    assert "85 %, budget-klr, staged: not run yet" in missing


def test_a_student_built_before_balanced_storage_is_rebalanced_not_rebuilt(tmp_path):
    import argparse

    import torch

    from kronlm.layers import KroneckerLinear
    from kronlm.modeling import load

    earlier = bench.student_folder(tmp_path, "kron-prune", 0.85, "unbalanced")
    model = compress(tiny_llama(), CompressionConfig(targets=[KroneckerTarget(["**.mlp.up_proj"], b_shape=(2, 1), init="pruning")]))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, KroneckerLinear):  # the split an earlier kronlm stored
                m.A.mul_(9.0)
                m.B.div_(9.0)
    save(model, earlier)
    args = argparse.Namespace(model="unused: nothing is built", calibration_sequences=4, data_dir=tmp_path)
    folder = bench.build_student("kron-prune", 0.85, tmp_path, args, [])
    assert folder == bench.student_folder(tmp_path, "kron-prune", 0.85)
    new, old = load(folder), load(earlier)
    ids = torch.randint(0, new.config.vocab_size, (1, 7))
    assert torch.allclose(new(ids).logits, old(ids).logits, atol=1e-5)
    layers = [m for m in new.modules() if isinstance(m, KroneckerLinear)]
    assert layers and all(torch.allclose(m.A.norm(), m.B.norm(), rtol=1e-5) for m in layers)


def test_cpu_rows_train_in_float32_whatever_the_recipe_says(tmp_path):
    import argparse

    args = argparse.Namespace(device="cpu", capture_memory_gb=1.0)
    parts = bench.stage_configs(args, truncated=False)
    assert {"local", "blockwise", "end_to_end", "end_to_end_alone", "blockwise_alone"} <= set(parts)
    assert {config.mixed_precision for config in parts.values()} == {"no"}
    on_gpu = bench.stage_configs(argparse.Namespace(device="cuda", capture_memory_gb=1.0), truncated=False)
    assert on_gpu["end_to_end"].mixed_precision == "auto"


def test_staged_all_trains_every_weight_end_to_end_and_staged_only_the_compressed_ones():
    import argparse

    parts = bench.stage_configs(argparse.Namespace(device="cpu", capture_memory_gb=1.0), truncated=False)
    assert parts["end_to_end"].freeze_uncompressed is True
    assert parts["end_to_end_all"].freeze_uncompressed is False
    # Nothing else differs: the row isolates what training the dense weights buys.
    assert parts["end_to_end_all"].replace(freeze_uncompressed=True) == parts["end_to_end"]


def test_unknown_students_or_recoveries_are_refused_by_name(monkeypatch, capsys):
    import pytest

    monkeypatch.setattr(sys, "argv", ["recovery.py", "--size", "0.85", "--recoveries", "staged,stagd"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "--recoveries: unknown 'stagd'" in capsys.readouterr().err


def test_budget_students_name_the_multiply_add_cap_they_were_built_with():
    config, families, flags = bench.budget_student("budget-kron", 1000)
    assert config.max_macs is None and config.families == ("kronecker",) and config.sequential is None
    assert families == ["--families", "kronecker"] and flags == ["--sequential-calibration", "off", "--max-macs", "none"]
    capped, families, flags = bench.budget_student("budget-kron-cap", 1000)
    assert capped.max_macs == 1.0 and capped.families == ("kronecker",) and capped.target_params == 1000
    assert families == ["--families", "kronecker"] and flags == ["--sequential-calibration", "off"]  # the CLI's default cap
    every, families, flags = bench.budget_student("budget-all", 1000)
    assert every.max_macs is None and families == [] and flags == ["--sequential-calibration", "off", "--max-macs", "none"]


def test_the_page_names_the_commit_its_code_ran_at_and_each_rows_own(tmp_path):
    rows = [json.loads(line) for line in (REPO / "docs" / "benchmarks" / "recovery.jsonl").read_text().splitlines()[:2]]
    rows[0] = {k: v for k, v in rows[0].items() if k != "commit"}
    rows[1] = {**rows[1], "commit": "f" * 40}
    page = bench.report(rows, sorted({r["size"] for r in rows}, reverse=True), "python benchmarks/recovery.py", tmp_path,
                        commit="a" * 40)
    assert f"commit `{'a' * 40}`" in page  # the process's commit, not the checkout's HEAD when the page is written
    assert f"measured at (`commit` in the results file): `{'f' * 12}`;" in page
    old = bench.report(rows[:1], [rows[0]["size"]], "python benchmarks/recovery.py", tmp_path, commit="a" * 40)
    assert "measured at" not in old  # rows without the field name nothing


def test_kronecker_low_rank_students_count_the_rows_of_their_fits_split(tmp_path):
    """kronlm stores Kronecker + low-rank layers as their joint fit split them: for ``budget-klr``
    the rows measured so (no ``factors`` key, or ``unbalanced``) count, the balanced ones are marked."""
    assert bench.current_factors("budget-klr") == "unbalanced" and bench.current_factors("kron-prune") == "balanced"
    assert bench.student_folder(tmp_path, "budget-klr", 0.85).name == "budget-klr-85"
    assert bench.run_folder(tmp_path, "budget-klr", 0.7, "staged").name == "budget-klr-70-staged"
    fit = {"size": 0.85, "student": "budget-klr", "recovery": "end_to_end", "low_rank_trained": True}
    even = {**fit, "factors": "balanced"}
    assert bench.series_label(fit) == "budget-klr" and bench.series_label(even) == "budget-klr, balanced"
    done = bench.rows_by_key([even])
    assert bench.measured(done, "budget-klr", 0.85, "end_to_end") is None  # the other storage does not count
    assert "85 %, budget-klr, end_to_end: not run yet" in "\n".join(bench.missing_section([even], tmp_path))
    done = bench.rows_by_key([even, fit])
    assert bench.measured(done, "budget-klr", 0.85, "end_to_end") is fit
    assert "85 %, budget-klr, end_to_end" not in "\n".join(bench.missing_section([even, fit], tmp_path))


def test_the_kronecker_alone_students_are_wanted_end_to_end_only(tmp_path):
    missing = "\n".join(bench.missing_section([], tmp_path))
    for student in bench.END_TO_END_ONLY:
        assert f"85 %, {student}, end_to_end: not run yet" in missing
        assert f"85 %, {student}, staged" not in missing
    assert "85 %, budget-svd, staged: not run yet" in missing
    started = bench.run_folder(tmp_path, "budget-kron", 0.85, "staged") / "points.json"
    started.parent.mkdir(parents=True)
    started.write_text('[{"label": "local", "minutes": 10.0, "test": 50.0}]')
    assert "85 %, budget-kron, staged: running or interrupted" in "\n".join(bench.missing_section([], tmp_path))


def test_kronecker_low_rank_rows_with_the_low_rank_part_frozen_end_to_end_do_not_count(tmp_path):
    frozen = {"size": 0.7, "student": "budget-klr", "recovery": "staged"}  # measured before U, V trained end to end
    assert bench.low_rank_frozen(frozen) and not bench.low_rank_frozen({**frozen, "low_rank_trained": True})
    assert not bench.low_rank_frozen({**frozen, "student": "budget-kron"})
    assert bench.series_label(frozen) == "budget-klr, low-rank part frozen end to end"
    assert bench.series_label({**frozen, "factors": "balanced"}) == "budget-klr, balanced, low-rank part frozen end to end"
    assert bench.measured(bench.rows_by_key([frozen]), "budget-klr", 0.7, "staged") is None
    assert "70 %, budget-klr, staged: not run yet" in "\n".join(bench.missing_section([frozen], tmp_path))
