"""Perplexity before any training: Van Loan vs activation-aware init vs budget allocation.

Compresses SmolLM2-135M-Instruct to 90 %, 80 % and 70 % of its parameters in several ways and
measures WikiText-2 test perplexity (first --max-tokens tokens, sliding window 1024 / stride 512,
docs/protocols.md) with no training at all:

- uniform: the MLPs (gate/up B (2,1), down B (1,2), as the krony-pt-llama-mlp-2x preset) of N
  evenly spaced blocks, N = 10 / 20 / 30 (90.1 % / 80.3 % / 70.4 % of the parameters), initialised
  by ``van_loan``, ``van_loan_rescaled`` or ``activation_aware``;
- ``svd``: the same modules as a truncated SVD of equal parameters (A (out,1) ⊗ B (1,in), R = 209);
- ``budget``: the code path of ``kronlm compress --budget-params N`` (``compress_to_budget``
  with a ``BudgetConfig`` of the CLI's defaults but fitted on the dense model's statistics,
  ``--sequential-calibration off``; ``--families`` as the CLI's) to the uniform rows' parameter
  count N, every linear layer a candidate.

Every row comes with the ``kronlm compress`` command that reproduces it: the uniform rows read the
config files that ``--write-configs DIR`` writes (one per row), the budget rows use
``--budget-params``. Calibration: ``--calibration`` sources as the CLI's (default the first
``--calibration-sequences`` x ``--calibration-length`` tokens of WikiText-2 validation);
sensitivities from the first ``--sensitivity-sequences``; defaults are the CLI's. Results are
appended to ``WORK/results.jsonl`` as they come, so a rerun skips what is done; the input
statistics are cached in ``WORK/calibration-<hash of the calibration flags>.safetensors``. Prints the reproduce header (command,
machine, date, versions) first and a Markdown table; ``--out FILE`` writes it atomically.

    python benchmarks/zero_shot_init.py --threads 1 --calibration-sequences 32 --out docs/benchmarks/zero_shot_init.md
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from kronlm.bench.markdown import (
    environment_info,
    reproduce_header,
    reproduce_section,
    write_markdown,
)
from kronlm.compression import (
    DEFAULT_CALIBRATION_LENGTH,
    DEFAULT_CALIBRATION_SEQUENCES,
    BudgetConfig,
    CompressionConfig,
    KroneckerTarget,
    ModuleCalibration,
    budget_candidates,
    budget_statistics,
    calibration_mix,
    check_families,
    count_parameters,
    load_calibration,
    price_modules,
    save_calibration,
)
from kronlm.data import load_text
from kronlm.evaluation import perplexity
from kronlm.modeling import compress, compress_to_budget, load_model_and_tokenizer
from kronlm.utils import default_data_dir

DEFAULTS = BudgetConfig()
BLOCKS = {0.9: 10, 0.8: 20, 0.7: 30}
METHODS = ("budget", "activation_aware", "van_loan", "svd", "van_loan_rescaled")


def spaced_blocks(n: int, total: int = 30) -> list[int]:
    return sorted({round(i * total / n) for i in range(n)})


def uniform_config(blocks: list[int], init: str, svd_rank: int | None = None) -> CompressionConfig:
    up = ["model.layers.*.mlp.gate_proj", "model.layers.*.mlp.up_proj"]
    down = ["model.layers.*.mlp.down_proj"]
    if svd_rank is None:
        targets = [KroneckerTarget(modules=up, b_shape=(2, 1), init=init, layers=blocks), KroneckerTarget(modules=down, b_shape=(1, 2), init=init, layers=blocks)]
    else:
        targets = [
            KroneckerTarget(modules=up, a_shape=(1536, 1), b_shape=(1, 576), rank=svd_rank, init=init, layers=blocks),
            KroneckerTarget(modules=down, a_shape=(576, 1), b_shape=(1, 1536), rank=svd_rank, init=init, layers=blocks),
        ]
    return CompressionConfig(targets=targets, name=f"mlp-{len(blocks)}-blocks-{init}")


def row_config(fraction: float, method: str) -> CompressionConfig:
    """The config of a uniform row (``svd`` and the initialisers)."""
    blocks = spaced_blocks(BLOCKS[fraction])
    if method == "svd":
        return uniform_config(blocks, "van_loan", svd_rank=209)
    return uniform_config(blocks, method)


def config_path(folder: Path, fraction: float, method: str) -> Path:
    return folder / f"zero-shot-{round(100 * fraction)}-{method}.yaml"


def write_configs(folder: Path, fractions) -> None:
    """One YAML config per uniform row, for ``kronlm compress --config``."""
    folder.mkdir(parents=True, exist_ok=True)
    for fraction in fractions:
        for method in METHODS[1:]:
            row_config(fraction, method).to_file(config_path(folder, fraction, method))


def calibration_flags(args) -> list[str]:
    flags = []
    for source in args.calibration:
        flags += ["--calibration", source]
    flags += ["--calibration-sequences", str(args.calibration_sequences), "--calibration-length", str(args.calibration_length)]
    if args.calibration_seed is not None:
        flags += ["--calibration-seed", str(args.calibration_seed)]
    return flags


def cli_command(args, fraction: float, method: str, target: int) -> str:
    """The ``kronlm compress`` command of one row."""
    out = ["--out", f"runs/zero-shot-{round(100 * fraction)}-{method}", "--eval", "wikitext2", "--max-tokens", str(args.max_tokens)]
    if method == "budget":
        parts = ["kronlm", "compress", "smollm2", "--budget-params", str(target), "--families", ",".join(args.families),
                 *calibration_flags(args), "--sensitivity-sequences", str(args.sensitivity_sequences), "--sequential-calibration", "off",
                 "--max-macs", "none", *out]
    else:
        parts = ["kronlm", "compress", "smollm2", "--config", str(config_path(args.configs, fraction, method)), *out]
        if method == "activation_aware":
            parts += calibration_flags(args)
    return " ".join(shlex.quote(p) for p in parts)


def calibrate(model, tokenizer, names, args) -> tuple[torch.Tensor, dict[str, ModuleCalibration]]:
    """The CLI's calibration ids and statistics (``calibration_mix``, ``budget_statistics``), cached."""
    meta = {"calibration": " ".join(args.calibration), "split": "validation", "sequences": str(args.calibration_sequences),
            "length": str(args.calibration_length), "seed": str(args.calibration_seed), "sensitivity": str(args.sensitivity_sequences)}
    # Named as benchmarks/pareto.py names it, so one file serves both (link it across WORK folders).
    cache = args.work / f"calibration-{hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]}.safetensors"
    ids, described = calibration_mix(model, tokenizer, args.calibration, args.calibration_sequences, args.calibration_length,
                                     seed=args.calibration_seed, data_dir=args.data_dir)
    print(f"calibration: {described}", flush=True)
    if cache.exists():
        try:
            return ids, load_calibration(cache, meta)
        except ValueError:
            pass  # made with other settings: collect again
    stats = budget_statistics(model, ids, names, sensitivity_sequences=args.sensitivity_sequences)
    save_calibration(stats, cache, meta)
    return ids, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.9, 0.8, 0.7])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--calibration", nargs="+", default=["wikitext2"], help="SPEC[=WEIGHT] sources, as kronlm compress --calibration")
    parser.add_argument("--calibration-sequences", type=int, default=DEFAULT_CALIBRATION_SEQUENCES)
    parser.add_argument("--calibration-length", type=int, default=DEFAULT_CALIBRATION_LENGTH)
    parser.add_argument("--calibration-seed", type=int, default=None)
    parser.add_argument("--sensitivity-sequences", type=int, default=DEFAULTS.sensitivity_sequences)
    parser.add_argument("--families", type=check_families, default=DEFAULTS.families, help="comma-separated, as kronlm compress --families")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--work", type=Path, default=Path("runs/zero_shot_init"))
    parser.add_argument("--configs", type=Path, default=Path("runs/zero_shot_init/configs"), help="where the uniform rows' configs are written")
    parser.add_argument("--write-configs", action="store_true", help="only write the uniform rows' configs to --configs and exit")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    write_configs(args.configs, args.fractions)
    if args.write_configs:
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/zero_shot_init.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    info = environment_info()
    print(reproduce_header(command, info), flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    results_file = args.work / "results.jsonl"
    done = {}
    if results_file.exists():
        for line in results_file.read_text().splitlines():
            row = json.loads(line)
            done[(row["fraction"], row["method"])] = row

    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer("smollm2")
    dense_params = count_parameters(model)
    test_ids = tokenizer(load_text("wikitext2", data_dir=args.data_dir), return_tensors="pt")["input_ids"][0][: args.max_tokens]

    def ppl(m) -> float:
        return perplexity(m, test_ids, max_length=1024, stride=512, desc="ppl").ppl

    def record(row):
        done[(row["fraction"], row["method"])] = row
        with results_file.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    if (1.0, "dense") not in done:
        record({"fraction": 1.0, "method": "dense", "params": dense_params, "ppl": ppl(model), "seconds": 0.0})
    ids = stats = pricing = None
    targets = {}
    # Method-major order: the most informative rows first, so a cut-short run still says something.
    for method in args.methods:
        for fraction in args.fractions:
            if (fraction, method) in done:
                continue
            if fraction not in targets:
                # Parameter count of the uniform configuration: every other method must match it.
                targets[fraction] = compress(copy.deepcopy(model), row_config(fraction, "van_loan"), progress=False).compression_report.params_after
            if method in ("activation_aware", "budget") and stats is None:
                ids, stats = calibrate(model, tokenizer, budget_candidates(model), args)
            student = copy.deepcopy(model)
            start = time.perf_counter()
            extra = {}
            if method == "budget":
                # On the dense statistics, as the other rows: this table compares initialisations (and
                # with no multiply-add cap, as when the rows were measured).
                config = BudgetConfig(target_params=targets[fraction], families=args.families,
                                      sensitivity_sequences=args.sensitivity_sequences, sequential=None, max_macs=None)
                if pricing is None:  # pricing does not depend on the budget: once for all fractions
                    pricing = price_modules(model, stats, settings=config)
                allocation = compress_to_budget(student, config, ids, statistics=stats, pricing=copy.deepcopy(pricing))
                for entry in stats.values():
                    entry.fitted.clear()
                report = student.compression_report
                counts: dict[str, int] = {}
                for c in allocation.choices:
                    key = f"{c.name.rsplit('.', 1)[-1]}:{c.option.family}"
                    counts[key] = counts.get(key, 0) + 1
                extra = {"choices": counts, "estimated_nll_increase": allocation.estimated_loss, "pricing": pricing.summary.describe()}
            else:
                statistics = stats if method == "activation_aware" else None
                report = compress(student, row_config(fraction, method), statistics=statistics).compression_report
            seconds = time.perf_counter() - start
            record({"fraction": fraction, "method": method, "params": report.params_after, "ppl": ppl(student), "seconds": seconds,
                    "command": cli_command(args, fraction, method, targets[fraction]), "invocation": command, **extra})
            del student

    dense = done[(1.0, "dense")]
    lines = [
        "# Zero-shot perplexity of compressed SmolLM2-135M-Instruct (no training)",
        "",
        f"Perplexity: WikiText-2 raw test (wiki.test.hf_joined.txt), first {args.max_tokens:,} tokens, sliding window max_length 1024, stride 512.",
        "",
        f"Dense: {dense['params']:,} parameters, perplexity {dense['ppl']:.2f}.",
        "",
        "| target | method | params | % of dense | perplexity | x dense | init seconds |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    commands = []
    for fraction in args.fractions:
        for method in args.methods:
            row = done.get((fraction, method))
            if row is None:
                continue
            lines.append(
                f"| {fraction:.0%} | {method} | {row['params']:,} | {100 * row['params'] / dense['params']:.1f} | {row['ppl']:,.2f} | {row['ppl'] / dense['ppl']:,.2f} | {row['seconds']:.1f} |"
            )
            commands.append(row.get("command", f"# {fraction:.0%} {method}: no command recorded (row from an earlier version)"))
    budget_rows = [(f, done[(f, "budget")]) for f in args.fractions if (f, "budget") in done]
    if budget_rows:
        lines += ["", "Budget allocation choices (module kind: family → count):", ""]
        for fraction, row in budget_rows:
            choices = ", ".join(f"{k} {v}" for k, v in sorted(row["choices"].items()))
            lines.append(f"- {fraction:.0%}: {choices}; estimated NLL increase {row['estimated_nll_increase']:.3f} nats/token")
    lines += ["", "Commands, one per row in table order (write the uniform rows' configs first):", "", "```bash",
              f"python benchmarks/zero_shot_init.py --write-configs --configs {args.configs}", *commands, "```", ""]
    invocations = list(dict.fromkeys(r["invocation"] for r in done.values() if "invocation" in r)) or [command]
    lines.append(reproduce_section(invocations, info))
    lines.append("")
    lines.append(f"Total wall clock of this invocation: {time.perf_counter() - t0:.0f} s.")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        write_markdown(table, args.out)


if __name__ == "__main__":
    main()
