"""The one data-source resolver: data directory, WikiText-2 aliases offline, file formats, errors."""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import click
import datasets
import pytest
from click.testing import CliRunner
from shared_paths import SHARED_DATA

from kronlm.cli.options import data_options
from kronlm.data.sources import (
    DataSource,
    data_dir,
    hub_offline,
    iter_records,
    resolve_source,
    source_fingerprint,
    split_joined_rows,
)
from kronlm.data.text import load_text

WIKITEXT2 = SHARED_DATA / "wikitext-2-raw" if SHARED_DATA is not None else None
needs_wikitext2 = pytest.mark.skipif(
    WIKITEXT2 is None or not (WIKITEXT2 / "wiki.valid.raw").is_file(), reason="no local WikiText-2 copy"
)
needs_glue = pytest.mark.skipif(SHARED_DATA is None or not (SHARED_DATA / "glue").is_dir(), reason="no local GLUE copy")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """The hub is offline (env and datasets' own flag); datasets caches into tmp."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.fixture
def online(monkeypatch):
    """The hub counts as reachable (nothing is fetched by the tests that use this)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "0")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def wikitext_folder(root, files: dict[str, str]):
    folder = root / "wikitext-2-raw"
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return root


# --- the data directory -------------------------------------------------------------------------


def test_data_dir_is_explicit_else_env_else_none(monkeypatch, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.setenv("KRONLM_DATA_DIR", str(tmp_path / "b"))
    assert data_dir(tmp_path / "a") == tmp_path / "a"
    assert data_dir() == tmp_path / "b"
    monkeypatch.setenv("KRONLM_DATA_DIR", "")
    assert data_dir() is None
    monkeypatch.delenv("KRONLM_DATA_DIR")
    assert data_dir() is None
    with pytest.raises(NotADirectoryError, match=f"data directory {tmp_path / 'missing'} is not a folder"):
        data_dir(tmp_path / "missing")
    monkeypatch.setenv("KRONLM_DATA_DIR", str(tmp_path / "gone"))
    with pytest.raises(NotADirectoryError, match=r"\$KRONLM_DATA_DIR .*gone is not a folder"):
        resolve_source("wikitext2", split="test")


def test_no_probing_of_the_working_directory(monkeypatch, tmp_path):
    # A checkout with ../shared/data beside it: library code must not find it on its own.
    wikitext_folder(tmp_path / "shared" / "data", {"wiki.test.hf_joined.txt": "x\n"})
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    monkeypatch.delenv("KRONLM_DATA_DIR", raising=False)
    assert resolve_source("wikitext2", split="test").kind == "hub"
    local = resolve_source("wikitext2", split="test", data_dir="../shared/data")
    assert local.kind == "joined" and local.path_or_dataset.endswith("wiki.test.hf_joined.txt")


def test_cli_data_options_defaults(monkeypatch, tmp_path):
    @click.command()
    @data_options
    def show(data_dir, text_field):
        click.echo(f"{data_dir}|{text_field}")

    runner = CliRunner()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "repo").mkdir()
    (tmp_path / "env").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    monkeypatch.delenv("KRONLM_DATA_DIR", raising=False)
    assert runner.invoke(show, []).output == f"{tmp_path / 'shared' / 'data'}|text\n"
    monkeypatch.setenv("KRONLM_DATA_DIR", str(tmp_path / "env"))
    assert runner.invoke(show, ["--text-field", "body"]).output == f"{tmp_path / 'env'}|body\n"
    assert runner.invoke(show, ["--data-dir", str(tmp_path / "repo")]).output == f"{tmp_path / 'repo'}|text\n"
    missing = runner.invoke(show, ["--data-dir", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    monkeypatch.delenv("KRONLM_DATA_DIR")
    monkeypatch.chdir(tmp_path)  # no ../shared/data from here
    assert runner.invoke(show, []).output == "None|text\n"


# --- WikiText-2 aliases --------------------------------------------------------------------------


@needs_wikitext2
def test_wikitext2_train_offline_uses_the_local_validation_split_and_says_so(offline):
    assert hub_offline()
    for spec, name in (("wikitext2", None), ("wikitext", "wikitext-2-raw-v1"), ("Salesforce/wikitext", "wikitext-2-raw-v1")):
        source = resolve_source(spec, split="train", name=name, data_dir=SHARED_DATA)
        path = WIKITEXT2 / "wiki.valid.raw"
        assert (source.kind, source.split, source.path_or_dataset) == ("raw-lines", "validation", str(path))
        assert source.label == (
            f"WikiText-2 raw validation split (local copy {path}; the train split is not available offline)"
        )
        assert source.description == source.label + '; rows joined with "\\n\\n"'


@needs_wikitext2
def test_wikitext2_train_online_is_the_hub_train_split(online):
    assert not hub_offline()
    source = resolve_source("wikitext2", split="train", data_dir=SHARED_DATA)
    assert (source.kind, source.path_or_dataset, source.config_name, source.split) == (
        "hub", "Salesforce/wikitext", "wikitext-2-raw-v1", "train"
    )


def test_wikitext2_local_train_copy_wins_and_offline_without_validation_goes_to_the_hub(offline, tmp_path):
    root = wikitext_folder(tmp_path / "d", {"wiki.train.raw": " = T = \n \n Body .\n", "wiki.valid.raw": " v\n"})
    source = resolve_source("wikitext2", split="train", data_dir=root)
    assert (source.kind, source.split, source.label) == (
        "raw-lines", "train", f"WikiText-2 raw train split (local copy {root / 'wikitext-2-raw' / 'wiki.train.raw'})"
    )
    assert load_text(source) == " = T = \n\n\n\n\n Body .\n"  # rows " = T = \n", "", " Body .\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert resolve_source("wikitext2", split="train", data_dir=empty).kind == "hub"
    with pytest.raises(ValueError, match="WikiText has only the field 'text', not 'body'"):
        resolve_source("wikitext2", split="train", data_dir=root, text_field="body")


def test_hub_offline_reads_either_variable(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert not hub_offline()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "yes")
    assert hub_offline()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline()


def test_test_split_falls_back_to_the_raw_line_file(tmp_path):
    root = wikitext_folder(tmp_path, {"wiki.test.raw": " a\n \n b\n"})
    source = resolve_source("wikitext2", split="test", data_dir=root)
    assert source.kind == "raw-lines" and source.split == "test"
    assert load_text(source) == " a\n\n\n\n\n b\n"  # rows " a\n", "", " b\n"


@needs_wikitext2
def test_joined_file_parses_back_into_the_hub_rows():
    joined = (WIKITEXT2 / "wiki.test.hf_joined.txt").read_text(encoding="utf-8")
    rows = split_joined_rows(joined)
    raw_rows = list(iter_records(DataSource("t", "raw-lines", str(WIKITEXT2 / "wiki.test.raw"), "wikitext", "t", "t")))
    assert len(raw_rows) == 4358  # README: 4,358 lines
    assert rows == raw_rows
    assert "\n\n".join(rows) == joined
    joined_source = resolve_source("wikitext2", split="test", data_dir=SHARED_DATA)
    assert joined_source.kind == "joined" and list(iter_records(joined_source)) == raw_rows


def test_split_joined_rows_round_trip_and_error():
    rows = ["", " = A = \n", "", " b .\n", "", "tail"]
    assert split_joined_rows("\n\n".join(rows)) == rows
    assert split_joined_rows("") == [""]
    with pytest.raises(ValueError, match=r"f\.txt: line 2 is not where"):
        split_joined_rows("a\nb\n", "f.txt")


# --- file formats --------------------------------------------------------------------------------

RECORDS = ["First record.\nWith two lines.", "", "Third, with a comma and \"quotes\"."]


def test_jsonl_records_are_joined_for_evaluation(tmp_path):
    path = tmp_path / "lambada.jsonl"
    path.write_text("".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(RECORDS)) + "\n")
    source = resolve_source(path, split="test")
    assert (source.kind, source.format, source.text_field) == ("file", "jsonl", "text")
    assert source.description == f'JSON Lines file {path} (field \'text\'); records joined with "\\n\\n"'
    assert load_text(path) == "\n\n".join(RECORDS)
    other = tmp_path / "c.json"
    other.write_text("".join(json.dumps({"body": r}) + "\r\n" for r in RECORDS))
    assert list(iter_records(resolve_source(other, split="test", text_field="body"))) == RECORDS


def test_csv_and_tsv_columns(tmp_path):
    csv_path = tmp_path / "c.csv"
    csv_path.write_text('id,text\n1,"First record.\nWith two lines."\n2,\n\n3,"Third, with a comma and ""quotes""."\n',
                        encoding="utf-8")
    assert load_text(csv_path) == "\n\n".join(RECORDS)
    assert resolve_source(csv_path, split="x").description.startswith(f"CSV file {csv_path} (column 'text'); rows joined")
    tsv_path = tmp_path / "t.tsv"
    # GLUE-style TSV: quotes are ordinary characters
    tsv_path.write_text('sentence\tlabel\nhe said "hi\t1\nit\'s "fine"\t0\n', encoding="utf-8")
    assert list(iter_records(resolve_source(tsv_path, split="x", text_field="sentence"))) == ['he said "hi', 'it\'s "fine"']


def test_parquet_through_datasets(offline, tmp_path):
    path = tmp_path / "p.parquet"
    datasets.Dataset.from_dict({"text": RECORDS, "n": [1, 2, 3]}).to_parquet(str(path))
    source = resolve_source(path, split="test")
    assert source.format == "parquet" and "Parquet file" in source.description
    assert load_text(source) == "\n\n".join(RECORDS)
    with pytest.raises(ValueError) as info:
        load_text(path, text_field="body")
    assert f"Parquet file {path}" in one_line_error(info) and "no column 'body' (columns: text, n)" in str(info.value)


@needs_glue
def test_real_glue_tsv_columns():
    sst2 = SHARED_DATA / "glue" / "SST-2" / "dev.tsv"
    assert len(list(iter_records(resolve_source(sst2, split="x", text_field="sentence")))) == 872
    mrpc = SHARED_DATA / "glue" / "MRPC" / "dev.tsv"
    assert len(list(iter_records(resolve_source(mrpc, split="x", text_field="#1 String")))) == 408


# --- one-line errors naming the file and line ----------------------------------------------------


@pytest.mark.parametrize(
    "name,content,field,expected",
    [
        ("a.jsonl", '{"text": "ok"}\n{"prompt": "x"}\n', "text", r"a\.jsonl: line 2 has no field 'text' \(fields: prompt\)"),
        ("a.jsonl", '{"text": "ok"}\n\n{"text": "x"\n', "text", r"a\.jsonl: line 3 is not valid JSON \(Expecting"),
        ("a.jsonl", '["text"]\n', "text", r"a\.jsonl: line 1 is a JSON array, not an object with a 'text' field"),
        ("a.jsonl", '{"text": 3}\n', "text", r"a\.jsonl: line 1 field 'text' is a JSON number, not a string"),
        ("a.json", '{\n  "text": "x"\n}\n', "text", r"a\.json: line 1 is not valid JSON .*read as JSON Lines"),
        ("a.csv", "a,b\n1,2\n", "text", r"a\.csv: line 1 \(the header\) has no column 'text' \(columns: a, b\)"),
        ("a.csv", "text,b\n1,2\n3\n", "text", r"a\.csv: line 3 has 1 fields but the header has 2"),
        ("a.tsv", "", "text", r"a\.tsv: empty TSV file, no header line"),
    ],
)
def test_bad_records_get_one_line_errors(tmp_path, name, content, field, expected):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=expected) as info:
        load_text(path, text_field=field)
    assert str(path) in one_line_error(info)


def test_unrecognised_formats_and_encodings(tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("# not read raw")
    with pytest.raises(ValueError, match=r"notes\.md: unrecognised data file format '\.md'; kronlm reads \.txt") as info:
        load_text(notes)
    one_line_error(info)
    bare = tmp_path / "README"
    bare.write_text("x")
    with pytest.raises(ValueError, match=r"README: unrecognised data file format '\(no suffix\)'"):
        resolve_source(bare, split="test")
    latin = tmp_path / "l.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"l\.jsonl: line 2 is not valid UTF-8 \(byte 13 of the line\)"):
        load_text(latin)
    with pytest.raises(FileNotFoundError, match="JSON Lines file missing.jsonl not found"):
        resolve_source("missing.jsonl", split="test")
    with pytest.raises(ValueError, match=r"a configuration name \('x'\) applies to datasets, not to a JSON Lines file"):
        resolve_source(latin, split="test", name="x")
    with pytest.raises(ValueError, match="text_field must be a non-empty column name"):
        resolve_source(latin, split="test", text_field="")


# --- content fingerprints ------------------------------------------------------------------------


def test_file_fingerprint_follows_content_not_size_mtime_or_path(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "aaaa"}\n')
    source = resolve_source(path, split="x")
    before = source_fingerprint(source)
    stat = path.stat()
    path.write_text('{"text": "bbbb"}\n')
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    after = source_fingerprint(source)
    assert after["sha256"] != before["sha256"]
    moved = tmp_path / "moved.jsonl"
    shutil.copyfile(path, moved)
    assert source_fingerprint(resolve_source(moved, split="x")) == after
    assert source_fingerprint(resolve_source(path, split="x", text_field="body")) != after


def test_folder_and_hub_fingerprints(tmp_path, monkeypatch):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "a"}\n')
    source = resolve_source(folder, split="train")
    first = source_fingerprint(source)
    (folder / "train.jsonl").write_text('{"text": "b"}\n')
    assert source_fingerprint(source) != first

    calls = []

    def fake_builder(path, name):
        calls.append((path, name))
        return SimpleNamespace(config_id=name, hash=revision)

    monkeypatch.setattr(datasets, "load_dataset_builder", fake_builder)
    hub = resolve_source("someone/corpus", split="train", name="en")
    revision = "abc"
    old = source_fingerprint(hub)
    assert old["builder_hash"] == "abc" and old["split"] == "train" and calls == [("someone/corpus", "en")]
    revision = "def"
    assert source_fingerprint(hub) != old
