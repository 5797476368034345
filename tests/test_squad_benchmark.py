"""The SQuAD benchmark's student configs (configs/minilm-*.yaml) at MiniLM's widths, and the pure
parts of benchmarks/squad_minilm.py: settings parsing, the dev subset, the validation curve across
resumed calls, the row checks and the report (no training here; the smoke run trains)."""

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_bert
from test_squad_data import article, qa, squad_file

from kronlm.compression import CompressionConfig
from kronlm.modeling import compress
from kronlm.tasks import count_embedding_linear_parameters
from kronlm.tasks.squad import read_squad_json

REPO = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("squad_minilm_benchmark", REPO / "benchmarks" / "squad_minilm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["squad_minilm_benchmark"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _benchmark()


def _minilm_shaped_qa():
    """A 2-layer BERT QA model with MiniLM's widths (hidden 384, 12 heads, FFN 1536), tiny vocabulary."""
    return tiny_bert(cls_name="BertForQuestionAnswering", hidden_size=384, num_attention_heads=12, intermediate_size=1536,
                     num_hidden_layers=2, max_position_embeddings=64)


@pytest.mark.parametrize("name, ratio", [("minilm-ffn2x.yaml", 1.5), ("minilm-linear4x.yaml", 3.98)])
def test_student_configs_compress_minilm_widths_and_comment_every_key(name, ratio):
    path = REPO / "configs" / name
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith((" ", "#")) or line.lstrip().startswith("- modules"):
            assert lines[i - 1].lstrip().startswith("#"), f"{name}: no comment above {line!r}"
    assert set(yaml.safe_load(path.read_text())) == {"name", "description", "targets", "lm_head", "svd_solver"}
    teacher = _minilm_shaped_qa()
    student = copy.deepcopy(teacher)
    compress(student, CompressionConfig.from_file(path))
    dense, compressed = (count_embedding_linear_parameters(m.base_model.encoder) for m in (teacher, student))
    assert dense / compressed == pytest.approx(ratio, abs=0.01)
    # Embeddings and the span head stay dense in both.
    assert isinstance(student.bert.embeddings.word_embeddings, torch.nn.Embedding)
    assert isinstance(student.qa_outputs, torch.nn.Linear)


def test_grid_names_and_bad_settings():
    args = bench.parse_args(["--teacher-lrs", "1e-4,5e-5", "--teacher-windows", "256:96,384:128", "--teacher-search", "grid",
                             "--data-dir", str(REPO)])
    names = [s.name for s in bench.teacher_grid(args)]
    assert names == ["teacher-lr0.0001-L256-S96", "teacher-lr5e-05-L256-S96", "teacher-lr0.0001-L384-S128",
                     "teacher-lr5e-05-L384-S128"]
    assert (args.batch_size, args.eval_batch_size, args.mixed_precision) == (16, 64, "no")
    gpu = bench.parse_args(["--device", "cuda", "--data-dir", str(REPO)])
    assert (gpu.batch_size, gpu.eval_batch_size, gpu.mixed_precision) == (32, 256, "auto")
    with pytest.raises(SystemExit, match="--teacher-windows: expected LENGTH:STRIDE pairs such as 256:96, got '256'"):
        bench.parse_windows("256")
    with pytest.raises(SystemExit, match="--teacher-lrs: 'fast' is not a number"):
        bench.parse_float_list("fast", "--teacher-lrs")
    with pytest.raises(SystemExit, match="--only: unknown row 'kb9'"):
        bench.selected("kb9", bench.teacher_grid(args))
    assert bench.selected("students,teacher-lr5e-05-L256-S96", bench.teacher_grid(args)) == {*bench.STUDENTS, names[1]}
    assert bench.selected("stage1", bench.teacher_grid(args)) == set()  # no row: stage 1 alone, beside the teacher rows
    # "teacher" and "all" ask for the search, not for every setting that could be named
    assert bench.selected("teacher", bench.teacher_grid(args)) == set()
    assert bench.selected("all", bench.teacher_grid(args)) == set(bench.STUDENTS)
    stride = bench.TeacherSetting(1e-4, 128, 128)
    with pytest.raises(SystemExit, match="teacher-lr0.0001-L128-S128: .*doc_stride must be an integer in"):
        bench.teacher_config(args, stride)


def test_coordinate_search_tries_the_best_learning_rate_of_the_first_window_at_the_others():
    args = bench.parse_args(["--teacher-lrs", "5e-5,1e-4,2e-4", "--teacher-windows", "256:96,384:128,512:128", "--data-dir", str(REPO)])
    assert args.teacher_search == "coordinate"
    first = [f"teacher-lr{lr}-L256-S96" for lr in ("5e-05", "0.0001", "0.0002")]
    assert [s.name for s in bench.teacher_grid(args)] == first
    rows = {first[0]: _teacher_row(first[0], 0.70, 0.6, lr=5e-5), first[1]: _teacher_row(first[1], 0.75, 0.6)}
    assert [s.name for s in bench.teacher_grid(args, rows)] == first  # undecided until every first-window row is in
    pending = bench.pending_settings(args, rows)
    longer = ("the best of those again with up to 8 epochs, if its held-out F1 is still best at its last epoch (after the "
              "other teacher rows)")
    assert pending == ["the learning rate with the best held-out F1 at 256:96, at window 384:128 (after the 256:96 rows)",
                       "the learning rate with the best held-out F1 at 256:96, at window 512:128 (after the 256:96 rows)", longer]
    rows[first[2]] = _teacher_row(first[2], 0.72, 0.7, lr=2e-4)  # best on dev, not on held-out questions: not chosen
    assert [s.name for s in bench.teacher_grid(args, rows)] == [*first, "teacher-lr0.0001-L384-S128", "teacher-lr0.0001-L512-S128"]
    assert bench.pending_settings(args, rows) == [longer]
    report = bench.report_markdown(dict(list(rows.items())[:2]), first, "python b.py --work W", None,
                                   pending=pending)
    assert "(so far: 4 teacher setting(s) of the search not measured yet)" in report
    assert ("- teacher: the learning rate with the best held-out F1 at 256:96, at window 384:128 (after the 256:96 rows): "
            "`python benchmarks/squad_minilm.py --only teacher`") in report
    assert "Settings tried: every learning rate at the first window" in report


def test_dev_subset_keeps_the_first_questions(tmp_path):
    source = squad_file(tmp_path, [article([qa("a", [("river Seine", 36)]), qa("b", [("Paris", 0)])]),
                                   article([qa("c", [("Paris", 0)])], title="Other")])
    out = bench.write_dev_subset(source, 2, tmp_path / "sub" / "dev.json")
    assert [e.id for e in read_squad_json(out)] == ["a", "b"]
    assert [e.id for e in read_squad_json(bench.write_dev_subset(source, 9, tmp_path / "all.json"))] == ["a", "b", "c"]


def test_validation_curve_joins_resumed_calls(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "logs" / "teacher"))  # the first call: epochs 1 and 2, then interrupted
    for step, f1 in ((10, 0.25), (20, 0.5)):
        writer.add_scalar("val/f1", f1, step)
        writer.add_scalar("val/exact_match", f1 / 2, step)
    writer.close()
    history = [{"step": 20, "f1": 0.55, "exact_match": 0.3, "examples": 8}, {"step": 30, "f1": 0.6, "exact_match": 0.4}]
    curve = bench.validation_curve(tmp_path, history)
    assert [p["step"] for p in curve] == [10, 20, 30]
    assert curve[0]["f1"] == pytest.approx(0.25) and curve[1] == {"step": 20, "f1": 0.55, "exact_match": 0.3}


def _teacher_row(name, held_out, dev_f1, lr=1e-4):
    metrics = {"exact_match": dev_f1 - 0.1, "f1": dev_f1}
    return {"name": name, "kind": "teacher", "lr": lr, "max_length": 256, "doc_stride": 96, "resumed": False,
            "curve": [{"step": 10, "epoch": 1.0, "f1": held_out - 0.1, "exact_match": 0.1},
                      {"step": 20, "epoch": 2.0, "f1": held_out, "exact_match": 0.2}],
            "teacher": {"metrics": metrics, "params": 100, "train_seconds": 60.0,
                        "selection": {"checkpoint": "best", "step": 20, "max_steps": 20, "value": held_out}},
            "settings": {"train_questions": None, "batch_size": 16}, "command": "python benchmarks/squad_minilm.py",
            "environment": {"date": "2026-12-01", "device": "cpu", "threads": "1", "commit": "abc"},
            "wall_seconds": 70.0, "cpu_seconds": 65.0}


def _student_row(name, teacher, f1):
    return {"name": name, "kind": "student", "teacher_name": teacher["name"], "teacher": teacher["teacher"],
            "student": {"metrics": {"exact_match": f1 - 0.1, "f1": f1}, "params": 50, "train_seconds": 30.0,
                        "selection": {"checkpoint": "best", "step": 5, "max_steps": 9, "value": 0.4}},
            "linear_params": 25, "teacher_linear_params": 100, "stage1": {"train_seconds": 12.0} if name == "kb8-s1" else None,
            "settings": {"student_epochs": 3.0}, "command": "python benchmarks/squad_minilm.py --only students",
            "environment": {"date": "2026-12-02", "device": "cpu", "threads": "1", "commit": "abc"},
            "wall_seconds": 40.0, "cpu_seconds": 35.0}


def test_the_best_setting_trains_again_with_more_epochs_while_its_held_out_f1_still_rises():
    args = bench.parse_args(["--teacher-lrs", "5e-5,1e-4", "--teacher-windows", "256:96", "--data-dir", str(REPO)])
    names = ["teacher-lr5e-05-L256-S96", "teacher-lr0.0001-L256-S96"]
    rows = {names[0]: _teacher_row(names[0], 0.70, 0.6, lr=5e-5)}
    assert [s.name for s in bench.teacher_grid(args, rows)] == names  # undecided while a searched row is missing
    rows[names[1]] = _teacher_row(names[1], 0.75, 0.6)  # best at its last epoch: more epochs may pay
    grid = bench.teacher_grid(args, rows)
    assert [s.name for s in grid] == [*names, "teacher-lr0.0001-L256-S96-E8"]
    assert bench.teacher_config(args, grid[-1]).epochs == 8 and bench.teacher_config(args, grid[0]).epochs == 4
    assert bench.pending_settings(args, rows) == []
    peaked = _teacher_row(names[1], 0.75, 0.6)
    peaked["teacher"]["selection"]["step"] = 10  # best after epoch 1 of 2: more epochs would not be kept
    assert [s.name for s in bench.teacher_grid(args, {**rows, names[1]: peaked})] == names
    off = bench.parse_args(["--teacher-lrs", "5e-5,1e-4", "--teacher-windows", "256:96", "--teacher-more-epochs", "0",
                            "--data-dir", str(REPO)])
    assert [s.name for s in bench.teacher_grid(off, rows)] == names and bench.pending_settings(off, rows) == []
    with pytest.raises(SystemExit):
        bench.parse_args(["--teacher-more-epochs", "-1", "--data-dir", str(REPO)])
    # the longer row competes with the others for the students' teacher
    rows["teacher-lr0.0001-L256-S96-E8"] = _teacher_row("teacher-lr0.0001-L256-S96-E8", 0.78, 0.62)
    assert bench.chosen_teacher(rows)["name"] == "teacher-lr0.0001-L256-S96-E8"


def test_report_states_goals_choice_previous_round_and_what_is_missing(tmp_path):
    grid = [bench.TeacherSetting(1e-4, 256, 96).name, bench.TeacherSetting(2e-4, 256, 96).name]
    empty = bench.report_markdown({}, grid, "python benchmarks/squad_minilm.py --work W", None)
    assert "Teacher F1 ≥ 60 on dev.json: not measured yet" in empty
    assert "dev EM 31.19 / F1 46.18" in empty and "dev EM 1.43 / F1 8.64" in empty  # previous round until replaced
    assert "- `kb8-s1`: `python benchmarks/squad_minilm.py --work W --only kb8-s1`" in empty
    weak, strong = _teacher_row(grid[0], 0.5, 0.58), _teacher_row(grid[1], 0.7, 0.65, lr=2e-4)
    rows = {r["name"]: r for r in (weak, strong, _student_row("ffn2x", strong, 0.63), _student_row("kb8", strong, 0.50),
                                   _student_row("kb8-s1", strong, 0.51), _student_row("truncated3", weak, 0.4))}
    rows["truncated3"]["command"] = "python benchmarks/squad_minilm.py --work W2 --teacher-lrs 1e-4 --only truncated3 --out R"
    text = bench.report_markdown(rows, grid, "python benchmarks/squad_minilm.py --work W", "curve.png", "docs/x.md")
    assert f"`{strong['name']}` **(chosen)**" in text and f"`{weak['name']}` **(chosen)**" not in text
    assert "Teacher F1 ≥ 60 on dev.json: met: F1 65.00." in text
    assert "keeps ≥ 95 % of the teacher's F1: met: `ffn2x` 96.9 %." in text
    assert "with stage 1 (`kb8-s1`) keeps ≥ 80 %: missed: 78.5 %." in text
    assert "without stage 1 (`kb8`): holds: 78.5 % with stage 1, 76.9 % without." in text
    assert "- Against truncated SVDs at `ffn2x`'s parameter count (`lowrank2x`): not measured yet." in text
    # truncated3 (params 50: 2.00x) against the Kronecker students at 2.00x too: ffn2x is the best.
    assert ("- Against dropping layers (`truncated3`, 2.00x, dev F1 40.00), Kronecker students compressed at least as much: "
            "holds: the best of them, `ffn2x` (2.00x, held-out F1 40.00), scores dev F1 63.00.") in text
    rows["lowrank2x"] = _student_row("lowrank2x", strong, 0.64)
    rows["kron2x-budget"] = _student_row("kron2x-budget", strong, 0.60)
    rows["kron2x-budget"]["student"]["selection"]["value"] = 0.35
    rows["truncated3"]["student"]["params"] = 40  # 2.50x: now every Kronecker student is less compressed
    more = bench.report_markdown(rows, grid, "python benchmarks/squad_minilm.py --work W", None)
    assert ("- Against truncated SVDs at `ffn2x`'s parameter count: does not hold: the Kronecker student `ffn2x` (held-out F1 "
            "40.00) scores dev F1 63.00, the low-rank one `lowrank2x` (held-out F1 40.00) 64.00.") in more
    assert "keeps ≥ 95 % of the teacher's F1: met: `ffn2x` 96.9 %, `kron2x-budget` 92.3 %." in more
    # A recipe variant of either family competes for its side of the comparison, chosen by held-out F1, not dev F1.
    rows["kron2x-budget-lr5e-5"] = _student_row("kron2x-budget-lr5e-5", strong, 0.66) | {"lr": 5e-5}
    rows["lowrank2x-lr5e-5"] = _student_row("lowrank2x-lr5e-5", strong, 0.62) | {"lr": 5e-5}
    rows["kron2x-budget-lr5e-5"]["student"]["selection"] = {"checkpoint": "best", "step": 5, "max_steps": 9, "value": 0.45}
    rows["lowrank2x-lr5e-5"]["student"]["selection"] = {"checkpoint": "best", "step": 5, "max_steps": 9, "value": 0.41}
    varied = bench.report_markdown(rows, grid, "python benchmarks/squad_minilm.py --work W", None)
    assert ("count: holds: the Kronecker student `kron2x-budget-lr5e-5` (held-out F1 45.00) scores dev F1 66.00, the low-rank "
            "one `lowrank2x-lr5e-5` (held-out F1 41.00) 62.00.") in varied
    rows["kron2x-budget-lr5e-5"]["dev_f1_questions"] = [1.0, 0.5, 0.0, 1.0]
    rows["lowrank2x-lr5e-5"]["dev_f1_questions"] = [0.0, 0.5, 0.0, 0.5]
    paired = bench.report_markdown(rows, grid, "python benchmarks/squad_minilm.py --work W", None)
    assert ("the low-rank one `lowrank2x-lr5e-5` (held-out F1 41.00) 62.00 (difference +37.50 F1, paired standard error 23.94 "
            "over 4 dev questions, one seed each: not separated: within two standard errors).") in paired
    assert "python benchmarks/squad_minilm.py --question-scores --out docs/benchmarks/squad_minilm.md" in paired
    assert "--question-scores" not in varied and "## Paired comparisons" not in varied  # no row holds per-question scores
    assert "| `kron2x-budget-lr5e-5` | `lowrank2x-lr5e-5` | 66.00 | 62.00 | +37.50 | 23.94 | not separated |" in paired
    rows["kb8-s1"]["dev_f1_questions"], rows["kb8"]["dev_f1_questions"] = [1.0] * 3 + [0.0], [0.0] * 4
    ablation = bench.report_markdown(rows, grid, "python benchmarks/squad_minilm.py --work W", None)
    assert ("without stage 1 (`kb8`): holds: 78.5 % with stage 1, 76.9 % without (difference +75.00 F1, paired standard "
            "error 25.00 over 4 dev questions, one seed each: separated).") in ablation
    del rows["kb8-s1"]["dev_f1_questions"], rows["kb8"]["dev_f1_questions"]
    del rows["kron2x-budget-lr5e-5"]["dev_f1_questions"], rows["lowrank2x-lr5e-5"]["dev_f1_questions"]
    rows["kron2x-budget-lr5e-5"]["student"]["selection"]["value"] = 0.39  # the dev-best Kronecker row is no longer kept
    rows["ffn2x"]["student"]["selection"]["value"] = 0.42
    held = bench.report_markdown(rows, grid, "python benchmarks/squad_minilm.py --work W", None)
    assert ("count: holds: the Kronecker student `ffn2x` (held-out F1 42.00) scores dev F1 63.00, the low-rank one "
            "`lowrank2x-lr5e-5` (held-out F1 41.00) 62.00.") in held
    assert "| 5e-05 | 45.00 (step 5 of 9) |" in varied and "| 4.00x | - | 40.00 (step 5 of 9) |" in varied
    rows["lowrank2x-lr5e-5"]["peak_memory"] = {"bytes": 11_340_000_000, "method": "peak RSS (VmHWM after clear_refs)"}
    memory = bench.report_markdown(rows, grid, "python benchmarks/squad_minilm.py --work W", None)
    assert "| 30 | - | 11.3 |" in memory and "Peak memory: the process's peak resident set during the row's last call" in memory
    del rows["kron2x-budget-lr5e-5"], rows["lowrank2x-lr5e-5"]
    assert "compressed at least as much: not measured yet." in more
    rows["truncated3"]["student"]["params"] = 50
    assert "| `ffn2x` | 53.00 | 63.00 | 96.9 % | 50 | 2.00x | 4.00x | - | 40.00 (step 5 of 9) | 30 | - | - |" in text
    assert "'-': measured before the benchmark recorded it." in text
    assert f"`truncated3` (teacher `{weak['name']}`)" in text  # distilled from a teacher no longer chosen
    assert "dev EM 31.19" not in text and "dev EM 1.43" not in text
    assert "(outside the search)" not in text and "run by name" not in text
    extra = _teacher_row("teacher-lr0.0001-L384-S128", 0.6, 0.6) | {"max_length": 384, "doc_stride": 128}
    named = bench.report_markdown({**rows, extra["name"]: extra}, grid, "python benchmarks/squad_minilm.py --work W", None)
    assert "| `teacher-lr0.0001-L384-S128` (outside the search) |" in named and "settings outside the search (run by name" in named
    # the missing rows are run with the settings of the latest row's invocation
    assert "`linear4x`: `python benchmarks/squad_minilm.py --work W2 --teacher-lrs 1e-4 --only linear4x`" in text
    assert "`kb8`: `python" not in text and "![held-out F1 of each teacher setting after each epoch](curve.png)" in text
    assert "python benchmarks/squad_minilm.py --work W2 --teacher-lrs 1e-4 --report-only --out docs/x.md" in text


def test_rows_of_other_settings_are_refused(tmp_path):
    row = _teacher_row("teacher-lr0.0001-L256-S96", 0.5, 0.6)
    settings = {"train_questions": None, "batch_size": 32}
    with pytest.raises(SystemExit, match="row teacher-lr0.0001-L256-S96 was measured with batch_size = 16, this invocation has 32"):
        bench.check_rows_match({row["name"]: row}, settings, tmp_path)
    bench.check_rows_match({row["name"]: row}, {"train_questions": None, "batch_size": 16}, tmp_path)
    (tmp_path / "results.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "lr": 3e-4}) + "\n")
    assert bench.read_rows(tmp_path / "results.jsonl")[row["name"]]["lr"] == 3e-4


def test_a_fresh_clone_trains_the_chosen_teacher_again_before_its_students(tmp_path, capsys):
    args = bench.parse_args(["--data-dir", str(REPO), "--work", str(tmp_path)])
    present = tmp_path / "present"
    present.mkdir()
    (present / "config.json").write_text("{}")
    row = {**_teacher_row("teacher-lr0.0001-L256-S96-E8", 0.75, 0.68), "epochs": 8, "folder": str(present)}
    calls = []

    def train(setting, args, work, data):
        calls.append(setting)
        return {**row, "folder": str(work / "runs" / setting.name / "teacher"), "teacher": {**row["teacher"], "metrics": {"f1": 0.67}}}

    assert bench.teacher_checkpoint(row, args, tmp_path, None, train=train) is row and calls == []
    gone = {**row, "folder": str(tmp_path / "gone" / "teacher")}
    again = bench.teacher_checkpoint(gone, args, tmp_path, None, train=train)
    assert calls == [bench.TeacherSetting(1e-4, 256, 96, 8)] and calls[0].name == row["name"]
    assert again["folder"] == str(tmp_path / "runs" / row["name"] / "teacher") and again["retrained"]["teacher"]["metrics"]["f1"] == 0.67
    assert again["teacher"] == row["teacher"]  # the row's own figures are kept; the student records the teacher it used
    assert "held-out F1 75.00 (row: 75.00), dev F1 67.00 (row: 68.00)" in capsys.readouterr().out
    plain = bench.setting_of(_teacher_row("teacher-lr0.0002-L384-S128", 0.7, 0.6, lr=2e-4) | {"max_length": 384, "doc_stride": 128,
                                                                                               "epochs": 4})
    assert plain == bench.TeacherSetting(2e-4, 384, 128)


def test_the_teacher_search_runs_only_the_settings_it_decides():
    args = bench.parse_args(["--data-dir", str(REPO)])  # coordinate: 5e-5, 1e-4, 2e-4 at 256:96, then the best at 384:128
    every = [bench.TeacherSetting(lr, length, stride) for length, stride in ((256, 96), (384, 128)) for lr in (5e-5, 1e-4, 2e-4)]
    rows = {}
    for lr, held_out in ((5e-5, 0.71), (1e-4, 0.75)):
        name = bench.TeacherSetting(lr, 256, 96).name
        rows[name] = _teacher_row(name, held_out, 0.6, lr=lr)
    assert [s.name for s in bench.teachers_to_run(args, rows, every, bench.selected("teacher", every), True)] == [
        "teacher-lr0.0002-L256-S96"]  # the first window's settings before any other window
    best = bench.TeacherSetting(2e-4, 256, 96).name
    rows[best] = _teacher_row(best, 0.76, 0.6, lr=2e-4)
    rows[best]["teacher"]["selection"]["step"] = 10  # peaked before its last epoch: no longer run
    outside = bench.TeacherSetting(1e-4, 384, 128).name  # a setting run by name beside the search
    rows[outside] = _teacher_row(outside, 0.77, 0.6) | {"max_length": 384, "doc_stride": 128}
    todo = bench.teachers_to_run(args, rows, every, bench.selected("teacher", every), True)
    assert [s.name for s in todo] == ["teacher-lr0.0002-L384-S128"]  # not 5e-5 at 384:128: the search never tries it
    named = bench.teachers_to_run(args, rows, every, bench.selected("teacher-lr5e-05-L384-S128", every), False)
    assert [s.name for s in named] == ["teacher-lr5e-05-L384-S128"]
    assert bench.teachers_to_run(args, rows, every, bench.selected("students", every), False) == []


def test_the_report_says_how_the_search_ended_once_it_has():
    grid = [bench.TeacherSetting(1e-4, 256, 96).name, bench.TeacherSetting(2e-4, 256, 96).name]
    weak, strong = _teacher_row(grid[0], 0.5, 0.58), _teacher_row(grid[1], 0.7, 0.65, lr=2e-4)
    strong["teacher"]["selection"]["step"] = 10  # best after epoch 1 of 2
    rows = {weak["name"]: weak, strong["name"]: strong}
    text = bench.report_markdown(rows, grid, "python benchmarks/squad_minilm.py --work W", None)
    assert (f"Outcome: the search's best setting is `{strong['name']}`, held-out F1 70.00 after epoch 1 of 2, past its peak "
            "before its last epoch, so no longer run was needed; the students learn from it.") in text
    assert "Outcome:" not in bench.report_markdown(rows, grid, "python", None, pending=["a setting not decided yet"])
    assert "Outcome:" not in bench.report_markdown({weak["name"]: weak}, grid, "python", None)
    named = _teacher_row("teacher-lr0.0001-L384-S128", 0.8, 0.66) | {"max_length": 384, "doc_stride": 128}
    text = bench.report_markdown({**rows, named["name"]: named}, grid, "python", None)
    assert f"; the students learn from `{named['name']}`, outside the search, whose held-out F1 is higher (80.00)." in text
    longer = bench.TeacherSetting(2e-4, 256, 96, 8).name
    rows[longer] = _teacher_row(longer, 0.75, 0.66, lr=2e-4) | {"epochs": 8}
    text = bench.report_markdown(rows, [*grid, longer], "python", None)
    assert f"Outcome: the search's best setting is `{longer}`, held-out F1 75.00 after epoch 2 of 2; the students" in text


def test_student_rows_recorded_without_a_curve_get_the_one_their_run_folder_holds(tmp_path):
    teacher = _teacher_row("teacher-lr0.0001-L256-S96", 0.7, 0.65)
    student = _student_row("ffn2x", teacher, 0.6) | {"folder": str(tmp_path / "ffn2x" / "student")}
    gone = _student_row("kb8", teacher, 0.2) | {"folder": str(tmp_path / "kb8" / "student")}  # run folder not here
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(row) + "\n" for row in (teacher, student, gone)))
    for folder in ("student", "student-run/logs"):
        (tmp_path / "ffn2x" / folder).mkdir(parents=True)
    history = [{"step": 50, "f1": 0.41, "exact_match": 0.29}, {"step": 100, "f1": 0.44, "exact_match": 0.31}]
    (tmp_path / "ffn2x" / "student" / "training_summary.json").write_text(json.dumps({"run": {"val_history": history}}))
    bench.fill_student_curves(results)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["name"] for r in rows] == [teacher["name"], "ffn2x", "kb8"]
    assert rows[1]["curve"] == history and rows[2]["curve"] is None and rows[0] == teacher
    before = results.read_bytes()
    bench.fill_student_curves(results)  # nothing left to fill: the file is left as it was
    assert results.read_bytes() == before
    text = bench.report_markdown({r["name"]: r for r in rows}, [teacher["name"]], "python b.py", None, student_png="s.png")
    assert "![held-out F1 of each student during task distillation, by step](s.png)" in text


def _saved_teacher_and_enwiki(tmp_path):
    """A MiniLM-shaped QA teacher saved with its tokenizer, an enwiki-sample file of its words, the
    benchmark's arguments on that data, the teacher row, and ffn2x's parameter count on it."""
    from test_squad_data import tiny_bert_tokenizer

    from kronlm.modeling import save

    words = "the river seine flows through paris which is the capital of france and of its region".split()
    text = " ".join(words[(7 * i) % len(words)] for i in range(3000))
    (tmp_path / "data" / "enwiki-sample").mkdir(parents=True)
    (tmp_path / "data" / "enwiki-sample" / "articles.jsonl").write_text(json.dumps({"text": text}) + "\n")
    teacher = _minilm_shaped_qa()
    save(teacher, tmp_path / "teacher", tokenizer=tiny_bert_tokenizer(text))
    reference = copy.deepcopy(teacher)
    compress(reference, CompressionConfig.from_file(REPO / "configs" / "minilm-ffn2x.yaml"))
    args = bench.parse_args(["--data-dir", str(tmp_path / "data")])
    args.data_dir = tmp_path / "data"
    row = {"name": "teacher-x", "folder": str(tmp_path / "teacher"), "max_length": 16}
    return args, row, sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("name, family", [("lowrank2x", "svd"), ("kron2x-budget", "kronecker")])
def test_budget_students_spend_ffn2x_parameters_on_the_ffn_alone(tmp_path, name, family):
    from kronlm.layers import KroneckerLinear
    from kronlm.modeling import load_model

    args, row, target = _saved_teacher_and_enwiki(tmp_path)
    folder = bench.budget_init(bench.STUDENTS[name], row, args, tmp_path / "work")
    student = load_model(str(folder), task="question-answering")
    params = sum(p.numel() for p in student.parameters())
    assert 0.98 * target <= params <= target  # the budget is spent, never overspent
    layers = student.bert.encoder.layer
    ffn = [m for layer in layers for m in (layer.intermediate.dense, layer.output.dense)]
    assert any(isinstance(m, KroneckerLinear) for m in ffn)
    for m in (m for m in ffn if isinstance(m, KroneckerLinear)):
        # A truncated SVD is a sum of A (out, 1) ⊗ B (1, in) terms; a Kronecker factor never is.
        assert (m.A.shape[-1] == 1 and m.B.shape[-2] == 1) == (family == "svd")
    # Attention, embeddings and the span head stay dense.
    assert all(type(layer.attention.self.query) is torch.nn.Linear for layer in layers)
    assert type(student.qa_outputs) is torch.nn.Linear
    # A second call, or the same student at another learning rate, finds the folder and compresses nothing.
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert bench.budget_init(bench.STUDENTS[name], row, args, tmp_path / "work") == folder
    assert bench.budget_init(bench.STUDENTS[f"{name}-lr5e-5"], row, args, tmp_path / "work") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_student_row_may_set_its_own_peak_learning_rate():
    args = bench.parse_args(["--data-dir", str(REPO)])
    teacher = {"max_length": 384, "doc_stride": 128}
    shared = bench.student_config(args, teacher)
    assert bench.student_config(args, teacher, bench.STUDENTS["kron2x-budget"]).lr == shared.lr
    lower = bench.student_config(args, teacher, bench.STUDENTS["kron2x-budget-lr5e-5"])
    assert lower.lr == 5e-5 != shared.lr and lower.max_length == 384 and lower.doc_stride == 128


def test_a_run_records_the_peak_memory_of_its_call(tmp_path, monkeypatch):
    held = {}

    def fake_run_squad(folder, **kwargs):
        held["tensor"] = torch.ones(50_000_000)  # 200 MB resident while the run lasts
        held.pop("tensor")
        return "report"

    class Data:
        def inputs(self):
            return ()

        def flags(self):
            return []

        def run_arguments(self):
            return {}

    monkeypatch.setattr(bench, "run_squad", fake_run_squad)
    monkeypatch.setattr(bench, "claim_task_folder", lambda out, teacher, inputs: out)
    config = bench.student_config(bench.parse_args(["--data-dir", str(REPO)]), {"max_length": 64, "doc_stride": 16})
    report, wall, cpu, resumed, memory = bench.squad_run(tmp_path / "runs" / "x", config, Data(), [], 1)
    assert report == "report" and not resumed and wall >= 0
    assert (tmp_path / "configs" / "x.yaml").is_file()
    baseline = bench.peak_memory(lambda: None)[0]
    if memory["method"] == "peak RSS (VmHWM after clear_refs)":
        assert memory["bytes"] >= baseline + 150_000_000  # the 200 MB the call held, on top of what stays resident
    assert memory["bytes"] >= 200_000_000 and memory["method"] in bench.MEMORY_METHODS


def test_ffn2x_aa_is_ffn2x_with_every_factor_fitted_to_activations(tmp_path):
    from kronlm.modeling import load_model

    args, row, target = _saved_teacher_and_enwiki(tmp_path)
    spec = bench.STUDENTS["ffn2x-aa"]
    assert spec.compression == bench.STUDENTS["ffn2x"].compression and spec.budget_families is None
    folder = bench.calibrated_init(spec, row, args, tmp_path / "work")
    student = load_model(str(folder), task="question-answering")
    assert sum(p.numel() for p in student.parameters()) == target  # ffn2x's shapes, so exactly its count
    modules = json.loads((folder / "kronlm_compression.json").read_text())["report"]["modules"]
    assert len(modules) == 4 and {m["init"] for m in modules} == {"activation_aware"}
    assert bench.calibrated_init(spec, row, args, tmp_path / "work") == folder  # found, not compressed again


def test_paired_standard_error_of_two_students_on_the_same_questions():
    from squad_minilm_scores import paired_difference, separation

    a, b = [1.0, 0.5, 0.0, 1.0], [0.0, 0.5, 0.0, 0.5]  # differences 100, 0, 0, 50 points: mean 37.5
    diff, se = paired_difference(a, b)
    assert diff == pytest.approx(37.5)
    assert se == pytest.approx((((62.5 ** 2 + 37.5 ** 2 * 2 + 12.5 ** 2) / 3) / 4) ** 0.5)
    assert separation(a, b).endswith(": not separated: within two standard errors")  # 37.5 < 2 x 23.9
    assert separation([1.0] * 50 + [0.5] * 50, [0.5] * 50 + [0.0] * 50).endswith(": separated")
    with pytest.raises(ValueError, match="different lengths"):
        paired_difference([1.0, 0.0], [1.0])
    with pytest.raises(ValueError, match="at least 2 questions"):
        paired_difference([1.0], [0.0])


def test_student_rows_get_per_question_dev_f1_checked_against_their_recorded_f1(tmp_path):
    from kronlm.tasks.squad import SquadEvalSet, SquadFamily, prepare_eval_features

    args, teacher, _ = _saved_teacher_and_enwiki(tmp_path)
    context = "paris is the capital of france and the river seine flows through paris"
    data_dir = tmp_path / "squad"
    data_dir.mkdir()
    squad_file(data_dir, [article([qa("q1", [("seine", 45)], question="which river flows through paris"),
                                   qa("q2", [("france", 24)], question="paris is the capital of which"),
                                   qa("q3", [("paris", 0)], question="what is the capital of france")], context=context)],
               name="dev.json")
    data = bench.SquadData(data_dir)
    teacher.update(kind="teacher", doc_stride=8, max_length=40)
    config = bench.student_config(args, teacher)
    family = SquadFamily(bench.load_tokenizer(tmp_path / "teacher"), data_dir=data_dir)
    model = family.load_model(tmp_path / "teacher")
    examples, source = family.examples("dev")
    dev = SquadEvalSet(examples, prepare_eval_features(examples, family.tokenizer, 40, 8, family.max_positions), source)
    f1 = family.evaluate(model, dev, config, torch.device("cpu"))["f1"]  # the run's own scoring: squad_metrics
    row = {"name": "ffn2x", "kind": "student", "teacher_name": teacher["name"], "folder": str(tmp_path / "teacher"),
           "student": {"metrics": {"f1": f1}}}
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in (teacher, row)))
    bench.fill_question_scores(results, args, data)
    filled = [json.loads(line) for line in results.read_text().splitlines()]
    scores = filled[1]["dev_f1_questions"]
    assert len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores)
    assert sum(scores) / 3 == pytest.approx(f1, abs=1e-4) and filled[0] == teacher
    before = results.read_bytes()
    bench.fill_question_scores(results, args, data)  # nothing left to fill
    assert results.read_bytes() == before
    row["student"]["metrics"]["f1"] = f1 + 0.01  # the folder no longer holds what the row measured
    results.write_text("".join(json.dumps(r) + "\n" for r in (teacher, row)))
    with pytest.raises(SystemExit, match=r"ffn2x: .* scores dev F1 .* but its row recorded"):
        bench.fill_question_scores(results, args, data)
