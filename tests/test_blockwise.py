"""Block-wise distillation: the teacher hidden-state cache, training one compressed block at a
time through the engine, kill-and-resume, and the errors a user can make."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from safetensors import safe_open

import kronlm
import kronlm.distill.hidden_cache as cache_module
from kronlm import CompressionConfig, KroneckerTarget
from kronlm.compression.truncate import truncate_layers
from kronlm.distill.blockwise import distill_blockwise
from kronlm.distill.config import TrainingConfig
from kronlm.distill.hidden_cache import (
    HiddenStateCache,
    boundary_name,
    build_hidden_cache,
)

MLP_CFG = CompressionConfig(targets=[KroneckerTarget(["**.mlp.gate_proj", "**.mlp.up_proj"], b_shape=(4, 1)),
                                     KroneckerTarget(["**.mlp.down_proj"], b_shape=(1, 4))])


def _ids(n: int, seed: int, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def _teacher_and_student(layers: list[int] | None = None):
    teacher = tiny_llama(3)
    with torch.no_grad():  # make the MLPs matter: tiny random models barely use them
        for layer in teacher.model.layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                proj.weight.mul_(8.0)
    student = kronlm.compress(copy.deepcopy(teacher), MLP_CFG, progress=False)
    return teacher, student


def _config(**kw) -> TrainingConfig:
    values = dict(mode="blockwise", recipe="ce", block_size=16, micro_batch_size=4, max_steps=24, lr=5e-3, min_lr=5e-4,
                  warmup_steps=2, eval_every=6, save_every=6, keep_checkpoints=10, mixed_precision="no", weight_decay=0.0,
                  seed=7)
    values.update(kw)
    return TrainingConfig(**values)


def _hidden_error(student, teacher, ids) -> float:
    with torch.no_grad():
        s = student.model(input_ids=ids).last_hidden_state
        t = teacher.model(input_ids=ids).last_hidden_state
    return (s - t).pow(2).mean().item()


def test_cache_holds_every_block_boundary_and_is_reused(tmp_path, monkeypatch):
    teacher = tiny_llama(1)
    ids = _ids(6, 0)
    cache = build_hidden_cache(teacher, ids, tmp_path / "c", dtype="float32", batch_size=4, progress=False)
    captured = []
    hooks = [b.register_forward_pre_hook(lambda m, a, kw: captured.append(a[0].clone()), with_kwargs=True) for b in teacher.model.layers]
    hooks.append(teacher.model.layers[-1].register_forward_hook(lambda m, a, o: captured.append((o[0] if isinstance(o, tuple) else o).clone())))
    with torch.no_grad():
        teacher.model(input_ids=ids)
    for h in hooks:
        h.remove()
    assert cache.num_boundaries == len(teacher.model.layers) + 1 == len(captured)
    for index, expected in enumerate(captured):
        assert torch.equal(cache.boundary(index), expected)  # float32: bit-identical
    with safe_open(str(tmp_path / "c" / "hidden.safetensors"), framework="pt") as handle:
        assert sorted(handle.keys()) == [boundary_name(i) for i in range(4)]
    assert (tmp_path / "c" / "hidden.safetensors").stat().st_size == json.loads((tmp_path / "c" / "hidden.json").read_text())["bytes"]

    # The same teacher and tokens reuse the file without running the teacher.
    monkeypatch.setattr(teacher.model, "forward", lambda *a, **k: pytest.fail("the teacher ran again"))
    again = build_hidden_cache(teacher, ids, tmp_path / "c", dtype="float32", progress=False)
    assert torch.equal(again.boundary(2), cache.boundary(2))


def test_cache_refuses_another_teacher_other_tokens_and_a_full_disk(tmp_path, monkeypatch):
    ids = _ids(4, 0)
    build_hidden_cache(tiny_llama(1), ids, tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match=r"made for another run \(teacher "):
        build_hidden_cache(tiny_llama(2), ids, tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match=r"made for another run \(tokens "):
        build_hidden_cache(tiny_llama(1), _ids(4, 1), tmp_path / "c", progress=False)
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    with pytest.raises(OSError, match=r"needs [\d,]+ bytes but .* has 1,000 free"):
        build_hidden_cache(tiny_llama(1), ids, tmp_path / "d", progress=False)
    assert not (tmp_path / "d" / "hidden.json").exists()
    (tmp_path / "c" / "hidden.safetensors").write_bytes(b"short")
    with pytest.raises(ValueError, match="truncated cache"):
        HiddenStateCache(tmp_path / "c")


@pytest.mark.parametrize("inputs", ["student", "teacher"])
def test_blockwise_recovery_lowers_the_error_and_trains_only_compressed_modules(tmp_path, inputs):
    teacher, student = _teacher_and_student()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    held_out = _ids(8, 99)
    error_before = _hidden_error(student, teacher, held_out)
    result = distill_blockwise(student, teacher, {"train": _ids(16, 1), "val": _ids(4, 2)},
                               _config(blockwise={"inputs": inputs}), tmp_path / "run", progress=False)
    assert [b.trained for b in result.blocks] == [True, True, True]
    assert sum(b.last_loss for b in result.blocks) < sum(b.first_loss for b in result.blocks)
    assert all(b.best_step is not None and b.chosen == "best" for b in result.blocks)
    assert _hidden_error(student, teacher, held_out) < 0.9 * error_before
    assert result.val_ppl_blockwise is not None and result.tokens_per_second > 0
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".mlp." in n and n.endswith((".A", ".B")) for n in changed)
    for folder in ("final", "best", "blockwise"):
        loaded = kronlm.load(tmp_path / "run" / folder)
        assert type(loaded).__name__ == "KroneckerLlamaForCausalLM"
    assert torch.equal(kronlm.load(tmp_path / "run" / "final").model.layers[1].mlp.up_proj.A, student.model.layers[1].mlp.up_proj.A)
    summary = json.loads((tmp_path / "run" / "blockwise_summary.json").read_text())
    assert [b["index"] for b in summary["blocks"]] == [0, 1, 2]
    assert summary["final_dir"] == str(result.final_dir) and summary["best_dir"] == str(result.best_dir)


def _stop_at(step_module, calls_before_stop: int):
    calls = {"n": 0}
    real = step_module.forward

    def forward(*args, **kwargs):
        if step_module.training:
            calls["n"] += 1
            if calls["n"] == calls_before_stop:
                raise KeyboardInterrupt
        return real(*args, **kwargs)

    step_module.forward = forward


def test_a_killed_run_resumes_to_the_same_student(tmp_path):
    data = {"train": _ids(16, 1), "val": _ids(4, 2)}
    teacher, reference = _teacher_and_student()
    distill_blockwise(reference, teacher, data, _config(), tmp_path / "whole", progress=False)

    teacher, student = _teacher_and_student()
    _stop_at(student.model.layers[1], 10)  # block 1, in its third step (4 sequences a step)
    with pytest.raises(KeyboardInterrupt):
        distill_blockwise(student, teacher, data, _config(), tmp_path / "killed", progress=False)
    assert (tmp_path / "killed" / "blocks" / "block-000" / "done.json").is_file()
    assert not (tmp_path / "killed" / "blocks" / "block-001" / "done.json").exists()
    teacher, student = _teacher_and_student()  # a fresh process would reload the compressed start
    with pytest.raises(ValueError, match="holds an earlier run; pass --resume"):
        distill_blockwise(student, teacher, data, _config(), tmp_path / "killed", progress=False)
    distill_blockwise(student, teacher, data, _config(), tmp_path / "killed", resume=True, progress=False)
    for (name, a), b in zip(reference.state_dict().items(), student.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="written by a run with another teacher, other tokens or other settings"):
        distill_blockwise(student, teacher, data, _config(lr=1e-3), tmp_path / "killed", resume=True, progress=False)


def test_students_that_are_not_compressed_copies_of_the_teacher_are_refused(tmp_path):
    teacher = tiny_llama(3)
    data = {"train": _ids(8, 1), "val": None}
    shallow = truncate_layers(teacher, [0, 2])
    with pytest.raises(ValueError, match="student's depth to equal the teacher's: 2 student blocks, 3 teacher blocks"):
        distill_blockwise(shallow, teacher, data, _config(), tmp_path / "a", progress=False)
    wider = tiny_llama(3, intermediate_size=64)
    with pytest.raises(ValueError, match=r"not a compressed version of the teacher: model\.layers\.0\.mlp\.\w+_proj\.weight is \((64, 32|32, 64)\)"):
        distill_blockwise(wider, teacher, data, _config(), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="block-by-block recovery needs token blocks"):
        distill_blockwise(copy.deepcopy(teacher), teacher, {"train": [1, 2, 3]}, _config(), tmp_path / "c", progress=False)


def test_gpt2_blocks_distil_too(tmp_path):
    teacher = tiny_gpt2(4)
    student = kronlm.compress(copy.deepcopy(teacher), CompressionConfig(targets=[
        KroneckerTarget(["**.mlp.c_fc"], b_shape=(4, 1)), KroneckerTarget(["**.mlp.c_proj"], b_shape=(1, 4))]), progress=False)
    result = distill_blockwise(student, teacher, {"train": _ids(8, 1), "val": _ids(4, 2)}, _config(max_steps=8),
                               tmp_path / "g", progress=False)
    assert all(b.trained for b in result.blocks)
    assert sum(b.last_loss for b in result.blocks) < sum(b.first_loss for b in result.blocks)


def test_the_teacher_cache_is_paid_from_the_stage_budget(tmp_path, monkeypatch):
    import kronlm.distill.block_runs as block_runs_module
    import kronlm.distill.blockwise as blockwise_module

    teacher, student = _teacher_and_student()
    offset = {"s": 0.0}
    real_clock, real_cache, real_block = time.perf_counter, block_runs_module.build_hidden_cache, blockwise_module._train_block

    def slow_cache(*args, **kwargs):
        offset["s"] += 57.0  # the teacher pass takes 57 of the stage's 60 seconds
        return real_cache(*args, **kwargs)

    shares = []

    def recording_block(index, block, block_kwargs, inputs, targets, n_train, config, *rest):
        shares.append(config.max_minutes)
        return real_block(index, block, block_kwargs, inputs, targets, n_train, config, *rest)

    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + offset["s"])
    monkeypatch.setattr(block_runs_module, "build_hidden_cache", slow_cache)
    monkeypatch.setattr(blockwise_module, "_train_block", recording_block)
    distill_blockwise(student, teacher, {"train": _ids(16, 1), "val": _ids(4, 2)}, _config(max_minutes=1.0), tmp_path / "run",
                      progress=False)
    # Three blocks share the 3 seconds left (at least 1 second each), not the whole minute: the
    # first gets a third of them, the others what is left then.
    assert len(shares) == 3 and shares[0] * 60.0 == pytest.approx(1.0, abs=0.2) and all(s * 60.0 < 3.5 for s in shares)
