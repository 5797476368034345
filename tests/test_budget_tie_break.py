"""The budget's measured tie-break: per-module swaps to a close option of another family, each kept
only when it lowers the held-out NLL, never over the budget."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import rule_ids, rule_trained_llama

from kronlm.compression.budget import (
    BudgetConfig,
    allocate_budget,
    budget_candidates,
    budget_statistics,
    close_alternatives,
    held_out_nll,
    price_modules,
)
from kronlm.compression.budget import tie_break as tie_break_module
from kronlm.compression.report import count_parameters
from kronlm.layers import KroneckerLinear
from kronlm.modeling import compress_to_budget


@pytest.fixture(scope="module")
def teacher():
    return rule_trained_llama()


IDS = rule_ids(12, 1, length=24)
FAMILIES = ("svd", "kronecker")


def _config(teacher, **overrides) -> BudgetConfig:
    settings = dict(target_params=count_parameters(teacher) - 8000, svd_step=2, sensitivity_sequences=4, held_out_sequences=4,
                    families=FAMILIES, sequential=None)
    settings.update(overrides)
    return BudgetConfig(**settings)


def _is_svd(module) -> bool:
    return isinstance(module, KroneckerLinear) and module.a_shape[1] == 1 and module.b_shape[0] == 1


def test_close_alternatives_are_no_larger_of_another_family_and_closest_first(teacher):
    config = _config(teacher)
    stats = budget_statistics(teacher, IDS[:-4], budget_candidates(teacher), sensitivity_sequences=4, progress=False)
    pricing = price_modules(teacher, stats, settings=config, progress=False)
    allocation = allocate_budget(teacher, stats, config.target_params, settings=config, pricing=pricing, families=("svd",),
                                 progress=False)
    factored = sum(c.option.family != "dense" for c in allocation.choices)
    assert factored >= 2
    loose = close_alternatives(allocation, pricing, FAMILIES, margin=1e9, limit=100)
    # Every SVD module of a tiny Llama has some Kronecker option no larger than it.
    assert len(loose) == factored
    for swap in loose:
        assert swap.alternative.family == "kronecker" != swap.current.family
        assert swap.alternative.params <= swap.current.params
        assert swap.gap == pytest.approx((swap.alternative.loss - swap.current.loss) / swap.current.loss)
    assert [s.gap for s in loose] == sorted(s.gap for s in loose)
    assert close_alternatives(allocation, pricing, FAMILIES, margin=1e9, limit=2) == loose[:2]
    tight = close_alternatives(allocation, pricing, FAMILIES, margin=loose[0].gap, limit=100)
    assert tight and all(s.gap <= loose[0].gap for s in tight)
    # A family set of one has no alternatives.
    assert close_alternatives(allocation, pricing, ("svd",), margin=1e9, limit=100) == []


def test_swaps_that_measure_better_are_kept_within_the_budget(teacher, monkeypatch):
    real = tie_break_module.held_out_nll

    def kronecker_looks_good(model, ids, batch_size=4):
        # Every Kronecker (non-SVD) factored module takes 0.1 nats off: each swap to one must be kept.
        count = sum(isinstance(m, KroneckerLinear) and not _is_svd(m) for m in model.modules())
        return real(model, ids, batch_size) - 0.1 * count

    monkeypatch.setattr(tie_break_module, "held_out_nll", kronecker_looks_good)
    config = _config(teacher, tie_break_modules=3, tie_break_margin=1e9)
    student = copy.deepcopy(teacher)
    allocation = compress_to_budget(student, config, IDS, progress=False)
    trials = allocation.tie_break
    assert 1 <= len(trials) <= 3
    assert all(t["kept"] for t in trials)
    # The measured NLL goes down trial after trial and ends at the returned model's.
    nlls = [t["held_out_nll"] for t in trials]
    assert nlls == sorted(nlls, reverse=True)
    assert allocation.measured_nll == pytest.approx(kronecker_looks_good(student, IDS[-4:]), rel=1e-6)
    # The choices describe the returned model, which keeps the budget.
    assert count_parameters(student) == allocation.params_after <= config.target_params
    for trial in trials:
        module = student.get_submodule(trial["module"])
        assert isinstance(module, KroneckerLinear) and not _is_svd(module)
        choice = next(c for c in allocation.choices if c.name == trial["module"])
        assert choice.option.describe() == trial["to"]
    assert allocation.estimated_loss == pytest.approx(sum(c.option.loss for c in allocation.choices))
    assert f"tie-break: {len(trials)} of {len(trials)} close swaps kept" in allocation.decided_by
    assert "tie-break swaps kept: " in allocation.table()


def test_swaps_that_measure_worse_are_undone_bit_identically(teacher, monkeypatch):
    plain = copy.deepcopy(teacher)
    compress_to_budget(plain, _config(teacher), IDS, progress=False)
    real = tie_break_module.held_out_nll

    def kronecker_looks_bad(model, ids, batch_size=4):
        count = sum(isinstance(m, KroneckerLinear) and not _is_svd(m) for m in model.modules())
        return real(model, ids, batch_size) + 0.1 * count

    monkeypatch.setattr(tie_break_module, "held_out_nll", kronecker_looks_bad)
    student = copy.deepcopy(teacher)
    allocation = compress_to_budget(student, _config(teacher, tie_break_modules=3, tie_break_margin=1e9), IDS, progress=False)
    assert allocation.tie_break and not any(t["kept"] for t in allocation.tie_break)
    assert "tie-break: 0 of" in allocation.decided_by
    kept, base = student.state_dict(), plain.state_dict()
    assert kept.keys() == base.keys()
    assert all(torch.equal(kept[k], base[k]) for k in kept)


def test_the_tie_break_is_never_worse_on_held_out_tokens(teacher):
    plain = copy.deepcopy(teacher)
    before = compress_to_budget(plain, _config(teacher), IDS, progress=False)
    student = copy.deepcopy(teacher)
    after = compress_to_budget(student, _config(teacher, tie_break_modules=4, tie_break_margin=1e9), IDS, progress=False)
    assert held_out_nll(student, IDS[-4:]) <= held_out_nll(plain, IDS[-4:]) + 1e-9
    assert after.measured_nll <= before.measured_nll
    assert count_parameters(student) == after.params_after <= after.target_params


@pytest.mark.parametrize("overrides, message", [({"tie_break_modules": -1}, "tie_break_modules"),
                                                ({"tie_break_margin": -0.5}, "tie_break_margin"),
                                                ({"tie_break_margin": "wide"}, "tie_break_margin"),
                                                ({"tie_break_modules": 4, "families": ("svd",)}, "families: svd, subset_check: true"),
                                                ({"tie_break_modules": 4, "subset_check": False}, "subset_check: false")])
def test_bad_tie_break_settings_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        BudgetConfig(target_fraction=0.5, **overrides)
