"""GLUE examples from GLUE-format TSV files or the Hugging Face ``glue`` dataset, and batching.

TSV files are read as the GLUE download script writes them (``<data_dir>/<TASK>/{train,dev}.tsv``,
tab-separated, no quoting, a header row except for CoLA). Every row must have as many fields as
the header and a label from the task's label set; otherwise a ``ValueError`` names the file and
the 1-based line number. The dev split is the one evaluated and reported (GLUE test labels are
private); checkpoints are chosen on a held-out share of the training split instead
(:meth:`GlueExamples.hold_out`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import load_dataset

from kronlm.tasks.glue.tasks import GlueTask
from kronlm.utils.paths import data_dir

__all__ = [
    "GlueBatchCollator",
    "GlueExamples",
    "default_glue_dir",
    "encode_examples",
    "encoded_lengths",
    "examples_from_rows",
    "load_glue_split",
    "load_hf_glue_split",
    "read_glue_tsv",
    "split_path",
]

SPLITS = ("train", "dev")


@dataclass
class GlueExamples:
    """The examples of one split of one task.

    Attributes:
        task: the :class:`GlueTask`.
        split: "train" or "dev".
        texts: one tuple per example, one string per text column (1 or 2).
        labels: class ids (int, index into ``task.labels``) or regression targets (float).
        source: where the examples came from (a file path or "hf:glue/<name>/<split>").
    """

    task: GlueTask
    split: str
    texts: list[tuple[str, ...]] = field(default_factory=list)
    labels: list[int | float] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int, seed: int) -> GlueExamples:
        """The first ``n`` examples of a seeded random permutation (all of them when n >= len).

        Raises:
            ValueError: ``n`` < 1.
        """
        if n < 1:
            raise ValueError(f"a subset needs at least 1 example, got {n}")
        if n >= len(self):
            return self
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].tolist()
        return GlueExamples(self.task, self.split, [self.texts[i] for i in order], [self.labels[i] for i in order],
                            f"{self.source} (random {n} of {len(self)}, seed {seed})")

    def hold_out(self, fraction: float, seed: int) -> tuple[GlueExamples, GlueExamples | None]:
        """Split into (examples to train on, held-out examples that choose the checkpoint).

        ``round(fraction * N)`` examples (at least 1 when ``fraction`` > 0) are drawn by a
        permutation seeded by ``seed`` (a stream of its own, not :meth:`subset`'s); both parts
        keep the original order and are disjoint. ``fraction`` 0 holds nothing out.

        Returns:
            (train, held_out); held_out is None for ``fraction`` 0.

        Raises:
            ValueError: ``fraction`` outside [0, 1), or so large that no training example is left.
        """
        if not 0 <= fraction < 1:
            raise ValueError(f"val_fraction must lie in [0, 1), got {fraction}")
        if fraction == 0:
            return self, None
        n_val = max(1, round(fraction * len(self)))
        if n_val >= len(self):
            raise ValueError(f"val_fraction {fraction} of {len(self)} {self.task.name} examples leaves none to train on")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed * 1_000_003 + 7)).tolist()
        held = sorted(order[:n_val])
        kept = sorted(order[n_val:])

        def part(indices: list[int], what: str) -> GlueExamples:
            return GlueExamples(self.task, self.split, [self.texts[i] for i in indices], [self.labels[i] for i in indices],
                                f"{self.source} ({what}: {len(indices)} of {len(self)}, seed {seed})")

        return part(kept, "trained on"), part(held, "held out")


def default_glue_dir() -> Path | None:
    """``<data dir>/glue`` when a data directory is configured (``$KRONLM_DATA_DIR``, see
    :func:`kronlm.utils.paths.data_dir`), else None.

    Raises:
        NotADirectoryError: ``$KRONLM_DATA_DIR`` is set but is not a folder.
    """
    root = data_dir()
    return None if root is None else root / "glue"


def split_path(task: GlueTask, split: str, data_dir: str | Path) -> Path:
    """``<data_dir>/<TASK>/<split>.tsv`` (``dev_matched.tsv`` for MNLI's dev).

    Raises:
        ValueError: a split other than "train" / "dev" (test labels are private).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; GLUE splits with labels are {', '.join(SPLITS)}")
    stem = task.dev_split if split == "dev" else "train"
    return Path(data_dir) / task.dir_name / f"{stem}.tsv"


def _parse_label(task: GlueTask, raw: str, where: str) -> int | float:
    raw = raw.strip()
    if task.labels is None:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{where}: {task.name} score {raw!r} is not a number") from None
        if not math.isfinite(value) or not 0.0 <= value <= 5.0:
            raise ValueError(f"{where}: {task.name} score {value} is outside [0, 5]")
        return value
    if raw not in task.labels:
        raise ValueError(f"{where}: label {raw!r} is not one of the {task.name} labels {list(task.labels)}")
    return task.labels.index(raw)


def read_glue_tsv(path: str | Path, task: GlueTask, split: str = "train") -> GlueExamples:
    """Read one GLUE-format TSV file.

    Blank lines are skipped. Fields are split on tabs with no quote handling (SST-2 and MRPC
    sentences contain bare quote characters). A UTF-8 byte-order mark (MRPC) is ignored.

    Args:
        path: the file.
        task: the task the file belongs to (fixes the columns and the label set).
        split: recorded in the result.

    Returns:
        :class:`GlueExamples`.

    Raises:
        FileNotFoundError: the file does not exist (names it).
        ValueError: a missing header column, a row with the wrong number of fields, an empty
            text, or a label outside the task's label set; the message names the file and the
            1-based line number. Also a file with no example.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {task.name} {split} split not found")
    lines = path.read_text(encoding="utf-8-sig").split("\n")
    examples = GlueExamples(task, split, source=str(path))
    first = 0
    if task.has_header:
        while first < len(lines) and not lines[first].strip():
            first += 1
        if first == len(lines):
            raise ValueError(f"{path}: empty file, expected a header row")
        header = lines[first].rstrip("\r").split("\t")
        missing = [c for c in (*task.text_columns, task.label_column) if c not in header]
        if missing:
            raise ValueError(f"{path}:{first + 1}: header has no column {missing} for {task.name} (header: {header})")
        text_idx = [header.index(c) for c in task.text_columns]
        label_idx = header.index(task.label_column)
        n_columns = len(header)
        first += 1
    else:
        text_idx, label_idx, n_columns = list(task.text_indices), int(task.label_column), task.n_columns
    for number, line in enumerate(lines[first:], start=first + 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        where = f"{path}:{number}"
        if len(fields) != n_columns:
            raise ValueError(f"{where}: malformed row, {len(fields)} tab-separated fields where {task.name} needs {n_columns}")
        texts = tuple(fields[i].strip() for i in text_idx)
        if any(not t for t in texts):
            raise ValueError(f"{where}: empty text field")
        examples.texts.append(texts)
        examples.labels.append(_parse_label(task, fields[label_idx], where))
    if not examples.labels:
        raise ValueError(f"{path}: no {task.name} example in the file")
    return examples


def load_glue_split(task: GlueTask, split: str, data_dir: str | Path | None = None) -> GlueExamples:
    """Read ``split`` ("train" or "dev") of ``task`` from GLUE-format TSV files.

    Args:
        data_dir: folder holding ``<TASK>/<split>.tsv``; None = :func:`default_glue_dir`.

    Raises:
        FileNotFoundError: no data folder, or the split file is missing (names the path).
        ValueError: see :func:`read_glue_tsv`.
    """
    if data_dir is None:
        data_dir = default_glue_dir()
        if data_dir is None:
            raise FileNotFoundError("no GLUE data folder: pass a data dir or use the Hugging Face glue dataset")
    return read_glue_tsv(split_path(task, split, data_dir), task, split)


def examples_from_rows(task: GlueTask, rows: Sequence[dict[str, Any]], split: str, source: str) -> GlueExamples:
    """Build examples from Hugging Face ``glue`` rows (dicts with the task's text columns and ``label``).

    Raises:
        ValueError: a row lacks a column, or has a label outside the task's label ids (names the
            row index); test rows carry label -1 and are refused.
    """
    out = GlueExamples(task, split, source=source)
    for i, row in enumerate(rows):
        missing = [c for c in (*task.hf_text_columns, "label") if c not in row]
        if missing:
            raise ValueError(f"{source} row {i}: missing columns {missing}")
        label = row["label"]
        if task.is_regression:
            label = float(label)
            if not math.isfinite(label) or not 0.0 <= label <= 5.0:
                raise ValueError(f"{source} row {i}: {task.name} score {label} is outside [0, 5]")
        else:
            if not isinstance(label, int) or not 0 <= label < task.num_labels:
                raise ValueError(f"{source} row {i}: label {label!r} is outside the {task.name} label ids 0..{task.num_labels - 1}")
        out.texts.append(tuple(str(row[c]) for c in task.hf_text_columns))
        out.labels.append(label)
    if not out.labels:
        raise ValueError(f"{source}: no example")
    return out


def load_hf_glue_split(task: GlueTask, split: str, dataset: str = "glue") -> GlueExamples:
    """Read ``split`` of ``task`` with ``datasets.load_dataset(dataset, task.name)``.

    "dev" maps to the hub's "validation" split ("validation_matched" for MNLI). Needs the hub or
    a local datasets cache.

    Raises:
        ValueError: unknown split, or bad rows (see :func:`examples_from_rows`).
        OSError / ConnectionError: the dataset cannot be loaded (from ``datasets``).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; GLUE splits with labels are {', '.join(SPLITS)}")

    hf_split = "train" if split == "train" else ("validation_matched" if task.name == "mnli" else "validation")
    rows = load_dataset(dataset, task.name, split=hf_split)
    return examples_from_rows(task, rows, split, f"hf:{dataset}/{task.name}/{hf_split}")


def encode_examples(examples: GlueExamples, tokenizer, max_length: int) -> list[dict[str, Any]]:
    """Tokenise every example (truncated to ``max_length`` tokens, special tokens included).

    Returns:
        one dict per example: "input_ids" (list of int), "token_type_ids" (when the tokenizer
        makes them), "labels" (int or float).

    Raises:
        ValueError: ``max_length`` < 2.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    columns = list(zip(*examples.texts))
    second = list(columns[1]) if len(columns) == 2 else None
    encoded = tokenizer(list(columns[0]), second, truncation=True, max_length=max_length)
    rows = []
    for i, label in enumerate(examples.labels):
        row = {"input_ids": encoded["input_ids"][i], "labels": label}
        if "token_type_ids" in encoded:
            row["token_type_ids"] = encoded["token_type_ids"][i]
        rows.append(row)
    return rows


def encoded_lengths(rows: list[dict[str, Any]]) -> list[int]:
    """Tokens of each encoded example (its ``input_ids``), for length-grouped batches."""
    return [len(r["input_ids"]) for r in rows]


class GlueBatchCollator:
    """Pads encoded examples on the right to the longest row of the batch.

    Args:
        pad_token_id: id written into padded positions (masked by ``attention_mask``).
        regression: labels become float32 (STS-B) instead of int64.

    Calling it on a list of :func:`encode_examples` rows returns a dict of tensors:
    "input_ids" (batch, seq) int64, "attention_mask" (batch, seq) int64 (1 = real token),
    "token_type_ids" (batch, seq) when the rows have them, "labels" (batch,).
    """

    def __init__(self, pad_token_id: int, regression: bool = False):
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token id; set tokenizer.pad_token first")
        self.pad_token_id = int(pad_token_id)
        self.regression = regression

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seq = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), seq), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), seq), dtype=torch.long)
        types = torch.zeros((len(rows), seq), dtype=torch.long) if "token_type_ids" in rows[0] else None
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            mask[i, :n] = 1
            if types is not None:
                types[i, :n] = torch.tensor(r["token_type_ids"])
        labels = torch.tensor([r["labels"] for r in rows], dtype=torch.float32 if self.regression else torch.long)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if types is not None:
            batch["token_type_ids"] = types
        return batch
