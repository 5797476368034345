"""Activation-aware Kronecker init: whitening, weighted ALS, calibration and budget allocation."""

import itertools

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from kronlm.compression import CompressionConfig, KroneckerTarget
from kronlm.compression.budget import BudgetSettings, allocate_budget, module_options
from kronlm.compression.calibration import calibration_input_ids, collect_calibration
from kronlm.decompose import (
    activation_aware_factors,
    kron_sum,
    nearest_kronecker_product,
    partial_traces,
    weighted_als,
    weighted_error,
    whitened_nearest_kronecker_product,
)
from kronlm.modeling import compress


def _anisotropic_covariance(n: int, samples: int = 400, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # A few loud channels, as in LLM activations.
    scale = torch.logspace(-1, 1.5, n, dtype=torch.float64)[torch.randperm(n, generator=gen)]
    X = torch.randn(n, samples, generator=gen, dtype=torch.float64) * scale[:, None]
    return X @ X.T / samples


def _weighted_error_bruteforce(W, factors, X):
    delta = W - factors.to_dense().double()
    return ((delta @ X).square().sum() / (W @ X).square().sum()).item()


SHAPES = [((6, 4), (3, 5)), ((8, 6), (2, 1)), ((4, 3), (1, 2)), ((12, 1), (1, 10))]


@pytest.mark.parametrize("a_shape,b_shape", SHAPES)
@pytest.mark.parametrize("rank", [1, 2])
def test_weighted_error_never_exceeds_van_loan(a_shape, b_shape, rank):
    (m1, n1), (m2, n2) = a_shape, b_shape
    if rank >= min(m1 * n1, m2 * n2):
        pytest.skip("at full rank both are exact")
    torch.manual_seed(1)
    W = torch.randn(m1 * m2, n1 * n2, dtype=torch.float64)
    C = _anisotropic_covariance(n1 * n2)
    plain = nearest_kronecker_product(W, a_shape, b_shape, rank)
    aware = activation_aware_factors(W, a_shape, b_shape, rank, covariance=C, damping=0.0)
    assert weighted_error(W, aware, C) <= weighted_error(W, plain, C) + 1e-12
    # On these anisotropic inputs the gain is large, not a rounding effect.
    assert weighted_error(W, aware, C) < 0.9 * weighted_error(W, plain, C)


def test_weighted_error_matches_samples():
    torch.manual_seed(2)
    W = torch.randn(12, 20, dtype=torch.float64)
    X = torch.randn(20, 50, dtype=torch.float64)
    f = nearest_kronecker_product(W, (6, 4), (2, 5), 1)
    assert weighted_error(W, f, X @ X.T / 50) == pytest.approx(_weighted_error_bruteforce(W, f, X), rel=1e-10)


@pytest.mark.parametrize("a_shape,b_shape", SHAPES)
def test_exact_recovery_of_a_kronecker_sum(a_shape, b_shape):
    torch.manual_seed(3)
    (m1, n1), (m2, n2) = a_shape, b_shape
    rank = min(2, m1 * n1, m2 * n2)
    W = kron_sum(torch.randn(rank, m1, n1, dtype=torch.float64), torch.randn(rank, m2, n2, dtype=torch.float64))
    C = _anisotropic_covariance(n1 * n2)
    aware = activation_aware_factors(W, a_shape, b_shape, rank, covariance=C, damping=0.0)
    torch.testing.assert_close(aware.to_dense(), W, atol=1e-9, rtol=0)
    p1, p2 = partial_traces(C, n1, n2)
    whitened = activation_aware_factors(W, a_shape, b_shape, rank, p1=p1, p2=p2, damping=0.0)
    torch.testing.assert_close(whitened.to_dense(), W, atol=1e-9, rtol=0)


def test_whitening_is_optimal_for_kronecker_covariance():
    # With C = C1 ⊗ C2 the whitened Van Loan solves the weighted problem exactly: ALS cannot improve it.
    torch.manual_seed(4)
    C1, C2 = _anisotropic_covariance(4, seed=1), _anisotropic_covariance(5, seed=2)
    C = torch.kron(C1, C2)
    W = torch.randn(18, 20, dtype=torch.float64)
    p1, p2 = partial_traces(C, 4, 5)
    torch.testing.assert_close(torch.kron(p1, p2) / C.trace(), C)
    start = whitened_nearest_kronecker_product(W, (6, 4), (3, 5), 1, p1, p2)
    _, _, history = weighted_als(W, C, start.A, start.B, iterations=20, tol=0.0)
    assert history[-1] == pytest.approx(history[0], rel=1e-9)


def test_als_is_monotone_and_reaches_a_stationary_point():
    torch.manual_seed(5)
    W = torch.randn(18, 20, dtype=torch.float64)
    C = _anisotropic_covariance(20)
    start = whitened_nearest_kronecker_product(W, (6, 4), (3, 5), 2, *partial_traces(C, 4, 5))
    A, B, history = weighted_als(W, C, start.A, start.B, iterations=300, tol=0.0)
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(history))
    assert history[-1] < history[0]
    A, B = A.clone().requires_grad_(), B.clone().requires_grad_()
    delta = W - kron_sum(A, B)
    ((delta @ C) * delta).sum().backward()
    # The last half-step minimised over B exactly, so B is stationary.
    assert B.grad.abs().max() < 1e-8


def test_bad_statistics_are_named():
    W = torch.randn(6, 8)
    with pytest.raises(ValueError, match="layer.x: input second moment is \\(4, 4\\), expected \\(8, 8\\)"):
        activation_aware_factors(W, (3, 4), (2, 2), 1, covariance=torch.eye(4), name="layer.x")
    with pytest.raises(ValueError, match="needs the input second moment"):
        activation_aware_factors(W, (3, 4), (2, 2), 1, name="layer.x")


def _calibration_ids(vocab: int, n: int = 6, length: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def test_calibration_second_moments_equal_a_manual_capture():
    model = tiny_llama()
    ids = _calibration_ids(96)
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    stats = collect_calibration(model, names, ids, batch_size=4, progress=False)
    captured = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: captured.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]))) for n in names]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    for n in names:
        X = torch.cat(captured[n]).double()
        torch.testing.assert_close(stats[n].inputs.covariance(), X.T @ X / X.shape[0], rtol=1e-5, atol=1e-7)
        assert stats[n].inputs.tokens == ids.numel()
    # Q and K read the same tensor: one shared accumulator, not two.
    assert stats[names[1]].inputs is stats[names[2]].inputs


def test_calibration_partial_traces_for_wide_inputs_and_sensitivity():
    model = tiny_llama()
    ids = _calibration_ids(96)
    name = "model.layers.0.mlp.down_proj"  # 48 inputs
    full = collect_calibration(model, [name], ids, progress=False, sensitivity=True)[name]
    wide = collect_calibration(model, [name], ids, progress=False, input_factors={name: (8, 6)}, max_full_dim=16)[name]
    p1, p2 = partial_traces(full.inputs.covariance(), 8, 6)
    q1, q2 = wide.inputs.partial_traces()
    torch.testing.assert_close(q1, p1, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(q2, p2, rtol=1e-5, atol=1e-7)
    assert wide.inputs.covariance() is None
    # Sensitivity: mean squared gradient of the summed NLL w.r.t. the module output, per unit.
    out = {}
    model.get_submodule(name).register_forward_hook(lambda m, a, o: out.setdefault("y", o))
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    (grad,) = torch.autograd.grad(loss, out["y"])
    assert full.grad_sq == pytest.approx(grad.double().square().sum().item() / ids.numel() / 32, rel=1e-4)
    assert all(p.requires_grad for p in model.parameters())


def test_calibration_errors():
    model = tiny_llama()
    ids = _calibration_ids(96)
    with pytest.raises(ValueError, match="no module 'model.nope'"):
        collect_calibration(model, ["model.nope"], ids, progress=False)
    with pytest.raises(ValueError, match="Embedding"):
        collect_calibration(model, ["model.embed_tokens"], ids, progress=False)
    with pytest.raises(ValueError, match="48 inputs, more than max_full_dim=16"):
        collect_calibration(model, ["model.layers.0.mlp.down_proj"], ids, progress=False, max_full_dim=16)
    with pytest.raises(ValueError, match="has 10 tokens, fewer than the 4 x 8 = 32"):

        class Tok:
            def __call__(self, text, return_tensors):
                return {"input_ids": torch.arange(10)[None]}

        calibration_input_ids(Tok(), "x", 4, 8)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
def test_compress_with_calibration_ids_lowers_output_error(builder):
    dense = builder()
    ids = _calibration_ids(96)
    modules = ["model.layers.*.mlp.down_proj"] if builder is tiny_llama else ["transformer.h.*.mlp.c_proj"]

    def compressed(init):
        model = builder()
        cfg = CompressionConfig(targets=[KroneckerTarget(modules=modules, b_shape=(2, 2), init=init)])
        compress(model, cfg, calibration=ids if init == "activation_aware" else None, progress=False)
        return model

    with torch.no_grad():
        ref = dense(input_ids=ids).logits
        err = {init: (compressed(init)(input_ids=ids).logits - ref).square().mean().item() for init in ("van_loan", "activation_aware")}
    assert err["activation_aware"] < err["van_loan"]


def test_activation_aware_without_calibration_is_refused():
    model = tiny_llama()
    cfg = CompressionConfig(targets=[KroneckerTarget(modules=["model.layers.*.mlp.down_proj"], b_shape=(2, 2), init="activation_aware")])
    with pytest.raises(ValueError, match="needs calibration data"):
        compress(model, cfg, progress=False)


def test_budget_options_price_the_whitened_tail_exactly():
    torch.manual_seed(6)
    W = torch.randn(12, 10, dtype=torch.float64)
    C = _anisotropic_covariance(10)
    options = module_options(W, C, sensitivity=2.0, b_shapes=((2, 1),), svd_step=1, damping=0.0)
    assert options[0].family == "dense" and options[0].params == 120
    for opt in options[1:]:
        factors = activation_aware_factors(W, opt.a_shape, opt.b_shape, opt.rank, covariance=C, damping=0.0)
        energy = ((W @ C) * W).sum().item()
        # n1 = 1 or n2 = 1: the whitening is exact, so the priced error is the achieved one.
        assert opt.output_error == pytest.approx(weighted_error(W, factors, C) * energy, rel=1e-8)
        assert opt.relative_error == pytest.approx(weighted_error(W, factors, C), rel=1e-8)
        assert opt.loss == pytest.approx(0.5 * 2.0 * opt.output_error)
        assert opt.params == opt.rank * (opt.a_shape[0] * opt.a_shape[1] + opt.b_shape[0] * opt.b_shape[1]) < 120


def test_budget_allocation_meets_the_budget_and_prefers_insensitive_modules():
    model = tiny_llama(num_hidden_layers=2)
    ids = _calibration_ids(96)
    names = [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")]
    stats = collect_calibration(model, names, ids, progress=False, sensitivity=True)
    # Make layer 1's modules look 1000x more sensitive: the allocation must cut layer 0 first.
    for n in names:
        if ".1." in n:
            stats[n].grad_sq *= 1000.0
    before = sum(p.numel() for p in model.parameters())
    target = before - 3000
    alloc = allocate_budget(model, stats, target, settings=BudgetSettings(b_shapes=((2, 1),), svd_step=2), progress=False)
    assert alloc.params_after <= target
    cut = {c.name: c.weight_shape[0] * c.weight_shape[1] - c.option.params for c in alloc.choices}
    assert sum(v for k, v in cut.items() if ".0." in k) > sum(v for k, v in cut.items() if ".1." in k)
    with pytest.raises(ValueError, match="below the smallest reachable"):
        allocate_budget(model, stats, 10, progress=False)
    with pytest.raises(ValueError, match=f"budget of {before:,} parameters is not below the model's {before:,}"):
        allocate_budget(model, stats, before, progress=False)
    report = compress(model, alloc.to_config(), statistics=stats, progress=False).compression_report
    assert report.params_after == alloc.params_after
    assert "estimated NLL increase" in alloc.table()


def test_calibration_file_round_trip_is_bit_identical(tmp_path):
    from kronlm.compression.calibration import load_calibration, save_calibration

    model = tiny_llama()
    ids = _calibration_ids(96)
    names = ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"]
    stats = collect_calibration(model, names, ids, progress=False, sensitivity=True)
    stats.update(collect_calibration(model, ["model.layers.1.mlp.down_proj"], ids, progress=False, input_factors={"model.layers.1.mlp.down_proj": (8, 6)}, max_full_dim=16))
    path = tmp_path / "cal.safetensors"
    save_calibration(stats, path, {"text": "tiny"})
    back = load_calibration(path, {"text": "tiny"})
    assert set(back) == set(stats)
    for name in names:
        assert torch.equal(back[name].inputs.covariance(), stats[name].inputs.covariance())
        assert back[name].grad_sq == stats[name].grad_sq and back[name].out_features == stats[name].out_features
    wide = "model.layers.1.mlp.down_proj"
    for got, want in zip(back[wide].inputs.partial_traces(), stats[wide].inputs.partial_traces()):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="was made with"):
        load_calibration(path, {"text": "other"})
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_calibration(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_calibration(tmp_path / "missing.safetensors")


def test_the_report_states_the_share_of_output_energy_the_fit_lost():
    from kronlm.layers import dense_weight

    ids = _calibration_ids(96)
    dense = tiny_llama()
    names = [n for n, _ in dense.named_modules() if n.endswith("mlp.down_proj")]
    stats = collect_calibration(dense, names, ids, progress=False)
    cfg = CompressionConfig(targets=[KroneckerTarget(modules=["model.layers.*.mlp.down_proj"], b_shape=(2, 2),
                                                     init="activation_aware")])
    model = compress(tiny_llama(), cfg, calibration=ids, progress=False)
    report = model.compression_report
    assert [m.name for m in report.modules] == names
    for m in report.modules:
        W, C = dense_weight(dense.get_submodule(m.name)).double(), stats[m.name].inputs.covariance()
        delta = W - model.get_submodule(m.name).to_dense().double()
        expected = ((delta @ C) * delta).sum().item() / ((W @ C) * W).sum().item()
        assert 0 < m.output_error < 1 and m.output_error == pytest.approx(expected, rel=1e-6)
    assert f"mean relative output error on the calibration inputs {report.mean_output_error:.4f}" in report.summary()
    assert type(report).from_dict(report.to_dict()).modules == report.modules  # saved and read back
    plain = compress(tiny_llama(), CompressionConfig(targets=[KroneckerTarget(modules=["model.layers.*.mlp.down_proj"],
                                                                               b_shape=(2, 2))]), progress=False)
    assert all(m.output_error is None for m in plain.compression_report.modules)
    assert "output error" not in plain.compression_report.summary()
