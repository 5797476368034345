"""AdamW parameter groups and the warm-up + cosine learning-rate schedule of a recovery run.

Krony-PT's optimiser (docs/method.md, "Recovery objectives"): AdamW with betas (0.9, 0.95) and weight decay 0.1, separate
groups (and optionally learning rates) for Kronecker factors and Krony-PT's per-term scalars, no
weight decay on biases, norm weights and scalars, and a linear warm-up followed by a cosine decay
to ``min_lr``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from kronlm.distill.config import TrainingConfig
from kronlm.layers import KRONECKER_MODULES

# The factors of a Kronecker module: its Kronecker terms, and the low-rank part of Kronecker + low
# rank (most of that layer's parameters: leaving it out would freeze it under freeze_uncompressed).
FACTOR_NAMES = ("A", "B", "U", "V")


def build_param_groups(model: nn.Module, config: TrainingConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups for ``model``.

    Groups (empty ones are left out), each with ``name``, ``params``, ``lr``, ``weight_decay``:

    - ``kronecker``: the factors of every Kronecker module: ``A`` (R, m1, n1) and ``B`` (R, m2, n2)
      of a ``KroneckerLinear`` / ``KroneckerEmbedding``, and of a ``KroneckerLowRankLinear`` also
      its low-rank part ``U`` (out, k) and ``V`` (k, in); ``lr_kronecker`` (default ``lr``),
      ``weight_decay``;
    - ``scalars``: Krony-PT's per-term ``scales`` (R,); ``lr_scalars`` (default ``lr``), no decay;
    - ``decay``: every other trainable tensor with 2 or more dimensions (weights, embeddings,
      LM head); ``lr``, ``weight_decay``;
    - ``no_decay``: every other trainable tensor with fewer than 2 dimensions (biases, LayerNorm /
      RMSNorm weights); ``lr``, no decay.

    With ``config.freeze_uncompressed`` every parameter outside the first two groups is set to
    ``requires_grad=False`` and left out. Tied parameters appear once.

    Raises:
        ValueError: ``freeze_uncompressed`` on a student without Kronecker layers, or no
            trainable parameter at all.
    """
    kronecker, scalars = set(), set()
    for module in model.modules():
        if isinstance(module, KRONECKER_MODULES):
            for name, param in module.named_parameters(recurse=False):
                if name in FACTOR_NAMES:
                    kronecker.add(id(param))
                elif name == "scales":
                    scalars.add(id(param))
    if config.freeze_uncompressed and not kronecker:
        raise ValueError("freeze_uncompressed is set, but the student has no Kronecker layers to train")
    buckets: dict[str, list[nn.Parameter]] = {"kronecker": [], "scalars": [], "decay": [], "no_decay": []}
    for _, param in model.named_parameters():
        if config.freeze_uncompressed and id(param) not in kronecker and id(param) not in scalars:
            param.requires_grad_(False)
            continue
        if not param.requires_grad:
            continue
        if id(param) in kronecker:
            buckets["kronecker"].append(param)
        elif id(param) in scalars:
            buckets["scalars"].append(param)
        elif param.ndim >= 2:
            buckets["decay"].append(param)
        else:
            buckets["no_decay"].append(param)
    settings = {
        "kronecker": (config.lr_kronecker or config.lr, config.weight_decay),
        "scalars": (config.lr_scalars or config.lr, 0.0),
        "decay": (config.lr, config.weight_decay),
        "no_decay": (config.lr, 0.0),
    }
    groups = [
        {"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
        for name, params in buckets.items()
        if params
    ]
    if not groups:
        raise ValueError("the student has no trainable parameters (all have requires_grad=False)")
    return groups


def build_optimizer(model: nn.Module, config: TrainingConfig) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay) over :func:`build_param_groups`, ``config.betas`` / ``eps``.

    Krony-PT's settings are the config defaults: betas (0.9, 0.95), weight decay 0.1.

    Raises:
        ValueError: as :func:`build_param_groups`.
    """
    return torch.optim.AdamW(
        build_param_groups(model, config), lr=config.lr, betas=tuple(config.betas), eps=config.eps
    )


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig, max_steps: int, *, completed_steps: int = 0):
    """Linear warm-up over ``warmup_steps``, then a half cosine down to ``min_lr / lr`` of each peak.

    The multiplier applied before optimizer step ``s`` (0-based) is ``s / warmup_steps`` during the
    warm-up and ``r + (1 - r) · ½(1 + cos(π (s - warmup) / (max_steps - warmup)))`` after it, with
    ``r = min_lr / lr`` (transformers' ``get_cosine_with_min_lr_schedule_with_warmup``).
    ``completed_steps`` > 0 positions the schedule after that many steps (the param groups must
    then carry ``initial_lr``, as a loaded optimizer state does).

    Raises:
        ValueError: ``warmup_steps`` is not smaller than ``max_steps``.
    """

    if config.warmup_steps >= max_steps:
        raise ValueError(f"warmup_steps ({config.warmup_steps}) must be smaller than max_steps ({max_steps})")
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, config.warmup_steps, max_steps, min_lr_rate=config.min_lr / config.lr,
        last_epoch=completed_steps - 1,
    )


def optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of every parameter of ``optimizer``, in the order of ``optimizer.state_dict()``.

    ``optimizer.state_dict()`` numbers parameters 0, 1, ... over its param groups in order; entry
    ``i`` of the result is the ``model.named_parameters()`` name of parameter ``i`` (the first
    name of a tied parameter). Call it on the unwrapped model, before any DDP / FSDP wrapping, so
    the names are the Hugging Face ones.

    Raises:
        ValueError: the optimizer holds a parameter that is not in ``model``.
    """
    names = {id(param): name for name, param in model.named_parameters()}
    out = []
    for g, group in enumerate(optimizer.param_groups):
        for i, param in enumerate(group["params"]):
            if id(param) not in names:
                raise ValueError(f"parameter {i} of optimizer group {g} ({group.get('name', '?')}) is not a parameter of the model")
            out.append(names[id(param)])
    return out


__all__ = ["build_optimizer", "build_param_groups", "build_scheduler", "optimizer_param_names"]
