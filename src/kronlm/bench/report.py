"""Machine description and Markdown tables for the benchmark output."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path
from typing import Sequence

import torch

from kronlm.utils.io import atomic_path


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo ("model name"), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str = "cpu") -> dict[str, str]:
    """What the timings ran on: CPU model, usable cores, torch version, intra-op threads, date (UTC), device."""
    device = torch.device(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)
    info = {
        "cpu": cpu_model(),
        "cores": str(cores),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    return info


def machine_line(info: dict[str, str]) -> str:
    """One Markdown line naming the machine (``machine_info``'s fields)."""
    return (
        f"Machine: {info['cpu']}, {info['cores']} cores, device {info['device']}, torch {info['torch']}, "
        f"{info['threads']} intra-op threads, Python {info['python']}, {info['date']}."
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table; ``align`` per column "l" or "r" (default: right for all but the first).

    Raises:
        ValueError: a row whose length differs from the headers'.
    """
    align = list(align) if align is not None else ["l"] + ["r"] * (len(headers) - 1)
    if len(align) != len(headers):
        raise ValueError(f"markdown_table: {len(align)} alignments for {len(headers)} columns")
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"]
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"markdown_table: row {i} has {len(row)} cells but there are {len(headers)} columns")
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def write_markdown(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` (plus a final newline) to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text.rstrip("\n") + "\n")
    return path
