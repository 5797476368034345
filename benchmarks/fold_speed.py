"""Forward and decode time of saved models with the Kronecker parts of their ``KroneckerLowRankLinear``
modules folded into low-rank form (the default without gradients) against the factored product.

    python benchmarks/fold_speed.py --threads 1 --model runs/recovery/students/budget-klr-85 --out docs/benchmarks/fold_speed.md

Both forms compute the same function (``kron_sum_lowrank`` is exact up to rounding); the table
says what the fold buys: a forward pass of T tokens (no cache, last-position logits, as a
prefill) and greedy decoding with the KV cache, timed round-robin so that load from other
processes falls on both forms alike.
"""

from __future__ import annotations

import click
import torch

from kronlm.bench.markdown import markdown_table, reproduce_header, reproduce_section, write_markdown
from kronlm.bench.options import command_line, speed_setup
from kronlm.bench.timing import calls_for, time_interleaved
from kronlm.layers import KroneckerLowRankLinear
from kronlm.modeling import load_model


def set_folding(layers: list[KroneckerLowRankLinear], folds: list[bool], on: bool) -> None:
    """Let each layer fold (when its shapes allow it, ``folds``) or force the factored product."""
    for layer, allowed in zip(layers, folds):
        layer.folds = allowed and on


def model_rows(path: str, tokens: list[int], new_tokens: int, repeats: int) -> list[list[object]]:
    """Table rows for one saved model: per token count and for decoding, factored vs folded ms."""
    model = load_model(path)
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, KroneckerLowRankLinear)]
    folds = [m.folds for m in layers]
    name = path.rstrip("/").split("/")[-1]
    if not any(folds):
        return [[name, f"0 of {len(layers)}", "–", "–", "–", "–"]]
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    rows = []
    cases = [(f"forward {t} tok", torch.randint(0, vocab, (1, t), generator=generator), None) for t in tokens]
    cases.append((f"decode {new_tokens} tok", torch.randint(0, vocab, (1, 8), generator=generator), new_tokens))
    for label, ids, new in cases:
        def run(on: bool, ids=ids, new=new):
            set_folding(layers, folds, on)
            with torch.no_grad():
                if new is None:
                    return model(ids, logits_to_keep=1)
                return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)

        inner = calls_for(lambda: run(True), target_s=0.2)
        timing = time_interleaved({"factored": lambda: run(False), "folded": lambda: run(True)}, warmup=1, repeats=repeats, inner=inner)
        factored, folded = timing["factored"].median_s, timing["folded"].median_s
        rows.append([name, f"{sum(folds)} of {len(layers)}", label, f"{factored * 1e3:,.1f}", f"{folded * 1e3:,.1f}", f"{factored / folded:.2f}"])
    set_folding(layers, folds, True)
    return rows


@click.command()
@click.option("--model", "model_paths", multiple=True, required=True, help="Saved kronlm model folder (repeatable).")
@click.option("--tokens", default="1,16,64,512", show_default=True, help="Forward-pass token counts, comma-separated.")
@click.option("--new-tokens", default=64, show_default=True, help="Greedy decode length after an 8-token prompt.")
@click.option("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice).")
@click.option("--repeats", default=5, show_default=True, help="Timed rounds per case (median reported).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the Markdown here.")
def main(model_paths, tokens, new_tokens, threads, repeats, out):
    """Median ms per call, factored vs folded Kronecker parts, for each saved model."""
    speed_setup(threads, "cpu", "float32")
    click.echo(reproduce_header(command_line()), err=True)
    counts = [int(t) for t in tokens.split(",") if t.strip()]
    rows = [row for path in model_paths for row in model_rows(path, counts, new_tokens, repeats)]
    table = markdown_table(["model", "folded modules", "case", "factored ms", "folded ms", "speed-up"], rows,
                           ["l", "r", "l", "r", "r", "r"])
    text = "\n\n".join([
        "## Folded Kronecker parts, saved models, float32 on cpu",
        "Median wall ms per call. Forward: one sequence of T tokens, no cache, last-position logits (as "
        "a prefill). Decode: greedy `generate` with the KV cache, after an 8-token prompt (prefill included). "
        "Factored: every `KroneckerLowRankLinear` applies its Kronecker factors (`kronecker_matmul`); folded: "
        "those whose factors are thin apply the exact low-rank form of their Kronecker part.",
        table,
        reproduce_section([command_line()]),
    ]) + "\n"
    click.echo(text)
    if out:
        click.echo(f"wrote {write_markdown(text, out)}", err=True)


if __name__ == "__main__":
    main()
