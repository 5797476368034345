"""Reading files and paths safely: JSON and UTF-8 text helpers.

Readers take only regular files: a device, a FIFO or a socket is refused by name, because reading
one can block or never end (``/dev/zero``). A file that is not UTF-8 text or not valid JSON fails
with one line naming it and the line or byte where it went wrong. A symlink given as an output is
followed (:func:`follow_link`): the link's target is written, the link stays.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any


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
        raise with_errno(OSError(f"{path}: a symlink loop, leading to no file or folder"), errno.ELOOP)
    return target


def with_errno(exc: OSError, code: int) -> OSError:
    """``exc`` with ``errno`` set to ``code``, its message left as one plain line."""
    # OSError(code, message) would print as "[Errno 28] message"; the command line shows one
    # plain line, so the code is set after construction.
    exc.errno = code
    return exc


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


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (integrity checks of caches and checkpoints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()
