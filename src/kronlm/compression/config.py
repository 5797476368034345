"""Compression configs: which modules become Kronecker modules, with which factors and init.

A config is a list of ``KroneckerTarget`` rules, serialised to JSON or YAML. Module names are
matched with patterns where ``*`` stands for one name component (``transformer.h.*.mlp.c_fc``),
``**`` for any number of them (``**.attention.self.query``), and a ``re:`` prefix gives a raw
regular expression matched against the whole name. The first target that matches a module wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from kronlm.decompose.initializers import INITIALIZERS
from kronlm.decompose.vanloan import SVD_METHODS
from kronlm.utils.config import ConfigBase

LM_HEAD_MODES = ("tied", "dense")
# Initialisers a Kronecker + low-rank target accepts: the weighted joint fit and the Frobenius one.
LOWRANK_INITS = ("activation_aware", "van_loan")


def pattern_regex(pattern: str) -> re.Pattern:
    """The compiled regular expression of a module-name pattern (see the module docstring).

    Raises:
        ValueError: a ``re:`` pattern that is not a valid regular expression (names the pattern).
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"a module pattern must be a non-empty string, got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:])
        except re.error as exc:
            raise ValueError(f"module pattern {pattern!r} is not a valid regular expression ({exc})") from None
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
class KroneckerTarget(ConfigBase):
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
        init: registered initialiser (``van_loan``, ``van_loan_rescaled``, ``pruning``, ``random``,
            ``activation_aware``).
        learnable_scales: add Krony-PT's learnable per-term scalars s_r.
        lowrank_rank: rank k of a low-rank part U (out, k) V (k, in) added to the Kronecker sum
            (``KroneckerLowRankLinear``, linear layers only); 0 (the default) for none. The fit
            is joint (``kronlm.decompose.lowrank``): under the input covariance with
            ``init="activation_aware"``, in the Frobenius norm with ``init="van_loan"``. Files
            and saved models written before the rename call it ``lowrank``; that key still reads.

    Raises:
        ValueError: no pattern, an invalid pattern, shapes that are not two positive integers,
            neither shapes nor a ratio, a rank below 1, a ratio not above 1, an unknown init, a
            negative ``lowrank_rank``, or a low-rank part with learnable scalars or an init other than
            ``activation_aware`` / ``van_loan``.
    """

    config_name = "compression target"
    renamed_keys = {"lowrank": "lowrank_rank"}

    modules: list[str]
    a_shape: tuple[int, int] | None = None
    b_shape: tuple[int, int] | None = None
    rank: int = 1
    compression_ratio: float | None = None
    layers: list[int] | None = None
    init: str = "van_loan"
    learnable_scales: bool = False
    lowrank_rank: int = 0

    def validate(self) -> None:
        """Normalise the fields and check them (see the class docstring)."""
        if isinstance(self.modules, str):
            self.modules = [self.modules]
        if not isinstance(self.modules, (list, tuple)) or not self.modules:
            raise ValueError(f"a Kronecker target needs a list of module patterns, got {self.modules!r}")
        self.modules = list(self.modules)
        self.a_shape = _pair(self.a_shape, f"a_shape of target {self.modules}")
        self.b_shape = _pair(self.b_shape, f"b_shape of target {self.modules}")
        if self.a_shape is None and self.b_shape is None and self.compression_ratio is None:
            raise ValueError(f"target {self.modules}: give a_shape, b_shape or compression_ratio")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"target {self.modules}: rank must be a positive integer, got {self.rank!r}")
        if self.compression_ratio is not None and not (
            isinstance(self.compression_ratio, (int, float)) and self.compression_ratio > 1
        ):
            raise ValueError(f"target {self.modules}: compression_ratio must be a number > 1, got {self.compression_ratio!r}")
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers):
                raise ValueError(f"target {self.modules}: layers must list non-negative block indices, got {self.layers!r}")
            self.layers = [int(i) for i in self.layers]
        if self.init not in INITIALIZERS:
            raise ValueError(f"target {self.modules}: unknown initialiser {self.init!r}; registered: {', '.join(sorted(INITIALIZERS))}")
        rank_k = self.lowrank_rank
        if isinstance(rank_k, bool) or not isinstance(rank_k, int) or rank_k < 0:
            raise ValueError(f"target {self.modules}: lowrank_rank must be an integer >= 0, got {rank_k!r}")
        if rank_k and self.init not in LOWRANK_INITS:
            raise ValueError(f"target {self.modules}: a low-rank part (lowrank_rank={rank_k}) is fitted by {' or '.join(LOWRANK_INITS)}, not {self.init!r}")
        if rank_k and self.learnable_scales:
            raise ValueError(f"target {self.modules}: learnable_scales is not supported with a low-rank part (lowrank_rank={rank_k})")
        self._regexes = [pattern_regex(p) for p in self.modules]

    def matches(self, module_name: str) -> bool:
        """True when ``module_name`` matches a pattern and, if ``layers`` is set, its block index."""
        if not any(rx.fullmatch(module_name) for rx in self._regexes):
            return False
        if self.layers is None:
            return True
        return layer_index(module_name) in self.layers

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-ready dict of the set fields (shapes as lists, unset fields and ``lowrank_rank`` 0 left out)."""
        return {k: v for k, v in super().to_dict().items() if v is not None and not (k == "lowrank_rank" and v == 0)}


@dataclass
class CompressionConfig(ConfigBase):
    """What ``kronlm.compress`` does to a model.

    Attributes:
        targets: the rules, first match wins.
        lm_head: when the input embedding is factored and the model ties its LM head to it:
            ``"tied"`` (the head reuses the Kronecker factors: no head parameters) or ``"dense"``
            (the head keeps the pretrained embedding as an untied dense matrix, as KnGPT2 does).
        svd_solver: how the SVD of the nearest Kronecker product is computed: "auto", "exact" or
            "randomized" (see ``nearest_kronecker_product``). Not the ``svd`` factor family of
            the budget; files written before the rename call it ``svd``, which still reads.
        name: preset or experiment name (for reports).
        description: one line for humans.

    Raises:
        ValueError: targets that are not a list of targets, an unknown ``lm_head`` or ``svd_solver``.
    """

    config_name = "compression config"
    renamed_keys = {"svd": "svd_solver"}

    targets: list[KroneckerTarget] = field(default_factory=list)
    lm_head: str = "tied"
    svd_solver: str = "auto"
    name: str | None = None
    description: str | None = None

    @classmethod
    def _from_plain(cls, data: dict[str, Any], source: str) -> dict[str, Any]:
        targets = data.get("targets", [])
        if not isinstance(targets, list):
            raise ValueError(f"{source}: targets must be a list of rules, got {type(targets).__name__}")
        data["targets"] = [
            t if isinstance(t, KroneckerTarget) else KroneckerTarget.from_dict(t, source=f"{source}, target {i}")
            for i, t in enumerate(targets)
        ]
        return data

    def validate(self) -> None:
        """Check the fields (see the class docstring)."""
        if not isinstance(self.targets, list) or not all(isinstance(t, KroneckerTarget) for t in self.targets):
            raise ValueError(f"targets must be a list of KroneckerTarget, got {self.targets!r}")
        if self.lm_head not in LM_HEAD_MODES:
            raise ValueError(f"lm_head must be one of {', '.join(LM_HEAD_MODES)}, got {self.lm_head!r}")
        if self.svd_solver not in SVD_METHODS:
            raise ValueError(f"svd_solver must be one of {', '.join(SVD_METHODS)}, got {self.svd_solver!r}")

    def target_for(self, module_name: str) -> KroneckerTarget | None:
        """The first target matching ``module_name``, or None."""
        for target in self.targets:
            if target.matches(module_name):
                return target
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-ready dict; ``CompressionConfig.from_dict`` inverts it."""
        out = {"targets": [t.to_dict() for t in self.targets], "lm_head": self.lm_head, "svd_solver": self.svd_solver}
        if self.name:
            out["name"] = self.name
        if self.description:
            out["description"] = self.description
        return out
