"""Plain text for language-model evaluation and recovery: local files, WikiText, any hub dataset.

The text of a dataset split is ``"\\n\\n".join(ds[split][text_field])``, the convention of the Hugging
Face perplexity guide ("Perplexity of fixed-length models", transformers docs) that SPEC §5 follows.
WikiText-2 raw is read from the local copy under :func:`kronlm.utils.paths.shared_data_dir` when
there is one (machines without a hub), otherwise every source goes through ``datasets.load_dataset``,
which is what users who are online get.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kronlm.utils.paths import shared_data_dir

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

# Local copies of WikiText-2 raw, relative to shared_data_dir(): split -> (file, how it is read).
# "joined" files already hold the "\n\n"-joined text; "raw" files are the original line files that
# the hub dataset was built from, one dataset row per line (see _join_raw_lines).
_LOCAL_WIKITEXT2_RAW = {
    "test": ("wikitext-2-raw/wiki.test.hf_joined.txt", "joined"),
    "validation": ("wikitext-2-raw/wiki.valid.raw", "raw"),
}

_PATH_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")
_TEXT_SUFFIXES = (".txt", ".raw", ".tokens", ".text")


@dataclass(frozen=True)
class TextSource:
    """Where :func:`load_text` reads a text from.

    Attributes:
        path_or_dataset: a local file or folder path, or a hub dataset id (``"Salesforce/wikitext"``).
        description: one line for logs and the CLI, e.g. ``"WikiText-2 raw test split (local copy
            /work/shared/data/wikitext-2-raw/wiki.test.hf_joined.txt)"``.
        kind: ``"file"`` (a text file read as is), ``"joined"`` (a local file that holds the
            joined split), ``"raw-lines"`` (a local WikiText line file, joined like the hub rows),
            ``"dataset-folder"`` (a local folder ``datasets.load_dataset`` reads) or ``"hub"``.
        config_name: the dataset configuration (``"wikitext-2-raw-v1"``), or None.
        split: the split read, or None for a plain text file.
    """

    path_or_dataset: str
    description: str
    kind: str
    config_name: str | None = None
    split: str | None = None


def _looks_like_path(source: str) -> bool:
    return source.startswith(_PATH_PREFIXES) or source.lower().endswith(_TEXT_SUFFIXES)


def _dataset_label(dataset: str, config_name: str | None) -> str:
    return f"{dataset!r}" + (f" (config {config_name!r})" if config_name else "")


def resolve_text_source(source: str, split: str = "test", name: str | None = None) -> TextSource:
    """Decide where the text named by ``source`` comes from, without reading it.

    Args:
        source: a local UTF-8 text file, a local dataset folder, an alias from ``TEXT_ALIASES``
            (``wikitext2``, ``wikitext103``, ``wikitext2-v1``, ``wikitext-103-v1``, ...), or a hub
            dataset id (``"wikitext"`` / ``"Salesforce/wikitext"`` with ``name="wikitext-2-raw-v1"``).
        split: the dataset split (``"test"``, ``"validation"``, ``"train"``); ignored for text files.
        name: the dataset configuration for a hub id; an alias fixes its own and rejects another.

    Returns:
        a :class:`TextSource`. WikiText-2 raw test and validation resolve to the local copy when
        ``shared_data_dir()`` has one.

    Raises:
        FileNotFoundError: ``source`` looks like a path (starts with ``./``, ``../``, ``/``, ``~`` or
            ends with ``.txt``/``.raw``/``.tokens``/``.text``) but no such file exists.
        ValueError: an alias is given together with a different ``name``.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return TextSource(str(path), f"text file {path}", "file")
    if path.is_dir():
        label = f"dataset folder {path}" + (f" (config {name!r})" if name else "")
        return TextSource(str(path), f"{label}, {split} split", "dataset-folder", name, split)
    if _looks_like_path(source):
        raise FileNotFoundError(f"text file {source} not found")

    dataset, config_name = source, name
    alias = TEXT_ALIASES.get(source.lower())
    if alias is not None:
        if name is not None and name != alias:
            raise ValueError(f"text source {source!r} is WikiText config {alias!r} but name={name!r} was given")
        dataset, config_name = WIKITEXT_DATASET, alias
    elif source in ("wikitext", WIKITEXT_DATASET):
        dataset = WIKITEXT_DATASET

    if dataset == WIKITEXT_DATASET and config_name == "wikitext-2-raw-v1" and split in _LOCAL_WIKITEXT2_RAW:
        data_dir = shared_data_dir()
        relative, how = _LOCAL_WIKITEXT2_RAW[split]
        if data_dir is not None and (data_dir / relative).is_file():
            local = data_dir / relative
            kind = "joined" if how == "joined" else "raw-lines"
            return TextSource(
                str(local), f"WikiText-2 raw {split} split (local copy {local})", kind, config_name, split
            )

    return TextSource(
        dataset, f"hub dataset {_dataset_label(dataset, config_name)}, {split} split", "hub", config_name, split
    )


def _join_raw_lines(path: Path) -> str:
    """Rebuild ``"\\n\\n".join(ds[split]["text"])`` from a WikiText ``wiki.*.raw`` line file.

    The hub dataset has one row per line of the original file with its trailing newline kept, and
    rows that are only whitespace stored as ``""``. Rebuilt this way, ``wiki.test.raw`` gives exactly
    the text of ``wiki.test.hf_joined.txt`` (the real ``load_dataset`` join, once its ``\\r\\n`` line
    ends are read as ``\\n``), so the validation split rebuilt from ``wiki.valid.raw`` is taken to
    equal the hub's validation join.
    """
    with open(path, encoding="utf-8") as fh:
        rows = [line if line.strip() else "" for line in fh]
    return "\n\n".join(rows)


def _read_utf8(path: Path) -> str:
    # Text mode with universal newlines on purpose: "\r\n" and "\r" read as "\n". The local
    # wiki.test.hf_joined.txt is stored with "\r\n" line ends while the hub text has "\n"; read
    # this way it gives GPT-2's documented 287,644 tokens (303,606 with the "\r" kept).
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"text file {path} is not valid UTF-8 (byte {exc.start})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _load_dataset_text(
    source: TextSource, *, text_field: str, streaming: bool, requested: str
) -> str:
    import datasets  # imported here: it is slow to import and only needed for dataset sources

    label = source.description
    try:
        ds = datasets.load_dataset(
            source.path_or_dataset, source.config_name, split=source.split, streaming=streaming
        )
    except Exception as exc:  # datasets raises ConnectionError, DatasetNotFoundError, ValueError, ...
        if source.kind == "hub":
            why = "no local copy exists and the hub could not be reached or refused it"
        else:
            why = "datasets could not load the folder"
        raise ValueError(f"could not load text {requested!r} ({label}): {why} ({_first_line(exc)})") from exc

    if streaming:
        texts = []
        for row in ds:
            if text_field not in row:
                raise ValueError(f"{label} has no field {text_field!r} (fields: {', '.join(row)})")
            texts.append(row[text_field])
        return "\n\n".join(texts)
    if text_field not in ds.column_names:
        raise ValueError(f"{label} has no field {text_field!r} (fields: {', '.join(ds.column_names)})")
    return "\n\n".join(ds[text_field])


def load_text(
    source: str,
    *,
    split: str = "test",
    name: str | None = None,
    text_field: str = "text",
    streaming: bool = False,
) -> str:
    """Return the text named by ``source`` as one string.

    A local text file is returned as is, except that its line ends ``\\r\\n`` and ``\\r`` are read
    as ``\\n`` (Python's universal newlines, so a file saved on Windows gives the same text and the
    same tokens as on Linux). A dataset split is returned as
    ``"\\n\\n".join(ds[split][text_field])`` (Hugging Face perplexity guide, SPEC §5).

    WikiText-2 raw (``wikitext2``, ``wikitext-2-raw-v1``, or ``"wikitext"`` with that ``name``) is read
    from the local copy when :func:`~kronlm.utils.paths.shared_data_dir` finds one:

    - ``test``: ``wikitext-2-raw/wiki.test.hf_joined.txt``, the hub join (stored with ``\\r\\n``
      line ends, read back as ``\\n``);
    - ``validation``: rebuilt from ``wikitext-2-raw/wiki.valid.raw`` one row per line, blank lines as
      empty rows, the way the hub dataset was built. The same rebuild applied to ``wiki.test.raw``
      gives ``wiki.test.hf_joined.txt`` byte for byte; no hub copy of the validation join was
      available to compare with, so this is the best local equivalent, not a checked copy.

    Every other split and dataset (WikiText-103, the non-raw ``-v1`` configurations of the Krony-PT
    protocol, any hub id) is loaded with ``datasets.load_dataset(source, name, split=split)``.

    Args:
        source: see :func:`resolve_text_source`.
        split: dataset split; ignored for a text file.
        name: dataset configuration for a hub id or dataset folder.
        text_field: the column that holds the text.
        streaming: iterate over the split with ``streaming=True`` instead of downloading it whole
            (dataset sources only).

    Returns:
        the text (str); its length is in characters.

    Raises:
        FileNotFoundError: ``source`` looks like a file path but does not exist.
        ValueError: the file is not UTF-8; the dataset or split cannot be loaded (the message names
            the source and split and says no local copy exists and the hub could not be reached);
            the split has no ``text_field`` column.
    """
    resolved = resolve_text_source(source, split, name)
    if resolved.kind in ("file", "joined"):
        return _read_utf8(Path(resolved.path_or_dataset))
    if resolved.kind == "raw-lines":
        return _join_raw_lines(Path(resolved.path_or_dataset))
    return _load_dataset_text(resolved, text_field=text_field, streaming=streaming, requested=source)


__all__ = ["TEXT_ALIASES", "WIKITEXT_DATASET", "TextSource", "load_text", "resolve_text_source"]
