"""Quality against CPU time: compressed SmolLM2-135M students recovered side by side.

Students at about SIZE of the dense parameters (equal within 1 %), each built once by the library
calls of the ``kronlm`` command that is printed (``kronlm.compress``, ``kronlm.compression.save_truncated``):

- ``kron-vlr``: Krony-PT-style Kronecker MLPs (gate/up B (2,1), down B (1,2)) of N evenly spaced
  blocks, modified Van Loan init; ``kron-prune``: the same shapes, pruning init; ``kron-aa``: the
  same shapes, activation-aware init;
- ``budget-svd``: the per-module budget allocation to the same parameter count, truncated SVDs
  only; ``budget-klr``: the same with Kronecker + low-rank factors only (the best Kronecker-containing
  family of the zero-shot Pareto front); ``budget-kron``: the same with Kronecker factors only (sums
  of Kronecker products, no low-rank part: the papers' layer, placed and sized by the allocation
  instead of one shape for every MLP); ``budget-kron-cap``: the same under the allocation's default
  multiply-add cap (no factored layer above its dense multiply-adds per token; the other budget
  students predate the cap and are built with ``--max-macs none``); ``budget-all``: every factor family (Kronecker,
  Kronecker + low rank, SVD; the held-out subset check may keep one family alone, and then its
  rows are that family's student's, marked ``same_as``: the same plan recovers the same way);
- ``truncate``: the layer-truncation baseline, whole blocks dropped (evenly spaced ones kept).

Recoveries, all on the same training tokens (``--train-data``, default the enwiki-sample
articles; the last blocks held out to choose checkpoints) under one wall-clock budget per run
(``--minutes``) on one torch thread:

- ``staged``: local reconstruction, then block-wise, then end-to-end distillation (the stages of
  ``configs/recover.yaml``; the block modes on the first ``--block-tokens`` training tokens, the
  end-to-end stage on all of them). Its points after the local stage and after the block-wise
  stage are the recoveries "local" and "local -> block-wise";
- ``end_to_end``: logit distillation of the compressed modules alone (``configs/recover-e2e.yaml``);
  the truncated student trains all weights with the DistilGPT2 recipe
  (``configs/recover-truncation.yaml``), its own best recipe;
- ``blockwise``: block-wise distillation alone, epochs until the budget;
- ``staged_all``: ``staged`` with every weight trainable in the end-to-end stage (attention,
  uncompressed MLPs, norms and embeddings too, as the truncated student trains), asked for by
  name only: does a Kronecker student fall behind truncation for want of training its dense
  weights?

The end-to-end parts run in segments that end at the ``--points`` minutes (resumed from their
checkpoints: the same run as an uninterrupted one); after each stage and segment the student
chosen on the held-out blocks is evaluated on WikiText-2 test (first ``--eval-tokens`` tokens,
sliding window 1024 / stride 512), and the final one also on GLUE SST-2 dev sentences (out of
domain: text in no calibration or training set). CPU-minutes are the process's CPU time of
everything a run spends (teacher cache, captures, training, validation) on one torch thread;
the budgets (``--minutes``, the points, the stages' ``max_minutes``) are wall-clock limits, equal
to CPU time on an otherwise idle core. On a CPU every part trains in float32, whatever the
recipe's ``mixed_precision: auto`` would pick (bf16 autocast on a CPU with AMX-BF16 or
AVX512-BF16 since it was measured to recover faster): every CPU row of the page was measured in
float32, and a row in another precision would not compare with them.

Results are appended to ``--results`` (default ``docs/benchmarks/recovery.jsonl``, committed beside
the page) one row per (student, size, recovery) as they come, so an interrupted invocation, or one
on a fresh clone, skips the rows already measured; the checkpoints of an unfinished row live under
``WORK`` and resume it on the same machine; a finished row keeps only its recovered student there
(``--keep-checkpoints`` keeps every stage's). ``--out`` writes the Markdown table and
``--plot`` the PNG (test perplexity against CPU-minutes, log scale, one line per student x recovery).

Factor storage: kronlm stores every Kronecker term of a ``KroneckerLinear`` with its scale split
evenly between the two factors (``kronlm.decompose.balance_terms``); truncated-SVD terms and
Kronecker + low-rank layers keep their fit's split. A student's rows count when measured with the
storage kronlm uses for it now (:func:`current_factors`): ``factors: balanced`` for the Krony-PT and
Kronecker-alone students (built in ``WORK/students/NAME-SIZE-balanced``, or, when an earlier build
exists, loaded from it and rebalanced with ``balance_factors``: the same weights), the init's split
(``unbalanced``, also what rows without the key were measured with) for ``budget-klr``. Rows of the
other storage stay on the page, marked, beside them. Students without Kronecker terms (truncation,
the truncated-SVD budget) are stored the same either way: their rows stand for both.

    python benchmarks/recovery.py --size 0.85 --students budget-svd,truncate --recoveries staged,end_to_end \\
        --out docs/benchmarks/recovery.md --plot docs/benchmarks/recovery-85.png
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from kronlm.bench.markdown import (
    environment_info,
    git_commit,
    machine_info,
    machine_line,
    append_result_row,
    markdown_table,
    read_result_rows,
    reproduce_header,
    reproduce_section,
    write_markdown,
)
from kronlm.bench.plots import line_plot
from kronlm.compression import (
    FACTOR_FAMILIES,
    BudgetConfig,
    CompressionConfig,
    balance_factors,
    calibration_mix,
    count_parameters,
    save_truncated,
)
from kronlm.data import build_blocks, load_text, resolve_source
from kronlm.distill import RecoveryConfig, TrainingConfig, distill_blockwise, distill_local, train
from kronlm.evaluation import perplexity_of_text
from kronlm.modeling import compress, load, load_model, load_model_and_tokenizer, load_tokenizer, save
from kronlm.utils.memory import release_memory

REPO = Path(__file__).resolve().parents[1]
BLOCKS = 30
# Krony-PT-style MLPs of N blocks at 2x, and the number of whole blocks the truncation drops to
# the same parameter count (a block of SmolLM2 is 3,539,840 parameters; 2x on its MLP saves 1,327,098).
SIZES = {0.85: {"kron_blocks": 16, "drop": 6}, 0.70: {"kron_blocks": 30, "drop": 11}}
STUDENTS = ("kron-vlr", "kron-prune", "kron-aa", "budget-svd", "budget-klr", "budget-kron", "budget-kron-cap", "budget-all",
            "truncate")
# The factor families each budget student may choose from.
BUDGET_FAMILIES = {"budget-svd": ("svd",), "budget-klr": ("kronecker_lowrank",), "budget-kron": ("kronecker",),
                   "budget-kron-cap": ("kronecker",), "budget-all": FACTOR_FAMILIES}
# The budget students built under the allocation's default multiply-add cap; the others were built
# before it existed, without it.
CAPPED = ("budget-kron-cap",)
RECOVERIES = ("staged", "end_to_end", "blockwise", "staged_all")
# The recoveries that run the block stages first (their rows count the block-stage tokens too).
STAGED = ("staged", "staged_all")
# Block-wise distillation alone is measured on one student only, for continuity with the earlier pages.
BLOCKWISE_ALONE = (0.85, "budget-svd")
# Students outside the grid, added to find the best Kronecker-only student: measured end to
# end alone, the better recovery for every activation-aware budget student (SVD and Kronecker + low
# rank at both sizes); a staged run is shown once started.
END_TO_END_ONLY = ("budget-kron", "budget-kron-cap")
# How the factors of the students measured now are stored; rows without a "factors" key predate it.
FACTORS = "balanced"
UNBALANCED = "unbalanced"
NO_KRONECKER_TERMS = ("truncate", "budget-svd")
# Students with Kronecker + low-rank layers: kronlm stores them with their joint fit's split, and
# their rows count once measured with the low-rank part U·V trainable end to end
# (``low_rank_trained``); kronlm froze it there before, with the rest of the uncompressed weights,
# so those rows trained only the small Kronecker part end to end.
LOW_RANK_STUDENTS = ("budget-klr",)
ENWIKI = Path("enwiki-sample") / "articles.jsonl"
# One size's whole grid (the committed tables: this at --size 0.85 and at --size 0.70).
FULL_COMMAND = ("python benchmarks/recovery.py --size 0.85 --recoveries staged,end_to_end --local-minutes 15 --blockwise-minutes 10 "
                "--out docs/benchmarks/recovery.md --plot 'docs/benchmarks/recovery-{size}.png'")


def spaced(n: int, total: int = BLOCKS) -> list[int]:
    """``n`` evenly spaced block indices of ``total``."""
    return sorted({round(i * total / n) for i in range(n)})


def show(argv: list[str], log: list[str]) -> None:
    """Record and print ``kronlm ARGV``: the command that builds what the next library calls build."""
    log.append("kronlm " + shlex.join(argv))
    print(log[-1], flush=True)


def tokenizer_of(model: str | Path):
    """The tokenizer saved with ``model``, or None when it has none."""
    try:
        return load_tokenizer(str(model))
    except (OSError, ValueError):
        return None


def truncated_student(model: str, keep: list[int], folder: Path) -> None:
    """``kronlm truncate MODEL --layers KEEP --out FOLDER --overwrite``."""
    save_truncated(load_model(model), keep, folder, tokenizer=tokenizer_of(model), overwrite=True)


def compressed_student(args, config: CompressionConfig | BudgetConfig, folder: Path, calibrate: bool) -> None:
    """``kronlm compress MODEL (--config FILE | --budget-params N) [--calibration wikitext2 ...] --out FOLDER --overwrite``."""
    net, tokenizer = load_model_and_tokenizer(args.model)
    ids = None
    if calibrate:
        # As `kronlm compress` reads them: the subset check's held-out sequences after the priced ones.
        extra = config.held_out_sequences if isinstance(config, BudgetConfig) and config.checks_subsets else 0
        ids, described = calibration_mix(net, tokenizer, ["wikitext2"], args.calibration_sequences + extra, 512, data_dir=args.data_dir)
        print(f"calibration: {described}", flush=True)
    compress(net, config, calibration=ids)
    print(net.compression_report.table(max_rows=12), flush=True)
    save(net, folder, tokenizer=tokenizer, overwrite=True)


def kron_config(work: Path, blocks: list[int], init: str) -> Path:
    path = work / f"kron-{init}-{len(blocks)}.yaml"
    path.write_text(json.dumps({"targets": [
        {"modules": ["model.layers.*.mlp.gate_proj", "model.layers.*.mlp.up_proj"], "b_shape": [2, 1], "init": init, "layers": blocks},
        {"modules": ["model.layers.*.mlp.down_proj"], "b_shape": [1, 2], "init": init, "layers": blocks},
    ]}))
    return path


def build_student(name: str, size: float, work: Path, args, log: list[str]) -> Path:
    """The student folder of ``name`` at ``size``, built once; the command that builds it is
    recorded in ``log`` either way (a row names it even when an earlier run built the folder)."""
    folder = student_folder(work, name, size)
    built = (folder / "config.json").is_file()
    earlier = student_folder(work, name, size, UNBALANCED)
    if not built and folder != earlier and (earlier / "config.json").is_file():
        # The earlier build holds the same weights; only the split of each term's scale differs.
        student = load(earlier)
        print(f"{folder.name}: {balance_factors(student)} factored layers of {earlier.name} rebalanced", flush=True)
        save(student, folder, tokenizer=tokenizer_of(earlier), overwrite=True)
        built = True
    setting = SIZES[size]
    common = ["--out", str(folder), "--overwrite"]
    calibration = ["--calibration", "wikitext2", "--calibration-sequences", str(args.calibration_sequences),
                   "--calibration-length", "512", "--data-dir", str(args.data_dir)]
    if name == "truncate":
        keep = spaced(BLOCKS - setting["drop"])
        show(["truncate", args.model, "--layers", ",".join(map(str, keep)), *common], log)
        if not built:
            truncated_student(args.model, keep, folder)
    elif name.startswith("budget"):
        reference = build_student("kron-vlr", size, work, args, [])
        target = count_parameters(load(reference))
        config, family_flags, flags = budget_student(name, target)
        show(["compress", args.model, "--budget-params", str(target), *family_flags, *calibration, *flags, *common], log)
        if not built:
            compressed_student(args, config, folder, calibrate=True)
    else:
        init = {"kron-vlr": "van_loan_rescaled", "kron-prune": "pruning", "kron-aa": "activation_aware"}[name]
        config = kron_config(work, spaced(setting["kron_blocks"]), init)
        show(["compress", args.model, "--config", str(config), *(calibration if init == "activation_aware" else []), *common], log)
        if not built:
            compressed_student(args, CompressionConfig.from_file(config), folder, calibrate=init == "activation_aware")
    return folder


def budget_student(name: str, target: int) -> tuple[BudgetConfig, list[str], list[str]]:
    """The ``BudgetConfig`` of budget student ``name`` at ``target`` parameters, and the
    ``kronlm compress`` flags that give the same one: ``--families`` (none for every family), then
    the fitting flags.

    Every budget student is fitted on the dense model's statistics (``--sequential-calibration
    off``), and all but those of ``CAPPED`` without the multiply-add cap: the rows were measured
    before the CLI's sequential default and its cap."""
    families = BUDGET_FAMILIES[name]
    cap = BudgetConfig().max_macs if name in CAPPED else None
    family_flags = [] if families == FACTOR_FAMILIES else ["--families", ",".join(families)]
    flags = ["--sequential-calibration", "off"] + ([] if name in CAPPED else ["--max-macs", "none"])
    return BudgetConfig(target_params=target, families=families, sequential=None, max_macs=cap), family_flags, flags


class Evaluator:
    """Test (and out-of-domain) perplexity of models, cached in ``WORK/evals/*.json`` by tag."""

    def __init__(self, work: Path, args):
        self.work, self.args = work, args
        self.texts = {
            "test": load_text(resolve_source("wikitext2", split="test", data_dir=args.data_dir)),
            "ood": load_text(resolve_source(args.data_dir / "glue" / "SST-2" / "dev.tsv", split="dev", text_field="sentence")),
        }

    def __call__(self, model, tokenizer, tag: str, texts=("test", "ood")) -> dict[str, float]:
        out = {}
        for name in texts:
            path = self.work / "evals" / f"{tag}-{name}.json"
            if not path.is_file():
                result = perplexity_of_text(model, tokenizer, self.texts[name], max_tokens=self.args.eval_tokens, max_length=1024,
                                            stride=512, batch_size=1)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"ppl": result.ppl, "tokens": result.tokens_scored, "seconds": result.seconds}))
            out[name] = json.loads(path.read_text())["ppl"]
        return out


class Clock:
    """Seconds a run has spent, saved beside the run so that a resumed invocation continues the
    count: on a CPU this process's CPU time (another job on the machine does not inflate it), on
    a GPU wall-clock time; :meth:`paused` stops it (evaluations are not part of a recovery's cost)."""

    def __init__(self, path: Path, cpu: bool = True):
        self.path = path
        self.read = time.process_time if cpu else time.perf_counter
        self.spent = json.loads(path.read_text())["seconds"] if path.is_file() else 0.0
        self.started = self.read()

    def now(self) -> float:
        return self.spent + self.read() - self.started

    def add(self, seconds: float) -> None:
        self.spent += seconds

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"seconds": self.now()}))

    @contextlib.contextmanager
    def paused(self):
        self.save()
        stopped = self.read()
        try:
            yield
        finally:
            self.started += self.read() - stopped


def stage_configs(args, truncated: bool) -> dict[str, TrainingConfig]:
    """The settings of each part: the stages of configs/recover.yaml; the end-to-end baselines."""
    staged = RecoveryConfig.from_file(REPO / "configs" / "recover.yaml").stages
    parts = {s.mode: s for s in staged}
    # Every student's local point is measured, whatever its init (the recipe refits data-free inits only).
    # Two runs share a 24 GB machine: captures beyond this go to disk (bf16) instead of memory.
    parts["local"] = parts["local"].replace(local={**parts["local"].local.to_dict(), "modules": "all",
                                                   "capture_memory_gb": args.capture_memory_gb})
    e2e_file = "recover-truncation.yaml" if truncated else "recover-e2e.yaml"
    parts["end_to_end_alone"] = TrainingConfig.from_file(REPO / "configs" / e2e_file)
    for mode in ("end_to_end", "end_to_end_alone"):
        # Validation costs as much as ~1/4 of the training tokens at every 8 steps; the segments' ends
        # (the points) validate anyway.
        parts[mode] = parts[mode].replace(eval_every=32, save_every=32)
    parts["blockwise_alone"] = parts["blockwise"].replace(epochs=100, max_minutes=None)
    parts["end_to_end_all"] = parts["end_to_end"].replace(freeze_uncompressed=False)
    if str(args.device) == "cpu":
        # Every CPU row so far was measured in float32; the recipe's "auto" would now pick bf16 on a
        # CPU with AMX and make later rows incomparable with them (docs/recovery.md, mixed precision).
        parts = {mode: config.replace(mixed_precision="no") for mode, config in parts.items()}
    return parts


def recover_and_measure(student_name: str, size: float, recovery: str, student_dir: Path, teacher, tokenizer, blocks,
                        evaluate: Evaluator, work: Path, args) -> dict:
    """One student x recovery: every point (CPU-minutes, test perplexity) and the final evaluation."""
    run_dir = run_folder(work, student_name, size, recovery)
    tag = run_dir.name
    clock = Clock(run_dir / "clock.json", cpu=str(args.device) == "cpu")
    student = load(student_dir).to(args.device)
    parts = stage_configs(args, student_name == "truncate")
    few = {"train": blocks.train[: args.block_tokens // blocks.train.shape[1]], "val": blocks.val}
    every = {"train": blocks.train, "val": blocks.val}
    settings = {"--train-data": str(args.train_data), "--train-tokens": args.train_tokens}
    points_path = run_dir / "points.json"
    # Points survive an interruption: a resumed run keeps the ones it measured before.
    points: list[dict] = json.loads(points_path.read_text()) if points_path.is_file() else []
    budget = 60.0 * args.minutes
    charged = {"cache": False}

    def charged_cache() -> bool:
        # Once per run: the block stages of one run share the cache.
        first, charged["cache"] = not charged["cache"], True
        return first and (work / "teacher_cache_seconds.json").is_file()

    def record(label: str, minutes: float, ppl: float) -> None:
        points.append({"label": label, "minutes": minutes, "test": ppl})
        points_path.parent.mkdir(parents=True, exist_ok=True)
        points_path.write_text(json.dumps(points))
        print(f"{tag}: {label} at {minutes:.1f} CPU-minutes: test perplexity {ppl:.2f}", flush=True)

    def point(label: str) -> None:
        if any(p["label"] == label for p in points):
            return
        minutes = clock.now() / 60.0
        with clock.paused():
            ppl = evaluate(student, tokenizer, f"{tag}-{label}", texts=("test",))["test"]
        record(label, minutes, ppl)

    def block_stage(mode: str, config: TrainingConfig, minutes: float) -> None:
        config = config.replace(max_minutes=minutes, blockwise={**config.blockwise.to_dict(), "cache_dir": str(work / "teacher_cache")})
        folder = run_dir / mode
        fn = distill_local if mode == "local" else distill_blockwise
        result = fn(student, teacher, few, config, folder, resume=folder.is_dir(), tokenizer=tokenizer, run_settings=settings)
        if result.cache_seconds < 1.0:  # the shared teacher cache was built by an earlier run: charge its cost here too
            clock.add(json.loads((work / "teacher_cache_seconds.json").read_text())["seconds"] if charged_cache() else 0.0)
        else:
            (work / "teacher_cache_seconds.json").write_text(json.dumps({"seconds": result.cache_seconds}))
        student.load_state_dict(load(result.best_dir).state_dict())
        del result
        release_memory()  # the stage's captures stay in the heap otherwise, and two runs share the machine

    def end_to_end(config: TrainingConfig, data) -> None:
        folder = run_dir / "end_to_end"
        for mark in args.points:
            label, trained, finished = f"e2e-{mark:g}min", False, False
            # A segment ends at the next point; the run resumes from its checkpoint (RESUME_FREE: max_minutes).
            # The trainer's limit is wall-clock time, which another job on the machine makes worth fewer
            # CPU-seconds: segments repeat until this run's CPU clock reaches the point.
            while (left := min(60.0 * mark, budget) - clock.now()) > 30:
                run = train(student, teacher, data, config.replace(max_minutes=left / 60.0, epochs=None, max_steps=config_steps(config, data)),
                            folder, resume=(folder / "checkpoints").is_dir(), tokenizer=tokenizer, run_settings=settings)
                student.load_state_dict(load(run.best_dir or run.final_dir).state_dict())
                trained, finished = True, not run.time_limited
                del run
                # The segment's activations stay in the heap otherwise: a 10 GB process at the final
                # evaluation was killed for memory beside two other jobs.
                release_memory()
                if finished:
                    break
            if trained:
                point(label)
            if finished:
                break

    if recovery in STAGED:
        block_stage("local", parts["local"], args.local_minutes or parts["local"].max_minutes)
        point("local")
        block_stage("blockwise", parts["blockwise"], args.blockwise_minutes or parts["blockwise"].max_minutes)
        point("local+blockwise")
        end_to_end(parts["end_to_end" if recovery == "staged" else "end_to_end_all"], every)
    elif recovery == "blockwise":
        block_stage("blockwise", parts["blockwise_alone"], args.minutes)
        point("blockwise")
    else:
        end_to_end(parts["end_to_end_alone"], every)
    with clock.paused():
        final = evaluate(student, tokenizer, f"{tag}-final")
    return {"student": student_name, "size": size, "recovery": recovery, "points": points, "after": final,
            "cpu_minutes": clock.now() / 60.0, "train_tokens": blocks.train.numel(), "block_tokens": few["train"].numel()}


def same_plan_as(name: str, size: float, work: Path) -> str | None:
    """For the allocation over every family: the single-family budget student of the same size
    whose plan (every module's factor shapes, rank and init) it equals, or None. The allocation
    checks its result against each single family's on held-out calibration tokens and may keep
    one of them whole (it did at 80 % on the Pareto front); that student then needs no run of its own."""
    if BUDGET_FAMILIES.get(name) != FACTOR_FAMILIES:
        return None
    mine = plan_targets(student_folder(work, name, size))
    for other in (n for n, families in BUDGET_FAMILIES.items() if len(families) == 1):
        folder = student_folder(work, other, size)
        if (folder / "kronlm_compression.json").is_file() and plan_targets(folder) == mine:
            return other
    return None


def plan_targets(folder: Path) -> list[str]:
    """The compression plan saved in a student folder, one sorted JSON string per target."""
    plan = json.loads((folder / "kronlm_compression.json").read_text())["compression"]["targets"]
    return sorted(json.dumps(t, sort_keys=True) for t in plan)


def current_factors(student: str) -> str:
    """The storage kronlm uses for ``student``'s factors now, which its counted rows are measured
    with: ``balanced``, ``unbalanced`` (the init's split: ``LOW_RANK_STUDENTS``) or ``-`` (no
    Kronecker terms)."""
    if student in NO_KRONECKER_TERMS:
        return "-"
    return UNBALANCED if student in LOW_RANK_STUDENTS else FACTORS


def student_folder(work: Path, student: str, size: float, factors: str | None = None) -> Path:
    """Where a student is built (``factors``: default :func:`current_factors`):
    ``WORK/students/kron-prune-85-balanced`` (``kron-prune-85`` for the unbalanced build; a student
    without Kronecker terms has one build: ``truncate-85``)."""
    return work / "students" / f"{student}-{int(size * 100)}{variant_suffix(student, factors or current_factors(student))}"


def run_folder(work: Path, student: str, size: float, recovery: str, factors: str | None = None) -> Path:
    """Where one (student, size, recovery) row keeps its checkpoints and points: ``WORK/runs/kron-prune-85-staged-balanced``."""
    return work / "runs" / f"{student}-{int(size * 100)}-{recovery}{variant_suffix(student, factors or current_factors(student))}"


def variant_suffix(student: str, factors: str) -> str:
    """``-balanced`` for a student with Kronecker terms stored balanced; nothing for the others."""
    return "-balanced" if factors == FACTORS and student not in NO_KRONECKER_TERMS else ""


def factors_of(row: dict) -> str:
    """The factor storage a row was measured with: ``balanced``, ``unbalanced`` (rows from before
    the key existed) or ``-`` (a student without Kronecker terms, or the twin of one: its rows
    stand for both)."""
    if row["student"] in NO_KRONECKER_TERMS or row.get("same_as") in NO_KRONECKER_TERMS:
        return "-"
    return row.get("factors", UNBALANCED)


def low_rank_frozen(row: dict) -> bool:
    """Whether a row of a Kronecker + low-rank student was measured with the low-rank part frozen
    end to end (rows from before kronlm trained it)."""
    return (row["student"] in LOW_RANK_STUDENTS or row.get("same_as") in LOW_RANK_STUDENTS) and not row.get("low_rank_trained")


def rows_by_key(rows: list[dict]) -> dict[tuple, dict]:
    """Rows by (student, size, recovery, ``factors_of``, ``low_rank_frozen``): the variants of one
    student apart."""
    return {(r["student"], r["size"], r["recovery"], factors_of(r), low_rank_frozen(r)): r for r in rows}


def measured(done: dict[tuple, dict], student: str, size: float, recovery: str) -> dict | None:
    """The row of the current storage for (student, size, recovery), if any: measured with
    :func:`current_factors`, or standing for both storages (no Kronecker terms, or the twin of such
    a student)."""
    for factors in (current_factors(student), "-"):
        if (row := done.get((student, size, recovery, factors, False))) is not None:
            return row
    return None


def prune_run(run_dir: Path) -> None:
    """Delete a finished row's intermediate checkpoints (its row is already in the results file):
    each stage's resumable state, block captures and final weights; the last stage's ``best`` (the
    recovered student), the points and the logs stay."""
    stages = [run_dir / s for s in ("local", "blockwise", "end_to_end") if (run_dir / s).is_dir()]
    for stage in stages:
        for child in stage.iterdir():
            keep = child.name == "logs" or child.is_file() or (stage == stages[-1] and child.name == "best")
            if not keep:
                shutil.rmtree(child)


def config_steps(config: TrainingConfig, data) -> int:
    """Optimizer steps of one pass over ``data``'s training blocks (the cosine's length)."""
    per_step = config.micro_batch_size * config.grad_accum_steps
    return max(data["train"].shape[0] // per_step, config.warmup_steps + 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (module docstring); ``argv`` None reads ``sys.argv``.

    Raises:
        SystemExit: an unknown student or recovery, or a bad value (argparse's error line).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=float, choices=sorted(SIZES), required=True, help="Fraction of the dense parameters kept.")
    parser.add_argument("--students", default=",".join(STUDENTS), help="Comma-separated subset of " + ", ".join(STUDENTS))
    parser.add_argument("--recoveries", default="staged,end_to_end", help="Comma-separated subset of " + ", ".join(RECOVERIES))
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--train-data", default=None, help="Training text (default: DATA_DIR/enwiki-sample/articles.jsonl).")
    parser.add_argument("--train-tokens", type=int, default=262144, help="Training tokens (validation blocks included).")
    parser.add_argument("--block-tokens", type=int, default=32768, help="Training tokens of the local and block-wise stages.")
    parser.add_argument("--val-fraction", type=float, default=0.015625, help="Share of the training tokens held out (choosing checkpoints).")
    parser.add_argument("--minutes", type=float, default=60.0, help="CPU-minute budget of each run (one torch thread).")
    parser.add_argument("--local-minutes", type=float, default=None, help="Budget of the staged run's local stage (default: configs/recover.yaml).")
    parser.add_argument("--blockwise-minutes", type=float, default=None, help="Budget of its block-wise stage (default: configs/recover.yaml).")
    parser.add_argument("--capture-memory-gb", type=float, default=3.0,
                        help="Local stage: captures held in memory up to this many GB, the rest on disk (two runs share the memory).")
    parser.add_argument("--points", default="5,10,20,40,60", help="CPU-minutes at which end-to-end segments end and are evaluated.")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--calibration-sequences", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="Where the models run (cpu, cuda); training and evaluation alike.")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "recovery")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "benchmarks" / "recovery.jsonl",
                        help="One JSON row per finished (student, size, recovery); rows present are not measured again.")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="Keep every stage's checkpoints of a finished row (default: only the recovered student, about 0.4 GB "
                             "instead of about 5 GB per staged row).")
    parser.add_argument("--report-only", action="store_true", help="Only write --out and --plot from --results.")
    parser.add_argument("--plot", default=None, help="PNG path per size, with {size} (e.g. docs/benchmarks/recovery-{size}.png).")
    args = parser.parse_args(argv)
    for flag, names, known in (("--students", args.students, STUDENTS), ("--recoveries", args.recoveries, RECOVERIES)):
        if unknown := [n for n in names.split(",") if n not in known]:
            parser.error(f"{flag}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
    try:
        args.points = [float(p) for p in args.points.split(",")]
    except ValueError:
        parser.error(f"--points: {args.points!r} is not a comma-separated list of CPU-minutes")
    args.train_data = args.train_data or str(args.data_dir / ENWIKI)
    return args


def main() -> None:
    """Measure the rows the command line asks for that ``--results`` lacks, then write the page."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("KRONLM_DATA_DIR", str(args.data_dir))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    results_path = args.results
    done = rows_by_key(read_result_rows(results_path))
    command = f"python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}"
    # The code this process runs: rows measured across a later commit still name the one they ran.
    commit = git_commit(Path(__file__).resolve().parent)
    if args.report_only:
        write_reports(results_path, args, command, commit)
        return
    info = environment_info(args.device)
    print(reproduce_header(command, {**info, "commit": commit}), flush=True)
    log: list[str] = []
    teacher, tokenizer = load_model_and_tokenizer(args.model)
    teacher.to(args.device).eval()
    evaluate = Evaluator(work, args)
    dense = evaluate(teacher, tokenizer, "dense")
    blocks = build_blocks(args.train_data, tokenizer, block_size=512, val_fraction=args.val_fraction, max_tokens=args.train_tokens,
                          data_dir=args.data_dir)
    print(f"training text: {blocks.source}; {blocks.train.shape[0]} training and {blocks.val.shape[0]} validation blocks of 512 tokens",
          flush=True)
    for name in args.students.split(","):
        student_dir = build_student(name, args.size, work, args, log)
        twin = same_plan_as(name, args.size, work)
        student = load(student_dir).to(args.device)
        params = count_parameters(student)
        before = evaluate(student, tokenizer, f"{name}-{int(args.size * 100)}")
        del student
        for recovery in args.recoveries.split(","):
            if name == "truncate" and recovery != "end_to_end":
                continue
            if measured(done, name, args.size, recovery):
                continue
            if twin and (twin_row := measured(done, twin, args.size, recovery)):
                # The same factorisation of the same weights recovers the same way: its row, not another hour.
                # The twin's invocation, which measured the row, stays its command.
                row = {**twin_row, "student": name, "same_as": twin, "commands": list(log),
                       "params": params, "before": before}
                print(f"{name}-{int(args.size * 100)}: the same plan as {twin}; its {recovery} row is this one's", flush=True)
                done.update(rows_by_key([row]))
                append_result_row(results_path, row)
                continue
            row = recover_and_measure(name, args.size, recovery, student_dir, teacher, tokenizer, blocks, evaluate, work, args)
            info = machine_info(args.device)
            # CPU-minutes are only comparable on one kind of CPU: every row names its own.
            if name not in NO_KRONECKER_TERMS:
                row["factors"] = current_factors(name)
            if name in LOW_RANK_STUDENTS:
                row["low_rank_trained"] = True
            row.update(params=params, dense_params=count_parameters(teacher), dense=dense, before=before, commands=list(log),
                       command=command, machine=f"{info['cpu']}, {info['cores']} cores, {info['device']}", date=info["date"],
                       commit=commit)
            done.update(rows_by_key([row]))
            append_result_row(results_path, row)
            if not args.keep_checkpoints:
                prune_run(run_folder(work, name, args.size, recovery))
    write_reports(results_path, args, command, commit)


def write_reports(results_path: Path, args, command: str, commit: str) -> None:
    """Markdown of every row in ``results_path`` (all sizes: several invocations append to one
    file) to ``--out``, and one PNG per size to ``--plot`` (``{size}`` replaced by 85, 70);
    ``commit``: the commit of the code that writes them (taken when the process started)."""
    rows = read_result_rows(results_path)
    sizes = sorted({r["size"] for r in rows}, reverse=True)
    if args.out:
        write_markdown(report(rows, sizes, command, args.work, commit), args.out)
    for size in sizes if args.plot else ():
        of_size = [r for r in rows if r["size"] == size]
        # Rows of the current storage first, so that their recoveries take the solid and dashed styles.
        drawn = sorted((r for r in of_size if not r.get("same_as")), key=lambda r: bool(storage_mark(r)))
        series = {f"{series_label(r)} {r['recovery']}": ([0.0] + [p["minutes"] for p in r["points"]],
                                                        [r["before"]["test"]] + [p["test"] for p in r["points"]]) for r in drawn}
        # One colour per student, one line style per recovery and storage: a student's rows read side by side.
        groups = {f"{series_label(r)} {r['recovery']}": (r["student"], r["recovery"] + storage_mark(r).replace(",", ""))
                  for r in drawn}
        line_plot(series, str(args.plot).replace("{size}", str(int(size * 100))), xlabel="CPU-minutes (one thread)",
                  ylabel="WikiText-2 test perplexity", title=f"Recovery of SmolLM2-135M at {int(size * 100)} % of the parameters",
                  logy=True, reference=of_size[0]["dense"]["test"], reference_label="dense", groups=groups)


def report(rows: list[dict], sizes: list[float], command: str, work: Path, commit: str | None = None) -> str:
    """The Markdown tables of ``rows``, one section per size; ``commit``: the code's commit the
    page names (default: the checkout's HEAD now)."""
    headers = ["student", "recovery", "params", "of dense", "test before", "test after", "x dense", "OOD before", "OOD after",
               "OOD x dense", "training tokens", "points (test ppl)", "CPU-min", "machine"]
    runs = sorted({r.get("command", command) for r in rows}) or [FULL_COMMAND]
    lines = ["# Recovery of SmolLM2-135M: quality against CPU time", "", "Page written on: " + machine_line(machine_info()).removeprefix("Machine: ")
             + " Each row names the machine it was measured on (CPU-minutes compare within one kind of CPU).",
             f"Commands: the {len(runs)} invocation(s) that measured the rows are listed under \"Reproduce\"; this page "
             f"written by `{command}`.", "",
             "Protocols: \"test\" = WikiText-2 raw test, first 16,384 tokens, sliding window 1024 / stride 512; \"OOD\" = GLUE "
             "SST-2 dev sentences joined with blank lines, same protocol (text in no calibration or training set). Points: the "
             "student after each stage or end-to-end segment, chosen on the held-out training blocks, at the CPU-minutes it had "
             "spent (one torch thread, float32 training, teacher cache included, evaluations excluded). Checkpoints: each block keeps its step "
             "with the lowest error on the held-out training blocks, end to end the step with the lowest perplexity on them; "
             "the test split chooses nothing. Training tokens: the end-to-end parts pass over them once at most (fewer when "
             "the time runs out). Factors: every row is measured with the factors stored as kronlm stores them: each "
             "Kronecker term's scale split evenly between its two factors, except in Kronecker + low-rank layers (`budget-klr`) "
             "and truncated SVDs, which keep their fit's split. Rows marked \"unbalanced\" (the init's split, measured "
             "before kronlm balanced terms) or \"balanced\" (`budget-klr` stored balanced, measured while kronlm did) are "
             "the other storage of the same weights; only the steps distillation takes differ. Rows marked \"low-rank part "
             "frozen end to end\" (`budget-klr` measured before kronlm trained a Kronecker + low-rank layer's U and V "
             "end to end: only its small Kronecker part learned there) do not count. Recoveries: `staged` = local "
             "reconstruction, block-wise, then end-to-end distillation of the compressed modules; `staged_all` = the same with "
             "every weight trainable end to end; `end_to_end` = end-to-end distillation alone (the truncated student: every "
             "weight, DistilGPT2 recipe); `blockwise` = block-wise distillation alone.", "",
             "Students, each at the size of the section: `kron-vlr`, `kron-prune`, `kron-aa` = Krony-PT-style Kronecker MLPs "
             "(gate/up B (2, 1), down B (1, 2), one term) of evenly spaced blocks, with modified Van Loan, pruning and "
             "activation-aware inits; `budget-svd`, `budget-klr`, `budget-kron` = the budget allocation to the same "
             "parameter count with truncated SVDs, Kronecker + low-rank factors, or Kronecker factors alone; `budget-kron-cap` "
             "= Kronecker factors alone under the allocation's default multiply-add cap (no factored layer above its dense "
             "multiply-adds per token); `budget-all` = the allocation over every family (all budget students on the dense "
             "model's statistics; all but `budget-kron-cap` with no multiply-add cap, `--max-macs none`, as when their first "
             "rows were measured); `truncate` = whole blocks dropped, evenly spaced "
             "ones kept. The two Kronecker-alone students are measured end to end alone (the better recovery of every "
             "activation-aware budget student).", ""]
    for size in sizes:
        of_size = [r for r in rows if r["size"] == size]
        dense = of_size[0]["dense"]
        table = []
        for r in sorted(of_size, key=lambda r: r["after"]["test"]):
            points = " / ".join(f"{p['label']} {p['test']:,.2f} ({p['minutes']:.0f} min)" for p in r["points"])
            table.append([series_label(r) + (f" (= {r['same_as']}: the held-out check kept its plan)" if r.get("same_as") else ""),
                          r["recovery"], f"{r['params']:,}", f"{r['params'] / r['dense_params']:.1%}",
                          f"{r['before']['test']:,.2f}", f"{r['after']['test']:,.2f}", f"{r['after']['test'] / dense['test']:.2f}",
                          f"{r['before']['ood']:,.2f}", f"{r['after']['ood']:,.2f}", f"{r['after']['ood'] / dense['ood']:.2f}",
                          tokens_cell(r), points, f"{r['cpu_minutes']:.1f}", r.get("machine", "")])
        lines += [f"## {int(size * 100)} % of the parameters", "", f"Dense: test {dense['test']:.2f}, OOD {dense['ood']:.2f}.", "",
                  markdown_table(headers, table), "", f"![test perplexity against CPU-minutes](recovery-{int(size * 100)}.png)", ""]
    lines += missing_section(rows, work)
    info = environment_info()
    info["commit"] = commit or info["commit"]
    commits = sorted({r["commit"] for r in rows if r.get("commit")})
    notes = [f"Rows record the commit they were measured at (`commit` in the results file): {', '.join(f'`{c[:12]}`' for c in commits)}; "
             "rows without it predate the field."] if commits else []
    lines.append(reproduce_section(runs, info, notes))
    return "\n".join(lines) + "\n"


def storage_mark(row: dict) -> str:
    """``", unbalanced"`` or ``", balanced"`` for a row measured with another storage than the
    student's current one (:func:`current_factors`), ``", low-rank part frozen end to end"`` for
    a row of :func:`low_rank_frozen`; "" for a counted row."""
    factors = factors_of(row)
    mark = "" if factors in ("-", current_factors(row["student"])) else f", {factors}"
    return mark + (", low-rank part frozen end to end" if low_rank_frozen(row) else "")


def series_label(row: dict) -> str:
    """A row's student, marked when its factors were stored otherwise than kronlm stores them now."""
    return row["student"] + storage_mark(row)


def tokens_cell(row: dict) -> str:
    """The training tokens of a row: the block stages' tokens (each block sees them) and the end-to-end text."""
    if row["recovery"] in STAGED:
        return f"{row['block_tokens']:,} per block, then {row['train_tokens']:,}"
    return f"{row['train_tokens']:,}"


def missing_section(rows: list[dict], work: Path) -> list[str]:
    """Markdown lines naming every (size, student, recovery) without a row yet, with the points an
    interrupted run has measured so far (``WORK/runs/TAG/points.json``)."""
    done = rows_by_key(rows)
    lines = []
    for size in sorted(SIZES, reverse=True):
        for student in STUDENTS:
            wanted = (("end_to_end",) if student in END_TO_END_ONLY else ("staged", "end_to_end")) + (
                ("blockwise",) if (size, student) == BLOCKWISE_ALONE else ())
            for recovery in RECOVERIES:
                if measured(done, student, size, recovery) or (student == "truncate" and recovery != "end_to_end"):
                    continue
                path = run_folder(work, student, size, recovery) / "points.json"
                points = json.loads(path.read_text()) if path.is_file() else []
                if recovery not in wanted and not points:
                    continue  # outside the grid: named only once a run of it has started
                so_far = "; so far: " + " / ".join(f"{p['label']} {p['test']:,.2f} ({p['minutes']:.0f} min)" for p in points) if points else ""
                lines.append(f"- {int(size * 100)} %, {student}, {recovery}: {'running or interrupted' if points else 'not run yet'}{so_far}")
    if not lines:
        return []
    return ["## Not measured yet", "", "Rows with the factors stored as kronlm stores them now (a row marked with the other "
            "storage does not count). Each is one more "
            "invocation of the command below with `--size` and `--students`; an interrupted run resumes from its checkpoints.",
            "", *lines, ""]


if __name__ == "__main__":
    main()
