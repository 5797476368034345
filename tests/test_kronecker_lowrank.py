"""Kronecker + low-rank modules: the joint fit, the layer, and a compressed model holding them that
saves, loads (with and without kronlm), merges and exports to ONNX like the other kinds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama

import kronlm
from kronlm import CompressionConfig, KroneckerTarget
from kronlm.decompose.activation_aware import (
    activation_aware_factors,
    psd_sqrt_and_inverse,
    weighted_error,
)
from kronlm.decompose.lowrank import (
    kronecker_lowrank_factors,
    output_error,
    whitened_truncated_svd,
)
from kronlm.decompose.vanloan import kron_sum, kron_sum_lowrank, kron_sum_rank_bound
from kronlm.layers import KRONECKER_MODULES, KroneckerLowRankLinear
from kronlm.layers.lowrank import folds_kronecker_part
from kronlm.modeling import ModulePlan
from kronlm.modeling.plan import KroneckerPlan

CFG = CompressionConfig(
    targets=[
        KroneckerTarget(["**.mlp.gate_proj", "**.mlp.up_proj"], a_shape=(8, 4), b_shape=(6, 8), rank=2, lowrank_rank=3, init="van_loan"),
        KroneckerTarget(["**.mlp.down_proj"], b_shape=(1, 2), lowrank_rank=4, init="van_loan"),
    ]
)
IDS = torch.arange(24).reshape(2, 12) % 96


def _covariance(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4 * n, generator=gen, dtype=torch.float64) * torch.logspace(0, 2, n, dtype=torch.float64)[:, None]
    return X @ X.T / X.shape[1]


def test_exact_sum_of_kronecker_and_low_rank_is_recovered():
    gen = torch.Generator().manual_seed(1)
    A, B = torch.randn(2, 6, 4, generator=gen, dtype=torch.float64), torch.randn(2, 4, 5, generator=gen, dtype=torch.float64)
    U, V = torch.randn(24, 3, generator=gen, dtype=torch.float64), torch.randn(3, 20, generator=gen, dtype=torch.float64)
    W = kron_sum(A, B) + 0.1 * U @ V
    f = kronecker_lowrank_factors(W, (6, 4), (4, 5), 2, 3, covariance=_covariance(20), damping=0.0, iterations=200, tol=0.0)
    # Alternating minimisation converges linearly: 200 passes take the error down ~5e4 times.
    assert f.history[-1] < 1e-4 * f.history[0] and f.relative_error < 1e-2
    assert all(b <= a * (1 + 1e-9) for a, b in zip(f.history, f.history[1:]))  # ALS shapes: no pass raises the error


def test_joint_fit_beats_each_part_alone_at_equal_terms():
    torch.manual_seed(2)
    W = torch.randn(24, 20, dtype=torch.float64)
    C = _covariance(20, seed=3)
    joint = kronecker_lowrank_factors(W, (6, 4), (4, 5), 2, 3, covariance=C, damping=0.0)
    err = output_error(W - joint.to_dense(), C) / output_error(W, C)
    kron = activation_aware_factors(W, (6, 4), (4, 5), 2, covariance=C, damping=0.0)
    root, inv = psd_sqrt_and_inverse(C)
    U, V = whitened_truncated_svd(W, root, inv, 3)
    assert err < weighted_error(W, kron, C)
    assert err < output_error(W - U @ V, C) / output_error(W, C)
    assert err == pytest.approx(min(joint.history[-1], min(joint.history)), rel=1e-9)


def test_bad_ranks_are_named():
    W = torch.randn(24, 20)
    with pytest.raises(ValueError, match="low-rank k=21 is out of range"):
        kronecker_lowrank_factors(W, (6, 4), (4, 5), 1, 21)
    with pytest.raises(ValueError, match="Kronecker rank R=25 is out of range"):
        kronecker_lowrank_factors(W, (6, 4), (4, 5), 25, 2)
    with pytest.raises(ValueError, match=r"input second moment is \(3, 3\)"):
        kronecker_lowrank_factors(W, (6, 4), (4, 5), 1, 2, covariance=torch.eye(3))
    with pytest.raises(ValueError, match="low rank k must be an integer >= 1, got 0"):
        KroneckerLowRankLinear(20, 24, (6, 4), (4, 5), 1, 0)


def test_layer_forward_matches_its_dense_weight_and_merges():
    torch.manual_seed(4)
    weight, bias = torch.randn(24, 20), torch.randn(24)
    layer, factors = KroneckerLowRankLinear.from_dense(weight, bias, (6, 4), (4, 5), 2, 3)
    assert layer.num_parameters() == 2 * (24 + 20) + 3 * (24 + 20) + 24
    assert torch.allclose(layer.to_dense(), factors.to_dense(), atol=1e-6)
    # Both parts keep the joint fit's split (it distils faster than even terms), bit for bit.
    for name in ("A", "B", "U", "V"):
        assert torch.equal(getattr(layer, name), getattr(factors, name).to(layer.A.dtype)), name
    assert not torch.allclose(layer.A.flatten(1).norm(dim=1), layer.B.flatten(1).norm(dim=1), rtol=1e-3)
    A, B = layer.A.clone(), layer.B.clone()
    assert layer.balances_terms is False and layer.balance_() is layer and torch.equal(layer.A, A) and torch.equal(layer.B, B)
    x = torch.randn(3, 7, 20)
    assert torch.allclose(layer(x), x @ layer.to_dense().T + bias, atol=1e-5)
    linear = layer.to_linear()
    assert torch.allclose(linear(x), layer(x), atol=1e-5)
    assert KroneckerLowRankLinear in KRONECKER_MODULES
    with pytest.raises(ValueError, match=r"factor U is \(24, 3\), the layer's is \(24, 2\)"):
        KroneckerLowRankLinear(20, 24, (6, 4), (4, 5), 2, 2).load_factors(factors)


@pytest.mark.parametrize("a_shape,b_shape,rank", [((12, 2), (2, 12), 3), ((1, 12), (8, 2), 2), ((8, 1), (3, 24), 4), ((3, 4), (4, 6), 2)])
def test_kronecker_sum_has_an_exact_low_rank_form(a_shape, b_shape, rank):
    torch.manual_seed(6)
    A, B = torch.randn(rank, *a_shape, dtype=torch.float64), torch.randn(rank, *b_shape, dtype=torch.float64)
    U, V = kron_sum_lowrank(A, B)
    width = kron_sum_rank_bound(a_shape, b_shape, rank)
    assert width == rank * min(a_shape) * min(b_shape)
    assert U.shape == (a_shape[0] * b_shape[0], width) and V.shape == (width, a_shape[1] * b_shape[1]) and U.dtype == torch.float32
    dense = kron_sum(A, B)
    assert torch.allclose((U @ V).double(), dense, rtol=0, atol=1e-5 * dense.abs().max().item())
    assert torch.linalg.matrix_rank(dense).item() <= width


def test_thin_factors_fold_without_gradient_and_refold_after_an_update():
    torch.manual_seed(7)
    weight, bias = torch.randn(96, 96), torch.randn(96)
    layer, _ = KroneckerLowRankLinear.from_dense(weight, bias, (48, 2), (2, 48), 2, 3)
    # 2 terms of rank 2 x 2: an 8-wide form, 8 * 192 multiply-adds per token, a sixth of 96 * 96.
    assert layer.folds and folds_kronecker_part(96, 96, (48, 2), (2, 48), 2)
    assert not folds_kronecker_part(96, 96, (12, 8), (8, 12), 2)  # 128 wide: dearer than dense
    x = torch.randn(2, 5, 96)
    factored = layer(x)  # gradients wanted for A and B: the factored product
    assert factored.requires_grad and not layer.uses_fold()
    with torch.no_grad():
        assert layer.uses_fold()
        folded = layer(x)
        U_K, V_K = layer.kronecker_fold(x.dtype)
        assert layer.kronecker_fold(x.dtype)[0] is U_K  # cached while A and B are unchanged
    assert torch.allclose(folded, factored, atol=1e-5) and not torch.equal(folded, factored.detach())
    assert torch.allclose(folded, x @ layer.to_dense().T + bias, atol=1e-5)
    with torch.no_grad():
        layer.A.mul_(2.0)  # an optimizer step or a load in place: the fold is rebuilt
        assert torch.allclose(layer(x), x @ layer.to_dense().T + bias, atol=1e-5)
        assert layer.kronecker_fold(x.dtype)[0] is not U_K


def test_training_the_low_rank_part_alone_uses_the_fold_with_the_same_gradients():
    torch.manual_seed(8)
    layer, _ = KroneckerLowRankLinear.from_dense(torch.randn(96, 96), None, (48, 2), (2, 48), 2, 3)
    x = torch.randn(4, 96, requires_grad=True)
    with torch.inference_mode():
        layer(x.detach())  # a fold built here must still serve a step that trains U and V
    grads = {}
    for frozen in (False, True):
        layer.A.requires_grad_(not frozen)
        layer.B.requires_grad_(not frozen)
        assert layer.uses_fold() is frozen
        layer.zero_grad()
        x.grad = None
        layer(x).pow(2).sum().backward()
        grads[frozen] = (layer.U.grad.clone(), layer.V.grad.clone(), x.grad.clone())
    for got, want in zip(grads[True], grads[False]):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_plan_entry_round_trips_and_old_kinds_keep_their_json():
    layer = KroneckerLowRankLinear(20, 24, (6, 4), (4, 5), 2, 3, bias=False)
    entry = ModulePlan.from_module(layer, init="activation_aware")
    assert entry.kind == "kronecker_lowrank" and entry.lowrank == 3
    data = entry.to_dict()
    assert data["lowrank"] == 3 and ModulePlan.from_dict(data) == entry
    rebuilt = entry.build()
    assert isinstance(rebuilt, KroneckerLowRankLinear) and (rebuilt.rank, rebuilt.lowrank, rebuilt.bias) == (2, 3, None)
    with pytest.raises(ValueError, match="has no key 'lowrank'"):
        ModulePlan.from_dict({k: v for k, v in data.items() if k != "lowrank"}, "m")
    plain = ModulePlan.from_module(kronlm.layers.KroneckerLinear(20, 24, (6, 4), (4, 5)))
    assert "lowrank" not in plain.to_dict()


def test_config_refuses_what_the_low_rank_kind_cannot_do():
    with pytest.raises(ValueError, match="fitted by activation_aware or van_loan, not 'pruning'"):
        KroneckerTarget(["x"], b_shape=(2, 1), lowrank_rank=2, init="pruning")
    with pytest.raises(ValueError, match="learnable_scales is not supported with a low-rank part"):
        KroneckerTarget(["x"], b_shape=(2, 1), lowrank_rank=2, learnable_scales=True)
    with pytest.raises(ValueError, match="lowrank_rank must be an integer >= 0, got -1"):
        KroneckerTarget(["x"], b_shape=(2, 1), lowrank_rank=-1)
    assert "lowrank_rank" not in KroneckerTarget(["x"], b_shape=(2, 1)).to_dict()
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"is for linear layers, not a Embedding"):
        kronlm.compress(model, CompressionConfig(targets=[KroneckerTarget(["**.embed_tokens"], b_shape=(1, 2), lowrank_rank=2)]), progress=False)
    with pytest.raises(ValueError, match=r"low rank k=40 exceeds min\(out, in\) = 32"):
        kronlm.compress(tiny_llama(), CompressionConfig(targets=[KroneckerTarget(["**.mlp.up_proj"], b_shape=(2, 1), lowrank_rank=40)]), progress=False)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_saved_model_loads_merges_and_counts_parameters(tmp_path):
    model = kronlm.compress(tiny_llama(), CFG, progress=False)
    modules = [m for m in model.modules() if isinstance(m, KroneckerLowRankLinear)]
    assert len(modules) == 9
    report = model.compression_report
    assert {m.lowrank for m in report.modules} == {3, 4}
    assert report.params_after == sum(p.numel() for p in model.parameters())
    plan = KroneckerPlan.from_dict(model.config.kronlm)
    assert {e.kind for e in plan.modules.values()} == {"kronecker_lowrank"}
    folder = kronlm.save(model, tmp_path / "k")
    meta = json.loads((folder / "kronlm_compression.json").read_text())
    assert {m["lowrank"] for m in meta["report"]["modules"]} == {3, 4}
    loaded = kronlm.load(folder)
    assert torch.equal(_logits(loaded), _logits(model))
    dense = kronlm.merge_and_unload(loaded)
    assert type(dense).__name__ == "LlamaForCausalLM"
    assert torch.allclose(_logits(dense), _logits(model), atol=1e-4)


def test_folder_loads_without_kronlm_with_bit_identical_logits(tmp_path):
    folder = kronlm.save(kronlm.compress(tiny_llama(), CFG, progress=False), tmp_path / "k")
    script = (
        "import sys; sys.modules['kronlm'] = None\n"
        "import torch, transformers\n"
        "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
        "ids = torch.arange(24).reshape(2, 12) % 96\n"
        "with torch.no_grad(): torch.save(m(ids).logits, sys.argv[2])\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    out = tmp_path / "logits.pt"
    proc = subprocess.run([sys.executable, "-c", script, str(folder), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(torch.load(out, weights_only=True), _logits(kronlm.load(folder)))


def test_onnx_export_verifies(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from kronlm.export import onnx as konnx

    model = kronlm.compress(tiny_llama(), CFG, progress=False)
    path = konnx.export_onnx(model, tmp_path / "onnx", seq_len=8)
    assert konnx.verify_onnx(model, path) <= 1e-4
    # The low-rank modules were traced as they are: no module was swapped for another.
    assert sum(isinstance(m, KroneckerLowRankLinear) for m in model.modules()) == 9
