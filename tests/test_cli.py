"""The kronlm command line on a tiny GPT-2 saved with the real GPT-2 tokenizer files."""

import json

import pytest
import torch
import yaml

from kronlm.cli import main
from kronlm.utils.paths import shared_data_dir

TOKENIZER_DIR = shared_data_dir().parent / "tokenizers" / "gpt2" if shared_data_dir() else None
pytestmark = pytest.mark.skipif(TOKENIZER_DIR is None or not TOKENIZER_DIR.is_dir(), reason="../shared/tokenizers/gpt2 missing")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

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
