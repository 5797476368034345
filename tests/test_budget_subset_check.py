"""The budget's subset check: over several families the kept allocation is never worse, on
held-out calibration tokens, than the same budget spent on any one family alone."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import rule_ids, rule_trained_llama

from kronlm.compression.budget import BudgetConfig, allocate_budget, budget_candidates, budget_statistics, held_out_nll
from kronlm.compression.budget.subset_check import compressed_in_place
from kronlm.compression.budget import subset_check as subset_check_module
from kronlm.layers import KroneckerLinear
from kronlm.modeling import compress, compress_to_budget
from kronlm.modeling import convert as convert_module


def _ids(n: int, seed: int) -> torch.Tensor:
    return rule_ids(n, seed, length=24)


@pytest.fixture(scope="module")
def teacher():
    return rule_trained_llama()


def test_the_kept_allocation_is_never_worse_than_a_single_family(teacher):
    before = sum(p.numel() for p in teacher.parameters())
    ids = _ids(12, 1)
    # On the dense statistics the model returned is exactly the one the check measured.
    config = BudgetConfig(target_params=before - 8000, svd_step=2, sensitivity_sequences=4, held_out_sequences=4, sequential=None)
    student = copy.deepcopy(teacher)
    allocation = compress_to_budget(student, config, ids, progress=False)
    scores = allocation.held_out_nll
    assert set(scores) == {"svd,kronecker,kronecker_lowrank", "svd", "kronecker", "kronecker_lowrank"}
    reachable = {k: v for k, v in scores.items() if v is not None}
    assert len(reachable) >= 2
    kept = held_out_nll(student, ids[-4:])
    # The model returned is the one measured, and nothing measured beat it.
    assert kept == pytest.approx(min(reachable.values()), rel=1e-6)
    assert all(kept <= v + 1e-9 for v in reachable.values())
    assert "held-out NLL on 4 calibration sequences (92 tokens scored)" in allocation.decided_by
    assert "subset check (held-out NLL, nats/token): svd,kronecker,kronecker_lowrank" in allocation.table()
    # The same budget compressed with one family alone and no check measures no better.
    for family in ("svd", "kronecker"):
        alone = compress(copy.deepcopy(teacher), BudgetConfig(target_params=before - 8000, svd_step=2, sensitivity_sequences=4,
                                                              families=(family,)), calibration=ids[:-4], progress=False)
        assert kept <= held_out_nll(alone, ids[-4:]) + 1e-6


def test_a_single_family_wins_when_it_measures_better(teacher, monkeypatch):
    real = subset_check_module.held_out_nll

    def svd_looks_bad(model, ids, batch_size=4):
        # Any SVD module (A with one column) costs a whole nat: the Kronecker-only allocation must win.
        svd = any(isinstance(m, KroneckerLinear) and m.a_shape[1] == 1 and m.b_shape[0] == 1 for m in model.modules())
        return real(model, ids, batch_size) + (1.0 if svd else 0.0)

    monkeypatch.setattr(subset_check_module, "held_out_nll", svd_looks_bad)
    before = sum(p.numel() for p in teacher.parameters())
    config = BudgetConfig(target_params=before - 8000, svd_step=2, sensitivity_sequences=4, held_out_sequences=4,
                          families=("svd", "kronecker"))
    student = compress(copy.deepcopy(teacher), config, calibration=_ids(12, 1), progress=False)
    allocation = student.compression_report.allocation
    assert "kept kronecker alone" in allocation.decided_by
    assert set(allocation.family_counts()) <= {"dense", "kronecker"}
    assert not any(isinstance(m, KroneckerLinear) and m.a_shape[1] == 1 and m.b_shape[0] == 1 for m in student.modules())


def _budget(teacher, **settings) -> BudgetConfig:
    before = sum(p.numel() for p in teacher.parameters())
    return BudgetConfig(target_params=before - 8000, svd_step=2, sensitivity_sequences=4, held_out_sequences=4, **settings)


def test_the_sequential_fit_is_kept_only_when_it_measures_no_worse(teacher):
    ids = _ids(12, 1)
    dense_fit = compress_to_budget(copy.deepcopy(teacher), _budget(teacher, sequential=None), ids, progress=False)
    checked = min(v for v in dense_fit.held_out_nll.values() if v is not None)
    student = copy.deepcopy(teacher)
    allocation = compress_to_budget(student, _budget(teacher), ids, progress=False)  # sequential "weight", the default
    assert allocation.held_out_nll == dense_fit.held_out_nll  # the check itself runs on the dense statistics
    kept = held_out_nll(student, ids[-4:])
    assert kept <= checked + 1e-9
    assert f"sequential calibration (weight): held-out NLL {kept:.4f} against {checked:.4f}" in allocation.decided_by


def test_a_worse_sequential_fit_gives_way_to_the_dense_statistics_fit(teacher, monkeypatch):
    ids = _ids(12, 1)
    reference = copy.deepcopy(teacher)
    compress_to_budget(reference, _budget(teacher, sequential=None), ids, progress=False)
    # Measured worse than anything the check saw: the factors fitted on the dense statistics replace it.
    monkeypatch.setattr(convert_module, "held_out_nll", lambda model, held_out, batch_size=4, **_: float("inf"))
    student = copy.deepcopy(teacher)
    allocation = compress_to_budget(student, _budget(teacher, sequential="output"), ids, progress=False)
    assert allocation.decided_by.endswith("kept the dense-statistics fit")
    ours, theirs = student.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert [m.relative_error for m in student.compression_report.modules] == [m.relative_error for m in reference.compression_report.modules]


def test_statistics_without_ids_need_the_sequential_fit_off(teacher):
    ids = _ids(12, 1)
    stats = budget_statistics(teacher, ids, budget_candidates(teacher), sensitivity_sequences=4, progress=False)
    with pytest.raises(ValueError, match=r"sequential calibration \(sequential='weight', the default\) runs the partially compressed"):
        compress_to_budget(copy.deepcopy(teacher), _budget(teacher, subset_check=False), None, statistics=stats, progress=False)
    allocation = compress_to_budget(copy.deepcopy(teacher), _budget(teacher, subset_check=False, sequential=None), None,
                                    statistics=stats, progress=False)
    assert allocation.family_counts() != {"dense": len(allocation.choices)}


def test_the_check_needs_sequences_to_hold_out(teacher):
    before = sum(p.numel() for p in teacher.parameters())
    with pytest.raises(ValueError, match="holds out the last 8 calibration sequences, which leaves none of the 6 given"):
        compress(copy.deepcopy(teacher), BudgetConfig(target_params=before - 8000), calibration=_ids(6, 1), progress=False)
    # One family needs no check, and the check can be turned off: all 6 sequences are priced.
    for config in (BudgetConfig(target_params=before - 8000, families=("svd",)), BudgetConfig(target_params=before - 8000, subset_check=False)):
        allocation = compress(copy.deepcopy(teacher), config, calibration=_ids(6, 1), progress=False).compression_report.allocation
        assert allocation.held_out_nll == {} and allocation.decided_by == ""
    with pytest.raises(ValueError, match="held_out_sequences must be an integer >= 1, got 0"):
        BudgetConfig(held_out_sequences=0)


def test_plans_are_measured_in_place_and_the_dense_model_comes_back(teacher):
    model = copy.deepcopy(teacher).train()
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids(12, 1)
    stats = budget_statistics(model, ids[:-4], budget_candidates(model), sensitivity_sequences=4, progress=False)
    before = sum(p.numel() for p in model.parameters())
    plan = allocate_budget(model, stats, before - 8000, settings=BudgetConfig(svd_step=2, sensitivity_sequences=4), progress=False)
    factored = {c.name for c in plan.choices if c.option.family != "dense"}
    with pytest.raises(RuntimeError, match="interrupted"):
        with compressed_in_place(model, plan.to_config(), stats) as dense:
            assert set(dense) == factored and not model.training
            assert all(isinstance(model.get_submodule(name), KroneckerLinear) for name in factored)
            assert sum(p.numel() for p in model.parameters()) == plan.params_after
            raise RuntimeError("interrupted")
    # Even after an error inside the block: the very same dense modules, weights and training flag.
    assert model.training
    assert all(model.get_submodule(name) is module for name, module in modules.items())
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_an_encoder_with_a_task_head_is_refused_before_calibrating_unless_priced_by_output_error(teacher, monkeypatch):
    from conftest import tiny_bert

    qa = tiny_bert(cls_name="BertForQuestionAnswering")
    before = sum(p.numel() for p in qa.parameters())
    candidates = budget_candidates(qa)
    ids = torch.randint(5, 90, (12, 16), generator=torch.Generator().manual_seed(0))
    calls = []
    monkeypatch.setattr(convert_module, "budget_statistics", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match=r"BertForQuestionAnswering returns no next-token logits, and the budget's sensitivity pass "
                                         r"\(sensitivity_sequences=32\) and subset check \(subset_check=True\) score"):
        compress_to_budget(qa, BudgetConfig(target_fraction=0.8), ids, progress=False)
    with pytest.raises(ValueError, match=r"the budget's subset check \(subset_check=True\) score"):
        compress_to_budget(qa, BudgetConfig(target_fraction=0.8, sensitivity_sequences=0), ids, progress=False)
    assert calls == []  # refused before the first calibration pass
    monkeypatch.undo()
    allocation = compress_to_budget(qa, BudgetConfig(target_fraction=0.8, sensitivity_sequences=0, subset_check=False), ids,
                                    progress=False)
    assert sum(p.numel() for p in qa.parameters()) <= 0.8 * before
    assert allocation.family_counts().get("dense", 0) < len(allocation.choices)
    # The span head is no candidate by default: the encoder's layers only.
    assert [c.name for c in allocation.choices] == candidates and "qa_outputs" not in candidates
    assert type(qa.qa_outputs) is torch.nn.Linear
    # Named, the (2, 32) span head is a candidate too small for any factored option below its size: it stays dense.
    named = tiny_bert(cls_name="BertForQuestionAnswering")
    allocation = compress_to_budget(named, BudgetConfig(target_fraction=0.9, sensitivity_sequences=0, subset_check=False,
                                                        modules=["**.intermediate.dense", "qa_outputs"]), ids, progress=False)
    assert "qa_outputs" in [c.name for c in allocation.choices] and type(named.qa_outputs) is torch.nn.Linear
    # The probe of a causal LM draws no random numbers and leaves the training flag as it was.
    teacher.train()
    state = torch.get_rng_state()
    convert_module._check_next_token_logits(teacher, _ids(2, 3), ["subset check"])
    assert torch.equal(state, torch.get_rng_state()) and teacher.training
    teacher.eval()


def test_held_out_nll_refuses_class_logits_instead_of_scoring_them_as_tokens():
    from conftest import tiny_bert

    classifier = tiny_bert(cls_name="BertForSequenceClassification")  # logits (batch, num_labels): 2-D
    classifier.train()
    ids = torch.randint(5, 90, (3, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"BertForSequenceClassification returns no next-token logits, and the budget's "
                                         r"tie-break scores a causal LM's loss"):
        held_out_nll(classifier, ids, needed_by="tie-break")
    assert classifier.training  # restored after the refusal


def test_the_default_candidates_are_the_base_models_layers_without_any_head(teacher):
    from conftest import tiny_bert

    classifier = tiny_bert(cls_name="BertForSequenceClassification")
    names = budget_candidates(classifier)
    encoder = [f"bert.{n}" for n, m in classifier.bert.named_modules() if isinstance(m, torch.nn.Linear)]
    assert names == encoder and "classifier" not in names and len(names) == 2 * 6 + 1  # 6 per layer, the pooler
    causal = budget_candidates(teacher)
    assert causal and all(not n.startswith("lm_head") for n in causal)
    assert budget_candidates(classifier, ["classifier"]) == ["classifier"]


def test_calibration_ids_beyond_the_vocabulary_are_named_before_any_pass():
    from conftest import tiny_bert

    from kronlm.compression import CompressionConfig

    model = tiny_bert(cls_name="BertForQuestionAnswering")  # 96 rows
    ids = torch.randint(5, 90, (12, 16), generator=torch.Generator().manual_seed(0))
    ids[3, 7] = 215  # text tokenized with another model's larger vocabulary
    config = BudgetConfig(target_fraction=0.9, sensitivity_sequences=0, subset_check=False)
    with pytest.raises(ValueError, match=r"calibration token ids run from 5 to 215, but BertForQuestionAnswering's input "
                                         r"embedding has 96 rows: tokenize the text with the model's own tokenizer"):
        compress_to_budget(model, config, ids, progress=False)
    with pytest.raises(ValueError, match=r"run from 5 to 215, but BertForQuestionAnswering's input embedding has 96 rows"):
        compress(model, CompressionConfig.from_dict({"targets": [{"modules": ["**.intermediate.dense"], "b_shape": [2, 2],
                                                                   "init": "activation_aware"}]}), calibration=ids, progress=False)
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
