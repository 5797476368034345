"""The budget figures are reproducible with the command line: the Pareto benchmark's code path
(one calibration and pricing, reused) and ``kronlm compress --budget`` give identical allocations
and bit-identical factors on the same settings; the flags that the benchmarks vary exist."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json

import pytest
import torch
from shared_paths import GPT2_TOKENIZER_DIR, REPO_ROOT
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

import kronlm
from kronlm.cli import main
from kronlm.compression import BudgetConfig, count_parameters
from kronlm.compression.budget import budget_candidates, budget_statistics, price_modules
from kronlm.compression.calibration import calibration_mix
from kronlm.modeling import compress_to_budget

DEFAULTS = BudgetConfig()

pytestmark = pytest.mark.skipif(GPT2_TOKENIZER_DIR is None, reason="../shared/tokenizers/gpt2 missing")


def _benchmark():
    spec = importlib.util.spec_from_file_location("pareto_benchmark", REPO_ROOT / "benchmarks" / "pareto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, n_inner=64)).save_pretrained(path)
    GPT2TokenizerFast.from_pretrained(GPT2_TOKENIZER_DIR).save_pretrained(path)
    (path / "text.txt").write_text(" ".join(f"The quick brown fox number {i} jumps over the lazy dog." for i in range(60)))
    return path


# The first case names --sequential-calibration off, lifts the multiply-add cap and runs the measured
# tie-break; the second leaves the CLI's defaults (sequential weight, the cap at 1.0, no tie-break).
@pytest.mark.parametrize("families,cut,extra,sequential,ties", [("svd,kronecker,kronecker_lowrank", 6000, [], "off", 2),
                                                                ("kronecker", 8000, ["--calibration-seed", "3"], None, None)])
def test_benchmark_path_equals_the_cli(folder, tmp_path, families, cut, extra, sequential, ties):
    text = str(folder / "text.txt")
    out = tmp_path / "cli"
    target = count_parameters(kronlm.load_model(str(folder))) - cut  # the tiny model is mostly its 50,257-token embedding
    flag = [] if sequential is None else ["--sequential-calibration", sequential]
    flag += [] if ties is None else ["--tie-break-modules", str(ties), "--tie-break-margin", "1000", "--max-macs", "none"]
    argv = ["compress", str(folder), "--budget-params", str(target), "--families", families, "--calibration", text,
            "--calibration-sequences", "4", "--calibration-length", "32", "--sensitivity-sequences", "2", *flag, "--out", str(out), *extra]
    assert main(argv) == 0

    bench = _benchmark()
    args = argparse.Namespace(sensitivity_sequences=2, check_rounds=DEFAULTS.check_rounds, sequential=sequential or DEFAULTS.sequential,
                              tie_break_modules=DEFAULTS.tie_break_modules if ties is None else ties,
                              tie_break_margin=DEFAULTS.tie_break_margin if ties is None else 1000.0,
                              max_macs=DEFAULTS.max_macs if ties is None else None)
    model, tokenizer = kronlm.load_model_and_tokenizer(str(folder))
    seed = int(extra[1]) if extra else None
    # As the benchmark does: calibration ids with the subset check's held-out sequences after the priced ones,
    # statistics and pricing once (all families), a copy per point.
    extra = DEFAULTS.held_out_sequences if "," in families else 0
    ids, _ = calibration_mix(model, tokenizer, [text], 4 + extra, 32, seed=seed, progress=False)
    ids, held_out = ids[:4], ids[4:]
    stats = budget_statistics(model, ids, budget_candidates(model), sensitivity_sequences=2, progress=False)
    pricing = price_modules(model, stats, settings=bench.settings_for(args, bench.SETS["mixed"]), progress=False)
    student = copy.deepcopy(model)
    config = bench.settings_for(args, tuple(families.split(","))).replace(target_params=target)
    allocation = compress_to_budget(student, config, ids, held_out=held_out if extra else None, statistics=stats, pricing=copy.deepcopy(pricing),
                                    progress=False)
    assert bool(allocation.held_out_nll) == ("," in families)  # the subset check runs over several families only
    assert bool(allocation.tie_break) == bool(ties)

    saved = json.loads((out / "kronlm_compression.json").read_text())["report"]["allocation"]
    ours = json.loads(json.dumps(allocation.to_dict()))
    assert saved == ours
    assert allocation.family_counts() != {"dense": len(allocation.choices)}  # something was compressed
    cli_state = kronlm.load(out).state_dict()
    state = student.state_dict()
    assert cli_state.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(cli_state[key], tensor), key
    flags = dict(model="smollm2", calibration=["wikitext2"], calibration_split="validation", calibration_sequences=32,
                 calibration_length=512, sensitivity_sequences=32, calibration_seed=None, check_rounds=DEFAULTS.check_rounds,
                 max_tokens=16384, tie_break_modules=DEFAULTS.tie_break_modules, tie_break_margin=DEFAULTS.tie_break_margin,
                 max_macs=DEFAULTS.max_macs)
    command = bench.cli_command(argparse.Namespace(**flags, sequential="output"), 0.8, ("svd",))
    assert command.startswith("kronlm compress smollm2 --budget 0.8 --families svd --calibration wikitext2 ")
    assert "--sensitivity-sequences 32" in command and "--sequential-calibration output" in command
    # The benchmark's rows on the dense statistics name it, since the CLI's default is the sequential fit.
    assert "--sequential-calibration off" in bench.cli_command(argparse.Namespace(**flags, sequential="off"), 0.8, ("svd",))
    assert "--sequential-calibration" not in bench.cli_command(argparse.Namespace(**flags, sequential=DEFAULTS.sequential), 0.8, ("svd",))
    assert "--tie-break" not in command and "--max-macs" not in command
    flags.update(tie_break_modules=16, tie_break_margin=0.25)
    assert "--tie-break-modules 16 --tie-break-margin 0.25 --out" in bench.cli_command(argparse.Namespace(**flags, sequential="off"), 0.8, ("svd",))
    flags.update(max_macs=None)
    assert "--max-macs none --out" in bench.cli_command(argparse.Namespace(**flags, sequential="off"), 0.8, ("svd",))


def test_budget_params_and_sequential_from_the_cli(folder, tmp_path, capsys):
    text = str(folder / "text.txt")
    dense = count_parameters(kronlm.load_model(str(folder)))
    out = tmp_path / "abs"
    assert main(["compress", str(folder), "--budget-params", str(dense - 4000), "--calibration", text, "--calibration-sequences", "4",
                 "--calibration-length", "32", "--sensitivity-sequences", "0", "--sequential-calibration", "output", "--families", "svd",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"(budget {dense - 4000:,})" in printed and "choices:" in printed
    allocation = json.loads((out / "kronlm_compression.json").read_text())["report"]["allocation"]
    assert allocation["target_params"] == dense - 4000 >= allocation["params_after"]
    assert set(allocation["family_counts"]) <= {"dense", "svd"}


@pytest.mark.parametrize("argv,message", [
    (["--budget", "0.9", "--families", "svd,tucker"], "unknown factor family 'tucker'"),
    (["--budget", "0.9", "--max-macs", "fast"], "give a positive multiple of the dense multiply-adds (e.g. 1.0) or `none`, got 'fast'"),
    (["--budget", "0.9", "--max-macs", "0"], "got '0'"),
    (["--budget-params", "10", "--sensitivity-sequences", "0"], "below the smallest reachable"),
    (["--budget", "0.9", "--calibration-sequences", "400"], "fewer than the 408 x 32 = 13,056 asked for (400 --calibration-sequences + 8 --held-out-sequences"),
    (["--budget", "0.9", "--calibration-sequences", "400", "--families", "svd"], "fewer than the 400 x 32"),
])
def test_bad_budget_input_is_one_line(folder, tmp_path, capsys, argv, message):
    text = str(folder / "text.txt")
    base = ["compress", str(folder), "--calibration", text, "--calibration-sequences", "4", "--calibration-length", "32", "--out", str(tmp_path / "x")]
    code = main(base + argv)
    err = capsys.readouterr().err.strip()
    last = err.replace("\r", "\n").splitlines()[-1]  # progress bars may come first
    assert code == 2 and last.startswith("kronlm: error:") and message in last and "Traceback" not in err, err


def test_pareto_commands_of_older_rows_name_the_settings_they_were_measured_with():
    bench = _benchmark()
    old = "kronlm compress smollm2 --budget 0.8 --families svd --calibration wikitext2 --out runs/x --eval wikitext2"
    # Rows recorded before the multiply-add cap ran without it (no "max_macs" key).
    uncapped = old.replace(" --out", " --max-macs none --out")
    assert bench._row_command({"command": old, "sequential": "off"}) == old.replace(" --out", " --sequential-calibration off --max-macs none --out")
    assert bench._row_command({"command": old}) == old.replace(" --out", " --sequential-calibration off --max-macs none --out")
    assert bench._row_command({"command": old, "sequential": DEFAULTS.sequential}) == uncapped
    assert bench._row_command({"command": old, "sequential": DEFAULTS.sequential, "max_macs": DEFAULTS.max_macs}) == old
    named = old.replace(" --out", " --sequential-calibration output --max-macs none --out")
    assert bench._row_command({"command": named, "sequential": "output"}) == named


def test_pareto_table_names_what_the_subset_check_kept():
    bench = _benchmark()
    assert bench._check_cell({"set": "mixed"}) == "not recorded"  # rows written before the check was recorded
    assert bench._check_cell({"set": "svd"}) == "no check (one family)"
    assert bench._check_cell({"set": "mixed", "decided_by": "", "held_out_nll": {}}) == "no check"  # check turned off
    row = {"set": "mixed", "held_out_nll": {"svd,kronecker": 3.2, "svd": 3.1, "kronecker": None}}
    assert bench._check_cell(row) == "svd alone (svd,kronecker 3.200, svd 3.100, kronecker out of reach)"
    row["held_out_nll"]["svd,kronecker"] = 3.0
    assert bench._check_cell(row) == "every family (svd,kronecker 3.000, svd 3.100, kronecker out of reach)"
    row["tie_break"] = [{"held_out_nll": 2.99, "kept": True}, {"held_out_nll": 2.995, "kept": False}, {"held_out_nll": 2.98, "kept": True}]
    assert bench._check_cell(row).endswith("out of reach; tie-break kept 2 of 3 swaps -> 2.980)")


def test_a_question_answering_encoder_from_the_cli_as_docs_compression_shows(tmp_path, capsys):
    from conftest import tiny_bert
    from test_squad_data import tiny_bert_tokenizer

    from kronlm.layers import KroneckerLinear

    words = "the river seine flows through paris to the sea and the city".split()
    text = " ".join(words[(5 * i) % len(words)] for i in range(600))
    (tmp_path / "text.txt").write_text(text)
    teacher = tiny_bert(cls_name="BertForQuestionAnswering", vocab_size=40)
    folder, out = tmp_path / "qa", tmp_path / "qa-svd"
    kronlm.save(teacher, folder, tokenizer=tiny_bert_tokenizer(text))
    target = count_parameters(teacher) - 3000
    argv = ["compress", str(folder), "--budget-params", str(target), "--families", "svd",
            "--budget-modules", "**.encoder.layer.*.intermediate.dense", "--budget-modules", "**.encoder.layer.*.output.dense",
            "--calibration", str(tmp_path / "text.txt"), "--calibration-sequences", "8", "--calibration-length", "16", "--out", str(out)]
    assert main(argv) == 2  # the sensitivity pass needs next-token logits (one family: no subset check)
    assert ("BertForQuestionAnswering returns no next-token logits, and the budget's sensitivity pass (sensitivity_sequences=32) "
            "scores a causal LM's loss") in capsys.readouterr().err
    assert main([*argv[:-2], "--sensitivity-sequences", "0", "--no-subset-check", "--out", str(out)]) == 0
    student = kronlm.load_model(str(out), task="question-answering")
    assert isinstance(student, type(teacher)) and count_parameters(student) <= target
    factored = [n for n, m in student.named_modules() if isinstance(m, KroneckerLinear)]
    assert factored and all(".intermediate.dense" in n or (".output.dense" in n and ".attention." not in n) for n in factored)
    ids = torch.randint(5, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = student(input_ids=ids).start_logits
    assert logits.shape == (2, 12) and torch.isfinite(logits).all()
