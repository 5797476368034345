"""GLUE runs through the one training loop: bit-exact kill-and-resume of teacher fine-tuning and
student task distillation, checkpoint choice on held-out training examples (never on dev), the
Python entry point run_glue, and the GLUE configs."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_glue_models import (
    TINY_KRON,
    encode,
    synthetic_sst2,
    tiny_bert_classifier,
    tiny_tokenizer,
)

from kronlm.distill.checkpoint import latest_checkpoint, load_checkpoint
from kronlm.tasks import TaskSplits, train_task_model
from kronlm.tasks.glue import (
    GlueFamily,
    GlueTrainConfig,
    get_task,
    make_classifier_student,
    read_report,
    run_glue,
)

REPO = Path(__file__).resolve().parents[1]


def killed_at(model, forward: int):
    """Raise KeyboardInterrupt at the ``forward``-th training-mode forward pass of ``model``."""
    calls = {"n": 0}

    def crash(module, args, kwargs):
        if module.training:
            calls["n"] += 1
            if calls["n"] == forward:
                raise KeyboardInterrupt("simulated kill")

    model.register_forward_pre_hook(crash, with_kwargs=True)
    return model


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_glue_run_killed_and_resumed_equals_the_uninterrupted_run_bit_for_bit(tmp_path, role):
    tok = tiny_tokenizer(tmp_path / "tok")
    family = GlueFamily(get_task("sst2"), tok)
    held_out = encode(tok, synthetic_sst2(16, 2))
    # Variable-length examples, padded per batch and grouped by length; dropout is on (BERT's 0.1).
    splits = TaskSplits(encode(tok, synthetic_sst2(80, 0)), held_out, held_out, val_examples=16)
    cfg = GlueTrainConfig(batch_size=8, max_steps=6, lr=3e-3, warmup_ratio=0.2, seed=5, eval_every=2, save_every=3,
                          keep_checkpoints=5, val_fraction=0.2)
    teacher = tiny_bert_classifier(seed=1) if role == "student" else None

    def fresh(seed):
        if role == "teacher":
            return tiny_bert_classifier(seed=seed)
        student = make_classifier_student(teacher, TINY_KRON)[0]
        with torch.no_grad():  # a different start, which the checkpoint must override
            for p in student.parameters():
                p.add_(0.01 * seed)
        return student

    def run(model, out, resume=False):
        return train_task_model(family, model, splits, cfg, tmp_path / out, role=role, teacher=teacher, resume=resume)

    full = run(fresh(0), "full")
    with pytest.raises(KeyboardInterrupt):
        run(killed_at(fresh(0), 4), "resumed")  # one micro-batch per step: step 4
    assert latest_checkpoint(tmp_path / "resumed").name == "step-0000003"
    torch.manual_seed(4321)
    random.seed(4)
    np.random.seed(4)
    resumed = run(fresh(7), "resumed", resume=True)

    assert resumed.start_step == 3 and resumed.steps == full.steps == 6
    assert resumed.losses == full.losses[3:] and resumed.loss_terms == full.loss_terms[3:]
    assert resumed.val_history == full.val_history  # the validation at step 2 comes from the checkpoint
    assert (resumed.best_step, resumed.best_val) == (full.best_step, full.best_val)
    assert resumed.tokens_seen == full.tokens_seen
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "resumed")
    assert a.model_state.keys() == b.model_state.keys()
    assert all(torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)
    assert all(torch.equal(a.optimizer_state["state"][i][n], b.optimizer_state["state"][i][n])
               for i in a.optimizer_state["state"] for n in a.optimizer_state["state"][i])
    expected_terms = {"ce"} if role == "teacher" else {"embedding", "attention", "hidden", "kd", "ce"}
    assert set(full.loss_terms[0]) == expected_terms
    # A different training set cannot be resumed: the data order would change.
    smaller = dataclasses.replace(splits, train=splits.train[:72])
    with pytest.raises(ValueError, match=r"data order would change \(training examples 80 -> 72\)"):
        train_task_model(family, fresh(0), smaller, cfg, tmp_path / "resumed", role=role, teacher=teacher, resume=True)


def write_sst2(root: Path, train, dev) -> Path:
    folder = root / "glue" / "SST-2"
    folder.mkdir(parents=True)
    for split, rows in (("train", train), ("dev", dev)):
        (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    return root / "glue"


def test_checkpoint_is_chosen_on_held_out_training_examples_never_on_dev(tmp_path):
    tok = tiny_tokenizer(tmp_path / "base")
    tiny_bert_classifier(seed=3).bert.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    train, dev = synthetic_sst2(96, 0), synthetic_sst2(32, 1)
    glue = write_sst2(tmp_path / "data", train, dev)
    # The same task with every dev label flipped: a choice that looked at dev would differ.
    flipped = write_sst2(tmp_path / "flipped", train, [(s, 1 - y) for s, y in dev])
    cfg = GlueTrainConfig(batch_size=16, max_steps=8, lr=1e-3, max_length=16, eval_every=2, val_fraction=0.25)
    quiet = dict(model=str(tmp_path / "base"), config=cfg, log=lambda line: None)
    a = run_glue("sst2", tmp_path / "a", data_dir=glue, **quiet).row("teacher")
    b = run_glue("sst2", tmp_path / "b", data_dir=flipped, **quiet).row("teacher")

    assert a.selection == b.selection and a.selection["checkpoint"] == "best"
    assert a.selection["val_examples"] == 24 and a.train_examples == 72  # 25 % of 96 held out
    history = json.loads((tmp_path / "a" / "teacher" / "training_summary.json").read_text())["run"]["val_history"]
    assert [v["step"] for v in history] == [2, 4, 6, 8] and {v["examples"] for v in history} == {24}
    best = max(history, key=lambda v: v["accuracy"])  # the first of equal values wins: only a strict improvement counts
    assert a.selection["step"] == best["step"] and a.selection["value"] == best["accuracy"]
    # Dev is evaluated for the final and the best model and only reported: flipped labels flip it.
    for name in ("metrics_final", "metrics_best"):
        assert getattr(a, name)["accuracy"] + getattr(b, name)["accuracy"] == pytest.approx(1.0)
    assert a.metrics == a.metrics_best
    summary = json.loads((tmp_path / "a" / "teacher" / "training_summary.json").read_text())
    assert summary["role"] == "teacher" and summary["task"] == "sst2" and summary["selection"] == a.selection
    assert summary["dev"]["final"] == a.metrics_final and summary["config"]["val_fraction"] == 0.25
    assert not (tmp_path / "a" / "teacher" / "kronlm_compression.json").exists()
    md = (tmp_path / "a" / "report.md").read_text()
    assert "Checkpoint choice (on held-out training examples; the dev split is only reported):" in md
    assert f"best/ (step {a.selection['step']} of 8" in md

    # val_fraction 0: nothing is chosen, the model after the last step is reported.
    none = run_glue("sst2", tmp_path / "c", data_dir=glue, **{**quiet, "config": cfg.replace(val_fraction=0.0)}).row("teacher")
    assert none.selection["checkpoint"] == "final" and "val_fraction 0" in none.selection["reason"]
    assert none.metrics == none.metrics_final and none.metrics_best is None and none.train_examples == 96
    assert not (tmp_path / "c" / "teacher-run" / "best").exists()

    with pytest.raises(ValueError, match="give model .* or teacher"):
        run_glue("sst2", tmp_path / "d", data_dir=glue)
    with pytest.raises(ValueError, match="task_kd=False / layer_map need a student"):
        run_glue("sst2", tmp_path / "d", data_dir=glue, task_kd=False, **quiet)
    with pytest.raises(ValueError, match="glue config: early_stopping_patience 2 needs held-out training examples"):
        GlueTrainConfig(val_fraction=0.0, early_stopping_patience=2)


def test_run_glue_teacher_and_student_in_one_call(tmp_path):
    tok = tiny_tokenizer(tmp_path / "base")
    tiny_bert_classifier(seed=3).bert.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    glue = write_sst2(tmp_path / "data", synthetic_sst2(64, 0), synthetic_sst2(16, 1))
    cfg = GlueTrainConfig(batch_size=16, max_steps=4, lr=1e-3, max_length=16, val_fraction=0.25)
    report = run_glue("sst2", tmp_path / "run", model=str(tmp_path / "base"), config=cfg, student=TINY_KRON,
                      data_dir=glue, log=lambda line: None)
    assert [r.role for r in report.rows] == ["teacher", "student"]
    assert report.rows[1].notes == "task ILKD (ilkd-kroneckerbert)"
    assert report.ratios()["embedding_linear"] > 1 and read_report(tmp_path / "run") == report
    student = json.loads((tmp_path / "run" / "student" / "training_summary.json").read_text())
    assert student["role"] == "student" and student["stages"] == ["task ILKD (ilkd-kroneckerbert)"]
    assert (tmp_path / "run" / "student" / "kronlm_compression.json").is_file()
    for run in ("teacher-run", "student-run"):
        assert (tmp_path / "run" / run / "final" / "model.safetensors").is_file()
        assert (tmp_path / "run" / run / "training_config.yaml").is_file()


def test_glue_configs_load_and_comment_every_key():
    files = sorted((REPO / "configs").glob("glue-minilm-*.yaml"))
    files = [f for f in files if "targets" not in yaml.safe_load(f.read_text())]  # compression configs aside
    assert len(files) == 3
    fields = [f.name for f in dataclasses.fields(GlueTrainConfig)]
    for file in files:
        GlueTrainConfig.from_file(file)
        assert list(yaml.safe_load(file.read_text())) == fields, file.name
        lines = file.read_text().splitlines()
        for i, line in enumerate(lines):
            if line and not line.startswith((" ", "#")):
                assert lines[i - 1].startswith("#"), f"{file.name}: no comment above {line!r}"
    cfg = GlueTrainConfig(batch_size=8, epochs=2.5, warmup_ratio=0.1, eval_every=0, save_every=0, val_fraction=0.1)
    run = cfg.training_config(100, recipe="ce")
    # 100 // 8 = 12 steps per epoch, ceil(2.5 x 12) = 30 steps, 3 warm-up, validation once per epoch.
    assert (run.max_steps, run.warmup_steps, run.eval_every, run.save_every, run.recipe) == (30, 3, 12, 30, "ce")
    assert run.micro_batch_size == 8 and run.block_size == cfg.max_length and run.loss_weights == {}
    with pytest.raises(ValueError, match=r"5 training examples, fewer than one optimizer step needs \(batch_size 8"):
        cfg.training_config(5)
    with pytest.raises(ValueError, match="glue config .*: unknown key learning_rate"):
        GlueTrainConfig.from_dict({"learning_rate": 1}, source="glue config x.yaml")
