"""Zero-shot perplexity against the fraction of parameters kept, per factor family (a Pareto picture).

For each fraction of SmolLM2-135M's parameters (default 95 / 90 / 80 / 70 / 60 %) and each set of
factor families the budget allocation may choose from,

- ``svd``: truncated SVD only (A (out, 1) ⊗ B (1, in));
- ``kronecker``: Kronecker products of the shape window only;
- ``kronecker_lowrank``: Kronecker + low-rank only;
- ``mixed``: all three,

the model is compressed by exactly the code path of ``kronlm compress --budget F --families ...``
(``kronlm.modeling.compress_to_budget`` with a ``BudgetConfig`` of the CLI's defaults; the
calibration statistics and the pricing are computed once and handed to it, a fresh copy of the
pricing per point so that every point equals the CLI's run), then scored with no training on

- in-domain text: WikiText-2 raw test, first ``--max-tokens`` tokens;
- out-of-domain text: GLUE dev sentences as plain text, the first ``--ood-tokens`` / 2 tokens of
  SST-2 dev then of QNLI dev (each file's ``sentence`` column joined with "\\n\\n"),

both with the sliding window, max_length 1024, stride 512 (docs/protocols.md). Each row also gives the
``kronlm compress`` command that reproduces it. Rows are appended to ``--results`` (default
``docs/benchmarks/pareto.jsonl``, committed beside the page) as they come (a rerun, on a fresh
clone too, skips what is done; ``--tag`` separates calibration variants), the calibration
statistics are cached in ``WORK/calibration-<hash of the calibration flags>.safetensors``.

After recovery: ``--save-dir DIR`` saves every student of ``--save-fraction`` (default 0.7) as a
kronlm folder; train the best Kronecker-containing one and the SVD-only one with the same recipe
(``kronlm distill --mode blockwise``, see ``docs/benchmarks/pareto.md``), then
``--recovered LABEL=FOLDER ...`` scores them on both texts and adds the "after recovery" table.

    python benchmarks/pareto.py --threads 1 --calibration-sequences 32 --out docs/benchmarks/pareto.md

Defaults are the command line's (``kronlm.BudgetConfig()``, ``DEFAULT_CALIBRATION_SEQUENCES`` and
``DEFAULT_CALIBRATION_LENGTH`` of ``kronlm.compression``), but for two the committed rows were
measured before: ``--sequential off`` and ``--max-macs none`` (no multiply-add cap).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

import kronlm
from kronlm.bench.plots import line_plot, png_beside
from kronlm.bench.markdown import (
    append_result_row,
    environment_info,
    markdown_table,
    read_result_rows,
    reproduce_header,
    reproduce_section,
    write_markdown,
)
from kronlm.compression import (
    DEFAULT_CALIBRATION_LENGTH,
    DEFAULT_CALIBRATION_SEQUENCES,
    BudgetConfig,
    CalibrationSource,
    budget_candidates,
    budget_statistics,
    calibration_mix,
    count_parameters,
    load_calibration,
    price_modules,
    save_calibration,
)
from kronlm.compression.budget import max_macs_text, parse_max_macs
from kronlm.data import load_text
from kronlm.evaluation import perplexity
from kronlm.modeling import compress_to_budget
from kronlm.utils import default_data_dir

SETS = {"svd": ("svd",), "kronecker": ("kronecker",), "kronecker_lowrank": ("kronecker_lowrank",),
        "mixed": ("svd", "kronecker", "kronecker_lowrank")}
OOD_FILES = ("glue/SST-2/dev.tsv", "glue/QNLI/dev.tsv")
# A hand-written block of the Markdown output between these markers is kept when it is rewritten.
NOTES_BEGIN, NOTES_END = "<!-- notes -->", "<!-- /notes -->"


def ood_ids(tokenizer, data_dir: Path, tokens: int) -> torch.Tensor:
    """The out-of-domain evaluation ids: tokens // 2 of each GLUE dev file's sentences, joined."""
    parts = []
    for rel in OOD_FILES:
        text = load_text(str(data_dir / rel), text_field="sentence")
        ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
        if ids.numel() < tokens // 2:
            raise ValueError(f"{rel} has {ids.numel():,} tokens, fewer than the {tokens // 2:,} asked for")
        parts.append(ids[: tokens // 2])
    return torch.cat(parts)


DEFAULTS = BudgetConfig()
DEFAULT_SEQUENTIAL = DEFAULTS.sequential or "off"  # the CLI's --sequential-calibration default


def settings_for(args, families: tuple[str, ...], fraction: float | None = None) -> BudgetConfig:
    """The CLI's budget config for these flags (``kronlm compress --budget FRACTION`` builds the same)."""
    return BudgetConfig(target_fraction=fraction, families=families, sensitivity_sequences=args.sensitivity_sequences,
                        check_rounds=args.check_rounds, sequential=None if args.sequential == "off" else args.sequential,
                        tie_break_modules=args.tie_break_modules, tie_break_margin=args.tie_break_margin, max_macs=args.max_macs)


def cli_command(args, fraction: float, families: tuple[str, ...]) -> str:
    """The ``kronlm compress`` command that gives the same student as one row."""
    parts = ["kronlm", "compress", args.model, "--budget", f"{fraction:g}", "--families", ",".join(families)]
    for source in args.calibration:
        parts += ["--calibration", source]
    parts += ["--calibration-split", args.calibration_split, "--calibration-sequences", str(args.calibration_sequences),
              "--calibration-length", str(args.calibration_length), "--sensitivity-sequences", str(args.sensitivity_sequences)]
    if args.calibration_seed is not None:
        parts += ["--calibration-seed", str(args.calibration_seed)]
    if args.check_rounds != DEFAULTS.check_rounds:
        parts += ["--check-rounds", str(args.check_rounds)]
    if args.sequential != DEFAULT_SEQUENTIAL:
        parts += ["--sequential-calibration", args.sequential]
    if args.tie_break_modules != DEFAULTS.tie_break_modules:
        parts += ["--tie-break-modules", str(args.tie_break_modules)]
    if args.tie_break_margin != DEFAULTS.tie_break_margin:
        parts += ["--tie-break-margin", f"{args.tie_break_margin:g}"]
    if args.max_macs != DEFAULTS.max_macs:
        parts += ["--max-macs", max_macs_text(args.max_macs)]
    parts += ["--out", f"runs/{args.model}-{round(100 * fraction)}-{'-'.join(families)}", "--eval", "wikitext2", "--max-tokens", str(args.max_tokens)]
    return " ".join(shlex.quote(p) for p in parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.95, 0.9, 0.8, 0.7, 0.6])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--calibration", nargs="+", default=["wikitext2"], help="SPEC[=WEIGHT] sources, as kronlm compress --calibration")
    parser.add_argument("--calibration-split", default="validation")
    parser.add_argument("--calibration-sequences", type=int, default=DEFAULT_CALIBRATION_SEQUENCES)
    parser.add_argument("--calibration-length", type=int, default=DEFAULT_CALIBRATION_LENGTH)
    parser.add_argument("--calibration-seed", type=int, default=None)
    parser.add_argument("--sensitivity-sequences", type=int, default=DEFAULTS.sensitivity_sequences)
    parser.add_argument("--check-rounds", type=int, default=DEFAULTS.check_rounds)
    parser.add_argument("--sequential", choices=["off", "output", "weight"], default="off")
    parser.add_argument("--tie-break-modules", type=int, default=DEFAULTS.tie_break_modules, help="as kronlm compress")
    parser.add_argument("--tie-break-margin", type=float, default=DEFAULTS.tie_break_margin, help="as kronlm compress")
    parser.add_argument("--max-macs", type=parse_max_macs, default=None,
                        help="as kronlm compress --max-macs (default none: the committed rows predate the cap)")
    parser.add_argument("--tag", default="wikitext2", help="name of this calibration variant in --results and the tables")
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--ood-tokens", type=int, default=16384)
    parser.add_argument("--data-dir", type=Path, default=default_data_dir(), help="as kronlm compress --data-dir")
    parser.add_argument("--work", type=Path, default=Path("runs/pareto"))
    parser.add_argument("--save-dir", type=Path, default=None, help="save the students of --save-fraction here (for recovery)")
    parser.add_argument("--save-fraction", type=float, default=0.7)
    parser.add_argument("--recovered", nargs="*", default=[], help="LABEL=FOLDER of recovered students to score")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "pareto.jsonl",
                        help="one JSON row per finished point; rows present are not computed again")
    parser.add_argument("--report-only", action="store_true", help="write the tables from --results without computing")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    # Reports and results name the data folder as "..." (portable_paths reads this).
    os.environ.setdefault("KRONLM_DATA_DIR", str(args.data_dir))
    if args.threads:
        torch.set_num_threads(args.threads)
    for source in args.calibration:
        CalibrationSource.parse(source)  # a bad spec fails before the model loads
    command = "python benchmarks/pareto.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    info = environment_info()
    args.machine = f"{info['cpu']}, {info['cores']} cores, {info['device']}"  # recorded per row: "compress s" compares within one machine
    print(reproduce_header(command, info), flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    results_file = args.results
    done = {(row["tag"], row["set"], row["fraction"]): row for row in read_result_rows(results_file)}

    def record(row):
        done[(row["tag"], row["set"], row["fraction"])] = row
        append_result_row(results_file, row)
        print(json.dumps({k: v for k, v in row.items() if k != "command"}), flush=True)

    if not args.report_only:
        run(args, done, record, command)
    report(args, done, info, command)


def run(args, done, record, command: str) -> None:
    model, tokenizer = kronlm.load_model_and_tokenizer(args.model)
    dense_params = count_parameters(model)
    test_ids = tokenizer(load_text("wikitext2", data_dir=args.data_dir), return_tensors="pt")["input_ids"][0][: args.max_tokens]
    glue_ids = ood_ids(tokenizer, args.data_dir, args.ood_tokens)

    def scores(m) -> dict:
        t0 = time.perf_counter()
        ppl = perplexity(m, test_ids, max_length=1024, stride=512, desc="wikitext2 ppl").ppl
        ood = perplexity(m, glue_ids, max_length=1024, stride=512, desc="glue ppl").ppl
        return {"ppl": ppl, "ppl_ood": ood, "eval_seconds": time.perf_counter() - t0}

    if ("dense", "dense", 1.0) not in done:
        record({"tag": "dense", "set": "dense", "fraction": 1.0, "params": dense_params, **scores(model)})
    for label, folder in (item.split("=", 1) for item in args.recovered):
        if ("recovered", label, 0.0) not in done:
            student = kronlm.load(folder)
            record({"tag": "recovered", "set": label, "fraction": 0.0, "folder": folder, "params": count_parameters(student), **scores(student)})
    todo = [(s, f) for f in args.fractions for s in args.sets if (args.tag, s, f) not in done]
    if not todo:
        return
    meta = {"calibration": " ".join(args.calibration), "split": args.calibration_split, "sequences": str(args.calibration_sequences),
            "length": str(args.calibration_length), "seed": str(args.calibration_seed), "sensitivity": str(args.sensitivity_sequences)}
    # One file per calibration setting (tags that differ only in how they fit share it).
    cache = args.work / f"calibration-{hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]}.safetensors"
    t0 = time.perf_counter()
    # The subset check's held-out sequences come after the priced ones, as `kronlm compress --budget` reads them.
    extra = BudgetConfig().held_out_sequences
    ids, described = calibration_mix(model, tokenizer, args.calibration, args.calibration_sequences + extra, args.calibration_length,
                                     seed=args.calibration_seed, split=args.calibration_split, data_dir=args.data_dir)
    ids, held_out = ids[:args.calibration_sequences], ids[args.calibration_sequences:]
    print(f"calibration: {described}", flush=True)
    names = budget_candidates(model)
    if cache.exists():
        stats = load_calibration(cache, meta)
    else:
        stats = budget_statistics(model, ids, names, sensitivity_sequences=args.sensitivity_sequences)
        save_calibration(stats, cache, meta)
    calibration_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    pricing = price_modules(model, stats, settings=settings_for(args, SETS["mixed"]))
    print(pricing.summary.describe(), flush=True)
    pricing_seconds = time.perf_counter() - t0
    for name, fraction in todo:
        families = SETS[name]
        student = copy.deepcopy(model)
        start = time.perf_counter()
        allocation = compress_to_budget(student, settings_for(args, families, fraction), ids, held_out=held_out, statistics=stats,
                                        pricing=copy.deepcopy(pricing))
        seconds = time.perf_counter() - start
        for entry in stats.values():
            entry.fitted.clear()
        print(allocation.table(max_rows=0), flush=True)
        row = {"tag": args.tag, "set": name, "fraction": fraction, "params": allocation.params_after, **scores(student),
               "families": allocation.family_counts(), "choices": next(l for l in allocation.table(max_rows=0).splitlines() if l.startswith("choices:")),
               "estimated_nll_increase": allocation.estimated_loss, "seconds": seconds, "calibration_seconds": calibration_seconds,
               "pricing_seconds": pricing_seconds, "pricing": pricing.summary.describe(), "calibration": described,
               "sequential": args.sequential, "max_macs": args.max_macs, "command": cli_command(args, fraction, families), "invocation": command,
               "decided_by": allocation.decided_by, "held_out_nll": allocation.held_out_nll, "tie_break": allocation.tie_break,
               "machine": args.machine}
        if args.save_dir is not None and abs(fraction - args.save_fraction) < 1e-9:
            folder = args.save_dir / f"{args.tag}-{name}-{round(100 * fraction)}"
            kronlm.save(student, folder, tokenizer=tokenizer, overwrite=True)
            row["saved"] = str(folder)
        record(row)
        del student


def _family_cell(row) -> str:
    counts = row.get("families", {})
    return " / ".join(str(counts.get(k, 0)) for k in ("dense", "svd", "kronecker", "kronecker_lowrank"))


def _check_cell(row) -> str:
    """What the held-out subset check kept (the family set with the lowest held-out NLL, as
    ``choose_by_held_out`` keeps it), and the held-out NLL of each family set it compared."""
    if len(SETS.get(row.get("set"), ())) == 1:
        return "no check (one family)"
    if "held_out_nll" not in row:
        return "not recorded"
    scores = row["held_out_nll"]
    if not scores:
        return "no check"
    kept = min((label for label, nll in scores.items() if nll is not None), key=scores.get)
    cells = ", ".join(f"{label} {nll:.3f}" if nll is not None else f"{label} out of reach" for label, nll in scores.items())
    trials = row.get("tie_break") or []
    swaps = ""
    if trials:
        kept_trials = [t for t in trials if t["kept"]]
        final = f" -> {kept_trials[-1]['held_out_nll']:.3f}" if kept_trials else ""
        swaps = f"; tie-break kept {len(kept_trials)} of {len(trials)} swaps{final}"
    return f"{'every family' if ',' in kept else kept + ' alone'} ({cells}{swaps})"


def _row_command(row: dict) -> str:
    """A row's reproducing command. Rows recorded before sequential calibration or the multiply-add
    cap became the CLI's defaults were measured with them off but their command does not say so: it
    says so here."""
    command, sequential = row["command"], row.get("sequential", "off")
    if "--sequential-calibration" not in command and sequential != DEFAULT_SEQUENTIAL:
        command = command.replace(" --out ", f" --sequential-calibration {sequential} --out ", 1)
    cap = row.get("max_macs")
    if "--max-macs" not in command and cap != DEFAULTS.max_macs:
        command = command.replace(" --out ", f" --max-macs {max_macs_text(cap)} --out ", 1)
    return command


def report(args, done, info, command) -> None:
    dense = done.get(("dense", "dense", 1.0))
    if dense is None:
        return
    tags = sorted({t for t, _, _ in done} - {"dense", "recovered"})
    lines = ["# Zero-shot Pareto picture: perplexity against parameters kept, per factor family (SmolLM2-135M, no training)", ""]
    lines += [
        f"Dense: {dense['params']:,} parameters; WikiText-2 test perplexity {dense['ppl']:.2f}, GLUE-sentences perplexity "
        f"{dense['ppl_ood']:.2f}.", "",
        "Perplexity: WikiText-2 raw test, first 16,384 tokens (in-domain for WikiText calibration); GLUE dev sentences as "
        "plain text, 8,192 tokens of SST-2 dev then 8,192 of QNLI dev (`sentence` column joined with \"\\n\\n\"; in no "
        "calibration set). Sliding window 1024 / stride 512. \"OOD / in\" is the ratio of the two × dense figures. "
        "Choices: modules kept dense / truncated SVD / Kronecker / Kronecker + low-rank, of 210 candidates.", "",
    ]
    series = {}
    for tag in tags:
        rows = []
        for fraction in sorted({f for t, _, f in done if t == tag}, reverse=True):
            for name in SETS:
                row = done.get((tag, name, fraction))
                if row is None:
                    continue
                rin, rood = row["ppl"] / dense["ppl"], row["ppl_ood"] / dense["ppl_ood"]
                rows.append([f"{100 * fraction:.0f}%", name, f"{row['params']:,}", f"{row['ppl']:,.2f}", f"{rin:,.2f}",
                             f"{row['ppl_ood']:,.2f}", f"{rood:,.2f}", f"{rood / rin:.2f}", _family_cell(row),
                             f"{row['estimated_nll_increase']:.3f}", _check_cell(row), f"{row['seconds']:.0f}"])
                key = f"{name} ({tag})" if len(tags) > 1 else name
                for text, value in (("WikiText-2", row["ppl"]), ("GLUE", row["ppl_ood"])):
                    xs, ys = series.setdefault(f"{key} · {text}", ([], []))
                    xs.append(100 * row["params"] / dense["params"])
                    ys.append(value)
        sample = next(r for (t, _, _), r in done.items() if t == tag)
        lines += [f"## Calibration `{tag}`", "", f"{sample['calibration']}; sequential calibration: {sample.get('sequential', 'off')}. "
                  f"{sample['pricing']} (pricing {sample['pricing_seconds']:.0f} s, calibration {sample['calibration_seconds']:.0f} s).", ""]
        lines.append(markdown_table(["kept", "families", "params", "WikiText-2", "× dense", "GLUE", "× dense", "OOD / in",
                                     "choices d/svd/k/k+lr", "est. ΔNLL", "subset check kept", "compress s"], rows))
        lines += ["", "Commands (one per row, same order):", "", "```bash"]
        for fraction in sorted({f for t, _, f in done if t == tag}, reverse=True):
            lines += [_row_command(done[(tag, n, fraction)]) for n in SETS if (tag, n, fraction) in done]
        lines += ["```", ""]
    recovered = [r for (t, _, _), r in done.items() if t == "recovered"]
    if recovered:
        lines += ["## After recovery", "", markdown_table(
            ["student", "params", "WikiText-2", "× dense", "GLUE", "× dense"],
            [[r["set"], f"{r['params']:,}", f"{r['ppl']:,.2f}", f"{r['ppl'] / dense['ppl']:,.2f}", f"{r['ppl_ood']:,.2f}",
              f"{r['ppl_ood'] / dense['ppl_ood']:,.2f}"] for r in recovered]), ""]
    if series and args.out:
        png = line_plot({k: (xs, ys) for k, (xs, ys) in series.items()}, png_beside(args.out),
                        title="SmolLM2-135M zero-shot perplexity vs parameters kept", xlabel="parameters kept (% of dense)",
                        ylabel="perplexity", logy=True, reference=dense["ppl"], reference_label="dense (WikiText-2)")
        lines += [f"![Pareto picture]({png.name})", ""]
    invocations = list(dict.fromkeys(r["invocation"] for r in done.values() if "invocation" in r))
    lines.append(reproduce_section(invocations or [command], info, notes=[
        "Each benchmark invocation prints the command, machine, date and versions at the top of its output; the figures "
        "above come from the invocations listed, in that order (pareto.jsonl accumulates across them). The machine line "
        "above is the last invocation's; rows recorded since 2026-12-06 name theirs in pareto.jsonl (`machine`), and the "
        "\"compress s\" column compares only within one machine.",
    ]))
    notes = ""
    if args.out and Path(args.out).is_file():  # the hand-written findings survive a rerun
        previous = Path(args.out).read_text()
        if NOTES_BEGIN in previous and NOTES_END in previous:
            notes = previous[previous.index(NOTES_BEGIN): previous.index(NOTES_END) + len(NOTES_END)]
    if notes:
        lines[2:2] = [notes, ""]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_markdown(text, args.out)


if __name__ == "__main__":
    main()
