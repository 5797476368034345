"""Atomic writes, folder exchange and write locks.

Every file kronlm writes (configs, safetensors, checkpoints) goes through a temporary file in the
same folder followed by ``os.replace``, so a crash never leaves a half-written file under the final
name: readers either see the old file or the complete new one. Multi-file artefacts (a saved
model, a checkpoint) are assembled in a temporary folder and exchanged with the old folder in one
atomic ``renameat2(RENAME_EXCHANGE)`` call, so at every instant the path holds either the old
or the new folder; writers to one path take a lock file and a second concurrent writer is refused.
A write that runs out of disk space or into the file-size limit (``ulimit -f``) fails with one
line naming the path and the bytes, and leaves the previous contents in place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kronlm.utils.files import with_errno, follow_link

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


class FolderBusyError(OSError):
    """Another process is writing the same folder (its lock file is held)."""


class StorageFullError(OSError):
    """A write ran out of disk space, quota or the file-size limit; the message names the path and
    the bytes, and the previous contents of the path are unchanged."""


def _default_mode(directory: bool) -> int:
    # mkstemp / mkdtemp create private (0600 / 0700) entries; a saved model or checkpoint should get
    # the permissions any other new file of this user would, so it can be shared.
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


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
    return with_errno(StorageFullError(f"{target}: cannot write it: {why}; {kept}"), code)


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


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


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


def clean_exchanged_links(link: Path) -> None:
    """Remove the symlinks an older kronlm left beside ``link`` under a temporary's name."""
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
        clean_exchanged_links(Path(path))
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
