"""The structural plan of a compressed model: which module is which Kronecker module.

The plan is stored as plain JSON under ``kronlm`` in the model's ``config.json``; the Kronecker
model classes (:mod:`kronlm.modeling.registry`) rebuild the compressed architecture from it, with
uninitialised factors, before ``from_pretrained`` fills in the weights. It is derived from the
compressed model itself (:meth:`KroneckerPlan.from_model`), so it cannot disagree with it.

JSON layout (version 1, unchanged since the first release)::

    {"version": 1,
     "modules": {"model.layers.0.mlp.up_proj": {"kind": "linear", "out": 1536, "in": 576,
                 "a_shape": [768, 576], "b_shape": [2, 1], "rank": 1, "bias": false,
                 "learnable_scales": false, "init": "van_loan", "padding_idx": null},
                 "model.layers.0.mlp.gate_proj": {"kind": "kronecker_lowrank", ..., "lowrank": 64}, ...},
     "lm_head": {"module": "lm_head", "mode": "tied", "embedding": "model.embed_tokens", "bias": false} | null,
     "compression": {... the CompressionConfig ...}}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from kronlm.compression.config import LM_HEAD_MODES
from kronlm.compression.report import CompressionReport
from kronlm.compression.surgery import set_module
from kronlm.layers import (
    KroneckerEmbedding,
    KroneckerLinear,
    KroneckerLowRankLinear,
    KroneckerTiedLMHead,
    dense_weight,
)

PLAN_VERSION = 1
MODULE_KINDS = ("linear", "embedding", "kronecker_lowrank")
# Module classes a plan entry describes (KroneckerTiedLMHead is recorded under lm_head instead).
PLANNED_MODULES = (KroneckerLinear, KroneckerLowRankLinear, KroneckerEmbedding)
# A compressed model's config is the base config with model_type "kronecker_<base type>".
PREFIX = "kronecker_"


def base_model_type(model_type: str) -> str:
    """``kronecker_llama`` -> ``llama``; other types unchanged."""
    return model_type.removeprefix(PREFIX)


def _shape(value: Any, what: str) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ValueError(f"{what} must be two positive integers, got {value!r}")
    return int(value[0]), int(value[1])


def _int(value: Any, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class ModulePlan:
    """One Kronecker module of a compressed model.

    Attributes:
        kind: "linear" (``KroneckerLinear``), "embedding" (``KroneckerEmbedding``) or
            "kronecker_lowrank" (``KroneckerLowRankLinear``: Σ_r A_r ⊗ B_r + U V).
        out_features, in_features: the dense shape (out, in), or (vocab, dim) for an embedding.
        a_shape, b_shape: factor shapes (rows, cols).
        rank: number of terms R.
        bias: the layer has a bias (linear only).
        learnable_scales: Krony-PT's per-term scalars (linear only).
        init: the initialiser that produced the factors (informative), or None.
        padding_idx: the embedding's padding index, or None.
        lowrank: rank k of the low-rank part U (out, k) V (k, in) ("kronecker_lowrank" only, else 0).
    """

    kind: str
    out_features: int
    in_features: int
    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    rank: int = 1
    bias: bool = False
    learnable_scales: bool = False
    init: str | None = None
    padding_idx: int | None = None
    lowrank: int = 0

    @classmethod
    def from_module(cls, module: nn.Module, init: str | None = None) -> ModulePlan:
        """The plan of an existing Kronecker module.

        Raises:
            TypeError: ``module`` is not a ``KroneckerLinear`` / ``KroneckerLowRankLinear`` /
                ``KroneckerEmbedding``.
        """
        if isinstance(module, KroneckerLowRankLinear):
            return cls("kronecker_lowrank", module.out_features, module.in_features, module.a_shape, module.b_shape, module.rank,
                       module.bias is not None, False, init, None, module.lowrank)
        if isinstance(module, KroneckerLinear):
            return cls("linear", module.out_features, module.in_features, module.a_shape, module.b_shape, module.rank,
                       module.bias is not None, module.learnable_scales, init)
        if isinstance(module, KroneckerEmbedding):
            return cls("embedding", module.num_embeddings, module.embedding_dim, module.a_shape, module.b_shape,
                       module.rank, False, False, init, module.padding_idx)
        raise TypeError(f"no module plan for a {type(module).__name__}")

    def build(self, device=None, dtype=None) -> nn.Module:
        """An uninitialised Kronecker module of this plan (factors to be loaded)."""
        if self.kind == "kronecker_lowrank":
            return KroneckerLowRankLinear(self.in_features, self.out_features, self.a_shape, self.b_shape, self.rank, self.lowrank,
                                          bias=self.bias, device=device, dtype=dtype)
        if self.kind == "embedding":
            return KroneckerEmbedding(self.out_features, self.in_features, self.a_shape, self.b_shape, self.rank,
                                      padding_idx=self.padding_idx, device=device, dtype=dtype)
        return KroneckerLinear(self.in_features, self.out_features, self.a_shape, self.b_shape, self.rank,
                               bias=self.bias, learnable_scales=self.learnable_scales, device=device, dtype=dtype)

    def to_dict(self) -> dict[str, Any]:
        """The JSON entry (keys ``out`` / ``in`` for the dense shape; ``lowrank`` only for the
        "kronecker_lowrank" kind, so entries of the other kinds are as before)."""
        out = {"kind": self.kind, "out": self.out_features, "in": self.in_features, "a_shape": list(self.a_shape),
               "b_shape": list(self.b_shape), "rank": self.rank, "bias": self.bias,
               "learnable_scales": self.learnable_scales, "init": self.init, "padding_idx": self.padding_idx}
        if self.kind == "kronecker_lowrank":
            out["lowrank"] = self.lowrank
        return out

    @classmethod
    def from_dict(cls, data: Any, name: str = "module") -> ModulePlan:
        """Read a JSON entry.

        Raises:
            ValueError: not a mapping, a missing key, or a value of the wrong type or range (the
                message names the module and the key).
        """
        if not isinstance(data, dict):
            raise ValueError(f"kronlm plan entry {name!r} must be a mapping, got {type(data).__name__}")
        try:
            kind = data["kind"]
            if kind not in MODULE_KINDS:
                raise ValueError(f"kind must be one of {', '.join(MODULE_KINDS)}, got {kind!r}")
            padding = data.get("padding_idx")
            return cls(
                kind=kind,
                out_features=_int(data["out"], "out"),
                in_features=_int(data["in"], "in"),
                a_shape=_shape(data["a_shape"], "a_shape"),
                b_shape=_shape(data["b_shape"], "b_shape"),
                rank=_int(data.get("rank", 1), "rank"),
                bias=bool(data.get("bias", False)),
                learnable_scales=bool(data.get("learnable_scales", False)),
                init=data.get("init"),
                padding_idx=None if padding is None else _int(padding, "padding_idx", 0),
                lowrank=_int(data["lowrank"], "lowrank") if kind == "kronecker_lowrank" else 0,
            )
        except KeyError as exc:
            raise ValueError(f"kronlm plan entry {name!r} has no key {exc.args[0]!r}") from None
        except ValueError as exc:
            raise ValueError(f"kronlm plan entry {name!r}: {exc}") from None


@dataclass(frozen=True)
class LMHeadPlan:
    """What happened to an LM head tied to a factored input embedding.

    Attributes:
        module: the head's module name.
        mode: "tied" (``KroneckerTiedLMHead`` reusing the embedding's factors) or "dense" (an
            untied dense copy of the pretrained embedding).
        embedding: the factored embedding's module name.
        bias: the head has a bias.
    """

    module: str
    mode: str
    embedding: str
    bias: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The JSON entry."""
        return {"module": self.module, "mode": self.mode, "embedding": self.embedding, "bias": self.bias}

    @classmethod
    def from_dict(cls, data: Any) -> LMHeadPlan:
        """Read the JSON entry.

        Raises:
            ValueError: not a mapping, a missing key or an unknown mode.
        """
        if not isinstance(data, dict):
            raise ValueError(f"kronlm plan: lm_head must be a mapping, got {type(data).__name__}")
        try:
            mode = data["mode"]
            if mode not in LM_HEAD_MODES:
                raise ValueError(f"kronlm plan: lm_head mode must be one of {', '.join(LM_HEAD_MODES)}, got {mode!r}")
            return cls(str(data["module"]), mode, str(data["embedding"]), bool(data.get("bias", False)))
        except KeyError as exc:
            raise ValueError(f"kronlm plan: lm_head has no key {exc.args[0]!r}") from None


@dataclass(frozen=True)
class KroneckerPlan:
    """Every Kronecker module of a compressed model, the LM head's fate and the config used.

    Attributes:
        modules: module name -> :class:`ModulePlan`, in model order.
        lm_head: :class:`LMHeadPlan` when a tied head followed a factored embedding, else None.
        compression: the ``CompressionConfig`` as a dict (informative), or None.
        version: format version, :data:`PLAN_VERSION`.
    """

    modules: dict[str, ModulePlan] = field(default_factory=dict)
    lm_head: LMHeadPlan | None = None
    compression: dict[str, Any] | None = None
    version: int = PLAN_VERSION

    @classmethod
    def from_model(cls, model: nn.Module, report: CompressionReport | None = None) -> KroneckerPlan:
        """The plan of a compressed model, read off its modules.

        Args:
            model: a model holding Kronecker modules.
            report: the ``compress`` report, for the initialiser names, the LM head mode and the
                compression config.
        """
        inits = {m.name: m.init for m in report.modules} if report is not None else {}
        modules = {
            name: ModulePlan.from_module(module, inits.get(name))
            for name, module in model.named_modules()
            if isinstance(module, PLANNED_MODULES)
        }
        lm_head = None
        embedding_names = {id(m): n for n, m in model.named_modules() if isinstance(m, KroneckerEmbedding)}
        for name, module in model.named_modules():
            if isinstance(module, KroneckerTiedLMHead):
                lm_head = LMHeadPlan(name, "tied", embedding_names[id(module.embedding)], module.bias is not None)
        if lm_head is None and report is not None and report.lm_head == "dense":
            head = model.get_output_embeddings()
            names = {id(m): n for n, m in model.named_modules()}
            embedding = model.get_input_embeddings()
            lm_head = LMHeadPlan(names[id(head)], "dense", names[id(embedding)], getattr(head, "bias", None) is not None)
        compression = report.config if report is not None else None
        return cls(modules=modules, lm_head=lm_head, compression=compression)

    def to_dict(self) -> dict[str, Any]:
        """The JSON stored under ``kronlm`` in ``config.json``."""
        return {"version": self.version, "modules": {n: p.to_dict() for n, p in self.modules.items()},
                "lm_head": None if self.lm_head is None else self.lm_head.to_dict(), "compression": self.compression}

    @classmethod
    def from_dict(cls, data: Any) -> KroneckerPlan:
        """Read the JSON stored under ``kronlm``.

        Raises:
            ValueError: not a mapping, an unsupported version, ``modules`` that is not a mapping
                of entries, or a bad entry (the message names it).
        """
        if not isinstance(data, dict):
            raise ValueError(f"kronlm plan must be a mapping, got {type(data).__name__}")
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"kronlm plan version {data.get('version')!r} is not supported (expected {PLAN_VERSION})")
        modules = data.get("modules")
        if not isinstance(modules, dict):
            raise ValueError(f"kronlm plan: modules must be a mapping of module names to entries, got {type(modules).__name__}")
        head = data.get("lm_head")
        compression = data.get("compression")
        if compression is not None and not isinstance(compression, dict):
            raise ValueError(f"kronlm plan: compression must be a mapping, got {type(compression).__name__}")
        return cls(
            modules={str(n): ModulePlan.from_dict(e, n) for n, e in modules.items()},
            lm_head=None if head is None else LMHeadPlan.from_dict(head),
            compression=compression,
        )

    def module_prefixes(self) -> tuple[str, ...]:
        """``"<name>."`` of every planned module, for checking that their tensors loaded."""
        return tuple(f"{name}." for name in self.modules)

    def apply(self, model: nn.Module) -> None:
        """Rebuild the compressed architecture inside ``model`` (factors uninitialised).

        Each planned module is replaced by an empty Kronecker module on the device and dtype of
        the dense module it replaces (the meta device while ``from_pretrained`` builds the model);
        a tied Kronecker LM head is re-attached to its embedding.

        Raises:
            ValueError: a planned module missing from the model, or a dense module whose shape
                differs from the plan's (the message names the module).
        """
        embeddings: dict[str, KroneckerEmbedding] = {}
        for name, entry in self.modules.items():
            resolved = resolve_module_name(model, name)
            if resolved is None:
                raise ValueError(f"kronlm plan names module {name!r}, which {type(model).__name__} does not have")
            old = model.get_submodule(resolved)
            if isinstance(old, PLANNED_MODULES):
                new = old
            else:
                weight = dense_weight(old)
                if tuple(weight.shape) != (entry.out_features, entry.in_features):
                    raise ValueError(
                        f"kronlm plan: module {name!r} has weight {tuple(weight.shape)} but the plan expects "
                        f"({entry.out_features}, {entry.in_features})"
                    )
                new = entry.build(device=weight.device, dtype=weight.dtype)
                set_module(model, resolved, new)
            if entry.kind == "embedding":
                embeddings[name] = new
        head = self.lm_head
        if head is not None and head.mode == "tied":
            if head.embedding not in embeddings:
                raise ValueError(f"kronlm plan: the tied LM head names embedding {head.embedding!r}, which the plan does not factor")
            resolved = resolve_module_name(model, head.module)
            if resolved is not None:  # a base model (no head) loaded from a causal-LM plan has none
                old = model.get_submodule(resolved)
                bias = getattr(old, "bias", None) if head.bias else None
                set_module(model, resolved, KroneckerTiedLMHead(embeddings[head.embedding], bias=bias))


def resolve_module_name(model: nn.Module, name: str) -> str | None:
    """Map a plan name onto ``model``, allowing for a base-model prefix present on one side only.

    A plan written for ``LlamaForCausalLM`` names ``model.layers.0.mlp.up_proj``; loaded into
    ``LlamaModel`` the same module is ``layers.0.mlp.up_proj`` (and the other way round).
    """
    names = dict(model.named_modules())
    if name in names:
        return name
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix:
        if name.startswith(prefix + ".") and name[len(prefix) + 1 :] in names:
            return name[len(prefix) + 1 :]
        if f"{prefix}.{name}" in names:
            return f"{prefix}.{name}"
    return None


__all__ = ["MODULE_KINDS", "PLANNED_MODULES", "PLAN_VERSION", "PREFIX", "KroneckerPlan", "LMHeadPlan", "ModulePlan", "base_model_type", "resolve_module_name"]
