"""Recovery in stages: a staged config file, local -> block-wise -> end-to-end on one student, the
kept stage chosen on held-out blocks, time budgets, and resume after a finished stage."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import rule_ids, tiny_llama

import kronlm
from kronlm import CompressionConfig, KroneckerTarget
from kronlm.distill.config import TrainingConfig
from kronlm.distill.stages import DEFAULT_RECIPE, RecoveryConfig, default_recovery_config, recover

MLP_CFG = CompressionConfig(targets=[KroneckerTarget(["**.mlp.gate_proj", "**.mlp.up_proj"], b_shape=(4, 1)),
                                     KroneckerTarget(["**.mlp.down_proj"], b_shape=(1, 4))])
DEFAULTS = dict(recipe="ce", loss_weights={"ce": 0.0, "kd": 1.0}, block_size=16, micro_batch_size=4, lr=5e-3, min_lr=5e-4,
                warmup_steps=1, eval_every=3, save_every=3, mixed_precision="no", weight_decay=0.0, seed=7, freeze_uncompressed=True)


_ids = rule_ids


_TEACHER = {}


def _pair():
    """A tiny Llama trained on the rule (perplexity far below the vocabulary's 96) and its compressed copy."""
    if "state" not in _TEACHER:
        teacher = tiny_llama(3)
        optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2)
        ids = _ids(64, 0)
        for _ in range(60):
            optimizer.zero_grad()
            teacher(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
        _TEACHER["state"] = copy.deepcopy(teacher.state_dict())
    teacher = tiny_llama(3)
    teacher.load_state_dict(_TEACHER["state"])
    teacher.eval()
    return teacher, kronlm.compress(copy.deepcopy(teacher), MLP_CFG, progress=False)


def _staged_file(tmp_path, **stage_overrides):
    path = tmp_path / "recover.yaml"
    stages = [{"mode": "local", "max_steps": 6, "local": {"target": "teacher"}},
              {"mode": "blockwise", "max_steps": 6},
              {"mode": "end_to_end", "max_steps": 6, "lr": 1e-3}]
    for i, extra in stage_overrides.items():
        stages[int(i)].update(extra)
    path.write_text(yaml.safe_dump({"defaults": DEFAULTS, "stages": stages}))
    return path


def test_a_staged_file_reads_into_one_training_config_per_stage(tmp_path):
    config = RecoveryConfig.from_file(_staged_file(tmp_path), overrides={"seed": 11})
    assert [s.mode for s in config.stages] == ["local", "blockwise", "end_to_end"]
    assert [s.lr for s in config.stages] == [5e-3, 5e-3, 1e-3]
    assert all(s.seed == 11 and s.block_size == 16 for s in config.stages)
    plain = tmp_path / "one.yaml"
    plain.write_text(yaml.safe_dump({"mode": "blockwise", "epochs": 2}))
    assert [s.mode for s in RecoveryConfig.from_file(plain).stages] == ["blockwise"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"defaults": DEFAULTS, "stages": [{"mode": "local"}, {"mode": "sideways"}]}))
    with pytest.raises(ValueError, match=r"recovery config .*bad.yaml, stage 2: .*mode must be one of"):
        RecoveryConfig.from_file(bad)
    bad.write_text(yaml.safe_dump({"stages": [], "extra": 1}))
    with pytest.raises(ValueError, match="unknown key extra"):
        RecoveryConfig.from_file(bad)


def test_budgets_scale_to_the_total():
    stages = [TrainingConfig(mode="local", max_minutes=2), TrainingConfig(mode="blockwise", max_minutes=3),
              TrainingConfig(mode="end_to_end", max_minutes=5)]
    scaled = RecoveryConfig(stages=stages).with_budget(20)
    assert [s.max_minutes for s in scaled.stages] == pytest.approx([4, 6, 10])
    open_ended = RecoveryConfig(stages=[TrainingConfig(mode="local", max_minutes=2), TrainingConfig(mode="end_to_end")]).with_budget(10)
    assert [s.max_minutes for s in open_ended.stages] == pytest.approx([2, 8])
    with pytest.raises(ValueError, match="budget must be positive"):
        RecoveryConfig(stages=stages).with_budget(0)


def test_stages_run_in_order_and_the_best_student_is_kept(tmp_path):
    teacher, student = _pair()
    data = {"train": _ids(16, 1), "val": _ids(4, 2)}
    result = recover(student, teacher, data, RecoveryConfig.from_file(_staged_file(tmp_path)), tmp_path / "run", progress=False)
    assert [s.mode for s in result.stages] == ["local", "blockwise", "end_to_end"]
    assert result.stages[0].val_ppl_before is not None
    for before, after in zip(result.stages, result.stages[1:]):
        assert after.val_ppl_before == pytest.approx(min(before.val_ppl_after, before.val_ppl_before))
    best = min(range(len(result.stages)), key=lambda i: result.stages[i].val_ppl_after)
    assert result.chosen == best + 1 and result.val_ppl == result.stages[best].val_ppl_after
    kept = kronlm.load(tmp_path / "run" / "best")
    for (name, a), b in zip(kept.state_dict().items(), student.state_dict().values()):
        assert torch.equal(a, b), name
    summary = json.loads((tmp_path / "run" / "recovery_summary.json").read_text())
    assert [s["mode"] for s in summary["stages"]] == ["local", "blockwise", "end_to_end"]
    assert summary["best_dir"] == (None if result.best_dir is None else str(result.best_dir))
    # The block stages share one teacher cache (the teacher runs over the tokens once).
    assert (tmp_path / "run" / "teacher_cache" / "hidden.json").is_file()
    assert not list((tmp_path / "run").glob("stage-*/teacher_cache"))

    # A resumed recovery loads finished stages instead of running them again.
    teacher, again = _pair()
    resumed = recover(again, teacher, data, RecoveryConfig.from_file(_staged_file(tmp_path)), tmp_path / "run", resume=True, progress=False)
    assert [s.seconds for s in resumed.stages] == [s.seconds for s in result.stages]
    for a, b in zip(again.state_dict().values(), student.state_dict().values()):
        assert torch.equal(a, b)


def test_a_stage_that_makes_things_worse_is_undone(tmp_path):
    teacher, student = _pair()
    data = {"train": _ids(16, 1), "val": _ids(4, 2)}
    # A learning rate far too large: the end-to-end stage can only make the student worse.
    config = RecoveryConfig.from_file(_staged_file(tmp_path, **{"2": {"lr": 50.0, "min_lr": 50.0, "grad_clip": None}}))
    result = recover(student, teacher, data, config, tmp_path / "run", progress=False)
    assert result.stages[2].val_ppl_after > min(result.stages[0].val_ppl_after, result.stages[1].val_ppl_after)
    assert result.chosen in (1, 2)
    kept = kronlm.load(tmp_path / "run" / f"stage-{result.chosen}-{result.stages[result.chosen - 1].mode}" / "best")
    for a, b in zip(kept.state_dict().values(), student.state_dict().values()):
        assert torch.equal(a, b)


def test_the_packaged_default_recipe_is_the_example_in_configs():
    example = Path(__file__).resolve().parents[1] / "configs" / "recover.yaml"
    assert example.read_text() == DEFAULT_RECIPE.read_text()
    config = default_recovery_config(minutes=6)
    assert [s.mode for s in config.stages] == ["local", "blockwise", "end_to_end"]
    assert sum(s.max_minutes for s in config.stages) == pytest.approx(6)


def test_the_minutes_a_stage_leaves_go_to_the_next(tmp_path):
    teacher, student = _pair()
    config = RecoveryConfig.from_file(_staged_file(tmp_path)).with_budget(3.0)  # 1 minute a stage; each needs about a second
    recover(student, teacher, {"train": _ids(16, 1), "val": _ids(4, 2)}, config, tmp_path / "run", progress=False)
    given = [TrainingConfig.from_file(tmp_path / "run" / f"stage-{i}-{m}" / "training_config.yaml").max_minutes
             for i, m in ((1, "local"), (2, "blockwise"), (3, "end_to_end"))]
    assert given[0] == pytest.approx(1.0)
    assert 1.9 < given[1] < 2.0 and 2.8 < given[2] < 3.0


def test_an_overrun_is_taken_from_the_next_stage(tmp_path, monkeypatch):
    import kronlm.distill.stages as stages_module

    teacher, student = _pair()
    clock = {"now": 0.0}
    spends = iter([90.0, 90.0, 10.0])  # seconds each stage takes: the first two overrun their 60
    given = []

    def fake_stage(index, student, teacher, blocks, stage, folder, *rest):
        given.append(stage.max_minutes)
        clock["now"] += next(spends)
        return stages_module.StageRecord(index, stage.mode, str(folder), val_ppl_after=None), folder

    monkeypatch.setattr(stages_module, "_run_stage", fake_stage)
    monkeypatch.setattr(stages_module.time, "perf_counter", lambda: clock["now"])
    config = RecoveryConfig.from_file(_staged_file(tmp_path)).with_budget(3.0)  # 1 minute a stage
    recover(student, teacher, {"train": _ids(16, 1), "val": _ids(4, 2)}, config, tmp_path / "run", progress=False)
    # Stage 2 gets 1 - 0.5 minutes; it takes 1.5, so stage 3 would get 1 - 1.0 = 0 and gets its floor, a quarter.
    assert given == pytest.approx([1.0, 0.5, 1.0 * stages_module.MIN_STAGE_SHARE])
