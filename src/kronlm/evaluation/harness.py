"""Zero-shot task accuracy with EleutherAI's lm-evaluation-harness, run in-process on a loaded model.

Needs the optional ``lm-eval`` package (``pip install 'kronlm[eval]'``). :func:`run_harness` wraps
the model (dense or kronlm-compressed; lm-eval's ``HFLM`` takes a model object) and calls
``lm_eval.simple_evaluate``: any lm-eval task name works (``lambada_openai``, ``hellaswag``, ...;
they download their data from the Hugging Face hub), plus task YAMLs from ``include_path``.

Offline, :func:`lambada_task` builds lm-eval's ``lambada_openai`` task (Paperno et al. 2016, the
OpenAI preprocessing of LAMBADA; same prompt, target and metrics: last-word accuracy and
perplexity of the last word) over a local JSON Lines file of ``{"text": ...}`` records, one
passage per line: the context is the text up to its last space, the target the last word.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from kronlm.utils.files import read_text

LAMBADA_LOCAL = "lambada_local"
# The metrics kronlm prints for a task, when lm-eval reports them (in this order).
REPORTED_METRICS = ("acc", "acc_norm", "perplexity", "word_perplexity", "exact_match", "f1", "mcc")


def require_lm_eval() -> None:
    """Check that lm-eval is importable.

    Raises:
        ImportError: it is not (the message names ``pip install 'kronlm[eval]'``).
    """
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ImportError("task evaluation needs lm-evaluation-harness: pip install 'kronlm[eval]' (or pip install lm-eval)") from None


def lambada_task(jsonl_path: str | os.PathLike, name: str = LAMBADA_LOCAL) -> dict[str, Any]:
    """lm-eval's ``lambada_openai`` task config over a local JSON Lines file of ``{"text": ...}`` lines.

    Args:
        jsonl_path: the file; every line a JSON object with a ``text`` field (a passage whose last
            space-separated word is the target).
        name: the task name in the results.

    Returns:
        A task config dict for ``lm_eval.simple_evaluate(tasks=[...])``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not a JSON object with a string ``text`` holding at least two
            words (the message names the line number).
    """
    path = Path(jsonl_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: LAMBADA JSON Lines file not found")
    for number, line in enumerate(read_text(path, what="JSON Lines file").splitlines(), 1):
        if not line.strip():
            continue
        record = read_json_line(line, path, number)
        text = record.get("text")
        if not isinstance(text, str) or len(text.split(" ")) < 2:
            raise ValueError(f"{path}:{number}: needs a string \"text\" of at least two space-separated words")
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "output_type": "loglikelihood",
        "test_split": "test",
        "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
        "doc_to_target": "{{' '+text.split(' ')[-1]}}",
        "metric_list": [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


def read_json_line(line: str, path: Path, number: int) -> dict[str, Any]:
    """One JSON Lines record as a dict.

    Raises:
        ValueError: not valid JSON or not an object (names file and line).
    """
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
    return record


@dataclass
class HarnessResult:
    """lm-eval results of one model.

    Attributes:
        metrics: task -> metric name -> value (lm-eval's ``results``, with the ",none" filter suffix removed).
        samples: task -> number of documents evaluated.
        seconds: wall time of the evaluation.
        lm_eval_version: the lm-eval package version.
    """

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    lm_eval_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"metrics": self.metrics, "samples": self.samples, "seconds": self.seconds, "lm_eval_version": self.lm_eval_version}


def run_harness(
    model: nn.Module,
    tokenizer,
    tasks: list[str | dict[str, Any]],
    *,
    include_path: str | os.PathLike | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    bootstrap_iters: int = 0,
    max_length: int | None = None,
    seed: int = 0,
) -> HarnessResult:
    """Evaluate a loaded causal LM on lm-eval tasks, in this process.

    Args:
        model: a Hugging Face causal LM (dense or kronlm-compressed), in eval mode.
        tokenizer: its tokenizer.
        tasks: lm-eval task names and/or task config dicts (e.g. :func:`lambada_task`).
        include_path: a folder of extra task YAMLs (lm-eval's ``--include_path``).
        limit: documents per task (an int) or fraction (a float below 1); None = all.
        num_fewshot: few-shot examples (None: each task's default, 0 for the tasks named here).
        batch_size: sequences per forward pass.
        bootstrap_iters: bootstrap resamples for standard errors (0: none, the fastest).
        max_length: context length in tokens (default: the model's).
        seed: random seed of lm-eval (few-shot sampling).

    Returns:
        A :class:`HarnessResult`.

    Raises:
        ImportError: lm-eval missing (names the extra).
        ValueError: an empty task list, or a task lm-eval does not know (lm-eval's message).
    """
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("run_harness: give at least one task")
    named = [t for t in tasks if isinstance(t, str)]
    # Scanning lm-eval's thousands of built-in YAMLs takes seconds; skip it when no task needs them.
    manager = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=bool(named) and not (include_path and _all_local(named, include_path)))
    unknown = [t for t in named if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm-eval knows no task {unknown[0]!r} (see `lm_eval ls tasks`, or give --include-path)")
    # backend "causal": lm-eval guesses it from model_type, which it does not know for kronecker_*.
    wrapped = HFLM(pretrained=model, backend="causal", tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=wrapped, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
        bootstrap_iters=bootstrap_iters, log_samples=False, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed,
    )
    seconds = time.perf_counter() - t0
    metrics = {task: clean_metrics(values) for task, values in (out or {}).get("results", {}).items()}
    samples = {task: int(n.get("effective", n.get("original", 0))) if isinstance(n, dict) else int(n)
               for task, n in (out or {}).get("n-samples", {}).items()}
    return HarnessResult(metrics, samples, seconds, getattr(lm_eval, "__version__", ""))


def _all_local(names: list[str], include_path: str | os.PathLike) -> bool:
    # True when every named task is defined by a YAML under include_path ("task: NAME").
    found = set()
    for yaml_file in Path(include_path).rglob("*.yaml"):
        for line in yaml_file.read_text(encoding="utf-8").splitlines():
            if line.startswith("task:"):
                found.add(line.split(":", 1)[1].strip().strip("'\""))
    return set(names) <= found


def clean_metrics(values: dict[str, Any]) -> dict[str, float]:
    """lm-eval's per-task result dict -> {metric: value}, numbers only, ",none" filter suffixes removed."""
    out = {}
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metric, _, filt = key.partition(",")
            out[metric if filt in ("", "none") else key] = float(value)
    return out


def harness_table(results: dict[str, HarnessResult]) -> str:
    """A plain-text table, one row per (task, metric), one column per model (e.g. dense, compressed)."""
    labels = list(results)
    rows = []
    tasks = list(dict.fromkeys(t for r in results.values() for t in r.metrics))
    for task in tasks:
        metrics = list(dict.fromkeys(m for r in results.values() for m in r.metrics.get(task, {})))
        metrics = [m for m in REPORTED_METRICS if m in metrics] or [m for m in metrics if not m.endswith("_stderr")]
        for metric in metrics:
            cells = [results[label].metrics.get(task, {}).get(metric) for label in labels]
            rows.append((task, metric, [("-" if c is None else f"{c:.4f}") for c in cells]))
    width_task = max([len("task")] + [len(r[0]) for r in rows])
    width_metric = max([len("metric")] + [len(r[1]) for r in rows])
    widths = [max(len(label), 10) for label in labels]
    lines = [f"{'task':<{width_task}} {'metric':<{width_metric}} " + " ".join(f"{label:>{w}}" for label, w in zip(labels, widths))]
    for task, metric, cells in rows:
        lines.append(f"{task:<{width_task}} {metric:<{width_metric}} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    samples = {label: sum(r.samples.values()) for label, r in results.items()}
    lines.append("documents: " + ", ".join(f"{label} {n:,}" for label, n in samples.items()))
    return "\n".join(lines)


__all__ = [
    "LAMBADA_LOCAL",
    "REPORTED_METRICS",
    "HarnessResult",
    "clean_metrics",
    "harness_table",
    "lambada_task",
    "read_json_line",
    "require_lm_eval",
    "run_harness",
]
