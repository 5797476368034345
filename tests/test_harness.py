"""lm-evaluation-harness on compressed models: in-process (`kronlm eval --tasks / --lambada-jsonl`),
LAMBADA-style last-word accuracy from a local JSON Lines file, and the `lm_eval` command line on a
saved folder in a process without kronlm (trust_remote_code=True)."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama

import kronlm
from kronlm import CompressionConfig, KroneckerTarget
from kronlm.cli import main

lm_eval = pytest.importorskip("lm_eval")
from kronlm.evaluation.harness import lambada_task, run_harness

WORDS = [f"w{i}" for i in range(40)]
CFG = CompressionConfig(targets=[KroneckerTarget(["**.mlp.gate_proj", "**.mlp.up_proj"], b_shape=(2, 1)), KroneckerTarget(["**.mlp.down_proj"], b_shape=(1, 2))])


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


def _passages(model, tokenizer, n=12, greedy_every=2, seed=0):
    """n passages of 8 words; every `greedy_every`-th ends with the model's own greedy next word (a sure hit)."""
    rng = random.Random(seed)
    texts, hits = [], 0
    while len(texts) < n:
        context = [rng.choice(WORDS) for _ in range(7)]
        if len(texts) % greedy_every == 0:
            with torch.no_grad():
                best = int(model(torch.tensor([tokenizer(" ".join(context))["input_ids"]])).logits[0, -1].argmax())
            if best < 2:
                continue  # <eos> / <unk>: not a word
            last, hits = WORDS[best - 2], hits + 1
        else:
            last = rng.choice(WORDS)
        texts.append(" ".join([*context, last]))
    return texts


def _direct(model, tokenizer, texts):
    """(accuracy, perplexity) of the last word, computed here without lm-eval."""
    correct, total_logprob = 0, 0.0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -2].double(), -1)
        total_logprob += float(logprobs[ids[-1]])
        correct += int(logprobs.argmax()) == ids[-1]
    return correct / len(texts), math.exp(-total_logprob / len(texts))


@pytest.fixture
def setup(tmp_path):
    tokenizer = _tokenizer()
    model = kronlm.compress(tiny_llama(vocab_size=len(tokenizer)), CFG, progress=False)
    texts = _passages(model, tokenizer)
    data = tmp_path / "lambada.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return model, tokenizer, texts, data


def test_local_lambada_matches_a_direct_computation(setup):
    model, tokenizer, texts, data = setup
    result = run_harness(model, tokenizer, [lambada_task(data)])
    acc, ppl = _direct(model, tokenizer, texts)
    assert acc >= 0.5  # the greedy-built half are hits
    assert result.samples["lambada_local"] == len(texts)
    assert result.metrics["lambada_local"]["acc"] == pytest.approx(acc)
    assert result.metrics["lambada_local"]["perplexity"] == pytest.approx(ppl, rel=1e-5)


def test_lambada_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one two"}\n{"text": "single"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: needs a string"):
        lambada_task(bad)
    bad.write_text('{"text": "one two"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        lambada_task(bad)


def test_cli_eval_runs_tasks_side_by_side(setup, tmp_path, capsys):
    model, tokenizer, texts, data = setup
    kronlm.save(model, tmp_path / "k", tokenizer=tokenizer)
    dense = tiny_llama(vocab_size=len(tokenizer))
    dense.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    rc = main(["eval", str(tmp_path / "k"), "--lambada-jsonl", str(data), "--baseline", str(tmp_path / "dense"), "--json", str(tmp_path / "e.json")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "lambada_local acc" in printed and "baseline" in printed
    report = json.loads((tmp_path / "e.json").read_text())
    acc, _ = _direct(model, tokenizer, texts)
    assert report["results"]["model"]["tasks"]["metrics"]["lambada_local"]["acc"] == pytest.approx(acc)
    assert report["results"]["baseline"]["tasks"]["metrics"]["lambada_local"]["acc"] == pytest.approx(_direct(dense, tokenizer, texts)[0])
    assert main(["eval", str(tmp_path / "k")]) == 2  # nothing to measure
    assert main(["eval", str(tmp_path / "k"), "--tasks", "no_such_task_xyz"]) == 1
    assert "no_such_task_xyz" in capsys.readouterr().err


TASK_YAML = """task: lambada_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_command_line_loads_the_folder_without_kronlm(setup, tmp_path):
    model, tokenizer, texts, data = setup
    folder = kronlm.save(model, tmp_path / "k", tokenizer=tokenizer)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "lambada_tiny.yaml").write_text(TASK_YAML.format(data=data))
    # `import kronlm` fails in this process: lm_eval must load the folder through its own code files.
    code = "import sys; sys.modules['kronlm'] = None; from lm_eval.__main__ import cli_evaluate; sys.argv[0] = 'lm_eval'; cli_evaluate()"
    argv = ["--model", "hf", "--model_args", f"pretrained={folder},trust_remote_code=True,dtype=float32", "--tasks", "lambada_tiny",
            "--include_path", str(tasks), "--device", "cpu", "--batch_size", "1", "--output_path", str(tmp_path / "out")]
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("results*.json")]
    assert len(results) == 1
    assert results[0]["results"]["lambada_tiny"]["acc,none"] == pytest.approx(_direct(model, tokenizer, texts)[0])
