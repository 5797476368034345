"""Training tokens per CPU-second: end-to-end ILKD vs end-to-end logit KD vs block-wise distillation.

The same compressed SmolLM2-135M student, teacher and WikiText-2 validation tokens for each mode;
one torch thread; rates are per CPU-second of the process (``time.process_time``), so another
job on the machine does not lower them (wall-clock seconds are printed beside). A token counts
once whatever the mode: one training token passed through the whole stack (for block-wise:
through every trained block once). ``--mixed-precision bf16`` runs every mode under bfloat16
autocast (on a CPU with native bfloat16 matrix units, AVX512-BF16 or AMX, its matrix products
are several times faster than float32).

- ``end_to_end ILKD``: KnGPT2's recipe (attention KL, hidden-state relative MSE, logit KD, CE;
  ``configs/distill-smoke.yaml``'s weights) on all parameters of the compressed modules;
- ``end_to_end KD``: logit KD only (``configs/recover-e2e.yaml``);
- ``blockwise``: ``configs/recover-blockwise.yaml`` (one pass over the tokens per block), with and
  without the one-time teacher hidden-state cache in the denominator.

    python benchmarks/recovery_throughput.py --student runs/recovery/students/kron-vlr-85 --out docs/benchmarks/recovery_throughput.md
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from kronlm.bench.markdown import (
    machine_info,
    machine_line,
    markdown_table,
    reproduce_header,
    reproduce_section,
    write_markdown,
)
from kronlm.data.blocks import build_blocks
from kronlm.distill.blockwise import distill_blockwise
from kronlm.distill.config import TrainingConfig
from kronlm.distill.trainer import train
from kronlm.modeling import load, load_model_and_tokenizer

REPO = Path(__file__).resolve().parents[1]


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", type=Path, required=True, help="A compressed student folder (kronlm compress output).")
    parser.add_argument("--teacher", default="smollm2")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--tokens", type=int, default=16384, help="Training tokens per mode.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no", help="Autocast of every mode.")
    parser.add_argument("--modes", default="ilkd,kd,blockwise", help="Comma-separated subset of ilkd, kd, blockwise.")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    modes = set(args.modes.split(","))
    if not modes <= {"ilkd", "kd", "blockwise"}:
        parser.error(f"--modes: unknown {', '.join(sorted(modes - {'ilkd', 'kd', 'blockwise'}))}; choose from ilkd, kd, blockwise")
    print(reproduce_header(f"python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}"), flush=True)
    torch.set_num_threads(args.threads)
    teacher, tokenizer = load_model_and_tokenizer(args.teacher)
    blocks = build_blocks("wikitext2", tokenizer, block_size=512, val_fraction=0.0, max_tokens=args.tokens, data_dir=args.data_dir)
    data = {"train": blocks.train, "val": None}
    rows = []
    work = Path(tempfile.mkdtemp(prefix="kronlm-throughput-"))
    mp = {"mixed_precision": args.mixed_precision}
    e2e = TrainingConfig.from_file(REPO / "configs" / "recover-e2e.yaml", {"max_minutes": None, "eval_every": 10_000, "save_every": 10_000, **mp})
    ilkd = e2e.replace(recipe="ilkd-kngpt2", loss_weights={"hidden_loss": "relative_mse"}, micro_batch_size=2)
    for key, label, config in (("ilkd", "end_to_end ILKD (KnGPT2 recipe)", ilkd), ("kd", "end_to_end KD (logits)", e2e)):
        if key not in modes:
            continue
        student = load(args.student)
        result, wall, cpu = timed(lambda: train(student, teacher, data, config, work / key, exporter=None))
        rows.append([label, f"{result.tokens_seen:,}", f"{wall:.0f}", f"{cpu:.0f}", f"{result.tokens_seen / cpu:,.1f}", ""])
    if "blockwise" in modes:
        student = load(args.student)
        blockwise = TrainingConfig.from_file(REPO / "configs" / "recover-blockwise.yaml", {"blockwise": {"end_to_end_steps": 0}, **mp})
        result, wall, cpu = timed(lambda: distill_blockwise(student, teacher, data, blockwise, work / "blockwise", progress=False))
        per_block = next(b.tokens for b in result.blocks if b.trained)
        rows.append(["blockwise, with the teacher cache", f"{per_block:,}", f"{wall:.0f}", f"{cpu:.0f}", f"{per_block / cpu:,.1f}", ""])
    base = float(rows[0][4].replace(",", ""))
    for row in rows:
        row[5] = f"{float(row[4].replace(',', '')) / base:.1f}x"
    headers = ["mode", "training tokens", "seconds", "CPU seconds", "tokens / CPU-second", f"vs {rows[0][0]}"]
    text = "\n".join([
        "# Recovery throughput on one CPU core", "", machine_line(machine_info()),
        f"Command: `python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}`",
        f"Student: `{args.student}` ({sum(p.numel() for p in student.parameters()):,} parameters); teacher {args.teacher}; "
        f"{args.tokens:,} tokens of WikiText-2 validation in blocks of 512; mixed precision {args.mixed_precision}.", "",
        markdown_table(headers, rows), "",
        reproduce_section([f"python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}"]), "",
    ])
    print(text)
    if args.out:
        write_markdown(text, args.out)


if __name__ == "__main__":
    main()
