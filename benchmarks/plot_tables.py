"""Draw the PNG of each committed speed table without re-running its benchmark.

    python benchmarks/plot_tables.py [--docs docs/benchmarks]

Reads ``layer_speed.md``, ``model_speed.md`` and ``onnx_speed.md`` and writes beside each the
figure its benchmark script writes with ``--out`` (``layer_speed.png``, ``model_speed-llama.png``
and ``model_speed-gpt2.png``, ``onnx_speed.png`` and ``onnx_decode.png``). New runs of the
benchmarks draw their own figures; this script is for tables measured before they did.
"""

import argparse
import sys
from pathlib import Path

from kronlm.bench.plots import (
    layer_speed_plot,
    markdown_tables,
    model_speed_plot,
    number,
    onnx_speed_plot,
)


def column(headers: list[str], name: str) -> int:
    """Index of the first header that starts with ``name``."""
    for i, header in enumerate(headers):
        if header.startswith(name):
            return i
    raise ValueError(f"no column {name!r} in {headers}")


def plot_layer_speed(md: Path) -> list[Path]:
    """layer_speed.md -> layer_speed.png (forward speed-up against tokens)."""
    out = []
    for title, headers, cells in markdown_tables(md.read_text())[:1]:
        rows = [{"presets": r[0], "out": r[1].strip("()").split(",")[0], "in": r[1].strip("()").split(",")[1].strip(),
                 "factors": r[2].rsplit(",", 1)[0], "rank": r[2].rsplit(",", 1)[1].strip(), "tokens": int(number(r[column(headers, "tokens")])),
                 "mac_ratio": number(r[column(headers, "MAC ratio")]), "fwd_ratio": number(r[column(headers, "fwd ratio")])} for r in cells]
        out.append(layer_speed_plot(rows, md.with_suffix(".png"), title=title))
    return out


def plot_model_speed(md: Path) -> list[Path]:
    """model_speed.md -> model_speed-<family>.png (prefill / decode speed-up, MAC ratio)."""
    out = []
    for title, headers, cells in markdown_tables(md.read_text()):
        shapes = [h.split()[-1] for h in headers if h.startswith("speed-up ")]
        rows = [{"model": r[0], "mac_ratio": number(r[column(headers, "MAC ratio")]),
                 "prefill_speedup": {tuple(int(v) for v in s.split("×")): number(r[column(headers, f"speed-up {s}")]) for s in shapes},
                 "decode_speedup": number(r[column(headers, "decode speed-up")])} for r in cells]
        family = "gpt2" if "GPT-2" in title else "llama"
        out.append(model_speed_plot(rows, md.with_name(f"{md.stem}-{family}.png"), title=title))
    return out


def plot_onnx_speed(md: Path) -> list[Path]:
    """onnx_speed.md -> onnx_speed.png (prefill speed-up per shape) and onnx_decode.png (decode tokens/s)."""
    out = []
    for title, headers, cells in markdown_tables(md.read_text()):
        names = [r[0] for r in cells]
        if "ONNX decode ms/token" in headers:
            series = {"ONNX (KV-cache graph)": [number(r[column(headers, "ONNX tokens/s")]) for r in cells],
                      "PyTorch (DynamicCache)": [number(r[column(headers, "torch tokens/s")]) for r in cells]}
            path = onnx_speed_plot(names, series, md.with_name("onnx_decode.png"), title=title, ylabel="greedy decode tokens/s (higher is faster)", reference=None)
        else:
            series = {h.replace(" speed-up", " tokens"): [number(r[i]) for r in cells] for i, h in enumerate(headers) if h.endswith("speed-up")}
            path = onnx_speed_plot(names, series, md.with_suffix(".png"), title=title, ylabel="prefill speed-up over dense ONNX (×)")
        out.append(path)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", default="docs/benchmarks", help="Folder holding the tables (default docs/benchmarks).")
    args = parser.parse_args(argv)
    docs = Path(args.docs)
    for fn, name in ((plot_layer_speed, "layer_speed.md"), (plot_model_speed, "model_speed.md"), (plot_onnx_speed, "onnx_speed.md")):
        if (docs / name).is_file():
            for path in fn(docs / name):
                print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
