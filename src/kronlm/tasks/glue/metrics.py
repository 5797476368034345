"""GLUE dev metrics (docs/protocols.md, "GLUE dev metrics") with scikit-learn and scipy.

CoLA: Matthews correlation; SST-2, QNLI, RTE, MNLI: accuracy; MRPC, QQP: F1 (of the positive
class 1) and accuracy; STS-B: Pearson and Spearman correlation. Values are fractions in [0, 1]
(correlations in [-1, 1]), not percentages.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from kronlm.tasks.glue.tasks import GlueTask

__all__ = ["compute_metrics", "predictions_from_logits"]


def predictions_from_logits(logits: torch.Tensor, task: GlueTask) -> np.ndarray:
    """Turn classifier outputs into predictions.

    Args:
        logits: (examples, num_labels).

    Returns:
        (examples,) int64 class ids (argmax), or float64 scores for a regression task.

    Raises:
        ValueError: ``logits`` is not (examples, task.num_labels).
    """
    if logits.dim() != 2 or logits.shape[1] != task.num_labels:
        raise ValueError(f"{task.name}: expected logits of shape (examples, {task.num_labels}), got {tuple(logits.shape)}")
    if task.is_regression:
        return logits[:, 0].double().cpu().numpy()
    return logits.argmax(dim=-1).cpu().numpy().astype(np.int64)


def compute_metrics(task: GlueTask, predictions: Sequence, labels: Sequence) -> dict[str, float]:
    """The task's dev metrics.

    Args:
        predictions: (examples,) predicted class ids or scores.
        labels: (examples,) gold class ids or scores.

    Returns:
        {metric name: value} for every name in ``task.metrics`` ("accuracy", "f1", "matthews",
        "pearson", "spearman"), as Python floats.

    Raises:
        ValueError: lengths differ or there is no example.
    """

    preds, gold = np.asarray(predictions), np.asarray(labels)
    if preds.shape != gold.shape or preds.ndim != 1:
        raise ValueError(f"{task.name}: {preds.shape} predictions for {gold.shape} labels")
    if preds.size == 0:
        raise ValueError(f"{task.name}: no example to score")
    out = {}
    for name in task.metrics:
        if name == "accuracy":
            out[name] = float(accuracy_score(gold, preds))
        elif name == "f1":
            out[name] = float(f1_score(gold, preds, pos_label=1, zero_division=0.0))
        elif name == "matthews":
            out[name] = float(matthews_corrcoef(gold, preds))
        elif name == "pearson":
            out[name] = float(pearsonr(preds.astype(np.float64), gold.astype(np.float64))[0])
        elif name == "spearman":
            out[name] = float(spearmanr(preds.astype(np.float64), gold.astype(np.float64))[0])
        else:  # pragma: no cover - the task table only names the metrics above
            raise ValueError(f"unknown metric {name!r}")
    return out
