"""Local reconstruction: closed-form refits equal their least-squares references, every compressed
module is fitted on captured activations through the engine, runs resume, captures spill to disk."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

import kronlm
import kronlm.distill.local as local_module
from kronlm import CompressionConfig, KroneckerTarget
from kronlm.distill.config import TrainingConfig
from kronlm.distill.hidden_cache import capture_block_kwargs
from kronlm.distill.local import closed_form_refit, distill_local, module_groups
from kronlm.layers import KroneckerLinear

MLP_CFG = CompressionConfig(targets=[KroneckerTarget(["**.mlp.gate_proj", "**.mlp.up_proj"], b_shape=(4, 1)),
                                     KroneckerTarget(["**.mlp.down_proj"], b_shape=(1, 4))])
ALL_CFG = CompressionConfig(targets=[KroneckerTarget(["**.self_attn.*_proj", "**.mlp.*_proj"], b_shape=(2, 2))])


def _ids(n: int, seed: int, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def _teacher(seed: int = 3):
    teacher = tiny_llama(seed)
    with torch.no_grad():  # make the MLPs matter: tiny random models barely use them
        for layer in teacher.model.layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                proj.weight.mul_(8.0)
    return teacher


def _config(**kw) -> TrainingConfig:
    values = dict(mode="local", recipe="ce", block_size=16, micro_batch_size=4, max_steps=24, lr=5e-3, min_lr=5e-4,
                  warmup_steps=2, eval_every=6, save_every=6, keep_checkpoints=10, mixed_precision="no", weight_decay=0.0, seed=7)
    values.update(kw)
    return TrainingConfig(**values)


def _hidden_error(student, teacher, ids) -> float:
    with torch.no_grad():
        s = student.model(input_ids=ids).last_hidden_state
        t = teacher.model(input_ids=ids).last_hidden_state
    return (s - t).pow(2).mean().item()


def test_full_rank_refit_is_the_least_squares_solution():
    torch.manual_seed(0)
    out_f, in_f = 6, 8
    x = torch.randn(1, 200, in_f, dtype=torch.float32)
    target_w = torch.randn(out_f, in_f)
    y = x @ target_w.T + 0.01 * torch.randn(1, 200, out_f)
    # A (6, 1) ⊗ B (1, 8) with 6 terms is a rank-6 map: it can hold any (6, 8) weight exactly.
    module = KroneckerLinear(in_f, out_f, (out_f, 1), (1, in_f), rank=out_f, bias=False)
    closed_form_refit(module, torch.randn(out_f, in_f), x, y, damping=0.0, batch_size=1, name="m")
    reference = torch.linalg.lstsq(x[0].double(), y[0].double()).solution.T
    assert torch.allclose(module.to_dense().double(), reference, atol=1e-4)


def test_low_rank_refit_is_reduced_rank_regression():
    torch.manual_seed(1)
    out_f, in_f, k = 10, 12, 3
    x = torch.randn(1, 500, in_f) @ torch.randn(in_f, in_f)  # correlated inputs
    y = x @ torch.randn(out_f, in_f).T
    module = KroneckerLinear(in_f, out_f, (out_f, 1), (1, in_f), rank=k, bias=False)
    closed_form_refit(module, torch.zeros(out_f, in_f), x, y, damping=0.0, batch_size=1, name="m")
    # Izenman's reduced-rank regression: top-k SVD of Y Xᵀ Σ^{-1/2}, mapped back by Σ^{-1/2}.
    X, Y = x[0].double(), y[0].double()
    evals, evecs = torch.linalg.eigh(X.T @ X / X.shape[0])
    inv_root = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    U, S, Vh = torch.linalg.svd((Y.T @ X / X.shape[0]) @ inv_root)
    rrr = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k] @ inv_root
    fitted_error = (Y - X @ module.to_dense().double().T).square().sum()
    optimum = (Y - X @ rrr.T).square().sum()
    # The optimum is a floor; the fit's whitening adds a small ridge (1 % of the mean input energy).
    assert optimum <= fitted_error <= 1.01 * optimum
    # ... and well below the plain truncated SVD of the least-squares weight, which ignores the inputs.
    W = torch.linalg.lstsq(X, Y).solution.T
    u, s, vh = torch.linalg.svd(W)
    naive = (Y - X @ (u[:, :k] @ torch.diag(s[:k]) @ vh[:k]).T).square().sum()
    assert fitted_error < 0.9 * naive


def test_llama_modules_group_by_shared_input_in_call_order():
    teacher = tiny_llama(0)
    student = kronlm.compress(copy.deepcopy(teacher), ALL_CFG, progress=False)
    block = student.model.layers[0]
    names = local_module.compressed_modules(block)
    kwargs = capture_block_kwargs(student, _ids(1, 0))
    groups = module_groups(block, kwargs, torch.randn(1, 16, 32), names)
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


@pytest.mark.parametrize("target", ["teacher", "dense"])
def test_local_recovery_fits_every_module_and_lowers_the_error(tmp_path, target):
    teacher = _teacher()
    student = kronlm.compress(copy.deepcopy(teacher), MLP_CFG, progress=False)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    held_out = _ids(8, 99)
    error_before = _hidden_error(student, teacher, held_out)
    result = distill_local(student, teacher, {"train": _ids(16, 1), "val": _ids(4, 2)}, _config(local={"target": target}),
                           tmp_path / "run", progress=False)
    assert [b.trained for b in result.blocks] == [True, True, True]
    for b in result.blocks:
        assert b.error_refit <= b.error_before  # the refit is kept only where it helps
        assert b.best_val <= b.error_refit + 1e-6 or b.best_step is not None
    assert _hidden_error(student, teacher, held_out) < 0.95 * error_before
    assert result.val_ppl_after is not None and result.train_seconds > 0
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".mlp." in n and n.endswith((".A", ".B")) for n in changed)
    loaded = kronlm.load(tmp_path / "run" / "best")
    assert torch.equal(loaded.model.layers[2].mlp.down_proj.B, student.model.layers[2].mlp.down_proj.B)


def test_refit_alone_beats_van_loan_on_the_held_out_block_outputs(tmp_path):
    teacher = _teacher(3)
    half = CompressionConfig(targets=[KroneckerTarget(["**.mlp.gate_proj", "**.mlp.up_proj"], b_shape=(2, 1)),
                                      KroneckerTarget(["**.mlp.down_proj"], b_shape=(1, 2))])
    student = kronlm.compress(copy.deepcopy(teacher), half, progress=False)
    # A learning rate too small to matter: what changes is the closed-form refit.
    result = distill_local(student, teacher, {"train": _ids(24, 1), "val": _ids(6, 2)},
                           _config(max_steps=2, warmup_steps=0, lr=1e-6, min_lr=0.0), tmp_path / "run", progress=False)
    assert all(b.error_refit < b.error_before for b in result.blocks)
    assert sum(b.error_refit for b in result.blocks) < 0.9 * sum(b.error_before for b in result.blocks)
    assert all(b.error_after <= b.error_refit + 1e-9 for b in result.blocks)


def test_a_killed_local_run_resumes_to_the_same_student(tmp_path):
    data = {"train": _ids(16, 1), "val": _ids(4, 2)}
    teacher = _teacher()
    reference = kronlm.compress(copy.deepcopy(teacher), MLP_CFG, progress=False)
    distill_local(reference, teacher, data, _config(), tmp_path / "whole", progress=False)

    student = kronlm.compress(copy.deepcopy(teacher), MLP_CFG, progress=False)
    calls = {"n": 0}
    real = local_module.LocalModules.forward

    def forward(self, batch):
        if self.block is student.model.layers[1] and self.training:
            calls["n"] += 1
            if calls["n"] == 10:
                raise KeyboardInterrupt
        return real(self, batch)

    local_module.LocalModules.forward = forward
    try:
        with pytest.raises(KeyboardInterrupt):
            distill_local(student, teacher, data, _config(), tmp_path / "killed", progress=False)
    finally:
        local_module.LocalModules.forward = real
    assert (tmp_path / "killed" / "blocks" / "block-000" / "done.json").is_file()
    assert not (tmp_path / "killed" / "blocks" / "block-001" / "done.json").exists()
    student = kronlm.compress(copy.deepcopy(teacher), MLP_CFG, progress=False)
    with pytest.raises(ValueError, match="holds an earlier run; pass --resume"):
        distill_local(student, teacher, data, _config(), tmp_path / "killed", progress=False)
    distill_local(student, teacher, data, _config(), tmp_path / "killed", resume=True, progress=False)
    for (name, a), b in zip(reference.state_dict().items(), student.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="written by a run with another teacher, other tokens or other settings"):
        distill_local(student, teacher, data, _config(local={"target": "dense"}), tmp_path / "killed", resume=True, progress=False)


def test_captures_spill_to_disk_and_a_full_disk_is_refused(tmp_path, monkeypatch):
    teacher = _teacher()
    data = {"train": _ids(8, 1), "val": _ids(4, 2)}
    student = kronlm.compress(copy.deepcopy(teacher), MLP_CFG, progress=False)
    error_before = _hidden_error(student, teacher, _ids(8, 99))
    cache = {"cache_dir": str(tmp_path / "cache")}
    distill_local(student, teacher, data, _config(max_steps=8, local={"capture_memory_gb": 0}, blockwise=cache), tmp_path / "disk",
                  progress=False)
    assert _hidden_error(student, teacher, _ids(8, 99)) < 0.95 * error_before
    assert not (tmp_path / "disk" / "captures").exists() or not any((tmp_path / "disk" / "captures").iterdir())

    class Usage:
        free = 1000
    monkeypatch.setattr(local_module.shutil, "disk_usage", lambda path: Usage())
    student = kronlm.compress(copy.deepcopy(teacher), MLP_CFG, progress=False)
    with pytest.raises(OSError, match=r"captures need [\d,]+ bytes in memory .* or [\d,]+ bytes on disk, but .* has 1,000 free"):
        distill_local(student, teacher, data, _config(local={"capture_memory_gb": 0}, blockwise=cache), tmp_path / "full", progress=False)
    assert not (tmp_path / "full" / "blocks" / "block-000" / "done.json").exists()


def test_gpt2_conv1d_blocks_fit_too(tmp_path):
    teacher = tiny_gpt2(4)
    student = kronlm.compress(copy.deepcopy(teacher), CompressionConfig(targets=[
        KroneckerTarget(["**.attn.c_attn", "**.mlp.c_fc"], b_shape=(4, 1)), KroneckerTarget(["**.mlp.c_proj"], b_shape=(1, 4))]),
        progress=False)
    result = distill_local(student, teacher, {"train": _ids(8, 1), "val": _ids(4, 2)}, _config(max_steps=8), tmp_path / "g",
                           progress=False)
    assert all(b.trained and b.error_refit < b.error_before for b in result.blocks)


def test_data_free_modules_only_leaves_activation_aware_modules_alone(tmp_path):
    teacher = _teacher()
    mixed = CompressionConfig(targets=[
        KroneckerTarget(["**.mlp.gate_proj", "**.mlp.up_proj"], b_shape=(2, 1)),
        KroneckerTarget(["**.mlp.down_proj"], b_shape=(1, 2), init="activation_aware")])
    student = kronlm.compress(copy.deepcopy(teacher), mixed, calibration=_ids(8, 5), progress=False)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    distill_local(student, teacher, {"train": _ids(16, 1), "val": _ids(4, 2)}, _config(local={"modules": "data_free"}),
                  tmp_path / "run", progress=False)
    changed = {n.rsplit(".", 2)[-2] for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"gate_proj", "up_proj"}
    with pytest.raises(ValueError, match="modules must be one of all, data_free"):
        _config(local={"modules": "some"})
    # Nothing data-free to fit: the stage leaves the student as it is and runs no teacher.
    aware = kronlm.compress(copy.deepcopy(teacher), CompressionConfig(targets=[KroneckerTarget(["**.mlp.*_proj"], b_shape=(2, 2),
                                                                                                 init="activation_aware")]),
                            calibration=_ids(8, 5), progress=False)
    state = {n: p.detach().clone() for n, p in aware.named_parameters()}
    result = distill_local(aware, teacher, {"train": _ids(16, 1), "val": _ids(4, 2)}, _config(local={"modules": "data_free"}),
                           tmp_path / "none", progress=False)
    assert not any(b.trained for b in result.blocks) and result.val_ppl_after == result.val_ppl_before
    assert all(torch.equal(p, state[n]) for n, p in aware.named_parameters())
    assert not (tmp_path / "none" / "teacher_cache").exists()


def test_a_llama_mlp_is_fitted_as_one_unit_and_attention_module_by_module(tmp_path):
    teacher = tiny_llama(0)
    student = kronlm.compress(copy.deepcopy(teacher), ALL_CFG, progress=False)
    block = student.model.layers[0]
    names = local_module.compressed_modules(block)
    kwargs = capture_block_kwargs(student, _ids(1, 0))
    units = local_module.joint_units(block, kwargs, torch.randn(1, 16, 32), names)
    assert units == {"mlp": (32, 32, ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])}
    # Joint or not, the local pass runs and lowers the held-out block error.
    for joint in (True, False):
        teacher = _teacher()
        student = kronlm.compress(copy.deepcopy(teacher), MLP_CFG, progress=False)
        result = distill_local(student, teacher, {"train": _ids(16, 1), "val": _ids(4, 2)}, _config(local={"joint": joint}),
                               tmp_path / f"run-{joint}", progress=False)
        assert all(b.error_after <= b.error_before for b in result.blocks)
