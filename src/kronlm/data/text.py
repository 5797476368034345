"""One evaluation (or calibration) text from any data source of :mod:`kronlm.data.sources`.

A plain text file is its text. Every other source is a sequence of records (JSON Lines records,
CSV/TSV/Parquet rows, dataset rows) joined as ``"\\n\\n".join(records)``: the convention of the
Hugging Face perplexity guide ("Perplexity of fixed-length models", transformers docs) for
``"\\n\\n".join(ds[split]["text"])``, which docs/protocols.md, "Sliding window" follows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kronlm.data.sources import (
    RECORD_SEPARATOR,
    TEXT_ALIASES,
    WIKITEXT_DATASET,
    DataSource,
    iter_records,
    read_text_file,
    resolve_source,
)

# The name this module gave DataSource before the resolver was shared with training.
TextSource = DataSource


def resolve_text_source(
    source: str | os.PathLike,
    split: str = "test",
    name: str | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    text_field: str = "text",
) -> DataSource:
    """:func:`kronlm.data.sources.resolve_source` with the evaluation default ``split="test"``.

    Raises:
        as :func:`~kronlm.data.sources.resolve_source`.
    """
    return resolve_source(source, split=split, name=name, data_dir=data_dir, text_field=text_field)


def load_text(
    source: str | os.PathLike | DataSource,
    *,
    split: str = "test",
    name: str | None = None,
    text_field: str = "text",
    streaming: bool = False,
    data_dir: str | os.PathLike | None = None,
    max_chars: int | None = None,
) -> str:
    """Return the text named by ``source`` as one string (or its first ``max_chars`` characters).

    - Plain text file (``.txt .raw .tokens .text``): returned as is, except that ``\\r\\n`` and
      ``\\r`` line ends are read as ``\\n`` (Python's universal newlines, so a file saved on
      Windows gives the same text and tokens as on Linux).
    - JSON Lines, CSV, TSV, Parquet files, dataset folders and hub datasets:
      ``"\\n\\n".join(records)`` of the ``text_field`` of every record (empty ones included, as the
      Hugging Face guide's join includes WikiText's empty rows); see
      :func:`~kronlm.data.sources.iter_records` for what a record is.
    - WikiText-2 raw (``wikitext2``, ``wikitext-2-raw-v1``, or ``"wikitext"`` with that ``name``)
      from the data directory when it holds the split: ``test`` is
      ``wikitext-2-raw/wiki.test.hf_joined.txt``, the hub join (stored with ``\\r\\n``, read back
      as ``\\n``); ``validation`` is rebuilt from ``wikitext-2-raw/wiki.valid.raw`` one row per
      line, blank lines as empty rows, the way the hub dataset was built. The same rebuild of
      ``wiki.test.raw`` gives ``wiki.test.hf_joined.txt`` byte for byte; no hub copy of the
      validation join was available to compare with, so it is the best local equivalent, not a
      checked copy. Without a local copy, and for WikiText-103 and the ``-v1`` configurations
      of the Krony-PT protocol, ``datasets.load_dataset`` reads the hub.

    Args:
        source: a :class:`~kronlm.data.sources.DataSource`, or what
            :func:`~kronlm.data.sources.resolve_source` takes (path, alias, hub id).
        split: dataset split; ignored for data files and for a given ``DataSource``.
        name: dataset configuration for a hub id or dataset folder.
        text_field: the field / column holding the text (not used by plain text files).
        streaming: read a hub dataset with ``streaming=True`` instead of downloading it whole.
        data_dir: folder of local copies of public data; None means ``$KRONLM_DATA_DIR``.
        max_chars: stop reading after this many characters of the joined text (and return
            exactly those); None reads everything. :func:`load_text_for_tokens` picks it.

    Returns:
        the text (str); its length is in characters.

    Raises:
        FileNotFoundError: ``source`` looks like a path but does not exist.
        ValueError: an unrecognised file format; text that is not UTF-8; a record that is not
            valid or lacks ``text_field`` (one line naming the file and line); a dataset or
            split that cannot be loaded (names the source and split, and says that no local copy
            exists and the hub could not be reached); a dataset without ``text_field``.
    """
    resolved = source if isinstance(source, DataSource) else resolve_source(
        source, split=split, name=name, data_dir=data_dir, text_field=text_field
    )
    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 0):
        raise ValueError(f"max_chars must be a non-negative integer or None, got {max_chars!r}")
    if resolved.format == "text" or resolved.kind == "joined":
        return read_text_file(Path(resolved.path_or_dataset), max_chars)
    if max_chars is None:
        return RECORD_SEPARATOR.join(iter_records(resolved, streaming=streaming))
    parts, total = [], 0
    for record in iter_records(resolved, streaming=streaming):
        parts.append(record)
        total += len(record) + len(RECORD_SEPARATOR)
        if total >= max_chars:
            break
    return RECORD_SEPARATOR.join(parts)[:max_chars]


# First read of load_text_for_tokens: characters per token asked for (most tokenizers average 3-5).
_CHARS_PER_TOKEN = 8
_MIN_CHARS = 4096


def load_text_for_tokens(source: DataSource, tokenizer: Any, max_tokens: int | None, *, streaming: bool = False) -> str:
    """The beginning of ``source`` that holds its first ``max_tokens`` tokens, read without the rest.

    Reads a prefix of about 8 characters per token (at least 4,096), tokenises it as
    :func:`kronlm.evaluation.perplexity.perplexity_of_text` does (``tokenizer(text)``), and reads
    4 times more until it holds more than ``max_tokens`` tokens; then reads twice that and keeps
    the prefix once its first ``max_tokens`` tokens come out the same both times (so a token cut
    in half at the end of a prefix cannot change them). A 150 MB file scored on 64 tokens reads a
    few kilobytes.

    Args:
        source: a resolved data source.
        tokenizer: the model's tokenizer (called on a string, returning ``input_ids``).
        max_tokens: tokens needed; None reads the whole text (:func:`load_text`).
        streaming: read hub datasets row by row.

    Returns:
        The text, or its prefix: its first ``max_tokens`` tokens are those of the whole text.

    Raises:
        ValueError: as :func:`load_text`.
    """
    if max_tokens is None:
        return load_text(source, streaming=streaming)
    budget = max(_MIN_CHARS, _CHARS_PER_TOKEN * (int(max_tokens) + 2))
    first = None
    while True:
        text = load_text(source, streaming=streaming, max_chars=budget)
        if len(text) < budget:
            return text  # the whole text
        ids = list(tokenizer(text)["input_ids"])
        if len(ids) > max_tokens + 1:
            if first is not None and ids[:max_tokens] == first:
                return text
            first = ids[:max_tokens]
            budget *= 2
        else:
            first = None
            budget *= 4


__all__ = ["TEXT_ALIASES", "WIKITEXT_DATASET", "DataSource", "TextSource", "load_text", "load_text_for_tokens", "resolve_text_source"]
