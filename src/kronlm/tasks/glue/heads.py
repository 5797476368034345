"""Sequence-classification models for GLUE: build, check and describe the head.

Encoders (BERT family) use ``AutoModelForSequenceClassification``: the pooler output ([CLS]
through a dense + tanh layer) feeds a linear classifier. Decoders (GPT-2, Llama) use transformers'
own ``GPT2ForSequenceClassification`` / ``LlamaForSequenceClassification``, whose ``score`` layer
reads the hidden state of the last token that is not padding (found from ``config.pad_token_id``),
the KnGPT2 / GPT-1 way of classifying with a causal model; :func:`build_classifier` sets that id.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from kronlm.modeling.loading import load_model, resolve_model_spec
from kronlm.tasks.glue.tasks import GlueTask
from kronlm.utils.files import read_json

__all__ = ["build_classifier", "check_classifier", "classifier_head", "classifier_head_name"]

_HEAD_NAMES = ("classifier", "score")


def classifier_head_name(model: nn.Module) -> str:
    """Name of the classification head module: "classifier" (BERT family) or "score" (decoders).

    Raises:
        ValueError: the model has neither (e.g. a bare encoder or a causal LM).
    """
    inner = getattr(model, "module", model)
    for name in _HEAD_NAMES:
        if isinstance(getattr(inner, name, None), nn.Module):
            return name
    raise ValueError(
        f"{type(inner).__name__} has no sequence-classification head (no 'classifier' or 'score' module); "
        "load it with AutoModelForSequenceClassification"
    )


def classifier_head(model: nn.Module) -> nn.Module:
    """The classification head module (see :func:`classifier_head_name`)."""
    inner = getattr(model, "module", model)
    return getattr(inner, classifier_head_name(inner))


def check_classifier(model: nn.Module, task: GlueTask) -> None:
    """Check that ``model`` is a sequence classifier with the task's number of outputs.

    A BERT-family head is ``classifier`` (a Linear, or a module ending in ``out_proj``); a decoder
    head is ``score`` (Linear hidden -> num_labels, no bias).

    Raises:
        ValueError: no head, ``config.num_labels`` differs from ``task.num_labels``, the head's
            output size differs, or a decoder without ``config.pad_token_id`` (it could not find
            the last real token of a padded row).
    """
    name = classifier_head_name(model)
    head = getattr(model, name)
    n = getattr(model.config, "num_labels", None)
    if n != task.num_labels:
        raise ValueError(
            f"{type(model).__name__} has {n} labels but {task.name} needs {task.num_labels}"
            + (" (regression)" if task.is_regression else f" ({', '.join(task.labels)})")
        )
    last = head if isinstance(head, nn.Linear) else getattr(head, "out_proj", None)
    if isinstance(last, nn.Linear) and last.out_features != task.num_labels:
        raise ValueError(f"{type(model).__name__}.{name} has {last.out_features} outputs but {task.name} needs {task.num_labels}")
    if name == "score" and model.config.pad_token_id is None:
        raise ValueError(f"{type(model).__name__}: config.pad_token_id is not set, so the last real token of a padded row cannot be found")


def build_classifier(spec: str, task: GlueTask, *, pad_token_id: int | None = None, seed: int = 0) -> PreTrainedModel:
    """Load ``spec`` as a sequence classifier for ``task`` (new head, seeded).

    A folder that already holds a classifier for the task (a fine-tuned teacher) keeps its head;
    a plain encoder or decoder gets a newly initialised one (``num_labels`` = task's, problem
    type "regression" for STS-B).

    Args:
        spec: hub id, local folder or alias (``minilm``), see :func:`kronlm.modeling.loading.resolve_model_spec`.
        pad_token_id: written to ``config.pad_token_id`` when the config has none (decoders).
        seed: seeds the head's initialisation.

    Raises:
        ValueError: a folder holding a classifier with another number of labels; see also
            :func:`check_classifier`.
        FileNotFoundError / OSError: see :func:`kronlm.modeling.loading.load_model`.
    """
    source = resolve_model_spec(spec)
    kwargs = {"num_labels": task.num_labels}
    config_file = None

    if Path(source.path_or_id).is_dir():
        config_file = Path(source.path_or_id) / "config.json"
    if config_file is not None and config_file.is_file():
        saved = read_json(config_file)
        archs = saved.get("architectures") or []
        if any(a.endswith("ForSequenceClassification") for a in archs):
            n = len(saved.get("id2label") or {}) or saved.get("num_labels")
            if n is not None and n != task.num_labels:
                raise ValueError(f"{spec}: a classifier with {n} labels, but {task.name} needs {task.num_labels}")
    if task.is_regression:
        kwargs["problem_type"] = "regression"
    elif task.num_labels > 1:
        kwargs["problem_type"] = "single_label_classification"
    if pad_token_id is not None:
        kwargs["pad_token_id"] = pad_token_id
    torch.manual_seed(seed)
    model = load_model(spec, task="sequence-classification", **kwargs)
    if model.config.pad_token_id is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    check_classifier(model, task)
    return model
