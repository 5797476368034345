"""Text sources: local files, the local WikiText-2 copy, dataset folders, and hub errors offline."""

from __future__ import annotations

import hashlib
import json
import shutil

import datasets
import pytest
from shared_paths import GPT2_TOKENIZER_DIR, SHARED_DATA
from transformers import GPT2TokenizerFast

from kronlm.data.text import WIKITEXT_DATASET, load_text, resolve_text_source

DATA = SHARED_DATA
WIKITEXT2 = DATA / "wikitext-2-raw" if DATA is not None else None
needs_wikitext2 = pytest.mark.skipif(
    WIKITEXT2 is None or not (WIKITEXT2 / "wiki.test.hf_joined.txt").is_file(), reason="no local WikiText-2 copy"
)


@pytest.fixture
def offline_datasets(monkeypatch, tmp_path):
    """datasets in offline mode (fails at once instead of retrying for ~25 s) with its cache in tmp."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    return datasets


def test_local_file_is_returned_as_is(tmp_path):
    path = tmp_path / "doc.txt"
    content = "Zürich — 東京\n\n = Heading = \n tail without newline"
    path.write_bytes(content.encode("utf-8"))
    assert load_text(str(path)) == content
    source = resolve_text_source(str(path))
    assert source.kind == "file" and source.path_or_dataset == str(path) and str(path) in source.description


def test_local_file_windows_line_ends_read_as_newlines(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"one\r\ntwo\r\n\r\nthree")
    assert load_text(str(path)) == "one\ntwo\n\nthree"


def test_missing_or_bad_local_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="text file ./no_such_file.txt not found"):
        load_text("./no_such_file.txt")
    with pytest.raises(FileNotFoundError, match="no_such_corpus.raw"):
        load_text("no_such_corpus.raw")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{latin1} is not valid UTF-8 \\(byte 3\\)"):
        load_text(str(latin1))


@pytest.mark.parametrize(
    "source,name,config",
    [
        ("wikitext103", None, "wikitext-103-raw-v1"),
        ("wikitext-103-raw-v1", None, "wikitext-103-raw-v1"),
        ("wikitext2-v1", None, "wikitext-2-v1"),
        ("wikitext-103-v1", None, "wikitext-103-v1"),
        ("wikitext", "wikitext-103-v1", "wikitext-103-v1"),
    ],
)
def test_aliases_resolve_to_wikitext_on_the_hub(source, name, config):
    resolved = resolve_text_source(source, "test", name)
    assert (resolved.kind, resolved.path_or_dataset, resolved.config_name, resolved.split) == (
        "hub", WIKITEXT_DATASET, config, "test"
    )


def test_alias_with_a_different_config_is_refused():
    with pytest.raises(ValueError, match="'wikitext2' is WikiText config 'wikitext-2-raw-v1' but name='wikitext-2-v1'"):
        resolve_text_source("wikitext2", "test", "wikitext-2-v1")


def test_wikitext2_goes_to_the_hub_without_a_local_copy(monkeypatch):
    monkeypatch.delenv("KRONLM_DATA_DIR", raising=False)
    for split in ("test", "validation"):
        resolved = resolve_text_source("wikitext2", split)
        assert (resolved.kind, resolved.config_name, resolved.split) == ("hub", "wikitext-2-raw-v1", split)


@needs_wikitext2
def test_wikitext2_train_split_is_not_local(monkeypatch):
    # Online, the train split comes from the hub (offline, the local validation split stands in:
    # tests/test_data_sources.py).
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "0")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    assert resolve_text_source("wikitext2", "train", data_dir=DATA).kind == "hub"


@needs_wikitext2
def test_local_wikitext2_test_is_the_hub_join():
    path = WIKITEXT2 / "wiki.test.hf_joined.txt"
    raw_bytes = path.read_bytes()
    # sha256 from ../shared/data/README.md: the file is the one described there.
    assert hashlib.sha256(raw_bytes).hexdigest() == "71fa921e51ba607b4364d8787d05f4513b41b33732dd3504ff1af8952c6e7e77"
    text = load_text("wikitext2", data_dir=DATA)
    assert load_text("wikitext", name="wikitext-2-raw-v1", data_dir=DATA) == text
    assert resolve_text_source("wikitext-2-raw-v1", data_dir=DATA).path_or_dataset == str(path)
    # The file stores "\r\n"; the hub text has "\n".
    assert text == raw_bytes.decode("utf-8").replace("\r\n", "\n")
    assert "\r" not in text


@needs_wikitext2
def test_local_wikitext2_gives_gpt2_documented_token_count():
    if GPT2_TOKENIZER_DIR is None:
        pytest.skip("GPT-2 tokenizer files not present")
    tokenizer = GPT2TokenizerFast.from_pretrained(str(GPT2_TOKENIZER_DIR))
    # 287,644 tokens: ../shared/data/README.md (and the HF perplexity guide) for the joined test split.
    assert len(tokenizer(load_text("wikitext2", data_dir=DATA))["input_ids"]) == 287_644


@needs_wikitext2
def test_validation_rebuild_reproduces_the_test_join(monkeypatch, tmp_path):
    # Put the real test line file where the validation file is looked for: the rebuild of the
    # validation split must then give exactly the real hub join of the test split.
    fake = tmp_path / "data" / "wikitext-2-raw"
    fake.mkdir(parents=True)
    shutil.copyfile(WIKITEXT2 / "wiki.test.raw", fake / "wiki.valid.raw")
    resolved = resolve_text_source("wikitext2", "validation", data_dir=tmp_path / "data")
    assert resolved.kind == "raw-lines" and resolved.path_or_dataset == str(fake / "wiki.valid.raw")
    expected = (WIKITEXT2 / "wiki.test.hf_joined.txt").read_bytes().decode("utf-8").replace("\r\n", "\n")
    assert load_text("wikitext2", split="validation", data_dir=tmp_path / "data") == expected


def test_validation_rebuild_rows(tmp_path):
    folder = tmp_path / "wikitext-2-raw"
    folder.mkdir()
    (folder / "wiki.valid.raw").write_text(" \n = Title = \n \n Body .\n")
    # rows: "", " = Title = \n", "", " Body .\n" (whitespace-only lines become empty rows)
    assert load_text("wikitext2", split="validation", data_dir=tmp_path) == "\n\n = Title = \n\n\n\n\n Body .\n"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_dataset_folder_split_is_joined(offline_datasets, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "test.jsonl", [{"text": "a b"}, {"text": ""}, {"text": "c"}])
    write_jsonl(folder / "train.jsonl", [{"text": "t"}])
    assert load_text(str(folder), split="test") == "a b\n\n\n\nc"
    assert load_text(str(folder), split="test", streaming=True) == "a b\n\n\n\nc"
    assert load_text(str(folder), split="train") == "t"
    with pytest.raises(ValueError, match="no column 'body' \\(columns: text\\)"):
        load_text(str(folder), split="test", text_field="body")
    with pytest.raises(ValueError, match="corpus.*nosuch split.*Unknown split"):
        load_text(str(folder), split="nosuch")


def test_unreachable_hub_dataset_error_names_source_and_split(offline_datasets):
    with pytest.raises(ValueError) as info:
        load_text("wikitext103", split="validation")
    message = str(info.value)
    assert "'wikitext103'" in message and "wikitext-103-raw-v1" in message and "validation split" in message
    assert "no local copy exists and the hub could not be reached" in message
    assert "\n" not in message
