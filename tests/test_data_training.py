"""Training blocks through the shared resolver: aliases offline, every format, content-keyed cache."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import datasets
import pytest
import torch
from shared_paths import GPT2_TOKENIZER_DIR, SHARED_DATA
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

from kronlm.data.blocks import build_blocks

WIKI_VALID = SHARED_DATA / "wikitext-2-raw" / "wiki.valid.raw" if SHARED_DATA is not None else None
WORDS = ["[UNK]", "[EOS]", "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "and", ",", ".", "first", "second", "third"]
DOCS = ["the cat sat on a mat .", "a dog ran far , and far .", "the first , the second and the third ."]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """A word-level fast tokenizer with an EOS token, built here (no files needed)."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="[EOS]", unk_token="[UNK]")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def expected_stream(tokenizer, docs: list[str]) -> list[int]:
    out: list[int] = []
    for i, doc in enumerate(docs):
        if i:
            out.append(tokenizer.eos_token_id)
        out.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
    return out


def stream(blocks) -> list[int]:
    return torch.cat([blocks.train.flatten(), blocks.val.flatten()]).tolist()


@pytest.mark.skipif(GPT2_TOKENIZER_DIR is None or WIKI_VALID is None or not WIKI_VALID.is_file(),
                    reason="GPT-2 tokenizer or local WikiText-2 missing")
def test_wikitext2_alias_trains_on_the_local_validation_split_offline(offline, tmp_path):
    tokenizer = GPT2TokenizerFast.from_pretrained(GPT2_TOKENIZER_DIR)
    blocks = build_blocks("wikitext2", tokenizer, block_size=1024, data_dir=SHARED_DATA, cache_dir=tmp_path / "c")
    assert blocks.source == (
        f"WikiText-2 raw validation split (local copy {WIKI_VALID}; the train split is not available offline); "
        "each non-blank record one document, joined with '<|endoftext|>' (id 50256)"
    )
    # the hub's rows: every non-blank line of wiki.valid.raw, unchanged
    with open(WIKI_VALID, encoding="utf-8") as fh:
        rows = [line for line in fh if line.strip()]
    expected = tokenizer(tokenizer.eos_token.join(rows))["input_ids"]
    assert blocks.num_documents == len(rows) and blocks.num_tokens == len(expected)
    assert stream(blocks) == expected[: len(expected) // 1024 * 1024]
    # the validation split named explicitly is the same content: the cache is keyed by it
    explicit = build_blocks("wikitext2", tokenizer, block_size=1024, split="validation", data_dir=SHARED_DATA,
                            cache_dir=tmp_path / "c")
    assert explicit.from_cache and torch.equal(explicit.train, blocks.train)


def write_formats(tmp_path, docs: list[str]) -> dict[str, object]:
    """The same records (with a blank one) as JSON Lines, CSV, TSV and Parquet files."""
    records = [docs[0], "", "   ", *docs[1:]]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"body": r}) + "\n" for r in records))
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("n,body\n" + "".join(f'{i},"{r}"\n' for i, r in enumerate(records)))
    tsv = tmp_path / "c.tsv"
    tsv.write_text("body\tn\n" + "".join(f"{r}\t{i}\n" for i, r in enumerate(records)))
    parquet = tmp_path / "c.parquet"
    datasets.Dataset.from_dict({"body": records}).to_parquet(str(parquet))
    return {"JSON Lines file": jsonl, "CSV file": csv_path, "TSV file": tsv, "Parquet file": parquet}


def test_every_format_gives_one_document_per_record(offline, tmp_path, tiny_tokenizer):
    expected = expected_stream(tiny_tokenizer, DOCS)
    for what, path in write_formats(tmp_path, DOCS).items():
        blocks = build_blocks(path, tiny_tokenizer, block_size=2, val_fraction=0.0, text_field="body",
                              cache_dir=tmp_path / "cache")
        assert blocks.num_documents == 3, what
        assert stream(blocks) == expected[: len(expected) // 2 * 2], what
        assert blocks.source.startswith(f"{what} {path} (") and "each non-blank record one document" in blocks.source
        assert blocks.source.endswith("joined with '[EOS]' (id 1)")
    with pytest.raises(ValueError, match="documents='file' applies to plain text files"):
        build_blocks(tmp_path / "c.jsonl", tiny_tokenizer, block_size=2, text_field="body", documents="file",
                     cache_dir=tmp_path / "cache")


def test_bad_record_fails_with_its_line_and_leaves_no_cache(tmp_path, tiny_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "the cat"}\n{"text": "the dog"}\n{"txt": "a mat"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 3 has no field 'text' \(fields: txt\)"):
        build_blocks(path, tiny_tokenizer, block_size=2, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_cache_is_keyed_by_content_not_size_mtime_or_path(tmp_path, tiny_tokenizer):
    path = tmp_path / "docs.txt"
    path.write_text("the cat sat on a mat .\n\nthe dog ran far .\n")
    first = build_blocks(path, tiny_tokenizer, block_size=2, val_fraction=0.0, cache_dir=tmp_path / "cache")
    stat = path.stat()
    path.write_text("the dog sat on a mat .\n\nthe cat ran far .\n")  # same length, other words
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    rewritten = build_blocks(path, tiny_tokenizer, block_size=2, val_fraction=0.0, cache_dir=tmp_path / "cache")
    assert not rewritten.from_cache
    assert stream(rewritten) != stream(first)
    expected = expected_stream(tiny_tokenizer, ["the dog sat on a mat .", "the cat ran far ."])
    assert len(expected) == 13 and stream(rewritten) == expected[:12]
    # the same bytes under another name are the same corpus
    copy = tmp_path / "copy.txt"
    copy.write_bytes(path.read_bytes())
    again = build_blocks(copy, tiny_tokenizer, block_size=2, val_fraction=0.0, cache_dir=tmp_path / "cache")
    assert again.from_cache and stream(again) == stream(rewritten)


def test_hub_dataset_cache_follows_the_builder_hash(tmp_path, tiny_tokenizer, monkeypatch):
    loads = []
    state = {"hash": "rev1"}

    def fake_builder(path, name):
        return SimpleNamespace(config_id=name or "default", hash=state["hash"])

    def fake_load(path, name, split, streaming):
        loads.append((path, name, split, streaming))
        return datasets.Dataset.from_dict({"text": DOCS})

    monkeypatch.setattr(datasets, "load_dataset_builder", fake_builder)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    first = build_blocks("someone/corpus", tiny_tokenizer, block_size=2, val_fraction=0.0, cache_dir=tmp_path)
    assert loads == [("someone/corpus", None, "train", False)]
    assert first.source.startswith("hub dataset 'someone/corpus', train split, column 'text'; each non-blank record")
    assert stream(first) == expected_stream(tiny_tokenizer, DOCS)[: first.num_tokens // 2 * 2]
    assert build_blocks("someone/corpus", tiny_tokenizer, block_size=2, val_fraction=0.0, cache_dir=tmp_path).from_cache
    assert len(loads) == 1  # a cache hit does not load the dataset
    state["hash"] = "rev2"  # a new hub revision
    assert not build_blocks("someone/corpus", tiny_tokenizer, block_size=2, val_fraction=0.0, cache_dir=tmp_path).from_cache
    assert len(loads) == 2
