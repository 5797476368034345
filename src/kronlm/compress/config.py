"""Compression configs: which modules become Kronecker modules, with which factors and init.

A config is a list of ``KroneckerTarget`` rules, serialised to JSON or YAML. Module names are
matched with patterns where ``*`` stands for one name component (``transformer.h.*.mlp.c_fc``),
``**`` for any number of them (``**.attention.self.query``), and a ``re:`` prefix gives a raw
regular expression matched against the whole name. The first target that matches a module wins.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LM_HEAD_MODES = ("tied", "dense")


def _pattern_regex(pattern: str) -> re.Pattern:
    if pattern.startswith("re:"):
        return re.compile(pattern[3:])
    out, i = "", 0
    if pattern.startswith("**."):
        out, i = r"(?:.*\.)?", 3
    while i < len(pattern):
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + r"[^.]*", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(module_name: str) -> int | None:
    """The block index in a module name: its first all-digit component (``h.3.mlp`` -> 3)."""
    match = _LAYER_INDEX.search(module_name)
    return int(match.group(1)) if match else None


def _pair(value, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
        raise ValueError(f"{what} must be two positive integers (rows, cols), got {value!r}")
    return (int(value[0]), int(value[1]))


@dataclass
class KroneckerTarget:
    """One rule of a compression config.

    Attributes:
        modules: name patterns (see the module docstring) of ``nn.Linear``, ``Conv1D`` or
            ``nn.Embedding`` modules.
        a_shape: (m1, n1) of every A_r, in the ``nn.Linear`` (out, in) orientation; for an
            embedding (vocab, dim) orientation. Derived from ``b_shape`` when omitted.
        b_shape: (m2, n2) of every B_r; an embedding factored "by n" has b_shape (1, n).
        rank: number of Kronecker terms R.
        compression_ratio: instead of shapes, pick per module the shapes that compress it at least
            this many times (``kronlm.decompose.choose_factor_shapes``).
        layers: only modules whose block index (first numeric name component) is listed.
        init: registered initialiser (``van_loan``, ``van_loan_rescaled``, ``pruning``, ``random``).
        learnable_scales: add Krony-PT's learnable per-term scalars s_r.
    """

    modules: list[str]
    a_shape: tuple[int, int] | None = None
    b_shape: tuple[int, int] | None = None
    rank: int = 1
    compression_ratio: float | None = None
    layers: list[int] | None = None
    init: str = "van_loan"
    learnable_scales: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.modules, str):
            self.modules = [self.modules]
        if not self.modules:
            raise ValueError("a Kronecker target needs at least one module pattern")
        self.a_shape = _pair(self.a_shape, f"a_shape of target {self.modules}")
        self.b_shape = _pair(self.b_shape, f"b_shape of target {self.modules}")
        if self.a_shape is None and self.b_shape is None and self.compression_ratio is None:
            raise ValueError(f"target {self.modules}: give a_shape, b_shape or compression_ratio")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"target {self.modules}: rank must be a positive integer, got {self.rank!r}")
        if self.compression_ratio is not None and self.compression_ratio <= 1:
            raise ValueError(f"target {self.modules}: compression_ratio must be > 1, got {self.compression_ratio}")
        if self.layers is not None:
            self.layers = [int(i) for i in self.layers]
        self._regexes = [_pattern_regex(p) for p in self.modules]

    def matches(self, module_name: str) -> bool:
        """True when ``module_name`` matches a pattern and, if ``layers`` is set, its block index."""
        if not any(rx.fullmatch(module_name) for rx in self._regexes):
            return False
        if self.layers is None:
            return True
        return layer_index(module_name) in self.layers

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-ready dict of the set fields (shapes as lists)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("a_shape", "b_shape"):
            if out[key] is not None:
                out[key] = list(out[key])
        return {k: v for k, v in out.items() if v is not None}


@dataclass
class CompressionConfig:
    """What ``kronlm.compress`` does to a model.

    Attributes:
        targets: the rules, first match wins.
        lm_head: when the input embedding is factored and the model ties its LM head to it:
            ``"tied"`` (the head reuses the Kronecker factors: no head parameters) or ``"dense"``
            (the head keeps the pretrained embedding as an untied dense matrix, as KnGPT2 does).
        svd: "auto", "exact" or "randomized" (see ``nearest_kronecker_product``).
        name: preset or experiment name (for reports).
        description: one line for humans.
    """

    targets: list[KroneckerTarget] = field(default_factory=list)
    lm_head: str = "tied"
    svd: str = "auto"
    name: str | None = None
    description: str | None = None

    def __post_init__(self) -> None:
        self.targets = [t if isinstance(t, KroneckerTarget) else KroneckerTarget(**_checked(t, KroneckerTarget)) for t in self.targets]
        if self.lm_head not in LM_HEAD_MODES:
            raise ValueError(f"lm_head must be one of {', '.join(LM_HEAD_MODES)}, got {self.lm_head!r}")
        if self.svd not in ("auto", "exact", "randomized"):
            raise ValueError(f"svd must be auto, exact or randomized, got {self.svd!r}")

    def target_for(self, module_name: str) -> KroneckerTarget | None:
        """The first target matching ``module_name``, or None."""
        for target in self.targets:
            if target.matches(module_name):
                return target
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-ready dict; ``CompressionConfig.from_dict`` inverts it."""
        out = {"targets": [t.to_dict() for t in self.targets], "lm_head": self.lm_head, "svd": self.svd}
        if self.name:
            out["name"] = self.name
        if self.description:
            out["description"] = self.description
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CompressionConfig":
        """Build from a dict (as read from JSON/YAML).

        Raises:
            ValueError: unknown keys (named) or invalid values.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a compression config must be a mapping, got {type(data).__name__}")
        return cls(**_checked(data, cls))

    @classmethod
    def from_file(cls, path: str | Path) -> "CompressionConfig":
        """Read a ``.json``, ``.yaml`` or ``.yml`` file.

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: it does not parse, or holds unknown keys / invalid values (message names the file).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"compression config {path}: file not found")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ValueError(f"compression config {path}: cannot parse ({str(exc).splitlines()[0]})") from None
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"compression config {path}: {exc}") from None

    def save(self, path: str | Path) -> None:
        """Write as JSON (``.json``) or YAML (other suffixes), atomically."""
        from kronlm.utils.io import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            data = self.to_dict()
            tmp.write_text(json.dumps(data, indent=2) + "\n" if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False))


def _checked(data: dict[str, Any], cls) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys: {sorted(known)}")
    return data
