"""The kronlm command line on a tiny GPT-2 saved with the real GPT-2 tokenizer files, and its
argument errors (which need no data at all, so they run on a clean clone)."""

import json

import pytest
import torch
import yaml
from shared_paths import GPT2_TOKENIZER_DIR, SHARED_DATA
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from kronlm.cli import main
from kronlm.distill.stages import DEFAULT_RECIPE, RecoveryConfig

TOKENIZER_DIR = GPT2_TOKENIZER_DIR


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    if TOKENIZER_DIR is None:
        pytest.skip("../shared/tokenizers/gpt2 missing")
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, n_inner=64)).save_pretrained(folder)
    GPT2TokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(folder)
    text = folder / "text.txt"
    text.write_text(" ".join(["The quick brown fox jumps over the lazy dog."] * 40))
    return folder


def test_compress_with_yaml_config_then_eval(tiny_folder, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"targets": [{"modules": ["**.mlp.c_fc"], "b_shape": [2, 1]}, {"modules": ["**.mlp.c_proj"], "b_shape": [1, 2]}]}))
    out = tmp_path / "out"
    rc = main(["compress", str(tiny_folder), "--config", str(config), "--out", str(out), "--eval", str(tiny_folder / "text.txt"), "--max-length", "64", "--stride", "32"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "4 modules compressed" in printed and "dense" in printed and "compressed" in printed
    results = json.loads((out / "eval.json").read_text())
    assert results["compressed"]["params"] < results["dense"]["params"]
    assert results["dense"]["tokens_scored"] == results["compressed"]["tokens_scored"] > 0

    rc = main(["eval", str(out), "--data", str(tiny_folder / "text.txt"), "--max-length", "64", "--stride", "32", "--json", str(tmp_path / "e.json")])
    assert rc == 0
    again = json.loads((tmp_path / "e.json").read_text())
    # The saved model reproduces the perplexity measured right after compression.
    assert again["ppl"] == pytest.approx(results["compressed"]["ppl"], rel=1e-6)


def test_compress_activation_aware_and_budget(tiny_folder, tmp_path, capsys):
    text = str(tiny_folder / "text.txt")
    common = ["--calibration", text, "--calibration-sequences", "4", "--calibration-length", "32", "--eval", text, "--max-length", "64", "--stride", "32"]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"targets": [{"modules": ["**.mlp.c_fc"], "b_shape": [2, 1]}, {"modules": ["**.mlp.c_proj"], "b_shape": [2, 2]}]}))
    out = tmp_path / "aa"
    assert main(["compress", str(tiny_folder), "--config", str(config), "--init", "activation_aware", "--out", str(out), *common]) == 0
    assert "calibration: 4 x 32 tokens" in capsys.readouterr().out
    meta = json.loads((out / "kronlm_compression.json").read_text())
    assert {m["init"] for m in meta["report"]["modules"]} == {"activation_aware"}

    out = tmp_path / "budget"
    assert main(["compress", str(tiny_folder), "--budget", "0.995", "--out", str(out), *common]) == 0
    printed = capsys.readouterr().out
    assert "estimated NLL increase" in printed and "choices:" in printed
    meta = json.loads((out / "kronlm_compression.json").read_text())
    allocation = meta["report"]["allocation"]
    assert allocation["params_after"] <= allocation["target_params"] == int(0.995 * allocation["params_before"])
    assert meta["report"]["params_after"] == allocation["params_after"]
    # The saved budget model reloads with the chosen shapes: same perplexity as right after compression.
    results = json.loads((out / "eval.json").read_text())
    assert main(["eval", str(out), "--data", text, "--max-length", "64", "--stride", "32", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["ppl"] == pytest.approx(results["compressed"]["ppl"], rel=1e-6)


def test_compress_refuses_an_out_folder_that_is_not_a_model(tmp_path, capsys):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    # Refused before any model is loaded (the model spec does not even exist).
    assert main(["compress", "./nowhere", "--preset", "krony-pt-96m", "--out", str(precious)]) == 2
    err = capsys.readouterr().err
    assert "mine: exists and is not a model folder" in err and "--overwrite" in err
    assert (precious / "notes.txt").read_text() == "keep me"


@pytest.mark.skipif(SHARED_DATA is None, reason="../shared/data missing")
def test_distill_takes_a_data_alias_and_says_which_split(tiny_folder, tmp_path, capsys):
    # wikitext2 has no local train split: offline, training reads the local validation split and says so.
    student = tmp_path / "student"
    assert main(["compress", str(tiny_folder), "--config", str(_mlp_config(tmp_path)), "--out", str(student)]) == 0
    rc = main(["distill", "--student", str(student), "--teacher", str(tiny_folder), "--data", "wikitext2", "--data-dir", str(SHARED_DATA),
               "--max-tokens", "4096", "--block-size", "64", "--batch-size", "4", "--max-steps", "2", "--warmup-steps", "0",
               "--recipe", "ce", "--out", str(tmp_path / "run")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "validation split" in printed and "train split is not available offline" in printed
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_distill_blockwise_mode_from_the_command_line(tiny_folder, tmp_path, capsys):
    student = tmp_path / "student"
    assert main(["compress", str(tiny_folder), "--config", str(_mlp_config(tmp_path)), "--out", str(student)]) == 0
    argv = ["distill", "--student", str(student), "--teacher", str(tiny_folder), "--data", str(tiny_folder / "text.txt"),
            "--block-size", "32", "--batch-size", "2", "--max-steps", "3", "--warmup-steps", "0", "--mode", "blockwise",
            "--block-inputs", "teacher", "--end-to-end-steps", "2", "--out", str(tmp_path / "bw")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "block-wise training of 2 of 2 blocks" in printed and "validation perplexity:" in printed
    summary = json.loads((tmp_path / "bw" / "blockwise_summary.json").read_text())
    assert summary["val_ppl_end_to_end"] is not None and len(summary["blocks"]) == 2
    assert main(argv[:-2] + ["--out", str(tmp_path / "bw2"), "--cache-dir", str(tmp_path / "bw" / "teacher_cache")]) == 0
    assert main(["distill", "--student", str(student), "--data", str(tiny_folder / "text.txt"), "--mode", "blockwise",
                 "--out", str(tmp_path / "x")]) == 2
    assert "block-wise distillation learns from a teacher: give --teacher MODEL" in capsys.readouterr().err


def _trained_teacher(tiny_folder, folder):
    """The tiny GPT-2 after a few steps on its text: a teacher whose perplexity means something."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel.from_pretrained(tiny_folder)
    tokenizer = GPT2TokenizerFast.from_pretrained(tiny_folder)
    ids = tokenizer((tiny_folder / "text.txt").read_text(), return_tensors="pt")["input_ids"][:, :128]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_compress_then_recover_block_wise_in_one_command(tiny_folder, tmp_path, capsys):
    text = str(tiny_folder / "text.txt")
    teacher = _trained_teacher(tiny_folder, tmp_path / "teacher")
    recover = tmp_path / "recover.yaml"
    recover.write_text(yaml.safe_dump({"mode": "blockwise", "recipe": "ce", "loss_weights": {"ce": 0.0, "kd": 1.0}, "block_size": 32,
                                       "micro_batch_size": 2, "max_steps": 8, "epochs": None, "warmup_steps": 0, "lr": 3e-3,
                                       "eval_every": 2, "freeze_uncompressed": True}))
    out = tmp_path / "out"
    coarse = tmp_path / "coarse.yaml"  # large B factors: an error worth recovering from
    coarse.write_text(yaml.safe_dump({"targets": [{"modules": ["**.mlp.c_fc", "**.mlp.c_proj"], "b_shape": [8, 8]}]}))
    argv = ["compress", str(teacher), "--config", str(coarse), "--out", str(out), "--recover", text,
            "--recover-tokens", "384", "--recover-config", str(recover), "--eval", text, "--max-length", "64", "--stride", "32"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "recovered in" in printed and "validation perplexity" in printed
    results = json.loads((out / "eval.json").read_text())
    # Every block's held-out output error went down, and the saved folder is the recovered model.
    summary = json.loads((tmp_path / "out.recovery" / "stage-1-blockwise" / "blockwise_summary.json").read_text())
    assert len(summary["blocks"]) == 2 and all(b["best_val"] < b["first_loss"] for b in summary["blocks"])
    # The recovery keeps a stage only when it lowers the validation perplexity: never worse than the start.
    assert results["recovered"]["ppl"] <= results["compressed"]["ppl"]
    assert results["recovered"]["params"] == results["compressed"]["params"] < results["dense"]["params"]
    assert main(["eval", str(out), "--data", text, "--max-length", "64", "--stride", "32", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["ppl"] == pytest.approx(results["recovered"]["ppl"], rel=1e-6)

    # A corpus with fewer tokens than asked: one line, before any work, nothing written.
    big = [a if a != "384" else "100000" for a in argv]
    big[big.index(str(out))] = str(tmp_path / "o3")
    assert main(big) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "400 tokens, fewer than the 100,000 asked for" in errors[0]
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o3.recovery").exists()
    recover.write_text(yaml.safe_dump({"stages": [{"mode": "local", "block_size": 32}, {"mode": "end_to_end", "block_size": 64}]}))
    assert main([*argv[:4], "--out", str(tmp_path / "o2"), *argv[6:]]) == 2
    assert "the recovery's stages use block sizes [32, 64]" in capsys.readouterr().err


def test_compress_recovers_in_stages_by_default(tiny_folder, tmp_path, capsys):
    text = str(tiny_folder / "text.txt")
    teacher = _trained_teacher(tiny_folder, tmp_path / "teacher")
    coarse = tmp_path / "coarse.yaml"
    coarse.write_text(yaml.safe_dump({"targets": [{"modules": ["**.mlp.c_fc", "**.mlp.c_proj"], "b_shape": [8, 8]}]}))
    out = tmp_path / "out"
    # The packaged recipe with blocks the tiny model's context holds, its budget scaled to 0.3 minutes in all.
    recipe = yaml.safe_load(DEFAULT_RECIPE.read_text())
    recipe["defaults"].update(block_size=32, micro_batch_size=2)
    (tmp_path / "recover.yaml").write_text(yaml.safe_dump(recipe))
    argv = ["compress", str(teacher), "--config", str(coarse), "--out", str(out), "--recover", text, "--recover-tokens", "384",
            "--recover-config", str(tmp_path / "recover.yaml"), "--recover-minutes", "0.3", "--eval", text, "--max-length", "64",
            "--stride", "32"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    budgets = [s.max_minutes for s in RecoveryConfig.from_file(tmp_path / "recover.yaml").with_budget(0.3).stages]
    assert " -> ".join(f"{mode} ({m:.1f} min)" for mode, m in zip(("local", "blockwise", "end_to_end"), budgets)) in printed
    summary = json.loads((tmp_path / "out.recovery" / "recovery_summary.json").read_text())
    assert [s["mode"] for s in summary["stages"]] == ["local", "blockwise", "end_to_end"]
    # The kept student is the stage result (or the start) with the lowest validation perplexity.
    candidates = [summary["stages"][0]["val_ppl_before"]] + [s["val_ppl_after"] for s in summary["stages"]]
    assert summary["val_ppl"] == min(candidates) and candidates.index(summary["val_ppl"]) == summary["chosen"]
    results = json.loads((out / "eval.json").read_text())
    assert results["recovered"]["ppl"] <= results["compressed"]["ppl"]


def test_distill_local_mode_and_staged_configs_from_the_command_line(tiny_folder, tmp_path, capsys):
    student = tmp_path / "student"
    assert main(["compress", str(tiny_folder), "--config", str(_mlp_config(tmp_path)), "--out", str(student)]) == 0
    common = ["distill", "--student", str(student), "--teacher", str(tiny_folder), "--data", str(tiny_folder / "text.txt"),
              "--block-size", "32", "--batch-size", "2", "--warmup-steps", "0"]
    assert main([*common, "--mode", "local", "--epochs", "2", "--local-target", "dense", "--out", str(tmp_path / "loc")]) == 0
    printed = capsys.readouterr().out
    assert "local reconstruction of 2 of 2 blocks" in printed and "validation perplexity:" in printed
    staged = tmp_path / "staged.yaml"
    staged.write_text(yaml.safe_dump({"defaults": {"recipe": "ce", "loss_weights": {"ce": 0.0, "kd": 1.0}},
                                      "stages": [{"mode": "local", "max_steps": 2}, {"mode": "end_to_end", "max_steps": 2}]}))
    assert main([*common, "--config", str(staged), "--out", str(tmp_path / "st")]) == 0
    printed = capsys.readouterr().out
    assert "local" in printed and "end_to_end" in printed and "kept " in printed
    assert (tmp_path / "st" / "stage-1-local" / "final" / "config.json").is_file()
    assert main([*common, "--max-steps", "2", "--epochs", "1", "--out", str(tmp_path / "x")]) == 2
    assert "give --max-steps or --epochs, not both" in capsys.readouterr().err


def _mlp_config(tmp_path):
    config = tmp_path / "mlp.yaml"
    config.write_text(yaml.safe_dump({"targets": [{"modules": ["**.mlp.c_fc"], "b_shape": [2, 1]}, {"modules": ["**.mlp.c_proj"], "b_shape": [1, 2]}]}))
    return config


def test_presets_lists_names(capsys):
    assert main(["presets", "--no-counts"]) == 0
    out = capsys.readouterr().out
    assert "krony-pt-96m" in out and "kroneckerbert8" in out and "krony-pt-llama-mlp-2x" in out


@pytest.mark.parametrize(
    "argv,code,message",
    [
        (["compress", "gpt2", "--out", "x"], 2, "give exactly one of --preset NAME, --config FILE or --budget FRACTION"),
        (["compress", "gpt2", "--budget", "0.8", "--out", "x"], 2, "--budget needs --calibration DATA"),
        (["compress", "gpt2", "--budget", "1.5", "--out", "x"], 2, "--budget"),
        (["compress", "gpt2", "--preset", "krony-pt-96m", "--init", "activation_aware", "--out", "x"], 2, "initialiser 'activation_aware' needs --calibration DATA"),
        (["compress", "./nowhere", "--preset", "krony-pt-96m", "--out", "x"], 1, "nowhere"),
        (["compress", "gpt2", "--preset", "krony-pt-1m", "--out", "x"], 1, "unknown preset 'krony-pt-1m'"),
        (["eval", "./nowhere", "--data", "wikitext2"], 1, "nowhere"),
        (["eval", "gpt2", "--data", "wikitext2", "--max-length", "1"], 2, "--max-length"),
        (["frobnicate"], 2, "No such command"),
    ],
)
def test_bad_arguments_give_one_line_and_nonzero_exit(argv, code, message, capsys):
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("kronlm: error:") and message in err and len(err.splitlines()) == 1
