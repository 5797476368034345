"""Perplexity before any training: Van Loan vs activation-aware init vs budget allocation.

Compresses SmolLM2-135M-Instruct to 90 %, 80 % and 70 % of its parameters in several ways and
measures WikiText-2 test perplexity (first --max-tokens tokens, sliding window 1024 / stride 512,
SPEC §5) with no training at all:

- uniform: the MLPs (gate/up B (2,1), down B (1,2), as the krony-pt-llama-mlp-2x preset) of N
  evenly spaced blocks, N = 10 / 20 / 30 (90.1 % / 80.3 % / 70.4 % of the parameters), initialised
  by ``van_loan``, ``van_loan_rescaled`` or ``activation_aware``;
- ``svd``: the same modules as a truncated SVD of equal parameters (A (out,1) ⊗ B (1,in), R = 209);
- ``budget``: ``compress_to_budget`` to the same parameter count, every linear layer a candidate.

Calibration: the first ``--calibration-sequences`` x ``--calibration-length`` tokens of WikiText-2
validation (wiki.valid.raw); sensitivities from the first --sensitivity-sequences of them. Results are appended to
``WORK/results.jsonl`` as they come, so a rerun skips what is done; the input statistics are cached
in ``WORK/calibration.safetensors``. Prints a Markdown table; ``--out FILE`` writes it atomically.

    python benchmarks/zero_shot_init.py --out docs/benchmarks/zero_shot_init.md
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from kronlm.compress import CompressionConfig, KroneckerTarget, count_parameters
from kronlm.modeling import compress
from kronlm.compress.budget import allocate_budget, budget_candidates, price_modules
from kronlm.compress.calibration import (
    ModuleCalibration,
    calibration_input_ids,
    collect_calibration,
    load_calibration,
    save_calibration,
)
from kronlm.data.text import load_text
from kronlm.evaluate.perplexity import perplexity
from kronlm.modeling.loading import load_model_and_tokenizer
from kronlm.utils.io import atomic_path

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


def calibrate(model, tokenizer, names, work: Path, sequences: int, length: int, sensitivity: int) -> dict[str, ModuleCalibration]:
    """Input statistics of ``names`` on WikiText-2 validation, cached in WORK/calibration.safetensors."""
    cache = work / "calibration.safetensors"
    meta = {"sequences": str(sequences), "length": str(length), "sensitivity_sequences": str(sensitivity)}
    if cache.exists():
        return load_calibration(cache, meta)
    ids = calibration_input_ids(tokenizer, load_text("wikitext2", split="validation"), sequences, length)
    stats = collect_calibration(model, names, ids)
    grads = collect_calibration(model, names, ids[:sensitivity], sensitivity=True)
    for n in names:
        stats[n].grad_sq = grads[n].grad_sq
    save_calibration(stats, cache, meta)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.9, 0.8, 0.7])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--calibration-sequences", type=int, default=128)
    parser.add_argument("--calibration-length", type=int, default=512)
    parser.add_argument("--sensitivity-sequences", type=int, default=16)
    parser.add_argument("--work", type=Path, default=Path("runs/zero_shot_init"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
    test_ids = tokenizer(load_text("wikitext2"), return_tensors="pt")["input_ids"][0][: args.max_tokens]

    def ppl(m) -> float:
        return perplexity(m, test_ids, max_length=1024, stride=512, desc="ppl").ppl

    def record(row):
        done[(row["fraction"], row["method"])] = row
        with results_file.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    if (1.0, "dense") not in done:
        record({"fraction": 1.0, "method": "dense", "params": dense_params, "ppl": ppl(model), "seconds": 0.0})
    stats = options = None
    targets = {}
    # Method-major order: the most informative rows first, so a cut-short run still says something.
    for method in args.methods:
        for fraction in args.fractions:
            if (fraction, method) in done:
                continue
            blocks = spaced_blocks(BLOCKS[fraction])
            if fraction not in targets:
                # Parameter count of the uniform configuration: every other method must match it.
                targets[fraction] = compress(copy.deepcopy(model), uniform_config(blocks, "van_loan"), progress=False).compression_report.params_after
            if method in ("activation_aware", "budget") and stats is None:
                stats = calibrate(model, tokenizer, budget_candidates(model), args.work, args.calibration_sequences, args.calibration_length, args.sensitivity_sequences)
            student = copy.deepcopy(model)
            start = time.perf_counter()
            extra = {}
            if method == "budget":
                if options is None:  # pricing does not depend on the budget: once for all fractions
                    options = price_modules(model, stats)
                allocation = allocate_budget(student, stats, targets[fraction], options=options)
                report = compress(student, allocation.to_config(), calibration=stats).compression_report
                counts: dict[str, int] = {}
                for c in allocation.choices:
                    key = f"{c.name.rsplit('.', 1)[-1]}:{c.option.family}"
                    counts[key] = counts.get(key, 0) + 1
                extra = {"choices": counts, "estimated_nll_increase": allocation.estimated_loss}
            elif method == "svd":
                report = compress(student, uniform_config(blocks, "van_loan", svd_rank=209)).compression_report
            else:
                report = compress(student, uniform_config(blocks, method), calibration=stats if method == "activation_aware" else None).compression_report
            seconds = time.perf_counter() - start
            record({"fraction": fraction, "method": method, "params": report.params_after, "ppl": ppl(student), "seconds": seconds, **extra})
            del student

    dense = done[(1.0, "dense")]
    lines = [
        "# Zero-shot perplexity of compressed SmolLM2-135M-Instruct (no training)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; {date.today().isoformat()}.",
        f"Command: `python benchmarks/zero_shot_init.py --max-tokens {args.max_tokens} --calibration-sequences {args.calibration_sequences} --calibration-length {args.calibration_length} --sensitivity-sequences {args.sensitivity_sequences}{f' --threads {args.threads}' if args.threads else ''}`",
        f"Perplexity: WikiText-2 raw test (wiki.test.hf_joined.txt), first {args.max_tokens:,} tokens, sliding window max_length 1024, stride 512.",
        f"Calibration: first {args.calibration_sequences} x {args.calibration_length} tokens of WikiText-2 validation (wiki.valid.raw); sensitivities from the first {args.sensitivity_sequences} sequences.",
        "",
        f"Dense: {dense['params']:,} parameters, perplexity {dense['ppl']:.2f}.",
        "",
        "| target | method | params | % of dense | perplexity | x dense | init seconds |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for fraction in args.fractions:
        for method in args.methods:
            row = done.get((fraction, method))
            if row is None:
                continue
            lines.append(
                f"| {fraction:.0%} | {method} | {row['params']:,} | {100 * row['params'] / dense['params']:.1f} | {row['ppl']:,.2f} | {row['ppl'] / dense['ppl']:,.2f} | {row['seconds']:.1f} |"
            )
    budget_rows = [(f, done[(f, "budget")]) for f in args.fractions if (f, "budget") in done]
    if budget_rows:
        lines += ["", "Budget allocation choices (module kind: family → count):", ""]
        for fraction, row in budget_rows:
            choices = ", ".join(f"{k} {v}" for k, v in sorted(row["choices"].items()))
            lines.append(f"- {fraction:.0%}: {choices}; estimated NLL increase {row['estimated_nll_increase']:.3f} nats/token")
    lines.append("")
    lines.append(f"Total wall clock of this invocation: {time.perf_counter() - t0:.0f} s.")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with atomic_path(args.out) as tmp:
            Path(tmp).write_text(table)


if __name__ == "__main__":
    main()
