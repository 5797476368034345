"""One resolver of data sources for evaluation, calibration and training.

:func:`resolve_source` turns what a user typed (``--data``) into a :class:`DataSource`: a local
file in one of :data:`FILE_FORMATS`, a local dataset folder, an alias from :data:`TEXT_ALIASES`
(WikiText), or a Hugging Face hub dataset. WikiText-2 raw is read from a local copy under the
data directory (:func:`data_dir`: the caller's ``data_dir``, else ``$KRONLM_DATA_DIR``) when one
exists, so machines without a hub get the same text as ``datasets.load_dataset`` gives users who
are online. :func:`iter_records` reads a source record by record (a JSON Lines record, a CSV row,
a dataset row); :func:`kronlm.data.text.load_text` joins the records into one evaluation text and
:func:`kronlm.data.blocks.build_blocks` tokenises each record as one training document.
:func:`source_fingerprint` identifies a source's content for caches.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from kronlm.utils import paths
from kronlm.utils.files import (
    file_sha256,
    parse_json,
    special_file_kind,
    utf8_error_message,
)

# Re-exported: the one place that decides which data directory is used.
data_dir = paths.data_dir
DATA_DIR_ENV = paths.DATA_DIR_ENV

# The canonical hub id of WikiText (the bare name "wikitext" redirects to it).
WIKITEXT_DATASET = "Salesforce/wikitext"

# alias -> WikiText configuration. The "-v1" configurations are the tokenised (non-raw) text with
# <unk> tokens that the Krony-PT protocol evaluates on; the "-raw-v1" ones are the untouched text.
TEXT_ALIASES: dict[str, str] = {
    "wikitext2": "wikitext-2-raw-v1",
    "wikitext-2-raw-v1": "wikitext-2-raw-v1",
    "wikitext103": "wikitext-103-raw-v1",
    "wikitext-103-raw-v1": "wikitext-103-raw-v1",
    "wikitext2-v1": "wikitext-2-v1",
    "wikitext-2-v1": "wikitext-2-v1",
    "wikitext103-v1": "wikitext-103-v1",
    "wikitext-103-v1": "wikitext-103-v1",
}

# File suffix -> format. A ".json" file is read as JSON Lines; one JSON document spread over
# several lines (a JSON array, SQuAD's nested format) is refused with the line that fails.
FILE_FORMATS: dict[str, str] = {
    ".txt": "text",
    ".raw": "text",
    ".tokens": "text",
    ".text": "text",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
_FORMAT_NAMES = {"text": "text file", "jsonl": "JSON Lines file", "csv": "CSV file", "tsv": "TSV file",
                 "parquet": "Parquet file"}

# How records are joined into one evaluation text: the convention of the Hugging Face perplexity
# guide ("Perplexity of fixed-length models", transformers docs), "\n\n".join(ds[split]["text"]).
RECORD_SEPARATOR = "\n\n"
_JOINED = 'joined with "\\n\\n"'

# Local copies of WikiText-2 raw under the data directory: split -> candidates (file, kind), first
# found wins. "joined" files hold the "\n\n"-joined split; "raw-lines" files are the original line
# files the hub dataset was built from, one dataset row per line.
_LOCAL_WIKITEXT2_RAW: dict[str, tuple[tuple[str, str], ...]] = {
    "train": (("wikitext-2-raw/wiki.train.raw", "raw-lines"),),
    "validation": (("wikitext-2-raw/wiki.valid.raw", "raw-lines"),),
    "test": (("wikitext-2-raw/wiki.test.hf_joined.txt", "joined"), ("wikitext-2-raw/wiki.test.raw", "raw-lines")),
}

PATH_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")
# The longest JSON Lines record read: a longer line is refused (reading and tokenising it whole
# would take minutes even when a few tokens are asked for).
MAX_RECORD_BYTES = 32 << 20
_ENV_TRUE = {"1", "ON", "YES", "TRUE"}
_READ_BATCH = 1000


@dataclass(frozen=True)
class DataSource:
    """Where a text or a corpus comes from, decided by :func:`resolve_source` before any reading.

    Attributes:
        spec: what the caller asked for (``"wikitext2"``, ``"corpus.jsonl"``).
        kind: ``"file"`` (a local data file), ``"joined"`` (a local file holding a WikiText split's
            rows joined with ``"\\n\\n"``), ``"raw-lines"`` (a local WikiText line file, one row per
            line), ``"dataset-folder"`` (a local folder ``datasets.load_dataset`` reads) or
            ``"hub"`` (a Hugging Face hub dataset).
        path_or_dataset: the local path (file or folder) or the hub dataset id.
        format: ``"text"``, ``"jsonl"``, ``"csv"``, ``"tsv"``, ``"parquet"`` for files,
            ``"wikitext"`` for the local WikiText copies, ``"dataset"`` for folders and the hub.
        label: one line naming the source, its format, split and field, e.g. ``"JSON Lines file
            /d/c.jsonl (field 'text')"`` or ``"WikiText-2 raw validation split (local copy
            /d/wiki.valid.raw; the train split is not available offline)"``.
        description: ``label`` plus how the records are joined into one evaluation text (what
            :func:`kronlm.data.text.load_text` returns); the command line prints it next to every
            perplexity.
        config_name: the dataset configuration (``"wikitext-2-raw-v1"``), or None.
        split: the split read (the one actually used, e.g. ``"validation"`` when a local
            validation copy stands in for the train split), or None for a data file.
        text_field: the JSON field / column holding the text, or None for plain text.
    """

    spec: str
    kind: str
    path_or_dataset: str
    format: str
    label: str
    description: str
    config_name: str | None = None
    split: str | None = None
    text_field: str | None = None


def hub_offline() -> bool:
    """True when the Hugging Face hub must not be used: ``HF_HUB_OFFLINE`` or
    ``HF_DATASETS_OFFLINE`` is set to 1/ON/YES/TRUE, now or when ``datasets`` was imported."""
    env = any(os.environ.get(var, "").upper() in _ENV_TRUE for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return env or bool(datasets.config.HF_HUB_OFFLINE)


def looks_like_path(spec: str) -> bool:
    """True when ``spec`` can only mean a local path: it starts with ``./``, ``../``, ``/``, ``~``
    (or their Windows forms) or ends with a suffix of :data:`FILE_FORMATS`."""
    return spec.startswith(PATH_PREFIXES) or Path(spec).suffix.lower() in FILE_FORMATS


def _joined(label: str, what: str = "rows") -> str:
    return f"{label}; {what} {_JOINED}"


def _file_source(spec: str, path: Path, name: str | None, text_field: str) -> DataSource:
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(FILE_FORMATS)
        raise ValueError(f"{path}: unrecognised data file format {path.suffix or '(no suffix)'!r}; kronlm reads {known} files")
    if name is not None:
        raise ValueError(f"{path}: a configuration name ({name!r}) applies to datasets, not to a {_FORMAT_NAMES[fmt]}")
    if fmt == "text":
        label = f"text file {path}"
        return DataSource(spec, "file", str(path), fmt, label, f"{label} (plain text, read as one text)")
    if fmt == "jsonl":
        label = f"JSON Lines file {path} (field {text_field!r})"
        return DataSource(spec, "file", str(path), fmt, label, _joined(label, "records"), text_field=text_field)
    label = f"{_FORMAT_NAMES[fmt]} {path} (column {text_field!r})"
    return DataSource(spec, "file", str(path), fmt, label, _joined(label), text_field=text_field)


def _local_wikitext2(spec: str, split: str, folder: Path | None, text_field: str) -> DataSource | None:
    """The local copy of a WikiText-2 raw split under ``folder``, or None to use the hub."""
    if folder is None:
        return None
    found = [(folder / rel, kind, split, "") for rel, kind in _LOCAL_WIKITEXT2_RAW.get(split, ())]
    if split == "train" and hub_offline():
        # Recovery training on machines without a hub: the local validation split is the only
        # WikiText-2 training text there is, and the label says so.
        found += [(folder / rel, kind, "validation", "; the train split is not available offline")
                  for rel, kind in _LOCAL_WIKITEXT2_RAW["validation"]]
    for path, kind, used_split, note in found:
        if path.is_file():
            if text_field != "text":
                raise ValueError(f"WikiText has only the field 'text', not {text_field!r}")
            label = f"WikiText-2 raw {used_split} split (local copy {path}{note})"
            return DataSource(spec, kind, str(path), "wikitext", label, _joined(label),
                              "wikitext-2-raw-v1", used_split, "text")
    return None


def resolve_source(
    spec: str | os.PathLike,
    *,
    split: str,
    name: str | None = None,
    data_dir: str | os.PathLike | None = None,
    text_field: str = "text",
) -> DataSource:
    """Decide where the data named by ``spec`` comes from, without reading it.

    In this order:

    1. an existing local file: its format comes from its suffix (:data:`FILE_FORMATS`: plain
       text ``.txt .raw .tokens .text``, JSON Lines ``.jsonl .json``, ``.csv``, ``.tsv``,
       ``.parquet``);
    2. an existing local folder: a dataset folder for ``datasets.load_dataset(folder, name)``;
    3. a string that can only be a path (:func:`looks_like_path`) but does not exist: an error;
    4. an alias from :data:`TEXT_ALIASES` (``wikitext2``, ``wikitext103``, ``wikitext2-v1``,
       ``wikitext-103-v1``, ...) or ``"wikitext"`` / ``"Salesforce/wikitext"`` with ``name``:
       WikiText on the hub, except WikiText-2 raw (``wikitext2``, ``wikitext-2-raw-v1``), which
       is read from the data directory when it holds the split:
       ``wikitext-2-raw/wiki.test.hf_joined.txt`` (else ``wiki.test.raw``) for ``test``,
       ``wiki.valid.raw`` for ``validation``, ``wiki.train.raw`` for ``train``. When no local
       train copy exists, the hub is offline (:func:`hub_offline`) and the local validation copy
       exists, ``train`` resolves to the local validation split and the label says so;
    5. anything else: a hub dataset id with configuration ``name``.

    Args:
        spec: a path, an alias or a hub dataset id.
        split: the split (``"train"``, ``"validation"``, ``"test"``); ignored for data files.
        name: the dataset configuration; an alias fixes its own and refuses another.
        data_dir: the folder of local copies of public data; None means ``$KRONLM_DATA_DIR``
            (see :func:`data_dir`), and without that no local copy is used.
        text_field: the JSON Lines field, CSV/TSV/Parquet column or dataset column holding the
            text (not used by plain text files).

    Returns:
        a :class:`DataSource`.

    Raises:
        FileNotFoundError: ``spec`` looks like a path but nothing is there.
        NotADirectoryError: ``data_dir`` (or ``$KRONLM_DATA_DIR``) is not a folder.
        ValueError: a device, FIFO or socket (named: reading one could block or never end); an
            unrecognised file suffix; ``name`` given for a data file; an alias with a
            different ``name``; an empty ``text_field``; a field other than ``text`` for WikiText.
    """
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field must be a non-empty column name, got {text_field!r}")
    spec_str = os.fspath(spec)
    path = Path(spec_str).expanduser()
    special = special_file_kind(path)
    if special is not None:
        raise ValueError(f"{path}: is {special}, not a regular file; kronlm reads data from regular files and folders")
    if path.is_file():
        return _file_source(spec_str, path, name, text_field)
    if path.is_dir():
        label = f"dataset folder {path}" + (f" (config {name!r})" if name else "") + f", {split} split, column {text_field!r}"
        return DataSource(spec_str, "dataset-folder", str(path), "dataset", label, _joined(label), name, split, text_field)
    if looks_like_path(spec_str):
        what = _FORMAT_NAMES.get(FILE_FORMATS.get(path.suffix.lower(), ""), "data file or folder")
        raise FileNotFoundError(f"{what} {spec_str} not found")

    dataset, config_name = spec_str, name
    alias = TEXT_ALIASES.get(spec_str.lower())
    if alias is not None:
        if name is not None and name != alias:
            raise ValueError(f"data source {spec_str!r} is WikiText config {alias!r} but name={name!r} was given")
        dataset, config_name = WIKITEXT_DATASET, alias
    elif spec_str in ("wikitext", WIKITEXT_DATASET):
        dataset = WIKITEXT_DATASET
    if dataset == WIKITEXT_DATASET and config_name == "wikitext-2-raw-v1":
        local = _local_wikitext2(spec_str, split, paths.data_dir(data_dir), text_field)
        if local is not None:
            return local
    label = f"hub dataset {dataset!r}" + (f" (config {config_name!r})" if config_name else "")
    label += f", {split} split, column {text_field!r}"
    return DataSource(spec_str, "hub", dataset, "dataset", label, _joined(label), config_name, split, text_field)


def read_text_file(path: str | os.PathLike, max_chars: int | None = None) -> str:
    """The text of a UTF-8 file, with ``\\r\\n`` and ``\\r`` line ends read as ``\\n``.

    Universal newlines on purpose: a file saved on Windows gives the same text and tokens as on
    Linux. The local ``wiki.test.hf_joined.txt`` is stored with ``\\r\\n`` while the hub text has
    ``\\n``; read this way it gives GPT-2's documented 287,644 tokens (303,606 with the ``\\r``).

    Args:
        path: the file.
        max_chars: read at most this many characters (the beginning of the file); None reads all.

    Raises:
        ValueError: the file is not valid UTF-8 (names the file and the byte offset).
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read() if max_chars is None else fh.read(max_chars)
    except UnicodeDecodeError as exc:
        raise ValueError(f"text file {path} is not valid UTF-8 (byte {exc.start})") from None


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _jsonl_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    # Lines read with a bound: a record longer than MAX_RECORD_BYTES is refused before it is held whole.
    with open(path, "rb") as fh:
        lineno = 0
        while raw := fh.readline(MAX_RECORD_BYTES + 1):
            lineno += 1
            if len(raw) > MAX_RECORD_BYTES and not raw.endswith(b"\n"):
                raise ValueError(f"{path}: line {lineno} is longer than {MAX_RECORD_BYTES >> 20} MiB; kronlm reads JSON Lines "
                                 "records of up to that size (split the document into several records)")
            yield lineno, raw


def _iter_jsonl(path: Path, field: str) -> Iterator[str]:
    # Binary lines: only b"\n" ends a record (a text-mode reader would also split inside JSON
    # strings at "\r"), and a decoding error can name its line.
    for lineno, raw in _jsonl_lines(path):
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: line {lineno} is not valid UTF-8 (byte {exc.start} of the line)") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = "; a .json file is read as JSON Lines, one JSON object per line" if path.suffix.lower() == ".json" else ""
            raise ValueError(f"{path}: line {lineno} is not valid JSON ({exc.msg} at column {exc.colno}){hint}") from None
        except RecursionError:
            parse_json(line, f"{path}: line {lineno}")  # raises the one-line "nested too deeply" error
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {lineno} is a JSON {_json_type(record)}, not an object with a {field!r} field")
        if field not in record:
            raise ValueError(f"{path}: line {lineno} has no field {field!r} (fields: {', '.join(record) or 'none'})")
        text = record[field]
        if not isinstance(text, str):
            raise ValueError(f"{path}: line {lineno} field {field!r} is a JSON {_json_type(text)}, not a string")
        yield text


def _iter_delimited(path: Path, field: str, fmt: str) -> Iterator[str]:
    # CSV: RFC 4180 quoting. TSV: no quoting at all, the convention of the GLUE files (their
    # sentences hold unbalanced quotes) and of Hugging Face's GLUE loader.
    dialect: dict[str, Any] = {"delimiter": ","} if fmt == "csv" else {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, **dialect)
        try:
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path}: empty {fmt.upper()} file, no header line")
            if field not in header:
                raise ValueError(f"{path}: line 1 (the header) has no column {field!r} (columns: {', '.join(header)})")
            column = header.index(field)
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise ValueError(f"{path}: line {reader.line_num} has {len(row)} fields but the header has {len(header)}")
                yield row[column]
        except UnicodeDecodeError:
            raise ValueError(utf8_error_message(path, what=f"{fmt.upper()} file")) from None
        except csv.Error as exc:
            raise ValueError(f"{path}: line {reader.line_num}: {exc}") from None


def _iter_raw_lines(path: Path) -> Iterator[str]:
    """The hub rows of a WikiText ``wiki.*.raw`` line file.

    The hub dataset has one row per line of the original file with its trailing newline kept, and
    rows that are only whitespace stored as ``""``. Rebuilt this way, ``wiki.test.raw`` gives
    exactly the text of ``wiki.test.hf_joined.txt`` (the real ``load_dataset`` join, once its
    ``\\r\\n`` line ends are read as ``\\n``), so the validation split rebuilt from
    ``wiki.valid.raw`` is taken to equal the hub's validation rows.
    """
    # Text mode on purpose: the hub rows were made by iterating over the file with Python's
    # universal newlines, which also end a line at "\r".
    lineno = 0
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                yield line if line.strip() else ""
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not valid UTF-8 after line {lineno} ({exc.reason})") from None


def split_joined_rows(text: str, origin: str = "text") -> list[str]:
    """Recover the rows of a WikiText split from its ``"\\n\\n".join(rows)``.

    Every WikiText row is either ``""`` or one line ending in ``"\\n"`` (the last row may lack
    it), so the join parses back unambiguously: ``"\\n\\n".join(split_joined_rows(t)) == t``.

    Args:
        text: the joined text (``\\n`` line ends).
        origin: what to name in an error (the file).

    Raises:
        ValueError: ``text`` is not such a join (names ``origin`` and the line).
    """
    rows: list[str] = []
    pos, end = 0, len(text)
    while True:
        if pos == end or text[pos] == "\n":
            row = ""
        else:
            newline = text.find("\n", pos)
            row = text[pos:] if newline < 0 else text[pos : newline + 1]
        rows.append(row)
        pos += len(row)
        if pos == end:
            return rows
        if not text.startswith(RECORD_SEPARATOR, pos):
            line = text.count("\n", 0, pos) + 1
            raise ValueError(f"{origin}: line {line} is not where a \"\\n\\n\"-joined WikiText split has a row separator")
        pos += len(RECORD_SEPARATOR)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _load_error(source: DataSource, exc: BaseException) -> ValueError:
    if source.kind == "hub":
        why = "no local copy exists and the hub could not be reached or refused it"
        if source.config_name == "wikitext-2-raw-v1":
            why += f" (local copies are looked up under data_dir / ${DATA_DIR_ENV}"
            if source.split == "train":
                why += "; without a hub, set HF_HUB_OFFLINE=1 to train on the local validation copy instead"
            why += ")"
    else:
        why = "datasets could not load it"
    return ValueError(f"could not load {source.spec!r} ({source.label}): {why} ({_first_line(exc)})")


def open_dataset(source: DataSource, *, streaming: bool = False) -> datasets.Dataset | datasets.IterableDataset:
    """Load a dataset-backed source (hub, dataset folder, Parquet file) with ``datasets``.

    ``datasets.load_dataset(id_or_folder, config_name, split=split, streaming=streaming)``; a
    Parquet file is ``load_dataset("parquet", data_files=path, split="train")``.

    Raises:
        ValueError: ``source`` is not dataset-backed; ``datasets`` cannot load it (one line naming
            the source and split; for the hub, that no local copy exists and the hub could not be
            reached).
    """
    try:
        if source.format == "parquet":
            return datasets.load_dataset("parquet", data_files=source.path_or_dataset, split="train", streaming=streaming)
        if source.kind in ("hub", "dataset-folder"):
            return datasets.load_dataset(source.path_or_dataset, source.config_name, split=source.split, streaming=streaming)
    except Exception as exc:  # datasets raises ConnectionError, DatasetNotFoundError, ValueError, ...
        raise _load_error(source, exc) from exc
    raise ValueError(f"{source.label} is not read with datasets")


def _iter_dataset(source: DataSource, streaming: bool) -> Iterator[str]:
    dataset = open_dataset(source, streaming=streaming)
    field = source.text_field
    columns = dataset.column_names
    if columns is not None and field not in columns:
        raise ValueError(f"{source.label}: no column {field!r} (columns: {', '.join(columns)})")
    index = 0
    for batch in dataset.iter(batch_size=_READ_BATCH):
        if field not in batch:
            raise ValueError(f"{source.label}: no column {field!r} (columns: {', '.join(batch)})")
        for text in batch[field]:
            if not isinstance(text, str):
                raise ValueError(f"{source.label}: row {index} holds {type(text).__name__}, not text")
            yield text
            index += 1


def iter_records(source: DataSource, *, streaming: bool = False) -> Iterator[str]:
    """Yield the text of each record of ``source``, unchanged and in order, read lazily.

    A record is: the whole file for plain text; a line's ``text_field`` for JSON Lines (blank
    lines skipped); a row's ``text_field`` column for CSV/TSV (with a header line; blank lines
    skipped), Parquet and datasets; a row (a line, ``""`` for a whitespace-only line) for a
    WikiText line file; a row recovered by :func:`split_joined_rows` for a joined WikiText file.

    Args:
        source: from :func:`resolve_source`.
        streaming: read hub datasets with ``streaming=True`` (rows are fetched as they are read).

    Raises:
        ValueError: one line naming the file and line (or the dataset and row) for: text that is
            not UTF-8, a JSON Lines line that is not a JSON object or lacks the field or whose
            field is not a string, a CSV/TSV file without the column or with a row of the wrong
            width, a dataset without the column or one that cannot be loaded.
    """
    path = Path(source.path_or_dataset)
    if source.kind == "file":
        if source.format == "text":
            yield read_text_file(path)
        elif source.format == "jsonl":
            yield from _iter_jsonl(path, source.text_field)
        elif source.format in ("csv", "tsv"):
            yield from _iter_delimited(path, source.text_field, source.format)
        else:
            yield from _iter_dataset(source, streaming)
    elif source.kind == "raw-lines":
        yield from _iter_raw_lines(path)
    elif source.kind == "joined":
        yield from split_joined_rows(read_text_file(path), str(path))
    else:
        yield from _iter_dataset(source, streaming)


def _folder_fingerprint(folder: Path) -> list[list[str]]:
    return [[p.relative_to(folder).as_posix(), file_sha256(p)] for p in sorted(folder.rglob("*")) if p.is_file()]


def source_fingerprint(source: DataSource) -> dict[str, Any]:
    """What identifies a source's content, for cache keys.

    Local files: the SHA-256 of their bytes (so a file rewritten with the same size and mtime is
    a different source, and a moved file the same one), with the format and field. Dataset
    folders: the SHA-256 of every file under them. Hub datasets: the ``datasets`` builder's
    ``hash`` and ``config_id``, which follow the hub revision of the data files, with the split
    and column (``datasets``' own fingerprint of local files uses their mtime, which is why local
    sources are hashed here instead).

    Returns:
        a JSON-serialisable dict.

    Raises:
        ValueError: a hub dataset whose builder cannot be loaded (as :func:`open_dataset`).
    """
    base: dict[str, Any] = {"kind": source.kind, "format": source.format, "text_field": source.text_field}
    if source.kind == "hub":
        try:
            builder = datasets.load_dataset_builder(source.path_or_dataset, source.config_name)
        except Exception as exc:  # same zoo of errors as load_dataset
            raise _load_error(source, exc) from exc
        return {**base, "dataset": source.path_or_dataset, "config_id": builder.config_id,
                "builder_hash": builder.hash, "split": source.split}
    path = Path(source.path_or_dataset)
    if source.kind == "dataset-folder":
        digest = hashlib.sha256(json.dumps(_folder_fingerprint(path)).encode()).hexdigest()
        return {**base, "files_sha256": digest, "config_name": source.config_name, "split": source.split}
    return {**base, "sha256": file_sha256(path)}


__all__ = [
    "DATA_DIR_ENV",
    "FILE_FORMATS",
    "PATH_PREFIXES",
    "RECORD_SEPARATOR",
    "TEXT_ALIASES",
    "WIKITEXT_DATASET",
    "MAX_RECORD_BYTES",
    "DataSource",
    "data_dir",
    "hub_offline",
    "iter_records",
    "looks_like_path",
    "open_dataset",
    "read_text_file",
    "resolve_source",
    "source_fingerprint",
    "split_joined_rows",
]
