"""SQuAD as a task family of the task pipeline, span evaluation, and :func:`run_squad`.

:class:`SquadFamily` answers what :class:`kronlm.tasks.pipeline.TaskFamily` asks for extractive
question answering (KroneckerBERT's SQuAD experiments, Tahaei et al., NAACL 2022):

- data: official-format JSON files (:func:`.data.read_squad_json`) or the Hugging Face ``squad`` /
  ``squad_v2`` datasets; a seeded ``max_train_examples`` subset of the training *questions*, then
  ``val_fraction`` of them held out **by paragraph** (every question about a held-out context is
  held out, so no context is both trained on and used to choose); training windows with answer
  positions, evaluation windows with offsets (:mod:`.features`);
- model: ``AutoModelForQuestionAnswering`` of the pretrained encoder (MiniLM is a bare
  ``BertModel``: its span head ``qa_outputs`` (2, hidden) is new, seeded);
- metric: n-best span decoding (:mod:`.postprocess`) and the official EM / F1
  (:mod:`.metrics`), main metric F1. For v2.0 the no-answer threshold is chosen on the held-out
  training questions (for the model being evaluated), never on the reported split; with
  ``val_fraction`` 0 it is 0.0 (run_qa.py's default).

Training uses the default objective: :class:`~kronlm.distill.objective.DistillationObjective`
takes CE on the gold start / end positions for a teacher, and task ILKD (embedding,
attention-score and hidden MSE, KD on the start and end logits, CE) for a student.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForQuestionAnswering, PreTrainedModel

from kronlm.compression.config import CompressionConfig
from kronlm.modeling import load
from kronlm.modeling.loading import load_model, load_tokenizer, resolve_model_spec
from kronlm.tasks.pipeline import TaskFamily, TaskSplits, run_task_pipeline
from kronlm.tasks.results import TaskReport
from kronlm.tasks.squad.config import SquadTrainConfig
from kronlm.tasks.squad.data import (
    HF_SQUAD_DATASETS,
    LOCAL_SQUAD_DIR,
    SquadExample,
    default_squad_dir,
    load_hf_squad,
    read_squad_json,
)
from kronlm.tasks.squad.features import (
    SquadCollator,
    prepare_eval_features,
    prepare_train_features,
)
from kronlm.tasks.squad.metrics import references_from_examples, squad_metrics
from kronlm.tasks.squad.postprocess import (
    SquadPredictions,
    apply_null_threshold,
    best_null_threshold,
    decode_predictions,
)
from kronlm.tasks.student import resolve_compression
from kronlm.utils.files import read_json

__all__ = [
    "QA_HEAD",
    "SquadEvalSet",
    "SquadFamily",
    "check_qa_model",
    "evaluate_squad",
    "hold_out_by_paragraph",
    "position_limit",
    "run_squad",
    "span_logits",
    "subset_questions",
]

QA_HEAD = "qa_outputs"
_MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids")
LOCAL_CAVEAT = (
    f"Data: {LOCAL_SQUAD_DIR}, the official SQuAD v1.1 *dev* set split by article (train 24 articles, 5,696 "
    "questions; evaluation 8 articles, 1,539 questions). These figures are not comparable with published "
    "SQuAD dev numbers (other training data, a subset of dev)."
)


@dataclass
class SquadEvalSet:
    """Questions with their evaluation windows: what :meth:`SquadFamily.evaluate` scores.

    Attributes:
        examples: the questions.
        features: their windows (:func:`.features.prepare_eval_features` of ``examples``).
        source: where the questions came from (for logs and reports).
        threshold_set: v2.0: the held-out training questions that choose the no-answer
            threshold when this set is scored (the reported split); None for the held-out set
            itself, which chooses on itself.
    """

    examples: list[SquadExample]
    features: list[dict[str, Any]]
    source: str
    threshold_set: SquadEvalSet | None = None

    def __len__(self) -> int:
        return len(self.examples)


def subset_questions(examples: Sequence[SquadExample], n: int, seed: int) -> list[SquadExample]:
    """``n`` questions drawn by a permutation seeded by ``seed``, in file order (all when n >= len).

    Raises:
        ValueError: ``n`` < 1.
    """
    if n < 1:
        raise ValueError(f"a subset needs at least 1 question, got {n}")
    if n >= len(examples):
        return list(examples)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return [examples[i] for i in sorted(order)]


def hold_out_by_paragraph(
    examples: Sequence[SquadExample], fraction: float, seed: int,
) -> tuple[list[SquadExample], list[SquadExample] | None]:
    """Split questions into (trained on, held out), whole paragraphs at a time.

    Paragraphs (questions sharing a title and a context) are taken in an order seeded by
    ``seed`` until at least ``round(fraction * N)`` questions (at least 1) are held out; both
    parts keep file order and share no paragraph, so the held-out score is not inflated by
    contexts seen in training. ``fraction`` 0 holds nothing out.

    Returns:
        (train, held_out); held_out is None for ``fraction`` 0.

    Raises:
        ValueError: ``fraction`` outside [0, 1); fewer than two paragraphs, or a fraction that
            leaves no paragraph to train on (names the counts).
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"val_fraction must lie in [0, 1), got {fraction}")
    if fraction == 0:
        return list(examples), None
    groups: dict[tuple[str, str], list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault((ex.title, ex.context), []).append(i)
    keys = list(groups)
    if len(keys) < 2:
        raise ValueError(f"val_fraction {fraction}: {len(examples)} questions in {len(keys)} paragraph(s); holding out "
                         "whole paragraphs needs at least 2")
    random.Random(seed * 1_000_003 + 7).shuffle(keys)
    wanted = max(1, round(fraction * len(examples)))
    held: list[int] = []
    taken = 0
    for key in keys:
        if len(held) >= wanted:
            break
        held.extend(groups[key])
        taken += 1
    if taken == len(keys):
        raise ValueError(f"val_fraction {fraction} of {len(examples)} questions in {len(keys)} paragraphs leaves no "
                         "paragraph to train on")
    held_set = set(held)
    return ([ex for i, ex in enumerate(examples) if i not in held_set],
            [ex for i, ex in enumerate(examples) if i in held_set])


def position_limit(config) -> int | None:
    """The longest input a model config allows, in tokens (``max_position_embeddings`` or
    ``n_positions``), or None when it states none (rotary models without a table)."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_qa_model(model: nn.Module) -> None:
    """Check that ``model`` is an extractive QA model: a ``qa_outputs`` layer with 2 outputs.

    Raises:
        ValueError: no such head (e.g. a bare encoder or a classifier), or not 2 outputs.
    """
    inner = getattr(model, "module", model)
    head = getattr(inner, QA_HEAD, None)
    if not isinstance(head, nn.Module):
        raise ValueError(f"{type(inner).__name__} has no question-answering head ('{QA_HEAD}'); load it with "
                         "AutoModelForQuestionAnswering")
    if isinstance(head, nn.Linear) and head.out_features != 2:
        raise ValueError(f"{type(inner).__name__}.{QA_HEAD} has {head.out_features} outputs; a span head has 2 (start, end)")


@torch.no_grad()
def span_logits(
    model: nn.Module, features: Sequence[dict[str, Any]], collator: SquadCollator, *, batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Start and end logits of every window, trimmed to the window's tokens.

    The model is moved to ``device`` and put in eval mode.

    Returns:
        (starts, ends): one float32 array (tokens of the window,) per feature, in order.

    Raises:
        ValueError: the model returns no start / end logits (not a QA model).
    """
    model.to(device)
    model.eval()
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    for i in range(0, len(features), batch_size):
        chunk = features[i:i + batch_size]
        batch = {k: v.to(device) for k, v in collator(chunk).items() if k in _MODEL_KEYS}
        out = model(**batch)
        if getattr(out, "start_logits", None) is None:
            raise ValueError(f"{type(model).__name__} returns no start_logits; it is not a question-answering model")
        s, e = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
        for j, f in enumerate(chunk):
            n = len(f["input_ids"])
            starts.append(s[j, :n])
            ends.append(e[j, :n])
    return starts, ends


def evaluate_squad(
    model: nn.Module, eval_set: SquadEvalSet, collator: SquadCollator, *, version: str = "1.1",
    n_best_size: int = 20, max_answer_length: int = 30, batch_size: int = 64, device: str | torch.device = "cpu",
) -> tuple[dict[str, float], SquadPredictions]:
    """Decode ``model``'s answers on ``eval_set`` and score them with the official metrics.

    v2.0: the no-answer threshold is the one that maximises F1 on ``eval_set.threshold_set``
    (the held-out training questions) for this model, or on ``eval_set`` itself when it has
    none (it *is* the held-out set); never on a reported split.

    Returns:
        (metrics, predictions). Metrics are fractions: ``exact_match``, ``f1``; v2.0 adds
        ``HasAns_f1`` / ``NoAns_f1`` (when the set has such questions) and ``null_threshold``
        (in logits, not a fraction).

    Raises:
        ValueError: an empty set, a model that is not a QA model, see
            :func:`.postprocess.decode_predictions` and :func:`.metrics.squad_metrics`.
    """
    if not eval_set.examples:
        raise ValueError(f"{eval_set.source}: no question to evaluate")
    v2 = version == "2.0"
    decode = dict(version_2_with_negative=v2, n_best_size=n_best_size, max_answer_length=max_answer_length)

    def predict(s: SquadEvalSet, threshold: float = 0.0) -> SquadPredictions:
        starts, ends = span_logits(model, s.features, collator, batch_size=batch_size, device=device)
        return decode_predictions(s.examples, s.features, starts, ends, null_score_diff_threshold=threshold, **decode)

    threshold = 0.0
    if v2:
        chooser = eval_set.threshold_set or eval_set
        chosen = predict(chooser)
        threshold, _ = best_null_threshold(chosen.best_spans, chosen.score_diff, references_from_examples(chooser.examples))
        if chooser is eval_set:
            predictions = chosen
            predictions.predictions = apply_null_threshold(chosen.best_spans, chosen.score_diff, threshold)
            predictions.threshold = float(threshold)
        else:
            predictions = predict(eval_set, threshold)
    else:
        predictions = predict(eval_set)
    scores = squad_metrics(predictions.predictions, references_from_examples(eval_set.examples), v2)
    if not v2:
        return {"exact_match": scores["exact_match"] / 100, "f1": scores["f1"] / 100}, predictions
    metrics = {"exact_match": scores["exact"] / 100, "f1": scores["f1"] / 100}
    for key in ("HasAns_f1", "NoAns_f1"):
        if key in scores:
            metrics[key] = scores[key] / 100
    metrics["null_threshold"] = float(threshold)
    return metrics, predictions


class SquadFamily(TaskFamily):
    """SQuAD v1.1 / v2.0 for :func:`kronlm.tasks.pipeline.run_task_pipeline`.

    Args:
        tokenizer: a fast tokenizer with right padding (offsets map tokens back to characters).
        version: "1.1" or "2.0" (a v2.0 file given for "1.1" is refused by the reader).
        data_dir: folder holding ``train.json`` and ``dev.json`` (official format); None =
            ``<data dir>/squad-v1.1-dev-split`` (:func:`.data.default_squad_dir`).
        train_file / dev_file: official-format files instead (e.g. ``train-v1.1.json``).
        hf_dataset: read the Hugging Face dataset ``squad`` / ``squad_v2`` (splits ``train`` and
            ``validation``) instead of files.
        max_positions: the model's position limit (see :func:`position_limit`), checked against
            every ``max_length`` before tokenising.

    Raises:
        ValueError: a slow tokenizer, left padding, no pad token, an unknown ``version`` or
            ``hf_dataset``, or both files and ``hf_dataset``.
    """

    family = "squad"
    main_metric = "f1"
    greater_is_better = True
    split_name = "dev"

    def __init__(self, tokenizer, *, version: str = "1.1", data_dir: str | os.PathLike | None = None,
                 train_file: str | os.PathLike | None = None, dev_file: str | os.PathLike | None = None,
                 hf_dataset: str | None = None, max_positions: int | None = None):
        if version not in ("1.1", "2.0"):
            raise ValueError(f"unknown SQuAD version {version!r}; expected 1.1 or 2.0")
        if hf_dataset is not None:
            if hf_dataset not in HF_SQUAD_DATASETS:
                raise ValueError(f"unknown SQuAD dataset {hf_dataset!r}; expected one of {', '.join(HF_SQUAD_DATASETS)}")
            if train_file is not None or dev_file is not None or data_dir is not None:
                raise ValueError("give files / a data folder or hf_dataset, not both")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; SQuAD windows need its offset mapping")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
        self.tokenizer = tokenizer
        self.version = version
        self.name = "squad" if version == "1.1" else "squad_v2"
        self.data_dir, self.train_file, self.dev_file, self.hf_dataset = data_dir, train_file, dev_file, hf_dataset
        self.max_positions = max_positions
        self.collator = SquadCollator(tokenizer.pad_token_id)
        self._examples: dict[str, tuple[list[SquadExample], str]] = {}
        self._max_length: int | None = None

    def examples(self, split: str) -> tuple[list[SquadExample], str]:
        """(questions, source description) of "train" or "dev", read once.

        Raises:
            FileNotFoundError: no data folder or file (named).
            ValueError: see :func:`.data.read_squad_json` (answers not matching their context,
                v2.0 data for a v1.1 task, ...).
            ConnectionError: a Hugging Face dataset that cannot be loaded.
        """
        if split not in self._examples:
            if self.hf_dataset is not None:
                hf_split = "train" if split == "train" else "validation"
                rows = load_hf_squad(self.hf_dataset, hf_split)
                self._examples[split] = (rows, f"hf:{self.hf_dataset}/{hf_split}")
            else:
                path = self.train_file if split == "train" else self.dev_file
                if path is None:
                    folder = self.data_dir if self.data_dir is not None else default_squad_dir()
                    if folder is None:
                        raise FileNotFoundError("no SQuAD data: give a data folder (train.json, dev.json), the files, "
                                                "or a Hugging Face dataset")
                    path = Path(folder) / f"{split}.json"
                rows = read_squad_json(path, self.version)
                self._examples[split] = (rows, str(path))
        return self._examples[split]

    def uses_local_split(self) -> bool:
        """Whether the data is the local ``squad-v1.1-dev-split`` (figures need the caveat)."""
        if self.hf_dataset is not None:
            return False
        names = [Path(p).parent.name for p in (self.train_file, self.dev_file) if p is not None]
        folder = self.data_dir if self.data_dir is not None else default_squad_dir()
        if folder is not None and (self.train_file is None or self.dev_file is None):
            names.append(Path(folder).name)
        return LOCAL_SQUAD_DIR in names

    def _check_room(self, max_length: int, where: str) -> None:
        if self.max_positions is not None and max_length > self.max_positions:
            raise ValueError(
                f"{where}: windows of max_length {max_length} tokens do not fit the model's {self.max_positions} "
                f"positions (config.max_position_embeddings); contexts longer than a window are cut into windows, so "
                f"lower max_length to {self.max_positions} or less"
            )

    def _eval_set(self, examples: list[SquadExample], source: str, config: SquadTrainConfig,
                  threshold_set: SquadEvalSet | None = None) -> SquadEvalSet:
        features = prepare_eval_features(examples, self.tokenizer, config.max_length, config.doc_stride, self.max_positions)
        return SquadEvalSet(examples, features, source, threshold_set)

    def load_splits(self, config: SquadTrainConfig) -> TaskSplits:
        if getattr(config, "version", self.version) != self.version:
            raise ValueError(f"the run is SQuAD {self.version} but its config says version {config.version}")
        self._check_room(config.max_length, "squad")
        self._max_length = config.max_length
        train, train_source = self.examples("train")
        dev, dev_source = self.examples("dev")
        if config.max_train_examples is not None and config.max_train_examples < len(train):
            train_source = f"{train_source} (random {config.max_train_examples} of {len(train)} questions, seed {config.seed})"
            train = subset_questions(train, config.max_train_examples, config.seed)
        kept, held = hold_out_by_paragraph(train, config.val_fraction, config.seed)
        features = prepare_train_features(kept, self.tokenizer, config.max_length, config.doc_stride, self.max_positions)
        val = None
        sources = {"train": f"{train_source}: {len(kept):,} questions, {len(features):,} windows", "val": None,
                   "dev": dev_source}
        if held is not None:
            held_source = f"{train_source}: {len(held):,} held-out questions in whole paragraphs (seed {config.seed})"
            val = self._eval_set(held, held_source, config)
            sources["val"] = f"{held_source}, {len(val.features):,} windows"
        dev_set = self._eval_set(dev, dev_source, config, threshold_set=val if self.version == "2.0" else None)
        sources["dev"] = f"{dev_source}: {len(dev):,} questions, {len(dev_set.features):,} windows"
        return TaskSplits(train=features, val=val, dev=dev_set, sources=sources, val_examples=0 if held is None else len(held))

    def collate_fn(self) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        return self.collator

    def lengths(self, examples: Sequence[dict[str, Any]]) -> list[int]:
        return [len(f["input_ids"]) for f in examples]

    def eval_tokens(self, eval_set: SquadEvalSet) -> int:
        return sum(len(f["input_ids"]) for f in eval_set.features)

    def _checked(self, model: PreTrainedModel, what: str) -> PreTrainedModel:
        check_qa_model(model)
        limit = position_limit(model.config)
        if limit is not None:
            self.max_positions = limit if self.max_positions is None else min(self.max_positions, limit)
        if self._max_length is not None:
            self._check_room(self._max_length, what)
        return model

    def new_model(self, spec: str, seed: int) -> PreTrainedModel:
        torch.manual_seed(seed)  # seeds the new span head
        return self._checked(load_model(spec, task="question-answering"), str(spec))

    def load_model(self, folder: str | Path) -> PreTrainedModel:
        config_file = Path(folder) / "config.json"
        if config_file.is_file():
            archs = read_json(config_file).get("architectures") or []
            if archs and not any(a.endswith("ForQuestionAnswering") for a in archs):
                raise ValueError(f"{folder}: a {archs[0]} has no question-answering head ('{QA_HEAD}'); give a "
                                 "fine-tuned QA teacher (OUT/teacher of a kronlm squad run)")
        return self._checked(load(folder, auto_class=AutoModelForQuestionAnswering), str(folder))

    def head_name(self, model: nn.Module) -> str:
        check_qa_model(model)
        return QA_HEAD

    def evaluate(self, model: nn.Module, eval_set: SquadEvalSet, config: SquadTrainConfig,
                 device: torch.device) -> dict[str, float]:
        return evaluate_squad(model, eval_set, self.collator, version=self.version, n_best_size=config.n_best_size,
                              max_answer_length=config.max_answer_length, batch_size=config.eval_batch_size,
                              device=device)[0]


def _model_position_limit(spec: str) -> int | None:
    source = resolve_model_spec(spec)
    if source.gguf_file is not None:
        return None
    return position_limit(AutoConfig.from_pretrained(source.path_or_id))


def run_squad(
    out_dir: str | os.PathLike,
    *,
    model: str | None = None,
    teacher: str | os.PathLike | None = None,
    config: SquadTrainConfig | None = None,
    teacher_config: SquadTrainConfig | None = None,
    student: CompressionConfig | str | None = None,
    student_init: str | os.PathLike | None = None,
    general_distill: str | os.PathLike | None = None,
    layer_map: list[int] | None = None,
    task_kd: bool = True,
    data_dir: str | os.PathLike | None = None,
    train_file: str | os.PathLike | None = None,
    dev_file: str | os.PathLike | None = None,
    hf_dataset: str | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> TaskReport:
    """Fine-tune a span-prediction teacher on SQuAD and optionally distil a compressed student.

    The Python form of ``kronlm squad`` (KroneckerBERT; docs/tasks.md): teacher fine-tuning of
    ``AutoModelForQuestionAnswering`` (or a fine-tuned ``teacher``) -> compression of the teacher
    with ``student`` -> optional stage-1 weights (``general_distill``) -> task ILKD -> report.
    Each stage chooses its checkpoint by F1 on held-out training questions (``val_fraction``,
    whole paragraphs); the evaluation split is scored (final and best model) and reported only.

    Args:
        out_dir: run folder (layout: :mod:`kronlm.tasks.pipeline`); ``report.{json,md}`` hold
            teacher and student EM / F1, parameters, compression ratio and retention.
        model: pretrained encoder to fine-tune as the teacher (hub id, folder or alias such as
            ``minilm``); or
        teacher: a fine-tuned QA teacher folder (``OUT/teacher`` of an earlier run).
        config: student settings (and teacher settings without ``teacher_config``); default
            :class:`SquadTrainConfig` (); ``config.version`` picks v1.1 or v2.0.
        teacher_config: teacher fine-tuning settings (same version).
        student: compression of the student: a :class:`CompressionConfig`, a config file or a
            preset name; None = teacher only.
        student_init: a pretrained compressed / truncated encoder folder instead of ``student``.
        general_distill: a stage-1 folder (``kronlm distill`` of the compressed encoder).
        layer_map: teacher layer of each student layer (shallower students).
        task_kd: False = the student learns from the gold spans only (CE).
        data_dir: folder with ``train.json`` / ``dev.json``; None = ``$KRONLM_DATA_DIR/squad-v1.1-dev-split``.
        train_file / dev_file: official-format files instead.
        hf_dataset: "squad" or "squad_v2" from the Hugging Face hub instead of files.
        resume: continue each stage from its latest checkpoint in ``out_dir``.
        log: where progress lines go.

    Returns:
        The :class:`~kronlm.tasks.results.TaskReport` written to ``out_dir``.

    Raises:
        ValueError: bad settings; teacher and student configs of different versions; bad data
            (an answer that does not match its context, names the question id; a v2.0 file for a
            v1.1 run); ``max_length`` beyond the model's positions (names both); a teacher without
            a span head.
        FileNotFoundError: missing data files or folders (named).
    """
    config = config or SquadTrainConfig()
    if teacher_config is not None and teacher_config.version != config.version:
        raise ValueError(f"teacher config is SQuAD {teacher_config.version} but the student config is {config.version}")
    if model is None and teacher is None:
        raise ValueError("give model (to fine-tune a teacher) or teacher (a fine-tuned one)")
    compression, name = resolve_compression(student) if student is not None else (None, None)
    spec = str(teacher or model)
    family = SquadFamily(load_tokenizer(spec), version=config.version, data_dir=data_dir, train_file=train_file,
                         dev_file=dev_file, hf_dataset=hf_dataset, max_positions=_model_position_limit(spec))
    settings = {"caveat": LOCAL_CAVEAT} if family.uses_local_split() else {}
    return run_task_pipeline(
        family, out_dir, config=config, teacher_config=teacher_config, model=model, teacher=teacher,
        compression=compression, compression_name=name, student_init=student_init, general_distill=general_distill,
        layer_map=layer_map, task_kd=task_kd, resume=resume, settings=settings, log=log,
    )
