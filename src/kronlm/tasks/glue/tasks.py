"""The GLUE tasks kronlm fine-tunes on: label sets, metrics, text columns, file names.

One :class:`GlueTask` per task of the GLUE benchmark (Wang et al., 2019) that the project
supports: CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE. Label ids follow the Hugging Face
``glue`` dataset (``datasets.load_dataset("glue", name)``), so a model fine-tuned on the TSV files
and one fine-tuned on the hub dataset agree on what class 0 means. Dev metrics follow docs/protocols.md, "GLUE dev metrics".
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GLUE_TASKS", "GlueTask", "get_task"]


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task.

    Attributes:
        name: canonical lower-case name ("sst2"), also the Hugging Face ``glue`` config name.
        dir_name: folder of the GLUE download script ("SST-2").
        text_columns: one or two TSV header names holding the input text(s).
        hf_text_columns: the same columns in the Hugging Face ``glue`` dataset.
        label_column: TSV header name (or 0-based column index for header-less CoLA) of the label.
        labels: the label strings as they appear in the TSV files, in id order; None for a
            regression task (STS-B, scores in [0, 5]).
        metrics: dev metrics (docs/protocols.md, "GLUE dev metrics"), the first one is the task's main metric.
        dev_split: file stem of the reported split ("dev"; "dev_matched" for MNLI).
        has_header: whether the TSV files start with a header row (all but CoLA).
        text_indices: for header-less files, the 0-based column of each text column.
        n_columns: for header-less files, the number of tab-separated fields of a row.
    """

    name: str
    dir_name: str
    text_columns: tuple[str, ...]
    hf_text_columns: tuple[str, ...]
    label_column: str | int
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    dev_split: str = "dev"
    has_header: bool = True
    text_indices: tuple[int, ...] = ()
    n_columns: int = 0

    @property
    def num_labels(self) -> int:
        """Outputs of the classification head: the number of classes, 1 for regression."""
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        """True for STS-B (a similarity score instead of a class)."""
        return self.labels is None

    @property
    def main_metric(self) -> str:
        """The metric the report's retention is computed on (accuracy, f1, matthews, pearson)."""
        return self.metrics[0]

    @property
    def is_pair(self) -> bool:
        """True when an example holds two texts (MRPC, STS-B, QQP, MNLI, QNLI, RTE)."""
        return len(self.text_columns) == 2


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        # CoLA's files have no header: source, label, original annotation, sentence.
        GlueTask("cola", "CoLA", ("sentence",), ("sentence",), 1, _BINARY, ("matthews", "accuracy"),
                 has_header=False, text_indices=(3,), n_columns=4),
        GlueTask("sst2", "SST-2", ("sentence",), ("sentence",), "label", _BINARY, ("accuracy",)),
        GlueTask("mrpc", "MRPC", ("#1 String", "#2 String"), ("sentence1", "sentence2"), "Quality", _BINARY, ("f1", "accuracy")),
        GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", None, ("pearson", "spearman")),
        GlueTask("qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate", _BINARY, ("f1", "accuracy")),
        GlueTask("mnli", "MNLI", ("sentence1", "sentence2"), ("premise", "hypothesis"), "gold_label",
                 ("entailment", "neutral", "contradiction"), ("accuracy",), dev_split="dev_matched"),
        GlueTask("qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label", _NLI2, ("accuracy",)),
        GlueTask("rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", _NLI2, ("accuracy",)),
    ]
}

_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli_matched": "mnli"}


def get_task(name: str) -> GlueTask:
    """Look a task up by name, case-insensitively ("SST-2", "sst2", "MRPC", "sts-b").

    Raises:
        ValueError: unknown task; the message lists the supported ones.
    """
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; supported tasks: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]
