"""Training checkpoints: exact resume, crash-safe writes, corruption detection, retention, and
the safetensors/JSON encodings of optimizer, RNG and tied model states."""

from __future__ import annotations

import json
import multiprocessing
import os
import random

import numpy as np
import pytest
import safetensors.torch
import torch
from training_models import BLOCK, VOCAB
from training_models import tiny_gpt2 as _tiny_gpt2
from transformers import GPT2LMHeadModel

from kronlm.data.blocks import TokenBlocks
from kronlm.distill import checkpoint as ckpt_mod
from kronlm.distill.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_state,
    optimizer_state_from_safetensors,
    optimizer_state_to_safetensors,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
    save_model_state,
)
from kronlm.distill.config import TrainingConfig
from kronlm.distill.trainer import train


def tiny_gpt2(seed: int, dropout: float = 0.1) -> GPT2LMHeadModel:
    """The shared tiny GPT-2, with dropout on by default: resume must reproduce the RNG stream."""
    return _tiny_gpt2(seed, dropout=dropout)


def tiny_blocks() -> TokenBlocks:
    ids = (torch.arange(VOCAB * 20) * 5) % VOCAB
    return TokenBlocks.from_ids(ids, BLOCK, val_fraction=0.1)


def small_checkpoint(out_dir, step: int) -> None:
    """A real but tiny checkpoint: a linear layer, AdamW after one step, a cosine schedule."""
    torch.manual_seed(step)
    layer = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    layer(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    rng = {k: v.unsqueeze(0) for k, v in capture_rng_state().items()}
    save_checkpoint(out_dir, step=step, model_state=layer.state_dict(), optimizer_state=opt.state_dict(),
                    scheduler_state=sched.state_dict(), rng_state=rng, trainer_state={"tokens_seen": step * 10})


# ------------------------------------------------------------------------------------------------ resume


def test_resume_continues_to_the_same_losses_as_an_uninterrupted_run(tmp_path):
    n = 3
    cfg = TrainingConfig(
        recipe="ilkd-kngpt2", block_size=BLOCK, micro_batch_size=2, grad_accum_steps=2, max_steps=2 * n, lr=5e-3,
        min_lr=5e-4, warmup_steps=1, eval_every=n, save_every=n, mixed_precision="no", seed=11,
        log_dir=str(tmp_path / "logs"),
    )
    data = tiny_blocks()

    # Uninterrupted run. Dropout is on, so the RNG state must be restored for equal losses.
    full = train(tiny_gpt2(1), tiny_gpt2(2, dropout=0.0), data, cfg, tmp_path / "full")

    # The same run, killed during step n + 1 (after the step-n checkpoint) ...
    student = tiny_gpt2(1)
    calls = {"n": 0}

    def crash(module, args):
        if module.training:
            calls["n"] += 1
            if calls["n"] == n * cfg.grad_accum_steps + 1:
                raise KeyboardInterrupt("simulated kill")

    student.register_forward_pre_hook(crash)
    with pytest.raises(KeyboardInterrupt):
        train(student, tiny_gpt2(2, dropout=0.0), data, cfg, tmp_path / "resumed")
    assert latest_checkpoint(tmp_path / "resumed").name == f"step-{n:07d}"

    # ... and resumed in a fresh "process": new model objects with a different initialisation,
    # and a different global RNG state, all of which the checkpoint must override.
    torch.manual_seed(12345)
    random.seed(1)
    np.random.seed(1)
    fresh = tiny_gpt2(99)
    resumed = train(fresh, tiny_gpt2(2, dropout=0.0), data, cfg, tmp_path / "resumed", resume=True)

    assert resumed.start_step == n and resumed.steps == 2 * n
    assert len(resumed.losses) == n
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(full.losses[n:]), rtol=0, atol=1e-6)
    assert resumed.tokens_seen == full.tokens_seen
    assert resumed.best_val_ppl == pytest.approx(full.best_val_ppl, rel=1e-6)
    assert resumed.val_history[-1]["ppl"] == pytest.approx(full.val_history[-1]["ppl"], rel=1e-6)
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "resumed")
    for name, tensor in a.model_state.items():
        torch.testing.assert_close(b.model_state[name], tensor, rtol=0, atol=1e-6)


def test_resume_refuses_a_different_data_order(tmp_path):
    cfg = TrainingConfig(recipe="ce", block_size=BLOCK, micro_batch_size=2, max_steps=4, warmup_steps=1,
                         save_every=2, eval_every=100, mixed_precision="no", log_dir=str(tmp_path / "logs"))
    train(tiny_gpt2(0), None, tiny_blocks(), cfg, tmp_path / "run")
    changed = cfg.replace(micro_batch_size=4, max_steps=6)
    with pytest.raises(ValueError, match=r"data order would change \(micro_batch_size 2 -> 4\)"):
        train(tiny_gpt2(0), None, tiny_blocks(), changed, tmp_path / "run", resume=True)


# ------------------------------------------------------------------------------------------------ crash safety


def _killed_while_writing(out_dir) -> None:
    """Child process: die (no cleanup, like SIGKILL) halfway through writing checkpoint 4."""
    real = ckpt_mod.save_file

    def dying_save_file(tensors, filename, metadata=None):
        if os.path.basename(filename) == ckpt_mod.OPTIMIZER_FILE:
            os._exit(3)
        real(tensors, filename, metadata=metadata)

    ckpt_mod.save_file = dying_save_file
    small_checkpoint(out_dir, 4)


def test_a_write_killed_midway_leaves_the_previous_checkpoint_latest(tmp_path):
    small_checkpoint(tmp_path, 2)
    before = load_checkpoint(latest_checkpoint(tmp_path))
    child = multiprocessing.get_context("fork").Process(target=_killed_while_writing, args=(tmp_path,))
    child.start()
    child.join(60)
    assert child.exitcode == 3
    leftovers = list((tmp_path / "checkpoints").glob(".step-0000004*.tmp"))
    assert len(leftovers) == 1 and (leftovers[0] / ckpt_mod.MODEL_FILE).is_file()  # the half-written folder
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    assert latest_checkpoint(tmp_path).name == "step-0000002"
    after = load_checkpoint(latest_checkpoint(tmp_path))
    assert after.step == 2 and after.trainer_state == before.trainer_state
    for name in before.model_state:
        assert torch.equal(after.model_state[name], before.model_state[name])
    # The next completed save moves latest on and clears the debris.
    small_checkpoint(tmp_path, 6)
    prune_checkpoints(tmp_path, keep=5)
    assert latest_checkpoint(tmp_path).name == "step-0000006"
    assert not list((tmp_path / "checkpoints").glob(".step-*"))


def test_an_exception_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    small_checkpoint(tmp_path, 2)

    def failing_save_file(tensors, filename, metadata=None):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        small_checkpoint(tmp_path, 4)
    assert latest_checkpoint(tmp_path).name == "step-0000002"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    assert not list((tmp_path / "checkpoints").glob(".step-*"))


@pytest.mark.parametrize(
    "damage, error, message",
    [
        ("truncate:model.safetensors", ValueError, r"model\.safetensors: checkpoint file truncated"),
        ("delete:optimizer.json", FileNotFoundError, r"optimizer\.json: checkpoint file missing"),
        ("flip:rng.safetensors", ValueError, r"rng\.safetensors: checkpoint file corrupt"),
        ("garbage:trainer_state.json", ValueError, r"trainer_state\.json: not valid JSON"),
        ("delete:trainer_state.json", FileNotFoundError, r"trainer_state\.json"),
    ],
)
def test_damaged_checkpoint_files_are_named(tmp_path, damage, error, message):
    small_checkpoint(tmp_path, 2)
    folder = latest_checkpoint(tmp_path)
    action, name = damage.split(":")
    file = folder / name
    data = file.read_bytes()
    if action == "truncate":
        file.write_bytes(data[: len(data) // 2])
    elif action == "delete":
        file.unlink()
    elif action == "flip":
        file.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        file.write_text("{not json")
    with pytest.raises(error, match=message):
        load_checkpoint(folder)


def test_unreadable_safetensors_is_named(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model_state(bad)


def test_only_the_last_checkpoints_and_the_best_are_kept(tmp_path):
    for step in (1, 2, 3, 4, 5):
        small_checkpoint(tmp_path, step)
    removed = prune_checkpoints(tmp_path, keep=2, protect_steps=(2,))
    assert sorted(p.name for p in removed) == ["step-0000001", "step-0000003"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4, 5]


def test_training_keeps_the_last_checkpoints_plus_the_best(tmp_path):
    cfg = TrainingConfig(recipe="ce", block_size=BLOCK, micro_batch_size=2, max_steps=8, warmup_steps=1, lr=2e-2,
                         save_every=1, eval_every=2, keep_checkpoints=2, mixed_precision="no",
                         log_dir=str(tmp_path / "logs"))
    result = train(tiny_gpt2(0), None, tiny_blocks(), cfg, tmp_path / "run")
    kept = [s for s, _ in list_checkpoints(tmp_path / "run")]
    assert kept == sorted({7, 8, result.best_step})
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ encodings


def test_optimizer_state_round_trip_is_bit_identical_and_continues_identically():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    groups = [{"params": [model[0].weight], "name": "decay", "weight_decay": 0.1},
              {"params": [model[0].bias, *model[1].parameters()], "name": "no_decay", "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95))
    x = torch.randn(5, 4)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    tensors, meta = optimizer_state_to_safetensors(opt.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    # Through the actual encodings (bytes and JSON text), as a checkpoint does.
    restored = optimizer_state_from_safetensors(safetensors.torch.load(safetensors.torch.save(tensors)),
                                                json.loads(json.dumps(meta)))

    clone = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    clone.load_state_dict(model.state_dict())
    clone_groups = [{"params": [clone[0].weight], "name": "decay", "weight_decay": 0.1},
                    {"params": [clone[0].bias, *clone[1].parameters()], "name": "no_decay", "weight_decay": 0.0}]
    opt2 = torch.optim.AdamW(clone_groups, lr=1e-2, betas=(0.9, 0.95))
    opt2.load_state_dict(restored)
    assert opt2.param_groups[0]["betas"] == (0.9, 0.95)
    for i, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(opt2.state_dict()["state"][i][key], value), (i, key)
    for m, o in ((model, opt), (clone, opt2)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


def test_rng_state_round_trip_replays_the_same_draws():
    def draws():
        return random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3)

    for _ in range(2):  # the second round starts with cached gaussians in Python's and NumPy's state
        state = {k: v.unsqueeze(0) for k, v in capture_rng_state().items()}
        first = draws()
        restore_rng_state(state, rank=0)
        second = draws()
        assert first[:4] == second[:4] and torch.equal(first[4], second[4])
    with pytest.raises(ValueError, match="RNG state of 1 processes, but this is process 1"):
        restore_rng_state(state, rank=1)


def test_tied_model_state_is_stored_once_and_restored(tmp_path):
    model = tiny_gpt2(0)
    assert model.lm_head.weight is model.transformer.wte.weight
    save_model_state(model.state_dict(), tmp_path / "m.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as handle:
        stored = set(handle.keys())
    assert len(stored) == len(model.state_dict()) - 1
    loaded = load_model_state(tmp_path / "m.safetensors")
    assert set(loaded) == set(model.state_dict())
    other = tiny_gpt2(1)
    other.load_state_dict(loaded)
    for name, tensor in model.state_dict().items():
        assert torch.equal(other.state_dict()[name], tensor)
    assert other.lm_head.weight is other.transformer.wte.weight


def test_loading_without_model_and_optimizer_reads_only_the_small_files(tmp_path):
    # Under FSDP the processes other than 0 load a checkpoint this way; process 0 broadcasts.
    small_checkpoint(tmp_path, 2)
    folder = latest_checkpoint(tmp_path)
    full = load_checkpoint(folder)
    light = load_checkpoint(folder, model_and_optimizer=False)
    assert light.model_state == {} and light.optimizer_state == {}
    assert light.step == 2 and light.trainer_state == full.trainer_state and light.scheduler_state == full.scheduler_state
    assert all(torch.equal(light.rng_state[k], full.rng_state[k]) for k in full.rng_state)
    (folder / ckpt_mod.MODEL_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors: checkpoint file missing"):
        load_checkpoint(folder, model_and_optimizer=False)
