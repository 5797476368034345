"""Data for kronlm: one resolver of sources (:mod:`kronlm.data.sources`), evaluation text
(:mod:`kronlm.data.text`) and packed, cached training blocks (:mod:`kronlm.data.blocks`)."""

from kronlm.data.blocks import (
    BlockDataset,
    TokenBlocks,
    build_blocks,
    tokenize_documents,
)
from kronlm.data.sources import (
    FILE_FORMATS,
    TEXT_ALIASES,
    WIKITEXT_DATASET,
    DataSource,
    data_dir,
    iter_records,
    resolve_source,
    source_fingerprint,
)
from kronlm.data.text import TextSource, load_text, resolve_text_source

__all__ = [
    "FILE_FORMATS",
    "TEXT_ALIASES",
    "WIKITEXT_DATASET",
    "BlockDataset",
    "DataSource",
    "TextSource",
    "TokenBlocks",
    "build_blocks",
    "data_dir",
    "iter_records",
    "load_text",
    "resolve_source",
    "resolve_text_source",
    "source_fingerprint",
    "tokenize_documents",
]
