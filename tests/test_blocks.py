"""Packed token blocks: exact token streams, train/val split, cache hits and corrupt caches."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from shared_paths import GPT2_TOKENIZER_DIR, SHARED_DATA
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from kronlm.data.blocks import (
    BlockDataset,
    TokenBlocks,
    build_blocks,
    split_paragraphs,
    tokenizer_fingerprint,
)

WIKI_VALID = SHARED_DATA / "wikitext-2-raw" / "wiki.valid.raw" if SHARED_DATA is not None else None
TOKENIZER_DIR = GPT2_TOKENIZER_DIR


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    if TOKENIZER_DIR is None:
        pytest.skip("GPT-2 tokenizer files not available")
    tokenizer = GPT2TokenizerFast.from_pretrained(TOKENIZER_DIR)
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    return tokenizer


class CountingTokenizer:
    """Delegates to a real tokenizer and counts encoding calls and encoded documents."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.calls = 0
        self.documents = 0

    def __call__(self, texts, **kwargs):
        self.calls += 1
        self.documents += len(texts) if isinstance(texts, list) else 1
        return self._tokenizer(texts, **kwargs)

    def __len__(self):
        return len(self._tokenizer)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


DOCS = [
    "The first document.\nIt has two lines.",
    "A second one, with a tab\tinside.",
    "Third: numbers 12345 and unicode café — ok.",
]


def test_split_paragraphs():
    assert split_paragraphs("a\nb\n \n\nc\n") == ["a\nb", "c"]
    assert split_paragraphs(" = Title = \n \n Body line .\n Next .\n") == ["= Title =", "Body line .\n Next ."]
    assert split_paragraphs("\n\n  \n") == []


def test_small_file_exact_stream(tmp_path, gpt2_tokenizer):
    path = write(tmp_path, "docs.txt", "\n\n".join(DOCS) + "\n \n\n")
    result = build_blocks(path, gpt2_tokenizer, block_size=4, val_fraction=0.0, cache_dir=tmp_path / "cache")
    eos = gpt2_tokenizer.eos_token_id
    expected: list[int] = []
    for i, doc in enumerate(DOCS):
        if i:
            expected.append(eos)
        expected.extend(gpt2_tokenizer.encode(doc))
    # the same stream from one call on the EOS-joined text
    assert expected == gpt2_tokenizer(gpt2_tokenizer.eos_token.join(DOCS))["input_ids"]
    n = len(expected) // 4
    assert result.num_tokens == len(expected)
    assert result.dropped_tokens == len(expected) - 4 * n
    assert result.num_documents == 3
    assert result.val.shape == (0, 4)
    assert result.train.dtype == torch.int64
    assert result.train.shape == (n, 4)
    assert result.train.flatten().tolist() == expected[: 4 * n]


def test_whole_file_mode(tmp_path, gpt2_tokenizer):
    text = "\n\n".join(DOCS) + "\n"
    path = write(tmp_path, "whole.txt", text)
    result = build_blocks(
        path, gpt2_tokenizer, block_size=3, val_fraction=None, documents="file", cache_dir=tmp_path / "c"
    )
    expected = gpt2_tokenizer(text)["input_ids"]
    assert gpt2_tokenizer.eos_token_id not in expected
    assert result.num_documents == 1
    assert result.train.flatten().tolist() == expected[: len(expected) // 3 * 3]


def test_wikitext_valid_exact_counts_and_split(tmp_path, gpt2_tokenizer):
    if WIKI_VALID is None or not WIKI_VALID.is_file():
        pytest.skip("WikiText-2 raw validation file not available")
    text = WIKI_VALID.read_text(encoding="utf-8")
    # the documented split, written out independently: paragraphs at whitespace-only lines
    docs = [part.strip() for part in re.split(r"\n[ \t]*\n", text)]
    docs = [d for d in docs if d]
    expected = gpt2_tokenizer(gpt2_tokenizer.eos_token.join(docs))["input_ids"]

    block_size = 128
    result = build_blocks(WIKI_VALID, gpt2_tokenizer, block_size=block_size, val_fraction=0.05, cache_dir=tmp_path)
    total = len(expected)
    assert result.num_tokens == total
    assert result.num_documents == len(docs)
    assert total > 200_000  # WikiText-2 valid is ~246k GPT-2 tokens
    n_blocks = total // block_size
    n_val = -(-round(0.05 * total) // block_size)
    assert result.val.shape == (n_val, block_size)
    assert result.train.shape == (n_blocks - n_val, block_size)
    assert result.dropped_tokens == total - n_blocks * block_size
    packed = torch.cat([result.train.flatten(), result.val.flatten()]).tolist()
    assert packed == expected[: n_blocks * block_size]
    # validation comes after every training token: disjoint positions in the stream
    assert result.val[0].tolist() == expected[(n_blocks - n_val) * block_size : (n_blocks - n_val + 1) * block_size]
    assert result.val.numel() >= 0.05 * total


def test_val_tokens_and_max_tokens(tmp_path, gpt2_tokenizer):
    path = write(tmp_path, "docs.txt", "\n\n".join(DOCS * 20))
    result = build_blocks(path, gpt2_tokenizer, block_size=8, val_tokens=10, max_tokens=100, cache_dir=tmp_path / "c")
    assert result.num_tokens == 100
    assert result.val.shape == (2, 8)  # 10 tokens rounded up to whole blocks
    assert result.train.shape == (10, 8)  # 100 // 8 = 12 blocks, 2 for validation
    assert result.dropped_tokens == 4
    full = build_blocks(path, gpt2_tokenizer, block_size=8, val_fraction=0.0, cache_dir=tmp_path / "c")
    assert torch.equal(torch.cat([result.train, result.val]).flatten(), full.train.flatten()[:96])


def test_cache_hit_does_not_tokenise_again(tmp_path, gpt2_tokenizer):
    path = write(tmp_path, "docs.txt", "\n\n".join(DOCS * 5))
    counting = CountingTokenizer(gpt2_tokenizer)
    first = build_blocks(path, counting, block_size=4, cache_dir=tmp_path / "cache")
    assert counting.calls == 1 and counting.documents == 15
    assert not first.from_cache
    assert first.cache_file.is_file() and first.cache_file.with_suffix(".json").is_file()
    manifest = json.loads(first.cache_file.with_suffix(".json").read_text())
    assert manifest["num_tokens"] == first.num_tokens

    second = build_blocks(path, counting, block_size=4, cache_dir=tmp_path / "cache")
    assert counting.calls == 1
    assert second.from_cache
    assert torch.equal(second.train, first.train) and torch.equal(second.val, first.val)

    # a freshly loaded tokenizer with the same files hits the same cache
    other = CountingTokenizer(GPT2TokenizerFast.from_pretrained(TOKENIZER_DIR))
    assert build_blocks(path, other, block_size=4, cache_dir=tmp_path / "cache").from_cache
    assert other.calls == 0

    # anything in the key changes the cache entry
    assert not build_blocks(path, counting, block_size=5, cache_dir=tmp_path / "cache").from_cache
    assert not build_blocks(path, counting, block_size=4, max_tokens=50, cache_dir=tmp_path / "cache").from_cache
    path.write_text("\n\n".join(DOCS * 6), encoding="utf-8")
    changed = build_blocks(path, counting, block_size=4, cache_dir=tmp_path / "cache")
    assert not changed.from_cache and changed.num_tokens > first.num_tokens


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage-manifest", "delete-manifest", "delete-tensor"])
def test_corrupt_cache_is_rebuilt(tmp_path, gpt2_tokenizer, caplog, damage):
    path = write(tmp_path, "docs.txt", "\n\n".join(DOCS * 5))
    counting = CountingTokenizer(gpt2_tokenizer)
    first = build_blocks(path, counting, block_size=4, cache_dir=tmp_path / "cache")
    tensor_file, manifest_file = first.cache_file, first.cache_file.with_suffix(".json")
    data = tensor_file.read_bytes()
    if damage == "truncate":
        tensor_file.write_bytes(data[: len(data) - 7])
    elif damage == "flip":
        # change one token id in the data section, keeping the file a valid safetensors file
        tensor_file.write_bytes(data[:-1] + bytes([data[-1] ^ 0x01]))
    elif damage == "garbage-manifest":
        manifest_file.write_text("{not json")
    elif damage == "delete-manifest":
        manifest_file.unlink()
    else:
        tensor_file.unlink()

    with caplog.at_level(logging.WARNING, logger="kronlm.data.blocks"):
        rebuilt = build_blocks(path, counting, block_size=4, cache_dir=tmp_path / "cache")
    assert not rebuilt.from_cache
    assert counting.calls == 2
    named = manifest_file.name if damage == "garbage-manifest" else tensor_file.name
    assert any(named in record.getMessage() for record in caplog.records), caplog.text
    assert torch.equal(rebuilt.train, first.train) and torch.equal(rebuilt.val, first.val)
    # the rebuilt cache is trusted again
    assert build_blocks(path, counting, block_size=4, cache_dir=tmp_path / "cache").from_cache
    assert counting.calls == 2


def test_local_dataset_folder(tmp_path, gpt2_tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    folder = tmp_path / "ds"
    folder.mkdir()
    rows = [DOCS[0], "", "   ", DOCS[1], DOCS[2]]
    (folder / "train.jsonl").write_text("".join(json.dumps({"body": r}) + "\n" for r in rows))
    expected = gpt2_tokenizer(gpt2_tokenizer.eos_token.join(DOCS))["input_ids"]
    for streaming in (False, True):
        result = build_blocks(
            folder, gpt2_tokenizer, block_size=2, val_fraction=0.0, text_field="body",
            streaming=streaming, cache_dir=tmp_path / f"cache{streaming}",
        )
        assert result.num_documents == 3
        assert result.train.flatten().tolist() == expected[: len(expected) // 2 * 2]
    with pytest.raises(ValueError, match="no column 'text'"):
        build_blocks(folder, gpt2_tokenizer, block_size=2, cache_dir=tmp_path / "cache3")


def test_block_dataset_with_dataloader():
    blocks = torch.arange(5 * 6).reshape(5, 6)
    dataset = BlockDataset(blocks)
    assert len(dataset) == 5
    item = dataset[3]
    assert item["input_ids"].tolist() == list(range(18, 24))
    assert item["attention_mask"].tolist() == [1] * 6
    batches = list(DataLoader(dataset, batch_size=2, shuffle=False))
    assert [b["input_ids"].shape for b in batches] == [(2, 6), (2, 6), (1, 6)]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), blocks)
    assert all(b["input_ids"].dtype == torch.int64 and bool((b["attention_mask"] == 1).all()) for b in batches)
    with pytest.raises(ValueError, match="num_blocks, block_size"):
        BlockDataset(torch.arange(6))
    with pytest.raises(ValueError, match="integer"):
        BlockDataset(torch.zeros(2, 3))


def test_block_dataset_trains_a_tiny_model():
    """Blocks feed a causal LM through a DataLoader; the held-out blocks' loss goes down."""
    torch.manual_seed(0)
    pattern = torch.tensor([5, 9, 2, 7, 3, 1, 8, 4])
    blocks = TokenBlocks.from_ids(pattern.repeat(20), 16, val_fraction=0.1)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=16, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    val = next(iter(DataLoader(blocks.val_dataset(), batch_size=len(blocks.val))))

    def val_loss() -> float:
        with torch.no_grad():
            return model(**val, labels=val["input_ids"]).loss.item()

    before = val_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(6):
        for batch in DataLoader(blocks.train_dataset(), batch_size=6, shuffle=True):
            model(**batch, labels=batch["input_ids"]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert val_loss() < 0.3 * before


def test_from_ids_split_layout():
    ids = torch.arange(103)
    blocks = TokenBlocks.from_ids(ids, 10, val_fraction=0.15)  # 15 tokens -> 2 blocks
    assert blocks.train.shape == (8, 10) and blocks.val.shape == (2, 10)
    assert blocks.train.flatten().tolist() == list(range(80))
    assert blocks.val.flatten().tolist() == list(range(80, 100))
    assert blocks.dropped_tokens == 3
    assert set(blocks.train.flatten().tolist()).isdisjoint(blocks.val.flatten().tolist())


def test_errors(tmp_path, gpt2_tokenizer):
    with pytest.raises(ValueError, match=r"105 tokens, of which validation takes 100 \(1 blocks\), leaving 5 tokens.*block_size=100"):
        TokenBlocks.from_ids(torch.arange(105), 100, val_fraction=0.05)
    with pytest.raises(ValueError, match=r"3 tokens.*block_size=4"):
        TokenBlocks.from_ids(torch.arange(3), 4, val_fraction=0.0)
    for bad in (1, 0, -3):
        with pytest.raises(ValueError, match=f"block_size must be .* got {bad}"):
            TokenBlocks.from_ids(torch.arange(10), bad)
    with pytest.raises(ValueError, match="val_fraction"):
        TokenBlocks.from_ids(torch.arange(10), 2, val_fraction=1.0)
    path = write(tmp_path, "tiny.txt", "Hello world")
    with pytest.raises(ValueError, match=r"2 tokens.*block_size=8"):
        build_blocks(path, gpt2_tokenizer, block_size=8, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="block_size"):
        build_blocks(path, gpt2_tokenizer, block_size=1, cache_dir=tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        build_blocks(tmp_path / "missing.txt", gpt2_tokenizer, block_size=8, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="documents"):
        build_blocks(path, gpt2_tokenizer, block_size=2, documents="lines", cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="max_tokens"):
        build_blocks(path, gpt2_tokenizer, block_size=2, max_tokens=0, cache_dir=tmp_path / "c")


def test_tokenizer_fingerprint(gpt2_tokenizer):
    tokenizer = GPT2TokenizerFast.from_pretrained(TOKENIZER_DIR)
    base = tokenizer_fingerprint(tokenizer)
    assert base == tokenizer_fingerprint(gpt2_tokenizer)
    assert base["vocab_size"] == 50257 and base["eos_token_id"] == 50256
    # a call with truncation changes the backend's state but not what ids a text maps to
    tokenizer(["a b c"], truncation=True, max_length=2)
    assert tokenizer_fingerprint(tokenizer) == base
    tokenizer.add_tokens(["<kronlm-new>"])
    changed = tokenizer_fingerprint(tokenizer)
    assert changed["sha256"] != base["sha256"] and changed["vocab_size"] == 50258


def test_block_dataset_through_accelerate():
    blocks = torch.arange(7 * 4).reshape(7, 4)
    loader = Accelerator(cpu=True).prepare(DataLoader(BlockDataset(blocks), batch_size=3))
    seen = torch.cat([batch["input_ids"] for batch in loader])
    assert torch.equal(seen, blocks)
