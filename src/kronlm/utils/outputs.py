"""The output policy: which paths a command may write.

One output policy guards every path a command writes (:func:`check_output_folder`,
:func:`check_output_file`, :func:`claim_run_folder`): a path that exists is replaced only when
kronlm wrote it (a model folder whose files its ``kronlm_manifest.json`` lists, a run folder
with ``kronlm_run.json``, a report or GGUF file kronlm marked) or when the caller says
``overwrite``; never when it is, holds or lies inside an input of the run; all checked before any
work starts. A symlinked output is followed: the link's target is written, the link stays.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from kronlm.utils.atomic import clean_exchanged_links, write_json
from kronlm.utils.files import (
    with_errno,
    file_sha256,
    follow_link,
    parse_json,
    require_regular_file,
    special_file_kind,
)

# What kronlm writes into the folders it makes, and how it recognises them again.
MANIFEST_FILE = "kronlm_manifest.json"
MANIFEST_FORMAT = "kronlm.manifest/1"
RUN_MARKER = "kronlm_run.json"
RUN_MARKER_FORMAT = "kronlm.run/1"
# A JSON report kronlm writes carries this key with a value starting with "kronlm".
WRITTEN_BY_KEY = "written_by"
# Files kronlm adds to a model folder after its manifest (compress --eval's scores).
MODEL_FOLDER_EXTRAS = ("eval.json",)
# Run folders written before run markers existed are recognised by what only kronlm puts there.
_LEGACY_RUN_SIGNS = ("checkpoints/latest", f"best/{MANIFEST_FILE}", f"final/{MANIFEST_FILE}", "recovery_summary.json")
# Folders with more files than this are not scanned to tell whether kronlm wrote all of them.
_SCAN_LIMIT = 10_000
# JSON files larger than this are not parsed just to see whether kronlm wrote them.
_REPORT_SNIFF_BYTES = 64 << 20
_FORCE_HINT = "pass --overwrite / overwrite=True to replace it anyway"


class OutputRefused(FileExistsError):
    """An output path kronlm refuses to write: it holds something kronlm did not write, it is, holds
    or lies inside an input of the run, or it names no new file or folder (the message says which)."""


def _listing(entries: list[str]) -> str:
    return f"{len(entries)} entries: " + ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")


def _output_name_check(path: str | os.PathLike, option: str | None) -> Path:
    text = os.fspath(path)
    label = f"{option} " if option else ""
    if not text.strip():
        raise OutputRefused(f"{label}{text!r}: an empty path names no file or folder; give a name such as ./out")
    path = Path(text).expanduser()
    if path.name in ("", ".", ".."):
        raise OutputRefused(f"{label}{text}: names an existing folder ({os.path.realpath(path)}), not a new one to write; "
                            "give a name such as ./out")
    return path


def output_conflict(path: str | os.PathLike, inputs=(), *, folder: bool = True, holding_ok: bool = False) -> str | None:
    """Why writing ``path`` would touch an input of the run, or None.

    ``path`` conflicts with an input (a file or folder that exists; other names are skipped) when
    both are the same after following symlinks, when ``path`` lies inside it, or when ``path``
    holds it (unless ``holding_ok``: a run folder written into, not replaced); an output folder
    replaced as a whole (``folder`` and not ``holding_ok``) also may not hold the working folder.

    Returns:
        e.g. ``"is the input dense"``, ``"holds the input runs/dense"``, or None.
    """
    out = Path(os.path.realpath(Path(path).expanduser()))
    for item in inputs:
        if item is None or not os.fspath(item):
            continue
        candidate = Path(item).expanduser()
        if not os.path.lexists(candidate):
            continue
        real = Path(os.path.realpath(candidate))
        if real == out:
            return f"is the input {item}"
        if out in real.parents and not holding_ok:
            return f"holds the input {item}"
        if real in out.parents:
            return f"lies inside the input {item}"
    if folder and not holding_ok:
        cwd = Path.cwd().resolve()
        if cwd == out or out in cwd.parents:
            return f"holds the current working folder {cwd}"
    return None


def _check_creatable(path: Path) -> None:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise with_errno(NotADirectoryError(f"{path}: {parent} is a file, not a folder; cannot write below it"), errno.ENOTDIR)
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise with_errno(PermissionError(f"{path} is not writable (no write permission on {parent})"), errno.EACCES)


def model_folder_extras(folder: str | os.PathLike) -> list[str] | None:
    """Files in ``folder`` that its kronlm manifest does not list (None: no readable manifest).

    A model folder kronlm wrote holds ``kronlm_manifest.json`` listing every file (plus
    :data:`MODEL_FOLDER_EXTRAS`); anything else is someone else's and must not be deleted by
    replacing the folder. Folders of more than 10,000 files are not scanned (None).
    """
    folder = Path(folder)
    try:
        manifest = parse_json(require_regular_file(folder / MANIFEST_FILE).read_text(encoding="utf-8"), folder / MANIFEST_FILE)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None
    known = set(files) | {MANIFEST_FILE, *MODEL_FOLDER_EXTRAS}
    extras, seen = [], 0
    for root, dirs, names in os.walk(folder):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            seen += 1
            if seen > _SCAN_LIMIT:
                return None
            rel = Path(root, name).relative_to(folder).as_posix()
            if rel not in known:
                extras.append(rel)
    return sorted(extras)


def is_run_folder(folder: str | os.PathLike) -> bool:
    """True for a run folder kronlm made: it holds ``kronlm_run.json`` (or, for runs made before
    run markers, a checkpoint ``latest`` pointer, a saved ``best/`` or ``final/`` model, or a
    staged recovery's ``recovery_summary.json``)."""
    folder = Path(folder)
    return any((folder / sign).is_file() for sign in (RUN_MARKER, *_LEGACY_RUN_SIGNS))


def _existing_output(path: Path, checks, *, folder: bool) -> bool:
    """The checks :func:`check_output_folder` and :func:`check_output_file` share: refuse any
    ``(where, conflict)`` of ``checks`` that overlaps an input, a special file, or an existing path of
    the other kind (a file for a folder output, a folder for a file output).

    Returns:
        False when ``path`` does not exist (its parent was checked writable), True when it exists
        and is of the wanted kind.

    Raises:
        OutputRefused / NotADirectoryError / PermissionError: as the two callers.
    """
    noun = "folder" if folder else "file"
    for where, conflict in checks:
        if conflict is not None:
            raise OutputRefused(f"{where}: {conflict}; refusing to write there (the output must be a separate {noun})")
    if not os.path.lexists(path):
        _check_creatable(path)
        return False
    special = special_file_kind(path)
    if special is not None:
        raise OutputRefused(f"{path}: is {special}, not {'a folder' if folder else 'a regular file'}; refusing to write there")
    if folder and not path.is_dir():
        raise OutputRefused(f"{path}: exists and is a file, not a folder; refusing to replace it")
    if not folder and path.is_dir():
        raise OutputRefused(f"{path}: is a folder, not a file; refusing to replace it")
    return True


def check_output_folder(path: str | os.PathLike, *, overwrite: bool = False, inputs=(), kind: str = "model",
                        option: str | None = None, replaced: tuple[str, ...] = ()) -> Path:
    """Check, before any work, that writing the folder ``path`` destroys nothing kronlm did not write.

    Allowed: a path that does not exist, an empty folder, and

    - ``kind="model"`` (a folder that is replaced as a whole: a saved model, an ONNX export): a
      folder kronlm wrote, i.e. one whose ``kronlm_manifest.json`` lists every file in it, or any
      folder when ``overwrite``;
    - ``kind="run"`` (a folder written into: a distillation or task run): a kronlm run folder
      (:func:`is_run_folder`); ``overwrite`` does not apply.

    Never allowed, ``overwrite`` or not: an empty path or one naming ``.`` / ``..``; a path that is,
    holds or lies inside one of ``inputs`` or the working folder (:func:`output_conflict`; a run
    folder may hold inputs, e.g. the teacher of an earlier run, but none of its ``replaced``
    entries may be, hold or lie inside one); a file, device or FIFO. A symlink at ``path`` is
    followed (the returned path is its target).

    Args:
        path: the output folder.
        overwrite: replace a folder kronlm did not write (model kind only).
        inputs: the files and folders the run reads (hub ids and other names that are not local
            paths are skipped).
        kind: ``"model"`` or ``"run"``.
        option: the command-line flag to name in errors (``"--out"``).
        replaced: entries of a run folder the run replaces (``"best"``, ``"final"``, ...).

    Returns:
        The folder to write (a symlink's target).

    Raises:
        OutputRefused: the path is refused (the message names it, what it holds or which input it
            overlaps, and what to do).
        NotADirectoryError: a parent of the path is a file.
        PermissionError: the nearest existing parent is not writable.
    """
    if kind not in ("model", "run"):
        raise ValueError(f"kind must be 'model' or 'run', got {kind!r}")
    path = _output_name_check(path, option)
    if path.is_symlink():
        clean_exchanged_links(path)
    path = follow_link(path)
    checks = [(path, output_conflict(path, inputs, holding_ok=kind == "run"))]
    checks += [(path / entry, output_conflict(path / entry, inputs, folder=False)) for entry in replaced]
    if not _existing_output(path, checks, folder=True):
        return path
    entries = sorted(os.listdir(path))
    if not entries:
        return path
    if kind == "run":
        if is_run_folder(path):
            return path
        raise OutputRefused(
            f"{path}: exists and is not a kronlm run folder (it holds {_listing(entries)}); refusing to write into it: "
            "give a new or empty folder"
        )
    if overwrite:
        return path
    extras = model_folder_extras(path)
    if extras == []:
        return path
    if extras is None:
        raise OutputRefused(
            f"{path}: exists and is not a model folder (it holds {_listing(entries)}); refusing to replace it: kronlm "
            f"replaces only folders it wrote itself (with {MANIFEST_FILE}); {_FORCE_HINT}"
        )
    raise OutputRefused(
        f"{path}: a model folder kronlm wrote, but it also holds {_listing(extras)} that kronlm did not write; refusing "
        f"to replace it; move them, or {_FORCE_HINT}"
    )


def claim_run_folder(path: str | os.PathLike, *, inputs=(), option: str | None = None, replaced: tuple[str, ...] = ()) -> Path:
    """:func:`check_output_folder` with ``kind="run"``, then create the folder and mark it as a kronlm
    run folder (``kronlm_run.json``), so that later runs and ``--resume`` may write into it.

    Returns:
        The run folder (a symlink's target).

    Raises:
        OutputRefused / PermissionError: as :func:`check_output_folder`.
    """
    path = check_output_folder(path, inputs=inputs, kind="run", option=option, replaced=replaced)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / RUN_MARKER).is_file():
        write_json(path / RUN_MARKER, {"format": RUN_MARKER_FORMAT, WRITTEN_BY_KEY: "kronlm"})
    return path


def written_by_kronlm_json(path: str | os.PathLike) -> bool:
    """True for a JSON file kronlm wrote as a report: a mapping whose ``"written_by"`` starts with ``kronlm``."""
    path = Path(path)
    try:
        if path.stat().st_size > _REPORT_SNIFF_BYTES:
            return False
        data = parse_json(require_regular_file(path).read_text(encoding="utf-8"), path)
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and str(data.get(WRITTEN_BY_KEY, "")).startswith("kronlm")


def check_output_file(path: str | os.PathLike, *, overwrite: bool = False, inputs=(), written_by_kronlm=None,
                      option: str | None = None) -> Path:
    """Check, before any work, that writing the file ``path`` destroys nothing kronlm did not write.

    Allowed: a path that does not exist; an existing regular file that ``written_by_kronlm(path)``
    recognises (a report or GGUF file kronlm wrote) or, with ``overwrite``, any regular file.
    Never: an empty path, a folder, a device or FIFO, or a path that is, or lies inside, one of
    ``inputs``. A symlink at ``path`` is followed.

    Args:
        path: the output file.
        overwrite: replace a file kronlm did not write.
        inputs: the files and folders the run reads.
        written_by_kronlm: ``path -> bool``; None recognises no file.
        option: the flag to name in errors (``"--json"``).

    Returns:
        The file to write (a symlink's target).

    Raises:
        OutputRefused: the path is refused (named, with why and what to do).
        NotADirectoryError: a parent of the path is a file.
        PermissionError: the nearest existing parent is not writable.
    """
    path = follow_link(_output_name_check(path, option))
    if not _existing_output(path, [(path, output_conflict(path, inputs, folder=False))], folder=False):
        return path
    if overwrite or (written_by_kronlm is not None and written_by_kronlm(path)):
        return path
    raise OutputRefused(f"{path}: exists and was not written by kronlm; refusing to replace it (pass --overwrite to replace it anyway)")


def write_manifest(folder: str | os.PathLike) -> Path:
    """Record the size (bytes) and SHA-256 of every visible file in ``folder`` (recursively) in
    ``folder/kronlm_manifest.json``; loading verifies them, and the output policy recognises the
    folder as kronlm's by it.

    Returns:
        The manifest path.
    """
    folder = Path(folder)
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or rel.as_posix() == MANIFEST_FILE or any(part.startswith(".") for part in rel.parts):
            continue
        files[rel.as_posix()] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = folder / MANIFEST_FILE
    write_json(manifest, {"format": MANIFEST_FORMAT, "files": files})
    return manifest
