"""One base class for kronlm's settings files: compression, training and fine-tuning configs.

A config is a dataclass whose fields are plain JSON/YAML values (numbers, strings, lists, dicts,
nested configs). :class:`ConfigBase` gives every such dataclass the same round trip
(``from_dict`` / ``to_dict``, ``from_file`` / ``to_file`` in YAML or JSON, ``replace``) and the
same errors: an unknown key is named together with the file it came from, and a value out of
range is named by the subclass's ``validate``. The litgpt / peft habit: one file describes one
run, is stored verbatim beside its results, and reads back into the same object.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from typing_extensions import Self

from kronlm.utils.atomic import atomic_path
from kronlm.utils.files import special_file_kind

C = TypeVar("C", bound="ConfigBase")

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def read_config_file(path: str | os.PathLike, what: str = "config") -> dict[str, Any]:
    """Parse a ``.yaml`` / ``.yml`` / ``.json`` file into a dict (an empty file gives ``{}``).

    Raises:
        FileNotFoundError: no such file (named).
        ValueError: a device or FIFO, another suffix, unparsable or too deeply nested text, or a
            top level that is not a mapping (the message names the file).
    """
    path = Path(path)
    special = special_file_kind(path)
    if special is not None:
        raise ValueError(f"{what} {path}: is {special}, not a regular file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: file not found")
    if path.suffix not in CONFIG_SUFFIXES:
        raise ValueError(f"{what} {path}: must end in {', '.join(CONFIG_SUFFIXES)}")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{what} {path}: cannot parse ({first})") from None
    except RecursionError:
        raise ValueError(f"{what} {path}: nested too deeply to parse") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


class ConfigBase:
    """Mixin for dataclass configs: dict/file round trips with named errors.

    Subclasses are ``@dataclass``es; they may override :meth:`validate` (called after
    construction, raising ``ValueError`` that names the key and the value) and
    :meth:`_from_plain` (to turn nested dicts into nested configs). ``config_name`` is the
    phrase used in messages ("training config"). ``renamed_keys`` maps a key of earlier versions
    to the field that replaced it, so files and saved models written before a rename still read;
    a mapping holding both the old and the new key is refused.
    """

    config_name = "config"
    renamed_keys: dict[str, str] = {}

    def __post_init__(self) -> None:
        try:
            self.validate()
        except ValueError as exc:
            message = str(exc)
            if message.startswith(self.config_name):
                raise
            raise ValueError(f"{self.config_name}: {message}") from None

    def validate(self) -> None:
        """Check every value; raise ``ValueError`` naming the first bad key. Default: nothing."""

    @classmethod
    def field_names(cls) -> list[str]:
        """The dataclass field names, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def check_keys(cls, data: dict[str, Any], source: str) -> None:
        """Raise ``ValueError`` naming every key of ``data`` that is not a field, and ``source``."""
        known = cls.field_names()
        unknown = sorted(set(data) - set(known))
        if unknown:
            plural = "s" if len(unknown) > 1 else ""
            raise ValueError(
                f"{source}: unknown key{plural} {', '.join(map(str, unknown))} (valid keys: {', '.join(known)})"
            )

    @classmethod
    def from_dict(cls, data: Any, *, source: str | None = None) -> Self:
        """Build from a dict (as read from YAML/JSON).

        Args:
            data: the mapping of field names to values.
            source: where it came from (a file name, "command line"); named in errors.

        Raises:
            ValueError: ``data`` is not a mapping, has unknown keys (all named), or holds a value
                that ``validate`` refuses; the message starts with ``source``.
        """
        source = source or cls.config_name
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
        data = cls.rename_old_keys(data, source)
        cls.check_keys(data, source)
        try:
            return cls(**cls._from_plain(dict(data), source))
        except (TypeError, ValueError) as exc:
            message = str(exc)
            if message.startswith(source):
                raise ValueError(message) from None
            own = f"{cls.config_name}: "
            message = message.removeprefix(own)
            raise ValueError(f"{source}: {message}") from None

    @classmethod
    def rename_old_keys(cls, data: dict[str, Any], source: str) -> dict[str, Any]:
        """``data`` with every key of ``renamed_keys`` replaced by its new name.

        Raises:
            ValueError: ``data`` holds both a key and the one that replaced it (both named).
        """
        out = dict(data)
        for old, new in cls.renamed_keys.items():
            if old in out:
                if new in out:
                    raise ValueError(f"{source}: give {new} only ({old} is its earlier name)")
                out[new] = out.pop(old)
        return out

    @classmethod
    def _from_plain(cls, data: dict[str, Any], source: str) -> dict[str, Any]:
        """Hook: convert nested plain values (lists of dicts) into nested configs."""
        return data

    @classmethod
    def from_file(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> Self:
        """Read a YAML or JSON file; ``overrides`` (e.g. command-line flags) replace its values.

        Overrides are applied before validation, so a file that is consistent only together with
        them (a warm-up below an overridden step count) is accepted.

        Raises:
            FileNotFoundError: no such file.
            ValueError: unknown suffix, unparsable text, unknown keys or bad values (the message
                names the file).
        """
        data = merge_settings(read_config_file(path, cls.config_name), overrides or {})
        return cls.from_dict(data, source=f"{cls.config_name} {path}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready dict (tuples become lists, nested configs dicts)."""
        return _plain(dataclasses.asdict(self))

    def to_file(self, path: str | os.PathLike) -> Path:
        """Write atomically as YAML (``.yaml``/``.yml``) or JSON (any other suffix); returns the path."""
        path = Path(path)
        data = self.to_dict()
        with atomic_path(path) as tmp:
            if path.suffix in (".yaml", ".yml"):
                tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
            else:
                tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        return path

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed, validated again.

        Raises:
            ValueError: an unknown field name or a bad value.
        """
        return type(self).from_dict({**self.to_dict(), **changes}, source=f"{self.config_name} override")


def merge_settings(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied; a nested mapping is merged key by key, not replaced."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_settings(out[key], value)
        else:
            out[key] = value
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


__all__ = ["CONFIG_SUFFIXES", "ConfigBase", "merge_settings", "read_config_file"]
