"""``kronlm_compression.json``: the compression config and report saved beside a compressed model.

Written by the Kronecker model classes' ``save_pretrained`` (so ``model.save_pretrained`` and
``kronlm.save`` write the same folder) and read back by their ``from_pretrained``, which attaches
the report to the loaded model as ``model.compression_report``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from kronlm.compression.report import CompressionReport
from kronlm.utils.atomic import write_json
from kronlm.utils.files import read_json

COMPRESSION_FILE = "kronlm_compression.json"
REPORT_ATTRIBUTE = "compression_report"


def compression_report(model: nn.Module) -> CompressionReport | None:
    """The ``CompressionReport`` of a compressed model (set by ``kronlm.compress`` or on load), or None."""
    return getattr(model, REPORT_ATTRIBUTE, None)


def attach_report(model: nn.Module, report: CompressionReport | None) -> None:
    """Remember ``report`` on ``model`` (as ``model.compression_report``); None forgets it."""
    object.__setattr__(model, REPORT_ATTRIBUTE, report)


def write_compression_file(folder: str | os.PathLike, compression: dict[str, Any] | None, report: CompressionReport | None) -> Path:
    """Write ``{"compression": ..., "report": ...}`` to ``folder/kronlm_compression.json`` atomically."""
    path = Path(folder) / COMPRESSION_FILE
    write_json(path, {"compression": compression, "report": None if report is None else report.to_dict()})
    return path


def read_compression_file(folder: str | os.PathLike) -> tuple[dict[str, Any] | None, CompressionReport | None]:
    """(compression config dict, report) from ``folder/kronlm_compression.json``; (None, None) without one.

    Raises:
        ValueError: the file is not valid JSON or its report is malformed (names the file).
    """
    path = Path(folder) / COMPRESSION_FILE
    if not path.is_file():
        return None, None
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping, got {type(data).__name__}")
    report = data.get("report")
    try:
        return data.get("compression"), None if report is None else CompressionReport.from_dict(report)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


__all__ = [
    "COMPRESSION_FILE",
    "REPORT_ATTRIBUTE",
    "attach_report",
    "compression_report",
    "read_compression_file",
    "write_compression_file",
]
