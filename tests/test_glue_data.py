"""GLUE task table, TSV reader (errors name file and line), HF rows, batching."""

from pathlib import Path

import pytest
import torch
from shared_paths import SHARED_DATA

from kronlm.tasks.glue import (
    GlueBatchCollator,
    get_task,
    load_glue_split,
    read_glue_tsv,
)
from kronlm.tasks.glue.data import examples_from_rows, split_path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_get_task_aliases_and_unknown():
    assert get_task("SST-2").name == "sst2"
    assert get_task("sts-b").is_regression and get_task("sts-b").num_labels == 1
    assert get_task("mnli").num_labels == 3 and get_task("mnli").dev_split == "dev_matched"
    with pytest.raises(ValueError, match="unknown GLUE task 'wnli2'.*sst2"):
        get_task("wnli2")


def test_read_sst2_and_mrpc_with_bom(tmp_path):
    sst = write(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel\na good film \t1\nbad\t0\n\n")
    ex = read_glue_tsv(sst, get_task("sst2"))
    assert ex.texts == [("a good film",), ("bad",)] and ex.labels == [1, 0]
    mrpc = write(tmp_path / "MRPC" / "dev.tsv", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\tHe said \" x\tShe said y\n")
    assert split_path(get_task("mrpc"), "dev", tmp_path) == mrpc
    ex = load_glue_split(get_task("mrpc"), "dev", tmp_path)
    assert ex.texts == [('He said " x', "She said y")] and ex.labels == [0]


def test_cola_has_no_header_and_nli_labels_map_to_hf_ids(tmp_path):
    cola = write(tmp_path / "c.tsv", "gj04\t1\t\tThe sailors rode.\ngj04\t0\t*\tRode sailors the.\n")
    assert read_glue_tsv(cola, get_task("cola")).labels == [1, 0]
    rte = write(tmp_path / "r.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tnot_entailment\n1\tc\td\tentailment\n")
    assert read_glue_tsv(rte, get_task("rte")).labels == [1, 0]
    mnli_task = get_task("mnli")
    mnli = write(tmp_path / "m.tsv", "sentence1\tsentence2\tgold_label\np\th\tcontradiction\np\th\tneutral\n")
    assert read_glue_tsv(mnli, mnli_task).labels == [2, 1]


def test_stsb_scores_parse_and_out_of_range_is_refused(tmp_path):
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    ok = write(tmp_path / "ok.tsv", head + "0\tg\tf\ty\t0\ts\ts\tA man.\tA guy.\t4.750\n")
    assert read_glue_tsv(ok, get_task("stsb")).labels == [4.75]
    bad = write(tmp_path / "bad.tsv", head + "0\tg\tf\ty\t0\ts\ts\tA man.\tA guy.\t7.5\n")
    with pytest.raises(ValueError, match=r"bad\.tsv:2: stsb score 7.5 is outside \[0, 5\]"):
        read_glue_tsv(bad, get_task("stsb"))


def test_malformed_row_names_file_and_line(tmp_path):
    path = write(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel\nfine\t1\n\nbroken row without tab\nlater\t0\n")
    with pytest.raises(ValueError, match=r"train\.tsv:4: malformed row, 1 tab-separated fields where sst2 needs 2"):
        read_glue_tsv(path, get_task("sst2"))


def test_label_outside_label_set_names_file_and_line(tmp_path):
    path = write(tmp_path / "t.tsv", "sentence\tlabel\nfine\t1\nodd\t2\n")
    with pytest.raises(ValueError, match=r"t\.tsv:3: label '2' is not one of the sst2 labels \['0', '1'\]"):
        read_glue_tsv(path, get_task("sst2"))


def test_missing_split_missing_header_column_and_empty_text(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"MRPC/train\.tsv: mrpc train split not found"):
        load_glue_split(get_task("mrpc"), "train", tmp_path)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        split_path(get_task("sst2"), "test", tmp_path)
    nohead = write(tmp_path / "h.tsv", "text\tlabel\nx\t1\n")
    with pytest.raises(ValueError, match=r"h\.tsv:1: header has no column \['sentence'\]"):
        read_glue_tsv(nohead, get_task("sst2"))
    empty = write(tmp_path / "e.tsv", "sentence\tlabel\n \t1\n")
    with pytest.raises(ValueError, match=r"e\.tsv:2: empty text field"):
        read_glue_tsv(empty, get_task("sst2"))


def test_hf_rows_and_test_labels_refused():
    task = get_task("mrpc")
    ex = examples_from_rows(task, [{"sentence1": "a", "sentence2": "b", "label": 1, "idx": 0}], "train", "hf")
    assert ex.texts == [("a", "b")] and ex.labels == [1]
    with pytest.raises(ValueError, match="hf row 0: label -1 is outside the mrpc label ids 0..1"):
        examples_from_rows(task, [{"sentence1": "a", "sentence2": "b", "label": -1}], "test", "hf")


def test_subset_is_seeded_and_a_real_subset(tmp_path):
    lines = "".join(f"s{i}\t{i % 2}\n" for i in range(50))
    ex = read_glue_tsv(write(tmp_path / "t.tsv", "sentence\tlabel\n" + lines), get_task("sst2"))
    a, b, c = ex.subset(10, 1), ex.subset(10, 1), ex.subset(10, 2)
    assert a.texts == b.texts and a.texts != c.texts and len(set(a.texts)) == 10
    assert all(ex.labels[int(t[0][1:])] == y for t, y in zip(a.texts, a.labels))


def test_held_out_split_is_seeded_disjoint_and_complete(tmp_path):
    lines = "".join(f"s{i}\t{i % 2}\n" for i in range(50))
    ex = read_glue_tsv(write(tmp_path / "t.tsv", "sentence\tlabel\n" + lines), get_task("sst2"))
    train, held = ex.hold_out(0.1, seed=3)
    assert len(held) == 5 and len(train) == 45
    assert set(train.texts).isdisjoint(held.texts) and sorted(train.texts + held.texts) == sorted(ex.texts)
    assert train.texts == [t for t in ex.texts if t in set(train.texts)]  # the original order is kept
    again, held_again = ex.hold_out(0.1, seed=3)
    assert held_again.texts == held.texts and again.texts == train.texts
    assert ex.hold_out(0.1, seed=4)[1].texts != held.texts
    # Not the subset's stream: holding out from a subset drawn with the same seed is still a random draw.
    assert held.texts != ex.subset(5, 3).texts
    assert ex.hold_out(0.0, seed=3) == (ex, None)
    with pytest.raises(ValueError, match="val_fraction 0.99 of 50 sst2 examples leaves none to train on"):
        ex.hold_out(0.99, seed=3)


def test_collator_pads_right_and_masks():
    rows = [{"input_ids": [5, 6, 7], "token_type_ids": [0, 0, 1], "labels": 1}, {"input_ids": [8], "token_type_ids": [0], "labels": 0}]
    batch = GlueBatchCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert batch["labels"].dtype == torch.long
    assert GlueBatchCollator(0, regression=True)([{"input_ids": [1], "labels": 2.5}])["labels"].dtype == torch.float32


REAL_DEV = {"sst2": 872, "mrpc": 408, "stsb": 1500, "cola": 1043, "qnli": 5463}


@pytest.mark.parametrize("name", sorted(REAL_DEV))
def test_real_dev_files_parse(name):
    root = SHARED_DATA
    if root is None or not (root / "glue").is_dir():
        pytest.skip("shared GLUE data not present")
    task = get_task(name)
    ex = load_glue_split(task, "dev", root / "glue")
    assert len(ex) == REAL_DEV[name]
    assert all(len(t) == len(task.text_columns) for t in ex.texts)
    if not task.is_regression:
        assert set(ex.labels) == set(range(task.num_labels))
