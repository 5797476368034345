"""Atomic writes, folder locks and JSON helpers.

Every file kronlm writes (configs, safetensors, checkpoints) goes through a temporary file in the
same folder followed by ``os.replace``, so a crash never leaves a half-written file under the final
name: readers either see the old file or the complete new one. Multi-file artefacts (a saved
model, a checkpoint) are assembled in a temporary folder and exchanged with the old folder in one
atomic ``renameat2(RENAME_EXCHANGE)`` call, so at every instant the path holds either the old
or the new folder; writers to one path take a lock file and a second concurrent writer is refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not a Unix system: writers are not locked
    fcntl = None

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


class FolderBusyError(OSError):
    """Another process is writing the same folder (its lock file is held)."""


def _default_mode(directory: bool) -> int:
    # mkstemp / mkdtemp create private (0600 / 0700) entries; a saved model or checkpoint should get
    # the permissions any other new file of this user would, so it can be shared.
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success, rename it to ``path`` atomically.

    The caller writes the complete file to the yielded path. If the block raises, the temporary
    file is removed and ``path`` is left untouched.

    Raises:
        OSError: the folder is not writable.
    """
    path = Path(path)
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
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        ValueError: ``path`` is not UTF-8 text or not valid JSON (the message names it and the
            byte offset, or the line and column).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    text = read_text(path, what="JSON file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None


def read_text(path: str | os.PathLike, *, what: str = "text file") -> str:
    """Read a UTF-8 text file (a byte-order mark is dropped).

    Raises:
        FileNotFoundError: ``path`` does not exist (named).
        ValueError: the bytes are not UTF-8; the message names the file and the byte offset,
            e.g. ``config.json: not UTF-8 text at line 1 (byte 0xd0 at offset 9); save the JSON file as UTF-8``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
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


def check_output_folder(path: str | os.PathLike, *, overwrite: bool = False, marker: str = "config.json") -> Path:
    """Check that writing a folder at ``path`` destroys nothing kronlm did not write.

    Allowed: a path that does not exist, an empty folder, a folder holding ``marker`` (a model
    folder, which is replaced atomically), or anything but a file when ``overwrite``.

    Raises:
        FileExistsError: ``path`` is a file, or a non-empty folder without ``marker`` while
            ``overwrite`` is False (the message names it and what it holds).
    """
    path = Path(path)
    if not path.exists():
        return path
    if not path.is_dir():
        raise FileExistsError(f"{path}: exists and is a file, not a folder; refusing to replace it")
    entries = sorted(p.name for p in path.iterdir())
    if not entries or (path / marker).is_file() or overwrite:
        return path
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise FileExistsError(
        f"{path}: exists and is not a model folder (it holds {len(entries)} entries: {shown}); "
        "refusing to replace it (pass --overwrite / overwrite=True to replace it anyway)"
    )


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
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


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
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success, swap it in as ``path``.

    Used for multi-file artefacts (a saved model, a checkpoint folder). While the block runs the
    writer holds ``path``'s lock (:func:`folder_lock`). At the end the new folder and an existing
    old one are exchanged in one atomic call and the old one removed; where the file system cannot
    exchange, the old folder is renamed aside, the new one renamed in, then the old one removed
    (a crash between those two renames is undone by :func:`recover_interrupted_swap` on the next
    write). Either way the path holds the old or the new folder at every instant a reader (or a
    crash) can see. A block that raises leaves ``path`` untouched and removes the temporary folder.

    Raises:
        FileExistsError: ``path`` exists and is not a folder (it is never replaced).
        FolderBusyError: another process is writing ``path``.
        OSError: the folder cannot be written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path}: exists and is not a folder; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(path):
        recover_interrupted_swap(path)
        _clean_stale_temporaries(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            yield tmp
            _share_like_new_files(tmp)
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
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (integrity checks of caches and checkpoints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()
