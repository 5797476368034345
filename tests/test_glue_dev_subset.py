"""max_dev_examples: a seeded dev subset for smoke runs, the same for every model of a run, reported
as such; the whole dev split otherwise; bad values refused by name, in the config and on the command line."""

from __future__ import annotations

import pytest
from test_glue_models import synthetic_sst2, tiny_bert_classifier, tiny_tokenizer
from test_glue_training import write_sst2

from kronlm.cli import main
from kronlm.tasks.glue import (
    GlueFamily,
    GlueTrainConfig,
    get_task,
    read_report,
    run_glue,
)


def test_dev_subset_is_seeded_and_reported(tmp_path):
    tok = tiny_tokenizer(tmp_path / "base")
    glue = write_sst2(tmp_path / "data", synthetic_sst2(40, 0), synthetic_sst2(16, 1))
    family = GlueFamily(get_task("sst2"), tok, data_dir=glue)
    whole = family.load_splits(GlueTrainConfig(max_length=16))
    assert len(whole.dev) == 16 and whole.sources["dev"].endswith("dev.tsv")
    cfg = GlueTrainConfig(max_length=16, max_dev_examples=5)
    first, again = family.load_splits(cfg), family.load_splits(cfg)
    assert len(first.dev) == 5 and first.dev == again.dev
    assert first.sources["dev"].endswith("(random 5 of 16, seed 42)")
    # The training rows do not change; a subset larger than the split is all of it.
    assert first.train == whole.train and len(family.load_splits(cfg.replace(max_dev_examples=99)).dev) == 16

    tiny_bert_classifier(seed=3).bert.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    run = cfg.replace(batch_size=16, max_steps=2, val_fraction=0.25)
    report = run_glue("sst2", tmp_path / "run", model=str(tmp_path / "base"), config=run, data_dir=glue, log=lambda line: None)
    teacher = report.row("teacher")
    assert report.settings["data"]["dev"].endswith("(random 5 of 16, seed 42)")
    assert teacher.eval_tokens == sum(len(r["input_ids"]) for r in first.dev)

    # The same through `kronlm glue --max-dev-examples`.
    argv = ["glue", "--task", "sst2", "--model", str(tmp_path / "base"), "--out", str(tmp_path / "cli"), "--data-dir",
            str(tmp_path / "data"), "--max-length", "16", "--batch-size", "16", "--max-steps", "2", "--val-fraction", "0.25"]
    assert main([*argv, "--max-dev-examples", "5"]) == 0
    assert read_report(tmp_path / "cli").settings["data"]["dev"].endswith("(random 5 of 16, seed 42)")


def test_bad_dev_subset_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(ValueError, match="glue config: max_dev_examples must be a positive integer or null, got 0"):
        GlueTrainConfig(max_dev_examples=0)
    with pytest.raises(ValueError, match="max_dev_examples must be a positive integer or null, got True"):
        GlueTrainConfig(max_dev_examples=True)
    assert main(["glue", "--task", "sst2", "--model", "x", "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path),
                 "--max-dev-examples", "0"]) == 2
    assert "--max-dev-examples" in capsys.readouterr().err
