"""One evaluation (or calibration) text from any data source of :mod:`kronlm.data.sources`.

A plain text file is its text. Every other source is a sequence of records (JSON Lines records,
CSV/TSV/Parquet rows, dataset rows) joined as ``"\\n\\n".join(records)``: the convention of the
Hugging Face perplexity guide ("Perplexity of fixed-length models", transformers docs) for
``"\\n\\n".join(ds[split]["text"])``, which SPEC §5 follows.
"""

from __future__ import annotations

import os
from pathlib import Path

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
) -> str:
    """Return the text named by ``source`` as one string.

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
    if resolved.format == "text" or resolved.kind == "joined":
        return read_text_file(Path(resolved.path_or_dataset))
    return RECORD_SEPARATOR.join(iter_records(resolved, streaming=streaming))


__all__ = ["TEXT_ALIASES", "WIKITEXT_DATASET", "DataSource", "TextSource", "load_text", "resolve_text_source"]
