"""Budget allocation over factor families (truncated SVD, Kronecker shapes, Kronecker + low-rank):
the shape window, exact pricing where the whitening is exact, the measured-error check, the
family filter, and the errors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama

from kronlm.compression.budget import (
    BudgetConfig,
    BudgetSettings,
    allocate_budget,
    check_families,
    measure_option,
    module_options,
    price_modules,
)
from kronlm.compression.budget import max_macs_text, parse_max_macs
from kronlm.compression.calibration import (
    InputStatistics,
    ModuleCalibration,
    collect_calibration,
)
from kronlm.decompose.shapes import contraction_macs, is_low_rank_shape, kronecker_shape_window
from kronlm.modeling import compress, compress_to_budget


def _covariance(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4 * n, generator=gen, dtype=torch.float64) * torch.logspace(0, 1.5, n, dtype=torch.float64)[:, None]
    return X @ X.T / X.shape[1]


def _stats(C: torch.Tensor) -> ModuleCalibration:
    return ModuleCalibration(InputStatistics(C.shape[0], tokens=1, moment_sum=C.clone()), out_features=0)


def test_shape_window_has_balanced_and_small_factors_of_every_orientation():
    shapes = {(s.a_shape, s.b_shape) for s in kronecker_shape_window(1536, 576)}
    assert ((48, 24), (32, 24)) in shapes  # balanced
    assert ((768, 576), (2, 1)) in shapes and ((1536, 288), (1, 2)) in shapes and ((768, 288), (2, 2)) in shapes  # small B
    assert ((2, 1), (768, 576)) in shapes  # small A
    assert not any(is_low_rank_shape(a, b) for a, b in shapes)  # the SVD family is priced on its own
    assert len(shapes) == 70
    assert len(kronecker_shape_window(576, 576)) == 77 and len(kronecker_shape_window(1536, 576, small_factor=2, balanced_slack=1.0)) == 4  # B or A of (2, 1) or (1, 2)


def test_kronecker_lowrank_estimate_is_an_upper_bound_of_the_fit():
    torch.manual_seed(1)
    W = torch.randn(24, 20, dtype=torch.float64)
    C = _covariance(20)
    options = module_options(W, C, families="kronecker_lowrank", svd_step=1, lowrank_fractions=(0.2,), damping=0.0)
    lowrank = [o for o in options if o.family == "kronecker_lowrank"]
    assert lowrank and all(o.lowrank >= 1 and o.params == o.rank * (o.a_shape[0] * o.a_shape[1] + o.b_shape[0] * o.b_shape[1]) + o.lowrank * 44
                           for o in lowrank)
    for option in lowrank[:: max(1, len(lowrank) // 4)]:
        measured = measure_option(W, option, _stats(C), init="activation_aware", damping=0.0, name="w")
        # The joint fit starts from the priced point (Kronecker part, then the exact low-rank step) and only improves.
        assert measured <= option.output_error * (1 + 1e-6)


def test_svd_and_exact_whitening_shapes_are_priced_exactly():
    torch.manual_seed(2)
    W = torch.randn(12, 10, dtype=torch.float64)
    C = _covariance(10, seed=3)
    options = module_options(W, C, families=("svd", "kronecker"), b_shapes=((2, 1), (1, 2)), svd_step=1, damping=1e-2)
    for option in options[1:]:
        measured = measure_option(W, option, _stats(C), init="activation_aware", damping=1e-2, name="w")
        if option.family == "svd" or option.b_shape == (2, 1):  # n1 = 1 or n2 = 1: exact whitening
            assert measured == pytest.approx(option.output_error, rel=1e-6, abs=1e-12)


def _option_key(o):
    return o.family, o.a_shape, o.b_shape, o.rank, o.lowrank


def test_multiply_add_cap_removes_exactly_the_options_above_it():
    torch.manual_seed(3)
    W = torch.randn(24, 20, dtype=torch.float64)
    C = _covariance(20)
    free = module_options(W, C, svd_step=1, lowrank_fractions=(0.2,), max_macs=None)
    capped = module_options(W, C, svd_step=1, lowrank_fractions=(0.2,))  # the default cap: 1.0 x dense
    half = module_options(W, C, svd_step=1, lowrank_fractions=(0.2,), max_macs=0.5)
    for o in free + capped + half:
        term = 0 if o.a_shape is None else min(contraction_macs(o.a_shape, o.b_shape))
        expected = {"dense": 480, "svd": o.rank * 44, "kronecker": o.rank * term, "kronecker_lowrank": o.rank * term + o.lowrank * 44}
        assert o.macs == expected[o.family]
    # Balanced shapes with many terms cost more than dense: e.g. (4,5)x(6,4) takes 176 per term, up to R = 10 below dense size.
    assert any(o.family == "kronecker" and o.macs > 480 for o in free)
    assert all(o.macs <= 480 for o in capped) and all(o.macs <= 240 for o in half if o.family != "dense")
    kept = {_option_key(o): o.output_error for o in capped if o.family in ("svd", "kronecker")}
    assert kept == {_option_key(o): o.output_error for o in free if o.family in ("svd", "kronecker") and o.macs <= 480}
    assert max(o.rank for o in half if o.family == "svd") == 5  # 5 x 44 <= 240 < 6 x 44
    assert any(o.family == "kronecker_lowrank" for o in capped)


def test_allocation_reports_multiply_adds_and_the_cap_holds(calibrated):
    model, _, stats = calibrated
    target = sum(p.numel() for p in model.parameters()) - 6000
    for cap in (None, 1.0, 0.6):
        allocation = allocate_budget(model, stats, target, settings=BudgetSettings(svd_step=2, max_macs=cap), families="kronecker",
                                     progress=False)
        factored = [c for c in allocation.choices if c.option.family != "dense"]
        above = [c for c in factored if c.option.macs > (cap or float("inf")) * c.weight_shape[0] * c.weight_shape[1]]
        assert factored and not above and allocation.params_after <= target
        ratio = sum(c.option.macs for c in factored) / sum(c.weight_shape[0] * c.weight_shape[1] for c in factored)
        slower = sum(c.option.macs > c.weight_shape[0] * c.weight_shape[1] for c in factored)
        assert (f"multiply-adds per token of the factored modules: {ratio:.2f}x their dense ones; "
                f"{slower} of {len(factored)} modules above dense") in allocation.table()


def test_multiply_add_cap_is_checked_and_round_trips(tmp_path):
    for bad in (0, -1.0, "fast", True, float("inf")):
        with pytest.raises(ValueError, match=r"max_macs must be a positive number \(multiples of the dense multiply-adds\) or null"):
            BudgetSettings(max_macs=bad)
    assert BudgetSettings(max_macs=2).max_macs == 2.0 and BudgetSettings().max_macs == 1.0
    config = BudgetConfig(target_fraction=0.8, max_macs=None)
    config.to_file(tmp_path / "b.yaml")
    assert BudgetConfig.from_file(tmp_path / "b.yaml").max_macs is None
    # The command line's spelling reads back to the same cap.
    for cap in (None, 1.0, 0.5):
        assert parse_max_macs(max_macs_text(cap)) == cap


def test_families_are_checked_by_name():
    assert check_families("kronecker, svd") == ("svd", "kronecker")
    with pytest.raises(ValueError, match="unknown factor family 'tucker'; choose from svd, kronecker, kronecker_lowrank"):
        check_families(["svd", "tucker"])
    with pytest.raises(ValueError, match="unknown factor family"):
        BudgetSettings(families=("lowrank",))


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_llama(hidden_size=48, intermediate_size=96, num_hidden_layers=2)
    ids = torch.randint(0, 96, (6, 24), generator=torch.Generator().manual_seed(0))
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    stats = collect_calibration(model, names, ids, progress=False, sensitivity=True)
    return model, ids, stats


def test_family_filter_and_check_rounds(calibrated):
    model, _, stats = calibrated
    before = sum(p.numel() for p in model.parameters())
    settings = BudgetSettings(svd_step=2)
    pricing = price_modules(model, stats, settings=settings, progress=False)
    assert pricing.summary.modules == len(stats) and set(pricing.summary.kept) == set(pricing.summary.window)
    target = before - 6000
    svd = allocate_budget(model, stats, target, settings=settings, pricing=pricing, families="svd", progress=False)
    assert set(svd.family_counts()) <= {"dense", "svd"} and svd.params_after <= target
    kron = allocate_budget(model, stats, target, settings=settings, pricing=pricing, families="kronecker", progress=False)
    assert set(kron.family_counts()) <= {"dense", "kronecker"} and kron.params_after <= target
    # After the check every chosen option carries its measured error, which is what it is priced at.
    for c in kron.choices:
        if c.option.family != "dense":
            assert c.option.measured_error is not None and c.option.output_error == c.option.measured_error
    assert "kronecker" in kron.table() and "est/meas" in kron.table()
    config = kron.to_config()
    report = compress(tiny_llama(hidden_size=48, intermediate_size=96, num_hidden_layers=2), config, statistics=stats, progress=False).compression_report
    assert report.params_after == kron.params_after
    with pytest.raises(ValueError, match=r"below the smallest reachable .* \(families svd\)"):
        allocate_budget(model, stats, 1000, settings=settings, pricing=pricing, families="svd", progress=False)


def test_allocation_gives_low_rank_targets_that_compress(calibrated):
    model, ids, stats = calibrated
    before = sum(p.numel() for p in model.parameters())
    settings = BudgetSettings(families=("kronecker_lowrank",), svd_step=2, lowrank_fractions=(0.05, 0.2))
    allocation = allocate_budget(model, stats, before - 5000, settings=settings, progress=False)
    config = allocation.to_config(init=settings.init)
    chosen = [c for c in allocation.choices if c.option.family == "kronecker_lowrank"]
    assert chosen and all(t.lowrank_rank > 0 for t in config.targets)
    student = compress(tiny_llama(hidden_size=48, intermediate_size=96, num_hidden_layers=2), config, statistics=stats, progress=False)
    assert student.compression_report.params_after == allocation.params_after <= before - 5000


def test_budget_config_round_trips_and_names_bad_input(tmp_path, calibrated):
    config = BudgetConfig(target_fraction=0.8, families="svd,kronecker", b_shapes=[[2, 1]], modules=["**.mlp.*"])
    for name in ("b.yaml", "b.json"):
        config.to_file(tmp_path / name)
        assert BudgetConfig.from_file(tmp_path / name) == config
    assert config.target_for(1000) == 800 and BudgetConfig(target_params=5).target_for(1000) == 5
    with pytest.raises(ValueError, match="budget config: give target_fraction or target_params, not both"):
        BudgetConfig(target_fraction=0.5, target_params=10)
    with pytest.raises(ValueError, match=r"budget config: target_fraction must lie in \(0, 1\), got 1.5"):
        BudgetConfig(target_fraction=1.5)
    model, ids, stats = calibrated
    with pytest.raises(ValueError, match="give target_fraction .* or target_params"):
        compress(tiny_llama(hidden_size=48, intermediate_size=96, num_hidden_layers=2), BudgetConfig(), calibration=ids, progress=False)
    with pytest.raises(ValueError, match="calibration must be token ids, an int64 tensor .*got dict; pass statistics already collected as statistics="):
        compress(tiny_llama(hidden_size=48, intermediate_size=96, num_hidden_layers=2), BudgetConfig(target_fraction=0.9),
                 calibration=stats, progress=False)


def test_compress_with_a_budget_config_is_the_budget_path(calibrated):
    model, ids, _ = calibrated
    before = sum(p.numel() for p in model.parameters())
    config = BudgetConfig(target_params=before - 6000, svd_step=2, sensitivity_sequences=3, held_out_sequences=2)
    one = compress(copy.deepcopy(model), config, calibration=ids, progress=False)
    two = copy.deepcopy(model)
    allocation = compress_to_budget(two, config, ids, progress=False)
    assert one.compression_report.allocation.to_dict() == allocation.to_dict()
    assert allocation.params_after <= before - 6000 and one.compression_report.params_after == allocation.params_after
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), two.state_dict().values()))
