"""Training speed of a saved student's factored layers: forward + backward of every Kronecker
layer on one batch, with kronlm's plan rules, with the fixed plan alone, and dense.

For each ``--model`` folder (a model saved by kronlm), every ``KroneckerLinear`` and the Kronecker
part of every ``KroneckerLowRankLinear`` multiplies a random batch of ``--tokens`` rows and
back-propagates a sum, three ways, timed interleaved (``kronlm.bench.timing.time_interleaved``,
median of ``--repeats``):

- ``rules``: ``kronecker_matmul(x, A, B, layer.order)``, what the layer runs: the factored plan,
  unless ``materializes`` forms W (many terms, enough tokens) or training with many terms takes
  the "bmm" middle (docs/method.md, "The forward pass never forms W");
- ``fixed plan``: the same order with ``default_middle`` named explicitly, which turns both rules
  off (what every layer ran before them);
- ``dense``: x @ Wᵀ with W = the layer's dense weight, trainable (the same layer uncompressed).

The gradients of A, B (or W) and the input are computed; the low-rank part of a Kronecker +
low-rank layer is the same two GEMMs in every plan and is left out. Prints (or writes, ``--out``)
a Markdown table per model and a summary, with the command, machine, date and versions.

    python benchmarks/layer_train_speed.py --model runs/recovery/students/budget-kron-85-balanced \\
        --model runs/recovery/students/budget-klr-70-balanced --out docs/benchmarks/layer_train_speed.md
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections import defaultdict
from pathlib import Path

import torch

from kronlm.bench.markdown import environment_info, markdown_table, reproduce_header, reproduce_section, write_markdown
from kronlm.bench.timing import time_interleaved
from kronlm.decompose.vanloan import kron_sum
from kronlm.layers.linear import KroneckerLinear, default_middle, kronecker_matmul, materializes
from kronlm.layers.lowrank import KroneckerLowRankLinear
from kronlm.modeling import load


def step(fn, *tensors):
    """One forward + backward of ``fn`` with fresh gradients on ``tensors``."""
    def run():
        for t in tensors:
            t.grad = None
        fn().sum().backward()
    return run


def layer_timings(model: torch.nn.Module, tokens: int, repeats: int) -> list[dict]:
    """One row per factored layer: its shapes and the median seconds of each way (module docstring)."""
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, (KroneckerLinear, KroneckerLowRankLinear)):
            continue
        if isinstance(module, KroneckerLinear):
            A, B = (t.detach().clone().requires_grad_() for t in module.forward_factors())
        else:
            A, B = module.A.detach().clone().requires_grad_(), module.B.detach().clone().requires_grad_()
        R, m1, n1 = A.shape
        _, m2, n2 = B.shape
        W = kron_sum(A.detach(), B.detach()).requires_grad_()
        x = torch.randn(tokens, n1 * n2, requires_grad=True)
        middle = default_middle(module.order, (m2, n2))
        times = time_interleaved({
            "rules": step(lambda: kronecker_matmul(x, A, B, module.order), A, B, x),
            "fixed plan": step(lambda: kronecker_matmul(x, A, B, module.order, middle), A, B, x),
            "dense": step(lambda: x @ W.t(), W, x),
        }, warmup=1, repeats=repeats)
        rows.append({"name": name, "shape": (m1 * m2, n1 * n2), "a": (m1, n1), "b": (m2, n2), "R": R,
                     "plan": "W formed" if materializes(tokens, R, (m1, n1), (m2, n2)) else f"{module.order}",
                     **{k: v.median_s for k, v in times.items()}})
    return rows


def model_section(folder: str, rows: list[dict], tokens: int) -> list[str]:
    """The Markdown of one model: totals, then one row per distinct (shape, A, B, R) summed over its layers."""
    total = {k: sum(r[k] for r in rows) for k in ("rules", "fixed plan", "dense")}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["shape"], r["a"], r["b"], r["R"], r["plan"])].append(r)
    table = []
    for (shape, a, b, R, plan), rs in sorted(groups.items(), key=lambda kv: -sum(r["fixed plan"] for r in kv[1])):
        fixed, rules, dense = (sum(r[k] for r in rs) for k in ("fixed plan", "rules", "dense"))
        table.append([f"{shape}", f"A {a} ⊗ B {b}", R, len(rs), plan, f"{fixed:.3f}", f"{rules:.3f}", f"{dense:.3f}", f"{fixed / rules:.2f}x"])
    return [f"## `{folder}`", "",
            f"{len(rows)} factored layers; forward + backward of {tokens:,} tokens through all of them: fixed plan "
            f"{total['fixed plan']:.2f} s, with the rules {total['rules']:.2f} s ({total['fixed plan'] / total['rules']:.2f}x faster), "
            f"the same layers dense {total['dense']:.2f} s.", "",
            markdown_table(["(out, in)", "factors", "R", "layers", "plan with the rules", "fixed plan (s)", "rules (s)", "dense (s)", "speed-up"],
                           table, ["l", "l", "r", "r", "l", "r", "r", "r", "r"]), ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="A model folder saved by kronlm (repeatable).")
    parser.add_argument("--tokens", type=int, default=2048, help="Rows of the batch (a training step of 4 x 512 tokens: 2,048).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed rounds per layer (median).")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads.")
    parser.add_argument("--out", type=Path, default=None, help="Markdown file to write (default: print).")
    args = parser.parse_args(argv)
    for folder in args.model:
        if not (Path(folder) / "config.json").is_file():
            raise SystemExit(f"--model {folder}: not a model folder (no config.json)")
    if args.tokens < 1 or args.repeats < 1:
        raise SystemExit(f"--tokens and --repeats must be at least 1, got {args.tokens} and {args.repeats}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    command = "python " + shlex.join(["benchmarks/layer_train_speed.py", *(argv if argv is not None else sys.argv[1:])])
    info = environment_info()
    print(reproduce_header(command, info), flush=True)
    lines = ["# Training speed of factored layers: kronlm's plan rules against the fixed plan and dense", "",
             "Seconds of one forward and backward pass of a batch through a saved student's factored layers (random "
             "inputs, gradients of the factors, or of the dense weight, and of the input), median of "
             f"{args.repeats} interleaved rounds. \"Fixed plan\": the contraction order and middle-axis layout each layer "
             "is built with; \"rules\": what the layer runs, which forms W when many terms make the factored product "
             "dearer than the dense one and trains many-term layers with the \"bmm\" layout (docs/method.md, \"The "
             "forward pass never forms W\"). The Kronecker + low-rank layers are timed on their Kronecker part.", ""]
    for folder in args.model:
        rows = layer_timings(load(folder), args.tokens, args.repeats)
        lines += model_section(folder, rows, args.tokens)
        print(f"{folder}: done", flush=True)
    lines.append(reproduce_section([command], info))
    text = "\n".join(lines) + "\n"
    if args.out:
        write_markdown(text, args.out)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
