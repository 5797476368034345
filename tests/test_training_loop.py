"""The training loop's extension points on something that is not a language model: a block-wise
distillation of one residual MLP block on cached (input, target) hidden states, with its own
objective, validator and no export; early stopping; the length-grouped data order."""

from __future__ import annotations

import json

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kronlm.distill import LossOutput, TrainingConfig, Validator, evaluation_mode
from kronlm.distill.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from kronlm.distill.data_order import epoch_indices, process_share
from kronlm.distill.trainer import Trainer, TrainingDiverged

WIDTH, POSITIONS = 8, 4


class Block(nn.Module):
    """Stands in for one transformer block: x + MLP(x), (batch, positions, width) -> same."""

    def __init__(self, seed: int, dropout: float = 0.1):
        super().__init__()
        torch.manual_seed(seed)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 16), nn.GELU(), nn.Dropout(dropout), nn.Linear(16, WIDTH))

    def forward(self, x):
        return x + self.mlp(x)


class HiddenMSE:
    """MSE between the block's output and the cached teacher hidden state."""

    needs_teacher = False

    def __call__(self, model, teacher, batch):
        loss = F.mse_loss(model(batch["inputs"]), batch["targets"])
        return LossOutput(total=loss, terms={"mse": loss.detach().float()})


class HeldOutMSE(Validator):
    name = key = "mse"
    greater_is_better = False

    def __init__(self, data):
        self.inputs = torch.stack([d["inputs"] for d in data])
        self.targets = torch.stack([d["targets"] for d in data])

    def __call__(self, model, accelerator):
        with evaluation_mode(model, accelerator) as net, torch.no_grad():
            return {"mse": F.mse_loss(net(self.inputs.to(accelerator.device)), self.targets.to(accelerator.device)).item()}


def cached_pairs(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """(input hidden, teacher output hidden) pairs of a fixed random 'teacher block'."""
    teacher = Block(1000, dropout=0.0).eval()
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, POSITIONS, WIDTH, generator=g)
    with torch.no_grad():
        targets = teacher(inputs)
    return [{"inputs": x, "targets": y} for x, y in zip(inputs, targets)]


def block_config(tmp_path, **kw) -> TrainingConfig:
    values = dict(recipe="ce", block_size=POSITIONS, micro_batch_size=4, max_steps=20, lr=1e-2, min_lr=1e-3,
                  warmup_steps=2, eval_every=5, save_every=5, keep_checkpoints=10, mixed_precision="no",
                  weight_decay=0.0, seed=3, log_dir=str(tmp_path / "logs"))
    values.update(kw)
    return TrainingConfig(**values)


def block_trainer(tmp_path, model, out, **kw):
    cfg = block_config(tmp_path, **kw.pop("config", {}))
    return Trainer(model, cfg, cached_pairs(48, 0), out, objective=HiddenMSE(), validator=HeldOutMSE(cached_pairs(16, 1)),
                   exporter=None, desc="block", **kw)


def test_block_wise_distillation_runs_through_the_same_loop_and_resumes_bit_exactly(tmp_path):
    full = block_trainer(tmp_path, Block(0), tmp_path / "full").run()
    assert full.steps == 20 and full.val_metric == "mse" and not full.greater_is_better
    assert full.losses[-1] < 0.5 * full.losses[0]
    assert [v["step"] for v in full.val_history] == [5, 10, 15, 20]
    assert full.val_history[-1]["mse"] < full.val_history[0]["mse"]
    assert full.tokens_seen == 20 * 4 * POSITIONS  # batch x positions of the cached hidden states
    # No export: no best/ or final/ folder, but checkpoints (the block's own state dict) and the best step.
    assert full.final_dir is None and full.best_dir is None
    assert not (tmp_path / "full" / "best").exists() and not (tmp_path / "full" / "final").exists()
    assert [s for s, _ in list_checkpoints(tmp_path / "full")] == [5, 10, 15, 20]
    assert set(load_checkpoint(tmp_path / "full").model_state) == {"mlp.0.weight", "mlp.0.bias", "mlp.3.weight", "mlp.3.bias"}
    assert full.best_step == min(full.val_history, key=lambda v: v["mse"])["step"]

    # Killed during step 11 (after the step-10 checkpoint), resumed with a fresh block and RNG.
    model = Block(0)
    calls = {"n": 0}

    def crash(module, args):
        if module.training:
            calls["n"] += 1
            if calls["n"] == 11:
                raise KeyboardInterrupt("simulated kill")

    model.register_forward_pre_hook(crash)
    with pytest.raises(KeyboardInterrupt):
        block_trainer(tmp_path, model, tmp_path / "resumed").run()
    assert latest_checkpoint(tmp_path / "resumed").name == "step-0000010"
    torch.manual_seed(777)
    random.seed(7)
    np.random.seed(7)
    fresh = Block(55)
    resumed = block_trainer(tmp_path, fresh, tmp_path / "resumed").run(resume=True)
    assert resumed.start_step == 10 and resumed.losses == full.losses[10:]  # dropout on: the RNG was restored
    assert resumed.val_history == full.val_history  # the two validations before the kill come from the checkpoint
    assert (resumed.best_step, resumed.best_val) == (full.best_step, full.best_val)
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "resumed")
    assert all(torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)


class Scripted(Validator):
    """Returns the given values in turn (lower is better)."""

    name = key = "score"

    def __init__(self, values):
        self.values = list(values)
        self.calls = 0

    def __call__(self, model, accelerator):
        self.calls += 1
        return {"score": self.values.pop(0)}


def test_early_stopping_stops_after_patience_validations_without_a_new_best(tmp_path):
    cfg = block_config(tmp_path, eval_every=2, save_every=100, early_stopping_patience=2)
    validator = Scripted([1.0, 0.9, 0.95, float("nan"), 0.5])
    trainer = Trainer(Block(0), cfg, cached_pairs(48, 0), tmp_path / "run", objective=HiddenMSE(), validator=validator,
                      exporter=None)
    result = trainer.run()
    # Best 0.9 at step 4; 0.95 (step 6) and NaN (step 8, never a best) are two validations without one.
    assert result.stopped_early and result.steps == 8 and validator.calls == 4
    assert (result.best_step, result.best_val) == (4, 0.9)
    assert latest_checkpoint(tmp_path / "run").name == "step-0000008"  # the stop writes a checkpoint
    state = load_checkpoint(tmp_path / "run").trainer_state
    assert state["stopped_early"] and state["validations_since_best"] == 2 and state["best_step"] == 4
    # Resuming a run that stopped early trains nothing more.
    again = Trainer(Block(0), cfg, cached_pairs(48, 0), tmp_path / "run", objective=HiddenMSE(),
                    validator=Scripted([]), exporter=None).run(resume=True)
    assert again.start_step == again.steps == 8 and again.losses == [] and again.stopped_early
    with pytest.raises(ValueError, match="early_stopping_patience must be a positive integer or null, got 0"):
        block_config(tmp_path, early_stopping_patience=0)


def test_a_custom_objective_that_diverges_is_stopped_and_named(tmp_path):
    class Exploding(HiddenMSE):
        def __call__(self, model, teacher, batch):
            out = super().__call__(model, teacher, batch)
            return LossOutput(total=out.total * float("inf"), terms={"mse": out.terms["mse"], "blowup": torch.tensor(float("inf"))})

    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 1: total=inf, blowup=inf, mse=.*last good checkpoint: none"):
        Trainer(Block(0), block_config(tmp_path), cached_pairs(48, 0), tmp_path / "x", objective=Exploding(),
                exporter=None).run()
    with pytest.raises(ValueError, match="a training batch must be a dict of tensors, got list"):
        Trainer(Block(0), block_config(tmp_path), cached_pairs(48, 0), tmp_path / "y", objective=HiddenMSE(),
                collate_fn=lambda items: [items], exporter=None).run()
    with pytest.raises(ValueError, match="the objective Needy learns from a teacher, but no teacher was given"):
        class Needy(HiddenMSE):
            needs_teacher = True

        Trainer(Block(0), block_config(tmp_path), cached_pairs(48, 0), tmp_path / "z", objective=Needy(), exporter=None).run()


def test_length_grouped_order_puts_similar_lengths_in_each_step_and_stays_a_pure_function():
    lengths = torch.randperm(48, generator=torch.Generator().manual_seed(0)).tolist()  # distinct lengths 0..47
    order = epoch_indices(48, epoch=2, seed=9, per_step=4, lengths=lengths)
    assert sorted(order) == list(range(48))  # every example once
    steps = [sorted(lengths[i] for i in order[k:k + 4]) for k in range(0, 48, 4)]
    # One chunk holds all 12 steps (50 steps per chunk): each step is 4 consecutive lengths ...
    assert all(s == list(range(s[0], s[0] + 4)) for s in steps)
    # ... and the steps come in a shuffled order, not shortest first.
    assert [s[0] for s in steps] != sorted(s[0] for s in steps)
    assert order == epoch_indices(48, epoch=2, seed=9, per_step=4, lengths=lengths)
    assert order != epoch_indices(48, epoch=3, seed=9, per_step=4, lengths=lengths)
    # Smaller chunks: sorted within each chunk of 2 steps only.
    chunked = epoch_indices(48, epoch=0, seed=9, per_step=4, lengths=lengths, group_steps=2)
    assert sorted(chunked) == list(range(48))
    # Split over 2 processes x 2 micro-batches, a step holds the same examples as on one process.
    two = [process_share(order, 0, 1, 2, 2, p) for p in range(2)]
    for k in range(12):
        assert sorted(two[0][2 * k:2 * k + 2] + two[1][2 * k:2 * k + 2]) == sorted(order[4 * k:4 * k + 4])
    with pytest.raises(ValueError, match="lengths has 3 entries for 48 training examples"):
        epoch_indices(48, 0, 9, 4, lengths=[1, 2, 3])


def test_a_time_limit_stops_validates_and_checkpoints_and_a_resumed_run_continues(tmp_path, monkeypatch):
    import kronlm.distill.trainer as trainer_module

    clock = {"t": 0.0}

    def fake_clock():
        clock["t"] += 1.0  # every reading of the clock is one simulated second later
        return clock["t"]

    monkeypatch.setattr(trainer_module.time, "perf_counter", fake_clock)
    run = block_trainer(tmp_path, Block(0), tmp_path / "t", config={"max_minutes": 0.5}).run()
    assert run.time_limited and not run.stopped_early and 0 < run.steps < 20
    assert run.val_history[-1]["step"] == run.steps  # validated at the stop, although not a multiple of eval_every
    assert latest_checkpoint(tmp_path / "t").name == f"step-{run.steps:07d}"
    saved = json.loads((latest_checkpoint(tmp_path / "t") / "trainer_state.json").read_text())
    assert saved["val_history"] == run.val_history and 0 < saved["train_seconds"] <= run.seconds
    again = block_trainer(tmp_path, Block(0), tmp_path / "t").run(resume=True)  # no limit this time
    assert again.start_step == run.steps and again.steps == 20 and not again.time_limited
    # The resumed run keeps the validations and the time spent before the interruption.
    assert again.val_history[:len(run.val_history)] == run.val_history and len(again.val_history) > len(run.val_history)
    assert again.total_seconds == pytest.approx(saved["train_seconds"] + again.seconds)
