"""GLUE metrics against values computed by hand."""

import math

import pytest
import torch

from kronlm.tasks.glue import compute_metrics, get_task, predictions_from_logits


def test_accuracy_and_f1_by_hand():
    # gold 1 1 0 0 1, pred 1 0 0 1 1: tp 2, fp 1, fn 1 -> precision 2/3, recall 2/3, F1 2/3; 3 of 5 right.
    m = compute_metrics(get_task("mrpc"), [1, 0, 0, 1, 1], [1, 1, 0, 0, 1])
    assert m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(0.6)
    assert list(m) == ["f1", "accuracy"]


def test_matthews_by_hand():
    # tp 2, tn 1, fp 1, fn 1: (2*1 - 1*1) / sqrt(3 * 3 * 2 * 2) = 1/6.
    m = compute_metrics(get_task("cola"), [1, 0, 0, 1, 1], [1, 1, 0, 0, 1])
    assert m["matthews"] == pytest.approx(1 / 6)


def test_pearson_spearman_by_hand():
    pred, gold = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 5.0]
    mp, mg = 2.5, 2.75
    cov = sum((p - mp) * (g - mg) for p, g in zip(pred, gold))
    r = cov / math.sqrt(sum((p - mp) ** 2 for p in pred) * sum((g - mg) ** 2 for g in gold))
    # ranks of gold: 1 3 2 4 -> Spearman = 1 - 6 * (0 + 1 + 1 + 0) / (4 * 15) = 0.8
    m = compute_metrics(get_task("stsb"), pred, gold)
    assert m["pearson"] == pytest.approx(r) and m["spearman"] == pytest.approx(0.8)


def test_predictions_from_logits_and_shape_errors():
    assert predictions_from_logits(torch.tensor([[0.1, 0.9], [2.0, -1.0]]), get_task("sst2")).tolist() == [1, 0]
    assert predictions_from_logits(torch.tensor([[3.5], [1.0]]), get_task("stsb")).tolist() == [3.5, 1.0]
    with pytest.raises(ValueError, match=r"mnli: expected logits of shape \(examples, 3\), got \(2, 2\)"):
        predictions_from_logits(torch.zeros(2, 2), get_task("mnli"))
    with pytest.raises(ValueError, match="predictions for"):
        compute_metrics(get_task("sst2"), [1, 0], [1])
