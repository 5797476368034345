"""The result table of a task run: teacher and student metric, parameters, compression ratio,
retention, and which checkpoint each model is and why.

Written as ``report.json`` (machine-readable, :func:`read_report` inverts it) and ``report.md``
(a Markdown table) by :func:`write_report`. The metrics are those of the reported split (GLUE's
dev); the checkpoint of each trained model was chosen on held-out training examples, never on
that split (see :mod:`kronlm.tasks.pipeline`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kronlm.utils.atomic import atomic_path, write_json
from kronlm.utils.files import read_json

__all__ = ["ModelResult", "TaskReport", "describe_selection", "format_metric", "read_report", "write_report"]

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


@dataclass
class ModelResult:
    """One row of the table.

    Attributes:
        role: "teacher" or "student".
        model: what it is (a path, an alias, or a description).
        metrics: reported-split metrics (fractions) of the chosen model.
        params: all parameters of the model (tied tensors once).
        params_embedding_linear: parameters in embedding and linear layers, head excluded.
        train_examples, train_steps, train_seconds, train_tokens: what its training run did
            (examples trained on, optimizer steps, seconds of wall time of the last call, tokens
            seen in all steps, padding excluded).
        eval_seconds, eval_tokens: wall seconds of the reported-split evaluation of this model
            (forward passes, decoding and metrics) and the tokens it read (0 = not counted).
        notes: free text (compression config name, distillation stages).
        selection: which checkpoint the row is and why: ``{"checkpoint": "best" | "final" |
            "given", "step", "max_steps", "metric", "value", "val_examples", "reason"}``.
        metrics_final / metrics_best: reported-split metrics of the model after the last step
            and of the best one by the held-out metric (reported only, never used to choose).
    """

    role: str
    model: str
    metrics: dict[str, float]
    params: int
    params_embedding_linear: int
    train_examples: int = 0
    train_steps: int = 0
    train_seconds: float = 0.0
    train_tokens: int = 0
    eval_seconds: float = 0.0
    eval_tokens: int = 0
    notes: str = ""
    selection: dict[str, Any] = field(default_factory=dict)
    metrics_final: dict[str, float] | None = None
    metrics_best: dict[str, float] | None = None


@dataclass
class TaskReport:
    """The result of one task run (``kronlm glue``, ``kronlm squad``).

    Metrics are fractions (the Markdown table shows them in percent), except those whose name
    ends in ``_threshold`` (SQuAD v2.0's no-answer threshold, in logits), shown as they are.

    Attributes:
        task: task name; split: the evaluated split ("dev"); main_metric: the task's first metric.
        rows: teacher first, then the student when there is one.
        settings: command and config details; a ``"caveat"`` string is printed under the table.
    """

    task: str
    split: str
    main_metric: str
    rows: list[ModelResult] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def row(self, role: str) -> ModelResult | None:
        """The first row with ``role``, or None."""
        return next((r for r in self.rows if r.role == role), None)

    @property
    def retention(self) -> float | None:
        """student main metric / teacher main metric, or None without both rows."""
        t, s = self.row("teacher"), self.row("student")
        if t is None or s is None or not t.metrics.get(self.main_metric):
            return None
        return s.metrics[self.main_metric] / t.metrics[self.main_metric]

    def ratios(self) -> dict[str, float] | None:
        """Teacher / student parameter ratios: ``whole_model`` and ``embedding_linear``."""
        t, s = self.row("teacher"), self.row("student")
        if t is None or s is None:
            return None
        return {"whole_model": t.params / s.params, "embedding_linear": t.params_embedding_linear / s.params_embedding_linear}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with the derived retention and ratios."""
        out = dataclasses.asdict(self)
        out["retention"] = self.retention
        out["compression_ratio"] = self.ratios()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskReport:
        """Inverse of :meth:`to_dict` (derived keys are recomputed, not read).

        Raises:
            ValueError: a required key is missing or a row has an unknown one.
        """
        try:
            rows = [ModelResult(**r) for r in data["rows"]]
            return cls(task=data["task"], split=data["split"], main_metric=data["main_metric"], rows=rows,
                       settings=dict(data.get("settings") or {}))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a kronlm task report ({exc})") from None

    def markdown(self) -> str:
        """A Markdown table (one row per model: metrics, parameters, ratios, retention, training
        wall minutes, evaluation tokens/s), the caveat and the checkpoint choice."""
        metrics = list(self.rows[0].metrics) if self.rows else [self.main_metric]
        head = ["role", "model", *[f"{self.split} {m}" for m in metrics], "params", "emb+linear params",
                "ratio (whole)", "ratio (emb+linear)", f"retention ({self.main_metric})", "train (min)",
                f"{self.split} tokens/s"]
        lines = [f"### {self.task} ({self.split} split)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        t = self.row("teacher")
        for r in self.rows:
            ratio_all = ratio_el = retention = "-"
            if t is not None and r is not t:
                ratio_all = f"{t.params / r.params:.2f}x"
                ratio_el = f"{t.params_embedding_linear / r.params_embedding_linear:.2f}x"
                if t.metrics.get(self.main_metric):
                    retention = f"{100 * r.metrics[self.main_metric] / t.metrics[self.main_metric]:.1f}%"
            speed = f"{r.eval_tokens / r.eval_seconds:,.0f}" if r.eval_tokens and r.eval_seconds else "-"
            cells = [r.role, f"`{r.model}`", *[format_metric(m, r.metrics.get(m, float("nan"))) for m in metrics],
                     f"{r.params:,}", f"{r.params_embedding_linear:,}", ratio_all, ratio_el, retention,
                     f"{r.train_seconds / 60:.1f}" if r.train_seconds else "-", speed]
            lines.append("| " + " | ".join(cells) + " |")
        if self.settings.get("caveat"):
            lines += ["", str(self.settings["caveat"])]
        choices = [f"- {r.role}: {describe_selection(r, self.split, self.main_metric)}" for r in self.rows if r.selection]
        if choices:
            lines += ["", f"Checkpoint choice (on held-out training examples; the {self.split} split is only reported):", *choices]
        return "\n".join(lines) + "\n"


def format_metric(name: str, value: float) -> str:
    """A metric for a table: a fraction in percent with 2 decimals; a ``*_threshold`` as it is (3 decimals)."""
    return f"{value:.3f}" if name.endswith("_threshold") else f"{100 * value:.2f}"


def describe_selection(row: ModelResult, split: str, main_metric: str) -> str:
    """One line: which checkpoint ``row`` is, why, and the reported metric of the final and best models."""
    sel = row.selection
    text = sel.get("reason", sel.get("checkpoint", "?"))
    shown = [(name, m) for name, m in (("final", row.metrics_final), ("best", row.metrics_best)) if m]
    if shown:
        text += "; " + ", ".join(f"{split} {main_metric} of {name} {100 * m.get(main_metric, float('nan')):.2f}" for name, m in shown)
    return text


def write_report(report: TaskReport, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir`` (atomically); returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / REPORT_JSON, report.to_dict())
    with atomic_path(out_dir / REPORT_MD) as tmp:
        tmp.write_text(report.markdown())
    return out_dir / REPORT_JSON, out_dir / REPORT_MD


def read_report(path: str | Path) -> TaskReport:
    """Read a ``report.json`` (or the folder holding it).

    Raises:
        FileNotFoundError / ValueError: missing or malformed file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_JSON
    return TaskReport.from_dict(read_json(path))
