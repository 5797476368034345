"""Save two SmolLM2 students of equal size for a recovery comparison: Van Loan vs the best init.

Both keep the parameter count of the krony-pt-llama-mlp-2x shapes on the MLPs of N evenly spaced
blocks (N = 30: 94,702,068 parameters, 70.4 % of dense). ``van_loan`` uses those uniform shapes
with plain Van Loan; ``budget`` is ``kronlm compress --budget-params N`` to the same count (the
CLI's code path, ``compress_to_budget`` with a default ``BudgetConfig``) on the calibration statistics cached by
``benchmarks/zero_shot_init.py`` (run that first, same --work and calibration flags).

    python benchmarks/init_students.py --fraction 0.7 --out runs/recovery_init
    kronlm distill --teacher smollm2 --student runs/recovery_init/van_loan ...   (see docs/benchmarks/zero_shot_init.md)
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import kronlm
from kronlm.bench.markdown import reproduce_header
from kronlm.compression import BudgetConfig, load_calibration
from kronlm.modeling import compress, compress_to_budget, load_model_and_tokenizer


def _zero_shot_module():
    spec = importlib.util.spec_from_file_location("zero_shot_init", Path(__file__).with_name("zero_shot_init.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.7, choices=[0.9, 0.8, 0.7])
    parser.add_argument("--work", type=Path, default=Path("runs/zero_shot_init"), help="where zero_shot_init.py cached its calibration")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(reproduce_header("python benchmarks/init_students.py " + " ".join(sys.argv[1:])), flush=True)
    zs = _zero_shot_module()
    blocks = zs.spaced_blocks(zs.BLOCKS[args.fraction])
    caches = sorted(args.work.glob("calibration-*.safetensors"))
    if not caches:
        sys.exit(f"{args.work}/calibration-*.safetensors: not found; run benchmarks/zero_shot_init.py --work {args.work} first")
    cache = caches[0]

    model, tokenizer = load_model_and_tokenizer("smollm2")
    stats = load_calibration(cache)
    report = compress(model, zs.uniform_config(blocks, "van_loan")).compression_report
    kronlm.save(model, args.out / "van_loan", tokenizer=tokenizer, report=report)
    target = report.params_after
    print(f"van_loan: {target:,} parameters -> {args.out / 'van_loan'}")

    model, tokenizer = load_model_and_tokenizer("smollm2")
    # The statistics are given (no ids needed); the recorded students predate the subset check, sequential calibration and the multiply-add cap.
    compress_to_budget(model, BudgetConfig(target_params=target, subset_check=False, sequential=None, max_macs=None), None, statistics=stats)
    report = model.compression_report
    kronlm.save(model, args.out / "budget", tokenizer=tokenizer, report=report)
    print(f"budget: {report.params_after:,} parameters -> {args.out / 'budget'}")


if __name__ == "__main__":
    main()
