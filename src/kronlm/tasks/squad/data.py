"""SQuAD v1.1 / v2.0 examples from the official JSON files or the Hugging Face ``squad`` datasets.

The official format (Rajpurkar et al. 2016, "SQuAD: 100,000+ Questions for Machine Comprehension
of Text"; Rajpurkar et al. 2018, "Know What You Don't Know: Unanswerable Questions for SQuAD") is::

    {"version": "1.1" | "v2.0",
     "data": [{"title": str,
               "paragraphs": [{"context": str,
                               "qas": [{"id": str, "question": str,
                                        "answers": [{"text": str, "answer_start": int}, ...],
                                        "is_impossible": bool (v2.0 only)}]}]}]}

Every answer is checked against its context: ``context[answer_start:answer_start + len(text)]``
must equal ``text`` exactly (character offsets, Python ``str`` indexing). Question ids must be
unique. A v2.0 file (a question with ``is_impossible`` true, or a version string "v2.0") is refused
when v1.1 is asked, because v1.1 training and metrics have no notion of an unanswerable question.
Every problem raises a one-line ``ValueError`` that names the file (or dataset) and the question.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import load_dataset

from kronlm.utils import paths
from kronlm.utils.files import read_json

__all__ = [
    "HF_SQUAD_DATASETS",
    "SQUAD_VERSIONS",
    "SquadExample",
    "default_squad_dir",
    "examples_from_hf_rows",
    "load_hf_squad",
    "load_squad_split",
    "read_squad_json",
]

SQUAD_VERSIONS = ("1.1", "2.0")
# Hugging Face dataset name -> SQuAD version of its rows.
HF_SQUAD_DATASETS = {"squad": "1.1", "squad_v2": "2.0", "rajpurkar/squad": "1.1", "rajpurkar/squad_v2": "2.0"}
LOCAL_SQUAD_DIR = "squad-v1.1-dev-split"


@dataclass(frozen=True)
class SquadExample:
    """One question about one paragraph.

    Attributes:
        id: the question id (unique within a split).
        title: the Wikipedia article title.
        context: the paragraph (characters; answers index into it).
        question: the question text, as stored (leading spaces are stripped only when tokenising).
        answer_texts: the gold answer strings; several for dev sets (one per annotator, repeats
            kept as in the file), empty for an unanswerable v2.0 question.
        answer_starts: character offset of each answer in ``context`` (same length as
            ``answer_texts``); ``context[s:s + len(t)] == t`` holds for every pair.
        is_impossible: True for a v2.0 question without an answer in the paragraph.
    """

    id: str
    title: str
    context: str
    question: str
    answer_texts: tuple[str, ...]
    answer_starts: tuple[int, ...]
    is_impossible: bool = False

    @property
    def answers(self) -> dict[str, list]:
        """The answers in the Hugging Face layout: ``{"text": [...], "answer_start": [...]}``."""
        return {"text": list(self.answer_texts), "answer_start": list(self.answer_starts)}


def _check_version(version: str) -> str:
    if version not in SQUAD_VERSIONS:
        raise ValueError(f"unknown SQuAD version {version!r}; expected one of {', '.join(SQUAD_VERSIONS)}")
    return version


def _require(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise ValueError(f"{where}: missing key {key!r}")
    value = obj[key]
    # bool is an int subclass; an answer_start of true is malformed, not offset 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{where}: key {key!r} must be {names}, got {type(value).__name__}")
    return value


def _check_answer(qid: str, context: str, text: str, start: int, where: str) -> None:
    span = context[start:start + len(text)] if 0 <= start <= len(context) else ""
    if not text or span != text:
        raise ValueError(
            f"{where}: question {qid!r}: answer {text!r} does not match the context at character offset {start} "
            f"(context there: {span!r}, context length {len(context)})"
        )


def _make_example(
    qid: str, title: str, context: str, question: str, texts: Sequence[str], starts: Sequence[int],
    is_impossible: bool, version: str, where: str,
) -> SquadExample:
    if is_impossible and version == "1.1":
        raise ValueError(f"{where}: question {qid!r} is unanswerable (is_impossible); this is SQuAD v2.0 data, v1.1 was asked")
    if is_impossible and texts:
        raise ValueError(f"{where}: question {qid!r} is marked impossible but has {len(texts)} answers")
    if not is_impossible and not texts:
        if version == "1.1":
            raise ValueError(f"{where}: question {qid!r} has no answer; an unanswerable question is SQuAD v2.0, not v1.1")
        raise ValueError(f"{where}: question {qid!r} has no answer but is not marked is_impossible")
    for text, start in zip(texts, starts):
        _check_answer(qid, context, text, start, where)
    return SquadExample(qid, title, context, question, tuple(texts), tuple(int(s) for s in starts), bool(is_impossible))


def _add_unique(seen: dict[str, str], qid: str, where: str, source: str) -> None:
    if qid in seen:
        raise ValueError(f"{source}: duplicate question id {qid!r} at {where} (first at {seen[qid]})")
    seen[qid] = where


def read_squad_json(path: str | Path, version: str = "1.1") -> list[SquadExample]:
    """Read an official-format SQuAD JSON file into examples, in file order.

    Args:
        path: the file (e.g. ``train-v1.1.json``, ``dev-v2.0.json``).
        version: "1.1" or "2.0". A v1.1 file is accepted as "2.0" (every question answerable);
            a v2.0 file is refused as "1.1".

    Returns:
        one :class:`SquadExample` per question.

    Raises:
        FileNotFoundError: the file does not exist (names it).
        ValueError: not valid JSON (names file, line, column); a missing or mistyped key (names the
            file, the JSON path such as ``data[3].paragraphs[0].qas[5]`` and the key); an answer
            that does not match its context at its offset (names the question id, the offset and
            both strings); v2.0 content when "1.1" is asked (names the file and a question id);
            an answerable question without answers, or an impossible one with answers; a
            duplicate question id; a file without questions.
    """
    version = _check_version(version)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: SQuAD file not found")
    root = read_json(path)
    articles = _require(root, "data", list, str(path))
    file_version = root.get("version") if isinstance(root, Mapping) else None
    file_is_v2 = isinstance(file_version, str) and file_version.lstrip("vV").startswith("2")
    examples: list[SquadExample] = []
    seen: dict[str, str] = {}
    for a, article in enumerate(articles):
        where_a = f"{path}: data[{a}]"
        title = _require(article, "title", str, where_a)
        for p, paragraph in enumerate(_require(article, "paragraphs", list, where_a)):
            where_p = f"{where_a}.paragraphs[{p}]"
            context = _require(paragraph, "context", str, where_p)
            if not context:
                raise ValueError(f"{where_p}: empty context")
            for q, qa in enumerate(_require(paragraph, "qas", list, where_p)):
                where_q = f"{where_p}.qas[{q}]"
                qid = _require(qa, "id", str, where_q)
                where_loc = where_q
                where_q = f"{where_q} (id {qid!r})"
                if version == "1.1" and file_is_v2:
                    raise ValueError(
                        f"{path}: version {file_version!r} is SQuAD v2.0 data (first question id {qid!r}); v1.1 was asked"
                    )
                question = _require(qa, "question", str, where_q)
                impossible = qa.get("is_impossible", False)
                if not isinstance(impossible, bool):
                    raise ValueError(f"{where_q}: key 'is_impossible' must be bool, got {type(impossible).__name__}")
                texts, starts = [], []
                for n, answer in enumerate(_require(qa, "answers", list, where_q)):
                    where_n = f"{where_q}.answers[{n}]"
                    texts.append(_require(answer, "text", str, where_n))
                    starts.append(_require(answer, "answer_start", int, where_n))
                _add_unique(seen, qid, where_q, str(path))
                examples.append(_make_example(qid, title, context, question, texts, starts, impossible, version, where_loc))
    if not examples:
        raise ValueError(f"{path}: no question in the file")
    return examples


def examples_from_hf_rows(rows: Iterable[Mapping[str, Any]], version: str, source: str) -> list[SquadExample]:
    """Build examples from Hugging Face ``squad`` / ``squad_v2`` rows.

    A row is ``{"id", "title", "context", "question", "answers": {"text": [...], "answer_start": [...]}}``;
    an unanswerable v2.0 row has empty answer lists (``is_impossible`` is derived from that).

    Args:
        rows: the rows (a ``datasets.Dataset`` or a list of dicts).
        version: "1.1" (every row must have an answer) or "2.0".
        source: named in errors (e.g. "hf:squad/validation").

    Raises:
        ValueError: a missing or mistyped column (names the row index and the column); text and
            start lists of different lengths; an answer that does not match its context; an
            empty answer list when "1.1" is asked; a duplicate id; no rows.
    """
    version = _check_version(version)
    examples: list[SquadExample] = []
    seen: dict[str, str] = {}
    for i, row in enumerate(rows):
        where_loc = f"{source} row {i}"
        qid = _require(row, "id", str, where_loc)
        where = f"{where_loc} (id {qid!r})"
        title = _require(row, "title", str, where)
        context = _require(row, "context", str, where)
        question = _require(row, "question", str, where)
        answers = _require(row, "answers", Mapping, where)
        texts = _require(answers, "text", (list, tuple), f"{where} answers")
        starts = _require(answers, "answer_start", (list, tuple), f"{where} answers")
        if len(texts) != len(starts):
            raise ValueError(f"{where}: {len(texts)} answer texts but {len(starts)} answer starts")
        for text, start in zip(texts, starts):
            if not isinstance(text, str) or not isinstance(start, int) or isinstance(start, bool):
                raise ValueError(f"{where}: answer ({text!r}, {start!r}) must be (str, int)")
        if not context:
            raise ValueError(f"{where}: empty context")
        _add_unique(seen, qid, where, source)
        examples.append(_make_example(qid, title, context, question, texts, starts, not texts, version, where_loc))
    if not examples:
        raise ValueError(f"{source}: no example")
    return examples


def load_hf_squad(name: str, split: str) -> list[SquadExample]:
    """Read ``split`` of the Hugging Face dataset ``name`` ("squad" or "squad_v2") with ``datasets.load_dataset``.

    Args:
        name: "squad" (v1.1), "squad_v2" (v2.0), or their "rajpurkar/..." hub ids.
        split: a split of that dataset ("train", "validation", or a slice such as "train[:1%]").

    Raises:
        ValueError: an unknown dataset name; bad rows (see :func:`examples_from_hf_rows`).
        ConnectionError: the dataset cannot be loaded (offline and not cached, unknown split...);
            one line naming the dataset, the split and the cause.
    """
    if name not in HF_SQUAD_DATASETS:
        raise ValueError(f"unknown SQuAD dataset {name!r}; expected one of {', '.join(HF_SQUAD_DATASETS)}")
    try:
        rows = load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError...)
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConnectionError(
            f"cannot load Hugging Face dataset {name!r} split {split!r}: {type(exc).__name__}: {cause}"
        ) from None
    return examples_from_hf_rows(rows, HF_SQUAD_DATASETS[name], f"hf:{name}/{split}")


def default_squad_dir() -> Path | None:
    """``<data dir>/squad-v1.1-dev-split`` when a local data folder is configured, else None.

    The data folder is :func:`kronlm.utils.paths.data_dir` (``$KRONLM_DATA_DIR``). The local copy
    is the official v1.1 dev set split by article: ``train.json`` (24 articles, 5,696 questions)
    and ``dev.json`` (8 articles, 1,539 questions); scores on it are not comparable with
    published SQuAD dev figures.

    Raises:
        NotADirectoryError: ``$KRONLM_DATA_DIR`` names no folder.
    """
    root = paths.data_dir()
    return None if root is None else root / LOCAL_SQUAD_DIR


def load_squad_split(split: str, data_dir: str | Path | None = None, version: str = "1.1") -> list[SquadExample]:
    """Read ``<data_dir>/<split>.json`` (official format).

    Args:
        split: the file stem ("train" or "dev" for the local split).
        data_dir: the folder holding the file (e.g. ``.../squad-v1.1-dev-split``); None =
            :func:`default_squad_dir`.
        version: see :func:`read_squad_json`.

    Raises:
        FileNotFoundError: no folder given or configured, or no such file (names the path).
        ValueError: see :func:`read_squad_json`.
    """
    if data_dir is None:
        data_dir = default_squad_dir()
        if data_dir is None:
            raise FileNotFoundError(
                f"no SQuAD folder: pass data_dir, set ${paths.DATA_DIR_ENV} (holding {LOCAL_SQUAD_DIR}/) or use load_hf_squad"
            )
    return read_squad_json(Path(data_dir) / f"{split}.json", version)
