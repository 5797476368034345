"""Side-by-side recovery of compressed SmolLM2-135M students at equal parameters and equal budget.

Every step is the ``kronlm`` command line, called in-process with the arguments printed in the
output, so a reader can run any row by hand:

- students (``kronlm compress`` / ``kronlm truncate``) at about SIZE of the dense parameters:
  ``kron-vlr`` Krony-PT-style Kronecker MLPs (gate/up B (2,1), down B (1,2)) of N evenly spaced
  blocks, modified Van Loan init; ``kron-prune`` the same shapes, pruning init; ``kron-aa`` the
  same shapes, activation-aware init; ``budget`` the per-module allocation to the same parameter
  count; ``truncate`` the Short Study's baseline, whole blocks dropped (evenly spaced ones kept);
- recovery (``kronlm distill``) on the same training tokens (WikiText-2 validation text, the last
  blocks held out for validation) under the same wall-clock cap of one core: ``end_to_end``
  (``configs/recover-e2e.yaml``: logit KD, only compressed modules trainable; the truncated
  student trains all weights with the DistilGPT2 recipe, ``configs/recover-truncation.yaml``) and
  ``blockwise`` (``configs/recover-blockwise.yaml``);
- evaluation (``kronlm eval``) before and after: WikiText-2 test (first ``--eval-tokens`` tokens,
  sliding window 1024 / stride 512) and one out-of-domain text (GLUE SST-2 dev sentences, joined
  with blank lines), on the checkpoint chosen by validation perplexity (``best/``).

Results are appended to ``WORK/results.jsonl`` as they come, so a rerun skips what is done. With
``--out`` a Markdown table (and ``--plot``, a PNG of validation perplexity against training
tokens, one line per run) is written.

    python benchmarks/recovery.py --size 0.85 --threads 1 --out docs/benchmarks/recovery.md --plot docs/benchmarks/recovery.png
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from kronlm.bench.plots import line_plot
from kronlm.bench.report import (
    machine_info,
    machine_line,
    markdown_table,
    reproduce_header,
    reproduce_section,
    write_markdown,
)
from kronlm.cli import main as kronlm_main
from kronlm.compress import count_parameters
from kronlm.modeling import load

REPO = Path(__file__).resolve().parents[1]
BLOCKS = 30
# Krony-PT-style MLPs of N blocks at 2x, and the number of whole blocks the truncation drops to
# the same parameter count (a block of SmolLM2 is 3,539,840 parameters; 2x on its MLP saves 1,327,098).
SIZES = {0.85: {"kron_blocks": 16, "drop": 6}, 0.70: {"kron_blocks": 30, "drop": 11}}
METHODS = ("kron-vlr", "kron-prune", "kron-aa", "budget", "truncate")
MODES = ("end_to_end", "blockwise")


def spaced(n: int, total: int = BLOCKS) -> list[int]:
    """``n`` evenly spaced block indices of ``total``."""
    return sorted({round(i * total / n) for i in range(n)})


def run_cli(argv: list[str], log: list[str]) -> str:
    """Run ``kronlm ARGV`` in-process; returns its standard output; raises on a non-zero exit."""
    log.append("kronlm " + shlex.join(argv))
    print(log[-1], flush=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = kronlm_main(argv)
    text = out.getvalue()
    print(text, flush=True)
    if code != 0:
        raise SystemExit(f"kronlm exited with {code}: {' '.join(argv)}")
    return text


def kron_config(work: Path, blocks: list[int], init: str) -> Path:
    path = work / f"kron-{init}-{len(blocks)}.yaml"
    path.write_text(json.dumps({"targets": [
        {"modules": ["model.layers.*.mlp.gate_proj", "model.layers.*.mlp.up_proj"], "b_shape": [2, 1], "init": init, "layers": blocks},
        {"modules": ["model.layers.*.mlp.down_proj"], "b_shape": [1, 2], "init": init, "layers": blocks},
    ]}))
    return path


def build_student(method: str, size: float, work: Path, args, log: list[str]) -> Path:
    """The student folder of ``method`` at ``size`` (built once)."""
    folder = work / "students" / f"{method}-{int(size * 100)}"
    if (folder / "config.json").is_file():
        return folder
    setting = SIZES[size]
    common = ["--out", str(folder), "--overwrite"]
    calibration = ["--calibration", "wikitext2", "--calibration-sequences", str(args.calibration_sequences),
                   "--calibration-length", "512", "--data-dir", str(args.data_dir)]
    if method == "truncate":
        keep = spaced(BLOCKS - setting["drop"])
        run_cli(["truncate", args.model, "--layers", ",".join(map(str, keep)), *common], log)
    elif method == "budget":
        reference = build_student("kron-vlr", size, work, args, log)
        target = count_parameters(load(reference))
        run_cli(["compress", args.model, "--budget-params", str(target), *calibration, *common], log)
    else:
        init = {"kron-vlr": "van_loan_rescaled", "kron-prune": "pruning", "kron-aa": "activation_aware"}[method]
        config = kron_config(work, spaced(setting["kron_blocks"]), init)
        run_cli(["compress", args.model, "--config", str(config), *(calibration if init == "activation_aware" else []), *common], log)
    return folder


def evaluate(folder: str, work: Path, args, log: list[str], tag: str) -> dict[str, float]:
    """Test and out-of-domain perplexity of a model (cached in WORK/evals)."""
    out = {}
    for name, data in (("test", ["--data", "wikitext2", "--split", "test"]),
                       ("ood", ["--data", str(args.data_dir / "glue" / "SST-2" / "dev.tsv"), "--text-field", "sentence"])):
        path = work / "evals" / f"{tag}-{name}.json"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            run_cli(["eval", folder, *data, "--data-dir", str(args.data_dir), "--max-tokens", str(args.eval_tokens), "--device", args.device,
                     "--json", str(path)], log)
        out[name] = json.loads(path.read_text())["ppl"]
    return out


def recover(method: str, mode: str, student: Path, size: float, work: Path, args, log: list[str]) -> dict:
    """Run one recovery; returns what it did (tokens, seconds, validation history, chosen checkpoint)."""
    run_dir = work / "runs" / f"{method}-{int(size * 100)}-{mode}"
    config = {"end_to_end": "recover-e2e.yaml", "blockwise": "recover-blockwise.yaml"}[mode]
    if method == "truncate":
        config = "recover-truncation.yaml"
    argv = ["distill", "--student", str(student), "--teacher", args.model, "--data", "wikitext2", "--data-dir", str(args.data_dir),
            "--max-tokens", str(args.train_tokens), "--val-fraction", str(args.val_fraction), "--config", str(REPO / "configs" / config),
            "--out", str(run_dir)]
    if args.minutes is not None:
        argv += ["--max-minutes", str(args.minutes)]
    if mode == "blockwise" and method != "truncate":
        # One teacher hidden-state cache for every block-wise run: same teacher, tokens and dtype.
        argv += ["--cache-dir", str(work / "teacher_cache")]
    finished = run_dir / ("blockwise_summary.json" if mode == "blockwise" and method != "truncate" else "final/training_summary.json")
    started = time.perf_counter()
    if finished.is_file():  # done by an earlier invocation: read its results back
        log.append("# already run: kronlm " + shlex.join(argv))
    else:
        run_cli(argv, log)
    seconds = time.perf_counter() - started
    if mode == "blockwise" and method != "truncate":
        summary = json.loads((run_dir / "blockwise_summary.json").read_text())
        trained = [b for b in summary["blocks"] if b["trained"]]
        tokens = trained[0]["tokens"] if trained else 0
        history = [{"tokens_seen": 0, "ppl": summary["val_ppl_before"]}, {"tokens_seen": tokens, "ppl": summary["val_ppl_blockwise"]}]
        return {"run_dir": str(run_dir), "tokens": tokens, "seconds": seconds, "train_seconds": summary["train_seconds"],
                "cache_seconds": summary["cache_seconds"], "val_history": history, "best_val": summary["val_ppl_blockwise"],
                "chosen": "best/ = the block-wise result (per block: lowest held-out block MSE)"}
    summary = json.loads((run_dir / "final" / "training_summary.json").read_text())
    return {"run_dir": str(run_dir), "tokens": summary["tokens_seen"], "seconds": seconds, "train_seconds": summary.get("seconds"),
            "val_history": summary.get("val_history") or [], "best_val": summary.get("best_val"),
            "chosen": f"best/ = step {summary.get('best_step')} of {summary.get('step')} (lowest validation perplexity)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=float, choices=sorted(SIZES), required=True, help="Fraction of the dense parameters kept.")
    parser.add_argument("--methods", default=",".join(METHODS), help="Comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--modes", default=",".join(MODES), help="end_to_end, blockwise (truncation runs end_to_end only)")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--train-tokens", type=int, default=73728, help="Tokens of WikiText-2 validation text to train on (validation blocks included).")
    parser.add_argument("--val-fraction", type=float, default=0.0625)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--calibration-sequences", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--minutes", type=float, default=None, help="Time cap of each end-to-end run (default: the config's, 20).")
    parser.add_argument("--device", default="auto", help="Where evaluation runs (training picks the GPU by itself).")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "recovery")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("KRONLM_DATA_DIR", str(args.data_dir))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "results.jsonl"
    done = {}
    if results_path.is_file():
        for line in results_path.read_text().splitlines():
            row = json.loads(line)
            done[(row["method"], row["size"], row["mode"])] = row
    print(reproduce_header(f"python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}"), flush=True)
    log: list[str] = []
    dense = evaluate(args.model, work, args, log, "dense")
    for method in args.methods.split(","):
        student = build_student(method, args.size, work, args, log)
        params = count_parameters(load(student))
        before = evaluate(str(student), work, args, log, f"{method}-{int(args.size * 100)}")
        for mode in args.modes.split(","):
            if method == "truncate" and mode == "blockwise":
                continue
            key = (method, args.size, mode)
            if key in done:
                continue
            run = recover(method, mode, student, args.size, work, args, log)
            after = evaluate(str(Path(run["run_dir"]) / "best"), work, args, log, f"{method}-{int(args.size * 100)}-{mode}")
            row = {"method": method, "size": args.size, "mode": mode, "params": params, "dense": dense, "before": before,
                   "after": after, **run, "commands": list(log)}
            done[key] = row
            with open(results_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    rows = [r for r in done.values() if r["size"] == args.size]
    if args.out:
        write_markdown(report(rows, args), args.out)
    if args.plot:
        series = {f"{r['method']} {r['mode']}": ([h["tokens_seen"] for h in r["val_history"] if h.get("ppl")],
                                                  [h["ppl"] for h in r["val_history"] if h.get("ppl")]) for r in rows}
        line_plot(series, args.plot, xlabel="training tokens", ylabel="validation perplexity",
                  title=f"Recovery of SmolLM2-135M at {int(args.size * 100)} % of the parameters", logy=True)


def report(rows: list[dict], args) -> str:
    dense = rows[0]["dense"] if rows else {"test": float("nan"), "ood": float("nan")}
    table = [[r["method"], r["mode"], f"{r['params']:,}", f"{r['before']['test']:,.2f}", f"{r['after']['test']:,.2f}",
              f"{r['after']['test'] / dense['test']:.2f}", f"{r['before']['ood']:,.2f}", f"{r['after']['ood']:,.2f}",
              f"{r['best_val']:,.2f}" if r.get("best_val") else "-", f"{r['tokens']:,}", f"{r['seconds']:.0f}", r["chosen"]]
             for r in sorted(rows, key=lambda r: r["after"]["test"])]
    headers = ["method", "recovery", "params", "test ppl before", "test ppl after", "x dense", "OOD ppl before", "OOD ppl after",
               "val ppl", "train tokens", "seconds", "checkpoint"]
    lines = [f"# Recovery of SmolLM2-135M at {int(args.size * 100)} % of the parameters", "",
             machine_line(machine_info()), f"Command: `python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}`", "",
             f"Dense: test {dense['test']:.2f}, OOD {dense['ood']:.2f}.", "", markdown_table(headers, table), "",
             reproduce_section([f"python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
