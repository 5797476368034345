"""Machine description, Markdown tables and results files for the benchmark output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import torch
import transformers

from kronlm.utils.atomic import atomic_path
from kronlm.utils.paths import data_dir


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
        f"{info['threads']} intra-op thread{'' if info['threads'] == '1' else 's'}, Python {info['python']}, {info['date']}."
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


# The first line of a Markdown report the command line writes, by which it recognises its own files.
MARKDOWN_MARK = "<!-- written by kronlm bench -->"


def written_by_kronlm_markdown(path: str | os.PathLike) -> bool:
    """True when ``path`` starts with :data:`MARKDOWN_MARK` (a report ``kronlm bench --out`` wrote)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readline(len(MARKDOWN_MARK) + 2).rstrip("\n") == MARKDOWN_MARK
    except (OSError, UnicodeDecodeError):
        return False


def portable_paths(text: str) -> str:
    """``text`` with the recording machine's absolute paths made portable, for reports others read.

    Replaced, longest prefix first: the local data folder (:func:`kronlm.utils.paths.data_dir`)
    and the Python environment (``sys.prefix``) by ``...``, the working directory by a path
    relative to it (``./``), the home folder by ``~``. Other text is unchanged.
    """
    prefixes: dict[str, str] = {}
    try:
        folder = data_dir()
    except NotADirectoryError:
        folder = None
    if folder is not None:
        prefixes[str(Path(folder).resolve())] = "..."
    prefixes[str(Path(sys.prefix).resolve())] = "..."
    prefixes[str(Path.cwd().resolve())] = "."
    prefixes[str(Path.home())] = "~"
    for prefix in sorted((p for p in prefixes if len(p) > 1), key=len, reverse=True):
        text = re.sub(re.escape(prefix) + r"(?=/|\b|$)", prefixes[prefix], text)
    return text


def write_markdown(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` (plus a final newline) to ``path`` atomically, its absolute paths made
    portable (:func:`portable_paths`); returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(portable_paths(text).rstrip("\n") + "\n")
    return path


def read_result_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a benchmark results file (JSON Lines, one row per finished configuration; blank
    lines skipped), in file order; ``[]`` when the file does not exist.

    Raises:
        json.JSONDecodeError: a line that is not JSON (the file was edited by hand or truncated).
    """
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_result_row(path: str | os.PathLike, row: dict) -> None:
    """Append ``row`` to the results file ``path`` as one JSON line (its folder created), the
    recording machine's absolute paths made portable (:func:`portable_paths`): the file is
    committed beside the page it feeds, so that a fresh clone skips the rows already measured."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(portable_paths(json.dumps(row)) + "\n")


def git_commit(path: str | os.PathLike | None = None) -> str:
    """The commit of the git checkout holding ``path`` (default: this file), with ``-dirty`` when
    tracked files differ from it; ``"unknown"`` outside a checkout or without git."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where, capture_output=True, text=True,
                               timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def environment_info(device: torch.device | str = "cpu") -> dict[str, str]:
    """``machine_info`` plus the package versions a figure depends on: transformers, kronlm and the
    kronlm git commit (``git_commit``)."""
    info = machine_info(device)
    try:
        kronlm_version = metadata.version("kronlm")
    except metadata.PackageNotFoundError:
        kronlm_version = "unknown"
    info.update({"transformers": transformers.__version__, "kronlm": kronlm_version, "commit": git_commit()})
    return info


def reproduce_header(command: str, info: dict[str, str] | None = None) -> str:
    """What a benchmark prints first: the command, machine, date and versions, one per line.

    Args:
        command: the command line that reproduces the output, as a user would type it.
        info: ``environment_info()`` (taken now when None).
    """
    info = info or environment_info()
    return "\n".join([
        f"command: {command}",
        f"machine: {info['cpu']}, {info['cores']} cores, device {info['device']}, {info['threads']} torch thread{'' if info['threads'] == '1' else 's'}",
        f"date: {info['date']}",
        f"versions: torch {info['torch']}, transformers {info['transformers']}, kronlm {info['kronlm']} (commit {info['commit']}), "
        f"Python {info['python']}",
    ])


def reproduce_section(commands: Sequence[str], info: dict[str, str] | None = None, notes: Sequence[str] = ()) -> str:
    """A Markdown ``## Reproduce`` section: the commands in a code block, then machine, date, versions.

    Args:
        commands: command lines, run in this order from the repository root.
        info: ``environment_info()`` (taken now when None).
        notes: extra lines (Markdown) after the versions.
    """
    info = info or environment_info()
    lines = ["## Reproduce", "", "```bash", *commands, "```", "",
             f"- Machine: {info['cpu']}, {info['cores']} cores, device {info['device']}, {info['threads']} torch thread{'' if info['threads'] == '1' else 's'}.",
             f"- Date: {info['date']}.",
             f"- Versions: torch {info['torch']}, transformers {info['transformers']}, kronlm {info['kronlm']}, commit `{info['commit']}`, "
             f"Python {info['python']}."]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines)

