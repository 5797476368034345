"""PNG figures of the benchmark tables (matplotlib, an optional dependency: ``pip install 'kronlm[plots]'``).

Every benchmark that writes a Markdown table can also write a picture of what the table shows:
:func:`line_plot` and :func:`bar_plot` are the two shapes used (perplexity against parameters or
training tokens, speed ratio against tokens), :func:`layer_speed_plot`, :func:`model_speed_plot`
and :func:`onnx_speed_plot` draw the speed benchmarks' rows. matplotlib runs with its file-only
"Agg" backend, so no display is needed. Files are written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from kronlm.utils.atomic import atomic_path

DPI = 120
# Six distinguishable line styles (matplotlib dash tuples beyond its four named ones).
LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (8, 2)))


def require_matplotlib():
    """``matplotlib.pyplot`` on the Agg backend.

    Raises:
        ImportError: matplotlib is missing (the message names ``pip install 'kronlm[plots]'``).
    """
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'kronlm[plots]' (or pip install matplotlib)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def png_beside(markdown_path: str | os.PathLike) -> Path:
    """The PNG path that goes with a Markdown table file: same folder and name, ``.png``."""
    return Path(markdown_path).with_suffix(".png")


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    return path


def line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    logy: bool = False,
    reference: float | None = None,
    reference_label: str = "",
    annotate: Mapping[str, Sequence[str]] | None = None,
    groups: Mapping[str, tuple[str, str]] | None = None,
) -> Path:
    """One line (with markers) per series; returns the PNG path.

    Args:
        series: label -> (x values, y values) of equal length.
        path: the PNG to write.
        title, xlabel, ylabel: the texts (give units: "tokens", "ms", "× dense").
        logx, logy: logarithmic axes.
        reference: draw a horizontal dashed line at this y (e.g. 1.0 = as fast as dense).
        reference_label: its legend text.
        annotate: label -> one text per point, written beside the markers.
        groups: label -> (colour group, line-style group): series of one colour group share a
            colour and marker, series of one line-style group a line style (e.g. student and
            recovery of a recovery curve). Without it every series gets its own colour.

    Raises:
        ImportError: matplotlib missing. ValueError: no series, x and y of different lengths, or a
            series without a ``groups`` entry (named).
    """
    if not series:
        raise ValueError("line_plot: no series to draw")
    for label, (xs, ys) in series.items():
        if len(xs) != len(ys):
            raise ValueError(f"line_plot: series {label!r} has {len(xs)} x values but {len(ys)} y values")
        if groups is not None and label not in groups:
            raise ValueError(f"line_plot: series {label!r} has no entry in groups")
    plt = require_matplotlib()
    many = len(series) > 6
    fig, ax = plt.subplots(figsize=(12, 6.5) if many else (7.5, 4.5))
    if groups is None:
        # Ten colours, then the same ten dashed: a series' place decides both.
        groups = {label: (str(i), str(i // 10)) for i, label in enumerate(series)}
    hues = list(dict.fromkeys(g[0] for g in groups.values()))
    styles = list(dict.fromkeys(g[1] for g in groups.values()))
    colors = plt.get_cmap("tab20" if len(hues) > 10 else "tab10")
    for label, (xs, ys) in series.items():
        hue, style = hues.index(groups[label][0]), styles.index(groups[label][1])
        ax.plot(list(xs), list(ys), marker="osD^v<>"[hue % 7], linestyle=LINE_STYLES[style % len(LINE_STYLES)], color=colors(hue % colors.N),
                label=label)
        for x, y, text in zip(xs, ys, (annotate or {}).get(label, ())):
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1, label=reference_label or None)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    plain = plt.FuncFormatter(lambda value, _: f"{value:g}")
    if logx:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plain)
    if logy:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
    ax.grid(True, alpha=0.3)
    if many:  # beside the axes, so that it hides no line
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def bar_plot(
    categories: Sequence[str],
    series: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    *,
    title: str,
    ylabel: str,
    reference: float | None = None,
    reference_label: str = "",
) -> Path:
    """Grouped bars: one group per category, one bar per series; returns the PNG path.

    Raises:
        ImportError: matplotlib missing. ValueError: no series, or a series whose length differs
            from the categories' (named).
    """
    if not series:
        raise ValueError("bar_plot: no series to draw")
    for label, values in series.items():
        if len(values) != len(categories):
            raise ValueError(f"bar_plot: series {label!r} has {len(values)} values for {len(categories)} categories")
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(categories) * max(1, len(series)) / 2 + 3), 4.5))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(categories))]
        bars = ax.bar(xs, list(values), width=width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1, label=reference_label or None)
    ax.set_xticks(range(len(categories)), list(categories), rotation=20, ha="right", fontsize=8)
    ax.set(title=title, ylabel=ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def layer_speed_plot(rows: Sequence[dict], path: str | os.PathLike, *, title: str = "KroneckerLinear vs nn.Linear") -> Path:
    """Forward speed ratio (dense time / Kronecker time) against tokens, one line per factor shape.

    ``rows``: :func:`kronlm.bench.layers.layer_speed_rows`' dicts. The multiply-add ratio of each
    shape is in its legend label: the ratio a perfectly efficient kernel would reach.
    """
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        label = f"{row['presets']}: ({row['out']}, {row['in']}) {row['factors']} R={row['rank']}, MAC ratio {row['mac_ratio']:.1f}"
        xs, ys = series.setdefault(label, ([], []))
        xs.append(row["tokens"])
        ys.append(row["fwd_ratio"])
    return line_plot(series, path, title=title, xlabel="tokens per call", ylabel="forward speed-up (dense time / Kronecker time)",
                     logx=True, logy=True, reference=1.0, reference_label="as fast as dense")


def model_speed_plot(rows: Sequence[dict], path: str | os.PathLike, *, title: str = "Compressed vs dense model speed") -> Path:
    """Bars of prefill and decode speed-up over the dense model, one group per model.

    ``rows``: :func:`kronlm.bench.models.model_speed_rows`' dicts (the first is the dense reference).
    """
    names = [row["model"] for row in rows]
    series: dict[str, list[float]] = {}
    for shape in rows[0]["prefill_speedup"]:
        series[f"prefill {shape[0]}×{shape[1]} tokens"] = [row["prefill_speedup"][shape] for row in rows]
    series["decode"] = [row["decode_speedup"] for row in rows]
    series["multiply-add ratio"] = [row["mac_ratio"] for row in rows]
    return bar_plot(names, series, path, title=title, ylabel="× dense (higher is faster)", reference=1.0, reference_label="dense")


def markdown_tables(text: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """Every GitHub Markdown table in ``text`` as (the last ``#`` heading above it, headers, rows of cells).

    Used to draw a figure from a table already committed, without re-running its benchmark.
    """
    tables, heading, lines = [], "", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|") and i + 1 < len(lines) and set(lines[i + 1].strip()) <= set("|-: "):
            headers = [c.strip() for c in line.strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            tables.append((heading, headers, rows))
            continue
        i += 1
    return tables


def number(cell: str) -> float:
    """The first number in a table cell ("1,953 (66)" -> 1953.0, "1.18×" -> 1.18).

    Raises:
        ValueError: a cell without a number (named).
    """
    token = cell.replace(",", "").replace("×", " ").replace("(", " ").split()
    for part in token:
        try:
            return float(part)
        except ValueError:
            continue
    raise ValueError(f"table cell {cell!r} holds no number")


def onnx_speed_plot(names: Sequence[str], series: Mapping[str, Sequence[float]], path: str | os.PathLike, *, title: str, ylabel: str,
                    reference: float | None = 1.0) -> Path:
    """Bars of the ONNX benchmark (speed-up per shape, or tokens/s per runtime with ``reference=None``), one group per model."""
    return bar_plot(names, series, path, title=title, ylabel=ylabel, reference=reference, reference_label="1×" if reference == 1.0 else "")


__all__ = [
    "DPI", "bar_plot", "layer_speed_plot", "line_plot", "markdown_tables", "model_speed_plot", "number", "onnx_speed_plot",
    "png_beside", "require_matplotlib",
]
