"""Atomic writes, folder locks and JSON helpers.

Every file kronlm writes (configs, safetensors, checkpoints) goes through a temporary file in the
same folder followed by ``os.replace``, so a crash never leaves a half-written file under the final
name: readers either see the old file or the complete new one. Multi-file artefacts (a saved
model, a checkpoint) are assembled in a temporary folder and exchanged with the old folder in one
atomic ``renameat2(RENAME_EXCHANGE)`` call, so at every instant the path holds either the old
or the new folder; writers to one path take a lock file and a second concurrent writer is refused.

One output policy guards every path a command writes (:func:`check_output_folder`,
:func:`check_output_file`, :func:`claim_run_folder`): a path that exists is replaced only when
kronlm wrote it (a model folder whose files its ``kronlm_manifest.json`` lists, a run folder
with ``kronlm_run.json``, a report or GGUF file kronlm marked) or when the caller says
``overwrite``; never when it is, holds or lies inside an input of the run; all checked before any
work starts. A symlinked output is followed: the link's target is written, the link stays.
A write that runs out of disk space or into the file-size limit (``ulimit -f``) fails with one
line naming the path and the bytes, and leaves the previous contents in place.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not a Unix system: writers are not locked
    fcntl = None
try:
    import resource
except ImportError:  # pragma: no cover - not a Unix system: no file-size limit to report
    resource = None

_LIBC = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None
_RENAMEAT2 = getattr(_LIBC, "renameat2", None) if _LIBC is not None else None
if _RENAMEAT2 is not None:
    _RENAMEAT2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    _RENAMEAT2.restype = ctypes.c_int
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# Locks this process holds, by (process id, lock-file path): nested writers of one process share
# them; a forked child inherits the dict but not the lock, hence the process id.
_HELD_LOCKS: dict[tuple[int, str], tuple[int, int]] = {}


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


class FolderBusyError(OSError):
    """Another process is writing the same folder (its lock file is held)."""


class OutputRefused(FileExistsError):
    """An output path kronlm refuses to write: it holds something kronlm did not write, it is, holds
    or lies inside an input of the run, or it names no new file or folder (the message says which)."""


class StorageFullError(OSError):
    """A write ran out of disk space, quota or the file-size limit; the message names the path and
    the bytes, and the previous contents of the path are unchanged."""


def special_file_kind(path: str | os.PathLike) -> str | None:
    """``"a FIFO (named pipe)"``, ``"a character device"``, ``"a block device"`` or ``"a socket"``
    for such a path (after following symlinks); None for regular files, folders and missing paths.

    Reading a device or a FIFO can block or never end (``/dev/zero``), so readers refuse them by name.
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return None


def require_regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` as a Path when it is a regular file (or a symlink to one).

    Raises:
        FileNotFoundError: nothing is there (``"<path>: <what> not found"``).
        ValueError: a folder, a device, a FIFO or a socket (named, e.g. ``"/dev/zero: is a
            character device, not a regular file"``).
    """
    path = Path(path)
    special = special_file_kind(path)
    if special is not None:
        raise ValueError(f"{path}: is {special}, not a regular file; kronlm reads only regular files")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a {what}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    return path


def _default_mode(directory: bool) -> int:
    # mkstemp / mkdtemp create private (0600 / 0700) entries; a saved model or checkpoint should get
    # the permissions any other new file of this user would, so it can be shared.
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def follow_link(path: str | os.PathLike) -> Path:
    """``path`` with a symlink as its last component replaced by the link's target (all links
    followed), else ``path`` unchanged: writers replace the target and keep the link.

    Raises:
        OSError: the link leads to itself (a loop; named).
    """
    path = Path(path)
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    if target.is_symlink():
        raise _with_errno(OSError(f"{path}: a symlink loop, leading to no file or folder"), errno.ELOOP)
    return target


def _storage_failure(exc: BaseException) -> int | None:
    # The errno of a full disk, quota or file-size limit anywhere in the exception chain; writers
    # such as safetensors' report them as their own exception types with "(os error 28)".
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return exc.errno
        text = str(exc)
        for code, words in ((errno.ENOSPC, "No space left on device"), (errno.EFBIG, "File too large"),
                            (errno.EDQUOT, "Disk quota exceeded")):
            if words in text or f"os error {code})" in text:
                return code
        exc = exc.__cause__ or exc.__context__
    return None


def _bytes_under(path: Path) -> int:
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)
    except OSError:
        return 0


def storage_error(target: str | os.PathLike, code: int, *, written: int, expected_bytes: int | None = None) -> StorageFullError:
    """The one-line error of a write to ``target`` that failed with ENOSPC, EDQUOT or EFBIG.

    Args:
        target: the file or folder being written.
        code: the errno.
        written: bytes written before the failure.
        expected_bytes: about how many bytes the complete write needs, when known.
    """
    target = Path(target)
    needed = f"about {expected_bytes:,} bytes needed" if expected_bytes else f"more than the {written:,} bytes written"
    if code == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource is not None else None
        shown = "unlimited" if limit in (None, getattr(resource, "RLIM_INFINITY", None)) else f"{limit:,} bytes"
        why = f"a file grew past the file-size limit ({shown}, see ulimit -f); {needed}"
    else:
        where = target.parent if not target.exists() else target
        while not where.exists() and where != where.parent:
            where = where.parent
        try:
            free = f"{shutil.disk_usage(where).free:,} bytes free"
        except OSError:
            free = "free space unknown"
        what = "disk quota exceeded" if code == errno.EDQUOT else "no space left on device"
        why = f"{what} ({needed}, {free})"
    kept = "its previous contents are unchanged" if target.exists() else "nothing was written"
    return _with_errno(StorageFullError(f"{target}: cannot write it: {why}; {kept}"), code)


def _with_errno(exc: OSError, code: int) -> OSError:
    # OSError(code, message) would print as "[Errno 28] message"; the command line shows one
    # plain line, so the code is set after construction.
    exc.errno = code
    return exc


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success, rename it to ``path`` atomically.

    The caller writes the complete file to the yielded path. If the block raises, the temporary
    file is removed and ``path`` is left untouched. A symlink at ``path`` is followed: its target is
    replaced and the link kept.

    Args:
        path: the file to write.
        expected_bytes: about how large the file will be (named when the disk fills up).

    Raises:
        StorageFullError: the disk, the quota or the file-size limit ran out (one line naming
            ``path`` and the bytes; ``path`` unchanged).
        OSError: the folder is not writable.
    """
    path = follow_link(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, _default_mode(directory=False))
        os.replace(tmp_path, path)
    except Exception as exc:
        code = _storage_failure(exc)
        if code is None:
            raise
        raise storage_error(path, code, written=_bytes_under(tmp_path), expected_bytes=expected_bytes) from exc
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def json_ready(obj: Any) -> Any:
    """``obj`` with dataclasses as dicts (``dataclasses.asdict``), paths as strings and tuples as
    lists, recursively: what ``json.dumps`` takes. Other values pass through unchanged."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {key: json_ready(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(value) for value in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        ValueError: ``path`` is not a regular file (a device, a FIFO), not UTF-8 text, not valid
            JSON or nested too deeply (the message names it and the byte offset, or the line and
            column).
    """
    path = require_regular_file(path)
    text = read_text(path, what="JSON file")
    return parse_json(text, path)


def parse_json(text: str, origin: str | os.PathLike) -> Any:
    """``json.loads(text)`` with errors that name ``origin`` (a file, or a file and line).

    Raises:
        ValueError: not valid JSON (with line and column), or nested deeper than Python's parser
            can follow (about ``sys.getrecursionlimit()`` levels; the message names ``origin``).
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{origin}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise ValueError(f"{origin}: JSON nested too deeply (arrays or objects more than about "
                         f"{sys.getrecursionlimit()} levels deep); refusing to read it") from None


def read_text(path: str | os.PathLike, *, what: str = "text file") -> str:
    """Read a UTF-8 text file (a byte-order mark is dropped).

    Raises:
        FileNotFoundError: ``path`` does not exist (named).
        ValueError: ``path`` is a device, FIFO or folder (named); the bytes are not UTF-8; the
            message names the file and the byte offset,
            e.g. ``config.json: not UTF-8 text at line 1 (byte 0xd0 at offset 9); save the JSON file as UTF-8``.
    """
    path = require_regular_file(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(utf8_error_message(path, data, exc, what)) from None


def utf8_error_message(path: str | os.PathLike, data: bytes | None = None, exc: UnicodeDecodeError | None = None,
                       what: str = "file") -> str:
    """One line naming the file, line and byte of the first invalid UTF-8 sequence in ``path``.

    ``data`` (the file's bytes) and ``exc`` (the error of decoding them) are computed when not
    given; readers that decode in chunks (``csv``, line iteration) call it with the path alone,
    because their own error positions point into a buffer, not the file.
    """
    if data is None:
        data = Path(path).read_bytes()
    if exc is None:
        try:
            data.decode("utf-8-sig")
            return f"{path}: not UTF-8 text; save the {what} as UTF-8"
        except UnicodeDecodeError as found:
            exc = found
    line = data.count(b"\n", 0, exc.start) + 1
    return (f"{path}: not UTF-8 text at line {line} (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            f"save the {what} as UTF-8")


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2`` with ``RENAME_EXCHANGE``).

    Returns:
        True when swapped; False when the system or file system cannot (then nothing changed).

    Raises:
        OSError: any other failure of the call (named by errno).
    """
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(os.fspath(a)), _AT_FDCWD, os.fsencode(os.fspath(b)), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, f"cannot exchange {a} and {b}: {os.strerror(code)}")


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of a folder: ``.<name>.lock`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the write lock of ``path`` (an advisory ``flock`` on ``.<name>.lock``) for the block.

    A second process that asks for the same lock fails at once; the same process may nest
    locks of one path (a command that locks its output folder for the whole run, then saves).

    Raises:
        FolderBusyError: another process holds the lock (the message names the folder).
    """
    lock = lock_path(path)
    key = (os.getpid(), str(lock.resolve()) if lock.parent.exists() else str(lock.absolute()))
    if fcntl is None:
        yield
        return
    if key in _HELD_LOCKS:
        fd, count = _HELD_LOCKS[key]
        _HELD_LOCKS[key] = (fd, count + 1)
        try:
            yield
        finally:
            fd, count = _HELD_LOCKS[key]
            _HELD_LOCKS[key] = (fd, count - 1)
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(lock, path)
    _HELD_LOCKS[key] = (fd, 1)
    try:
        yield
    finally:
        if _HELD_LOCKS[key][1] <= 1:
            del _HELD_LOCKS[key]
            # Unlink before unlocking: a process that opened the old file then finds it gone and retries.
            lock.unlink(missing_ok=True)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        else:
            fd, count = _HELD_LOCKS[key]
            _HELD_LOCKS[key] = (fd, count - 1)


def _acquire(lock: Path, path: Path) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, _default_mode(directory=False))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderBusyError(
                errno.EBUSY, f"{path}: another kronlm process is writing this folder (lock {lock}); wait for it or write elsewhere"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        # The holder removed the file between our open and our lock: lock the new one instead.
        os.close(fd)


def remove_stale_locks(folder: str | os.PathLike, pattern: str = ".*.lock") -> list[Path]:
    """Delete lock files under ``folder`` that no live process holds (left by a killed writer).

    Returns:
        The lock files removed.
    """
    removed = []
    if fcntl is None:
        return removed
    for lock in Path(folder).glob(pattern):
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        lock.unlink(missing_ok=True)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        removed.append(lock)
    return removed


# mkstemp / mkdtemp name temporaries ".<target>.<8 random characters>.tmp".
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]{8}\.tmp$")
_PREVIOUS = re.compile(r"^\.(?P<target>.+)\.old$")


def clean_interrupted_writes(folder: str | os.PathLike, names: tuple[str, ...] | None = None) -> list[Path]:
    """Remove what killed writers left in ``folder``: temporaries of :func:`atomic_path` /
    :func:`atomic_dir` (``.<name>.XXXXXXXX.tmp``), stale lock files, and the ``.<name>.old``
    folder of an interrupted two-rename swap (put back as ``<name>`` when nothing is there, else
    deleted).

    A temporary is removed only while its target's lock (:func:`folder_lock`) can be taken, so
    a live writer's work in progress is left alone.

    Args:
        folder: the folder to clean (not recursive).
        names: only the temporaries of these targets (None: of every target).

    Returns:
        The paths removed or put back.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    done: list[Path] = []
    for entry in sorted(folder.iterdir()):
        match = _TEMPORARY.match(entry.name) or _PREVIOUS.match(entry.name)
        if match is None or (names is not None and match.group("target") not in names):
            continue
        target = folder / match.group("target")
        try:
            with folder_lock(target):
                if entry.name.endswith(".old") and entry.is_dir() and not target.exists():
                    os.replace(entry, target)
                elif entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink(missing_ok=True)
        except FolderBusyError:
            continue
        done.append(entry)
    done += remove_stale_locks(folder)
    return done


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
        raise _with_errno(NotADirectoryError(f"{path}: {parent} is a file, not a folder; cannot write below it"), errno.ENOTDIR)
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise _with_errno(PermissionError(f"{path} is not writable (no write permission on {parent})"), errno.EACCES)


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
        _clean_exchanged_links(path)
    path = follow_link(path)
    checks = [(path, output_conflict(path, inputs, holding_ok=kind == "run"))]
    checks += [(path / entry, output_conflict(path / entry, inputs, folder=False)) for entry in replaced]
    for where, conflict in checks:
        if conflict is not None:
            raise OutputRefused(f"{where}: {conflict}; refusing to write there (the output must be a separate folder)")
    if not os.path.lexists(path):
        _check_creatable(path)
        return path
    special = special_file_kind(path)
    if special is not None:
        raise OutputRefused(f"{path}: is {special}, not a folder; refusing to write there")
    if not path.is_dir():
        raise OutputRefused(f"{path}: exists and is a file, not a folder; refusing to replace it")
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
    conflict = output_conflict(path, inputs, folder=False)
    if conflict is not None:
        raise OutputRefused(f"{path}: {conflict}; refusing to write there (the output must be a separate file)")
    if not os.path.lexists(path):
        _check_creatable(path)
        return path
    special = special_file_kind(path)
    if special is not None:
        raise OutputRefused(f"{path}: is {special}, not a regular file; refusing to write there")
    if path.is_dir():
        raise OutputRefused(f"{path}: is a folder, not a file; refusing to replace it")
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


def _previous_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover_interrupted_swap(path: str | os.PathLike) -> bool:
    """Put back a folder that a crash left at ``.<name>.old`` with nothing at ``path``.

    Only the fallback swap (two renames, for file systems without ``RENAME_EXCHANGE``) can leave
    that state. Returns True when a folder was put back.
    """
    path = Path(path)
    previous = _previous_path(path)
    if not path.exists() and previous.is_dir():
        os.replace(previous, path)
        return True
    return False


def _clean_stale_temporaries(path: Path) -> None:
    # Temporary folders of writers that were killed; safe to remove while holding the lock.
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        _remove(leftover)


def _clean_exchanged_links(link: Path) -> None:
    # Writers before symlinks were followed exchanged a temporary folder with the link itself and
    # left the link under the temporary's name: a symlink there is never a live writer's work.
    for leftover in link.parent.glob(f".{link.name}.*.tmp"):
        if leftover.is_symlink() and _TEMPORARY.match(leftover.name):
            leftover.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    # A symlink (an exchange with a symlinked destination once left one) is removed, never followed.
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _share_like_new_files(folder: Path) -> None:
    # Some writers (transformers 5's shard writer, mkstemp) leave private 0600 files; the folder
    # gets the permissions any new file of this user would, so a saved model can be shared.
    os.chmod(folder, _default_mode(directory=True))
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), _default_mode(directory=True))
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, _default_mode(directory=False))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success, swap it in as ``path``.

    Used for multi-file artefacts (a saved model, a checkpoint folder). While the block runs the
    writer holds ``path``'s lock (:func:`folder_lock`). At the end the new folder and an existing
    old one are exchanged in one atomic call and the old one removed; where the file system cannot
    exchange, the old folder is renamed aside, the new one renamed in, then the old one removed
    (a crash between those two renames is undone by :func:`recover_interrupted_swap` on the next
    write). Either way the path holds the old or the new folder at every instant a reader (or a
    crash) can see. A block that raises leaves ``path`` untouched and removes the temporary folder.
    A symlink at ``path`` is followed: the folder it points to is replaced and the link kept.

    Args:
        path: the folder to write.
        expected_bytes: about how many bytes the folder will hold (named when the disk fills up).

    Raises:
        FileExistsError: ``path`` exists and is not a folder (it is never replaced).
        FolderBusyError: another process is writing ``path``.
        StorageFullError: the disk, the quota or the file-size limit ran out (one line naming
            ``path`` and the bytes; the old folder stays).
        OSError: the folder cannot be written.
    """
    if Path(path).is_symlink():
        _clean_exchanged_links(Path(path))
    path = follow_link(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path}: exists and is not a folder; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(path):
        recover_interrupted_swap(path)
        _clean_stale_temporaries(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            try:
                yield tmp
                _share_like_new_files(tmp)
            except Exception as exc:
                code = _storage_failure(exc)
                if code is None:
                    raise
                raise storage_error(path, code, written=_bytes_under(tmp), expected_bytes=expected_bytes) from exc
            if not path.exists():
                os.replace(tmp, path)
            elif exchange_paths(tmp, path):
                shutil.rmtree(tmp)  # now the old folder
            else:
                previous = _previous_path(path)
                if previous.exists():
                    shutil.rmtree(previous)
                os.replace(path, previous)
                os.replace(tmp, path)
                shutil.rmtree(previous)
        finally:
            if os.path.lexists(tmp):
                _remove(tmp)


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (integrity checks of caches and checkpoints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()
