"""Time `kronlm.compress` of SmolLM2-135M-Instruct with every Llama preset (after loading).

    python benchmarks/compress_time.py [--model smollm2] [--threads N]

Prints a Markdown table: preset, modules, params before/after, mean relative error, seconds.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time

import torch

import kronlm
from kronlm.bench.markdown import reproduce_header, reproduce_section
from kronlm.compression import list_presets
from kronlm.modeling.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/compress_time.py " + shlex.join(sys.argv[1:])
    print(reproduce_header(command.strip()) + "\n")
    t0 = time.perf_counter()
    dense = load_model(args.model)
    load_s = time.perf_counter() - t0
    print(f"# compress time, {args.model}; load took {load_s:.1f} s\n")
    print("| preset | modules | params before | params after | mean rel. error | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for preset in list_presets():
        if preset.family != "llama":
            continue
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        report = kronlm.compress(model, preset.config, progress=False).compression_report
        seconds = time.perf_counter() - t0
        print(f"| {preset.name} | {len(report.modules)} | {report.params_before:,} | {report.params_after:,} | "
              f"{report.mean_relative_error:.4f} | {seconds:.1f} |", flush=True)
        del model
    print("\n" + reproduce_section([command.strip()]))


if __name__ == "__main__":
    main()
