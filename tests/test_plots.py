"""PNG figures of the benchmark tables: drawn from rows or from a committed Markdown table."""

from __future__ import annotations

import pytest

matplotlib = pytest.importorskip("matplotlib")
from kronlm.bench.plots import (
    bar_plot,
    layer_speed_plot,
    line_plot,
    markdown_tables,
    model_speed_plot,
    number,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _size(path):
    import matplotlib.image

    image = matplotlib.image.imread(path)
    return image.shape[1], image.shape[0]


def test_line_and_bar_plots_write_pngs(tmp_path):
    path = line_plot({"dense": ([1, 10, 100], [3.0, 2.0, 1.5]), "kron": ([1, 10, 100], [2.5, 1.8, 1.2])}, tmp_path / "a.png",
                     title="t", xlabel="tokens", ylabel="ms", logx=True, reference=1.0, reference_label="dense")
    assert path.read_bytes()[:8] == PNG_MAGIC and _size(path)[0] > 400
    path = bar_plot(["dense", "2x"], {"prefill": [1.0, 1.2], "decode": [1.0, 1.1]}, tmp_path / "sub" / "b.png", title="t", ylabel="×")
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="series 'x' has 2 x values but 1 y values"):
        line_plot({"x": ([1, 2], [1])}, tmp_path / "c.png", title="", xlabel="", ylabel="")
    with pytest.raises(ValueError, match="has 1 values for 2 categories"):
        bar_plot(["a", "b"], {"s": [1.0]}, tmp_path / "d.png", title="", ylabel="")
    assert not (tmp_path / "c.png").exists()


def test_speed_plots_from_benchmark_rows(tmp_path):
    rows = [{"presets": "p", "out": 8, "in": 4, "factors": "(4, 2)⊗(2, 2)", "rank": 1, "tokens": t, "mac_ratio": 2.0, "fwd_ratio": r}
            for t, r in ((1, 0.8), (16, 1.5), (512, 1.9))]
    assert layer_speed_plot(rows, tmp_path / "l.png").read_bytes()[:8] == PNG_MAGIC
    models = [{"model": "dense", "mac_ratio": 1.0, "prefill_speedup": {(1, 512): 1.0}, "decode_speedup": 1.0},
              {"model": "2x", "mac_ratio": 1.5, "prefill_speedup": {(1, 512): 1.2}, "decode_speedup": 1.1}]
    assert model_speed_plot(models, tmp_path / "m.png").read_bytes()[:8] == PNG_MAGIC


def test_markdown_tables_are_read_back():
    text = "# Title\n\nintro\n\n| model | ms (tok/s) | speed-up |\n|---|---:|---:|\n| dense | 1,953 (66) | 1.00× |\n| 2x | 1,657 (77) | 1.18× |\n\n## Next\n| a |\n| --- |\n| 1 |\n"
    tables = markdown_tables(text)
    assert [t[0] for t in tables] == ["Title", "Next"]
    title, headers, rows = tables[0]
    assert headers == ["model", "ms (tok/s)", "speed-up"] and rows[1] == ["2x", "1,657 (77)", "1.18×"]
    assert number(rows[0][1]) == 1953.0 and number(rows[1][2]) == 1.18
    with pytest.raises(ValueError, match="holds no number"):
        number("met")


def test_line_plot_groups_give_one_colour_per_first_key_and_one_style_per_second(tmp_path, monkeypatch):
    import kronlm.bench.plots as plots

    drawn = {}

    def keep(fig, path):
        drawn.update({line.get_label(): (line.get_color(), line.get_linestyle()) for line in fig.axes[0].get_lines()})
        return tmp_path / "kept.png"

    monkeypatch.setattr(plots, "_save", keep)
    series = {f"{s} {r}": ([0, 1], [2.0, 1.0]) for s in ("svd", "kron") for r in ("staged", "e2e")}
    groups = {f"{s} {r}": (s, r) for s in ("svd", "kron") for r in ("staged", "e2e")}
    line_plot(series, tmp_path / "g.png", title="", xlabel="", ylabel="", groups=groups)
    assert drawn["svd staged"][0] == drawn["svd e2e"][0] != drawn["kron staged"][0] == drawn["kron e2e"][0]
    assert drawn["svd staged"][1] == drawn["kron staged"][1] != drawn["svd e2e"][1] == drawn["kron e2e"][1]
    with pytest.raises(ValueError, match="series 'svd e2e' has no entry in groups"):
        line_plot(series, tmp_path / "h.png", title="", xlabel="", ylabel="", groups={"svd staged": ("svd", "staged")})
