"""Accelerate set-up of a recovery run, and the full (unsharded) states of its student and optimizer.

A run is one process, DDP, or FSDP, as ``accelerate launch`` / ``torchrun`` / the
``Accelerator`` passed to :func:`kronlm.distill.trainer.train` decide. kronlm's checkpoints hold
full states in safetensors + JSON whatever the layout (:mod:`kronlm.distill.checkpoint`), so a
run can be resumed under another layout with the same number of processes (DDP <-> FSDP):

- without FSDP every process holds the whole student and optimizer; their ``state_dict()`` is
  the full state;
- under FSDP (Accelerate's plugin: FSDP2 ``fully_shard``, or FSDP1 with ``use_orig_params``)
  each process holds a shard. The full states are gathered on process 0 (in CPU memory) with
  ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` /
  ``get_optimizer_state_dict`` and loaded back with ``set_model_state_dict`` /
  ``set_optimizer_state_dict``, process 0 reading the checkpoint and broadcasting it
  (``broadcast_from_rank0``), so no other process holds a full copy.

The optimizer state is stored in ``torch.optim.Optimizer.state_dict()``'s layout (parameters
numbered 0, 1, ... over the param groups, in the order :func:`kronlm.distill.optim.build_param_groups`
gives); under FSDP it is converted from and to the parameter-name keys of
``torch.distributed.checkpoint``.

DeepSpeed is refused: its ZeRO engine owns the optimizer and writes its own checkpoint format.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from kronlm.distill.config import TrainingConfig


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (Intel AMX-BF16 tiles or AVX512-BF16).

    There a bf16 matrix product of SmolLM2's shapes runs 3.5x (AVX512-BF16) to 8x (AMX) faster
    than a float32 one, end-to-end distillation processes 1.56x more tokens per CPU-second, and
    the packaged recovery recipe reaches a lower perplexity in the same minutes
    (docs/recovery.md, "Precision"). Elsewhere bf16 is emulated, so ``auto`` keeps float32.
    """
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(capabilities.get("amx_bf16", False) or capabilities.get("avx512_bf16", False))


def resolve_mixed_precision(mode: str) -> str:
    """Map ``"auto"`` to ``"bf16"`` where bfloat16 autocast is faster, else ``"no"``.

    bf16 where the run's device is a CUDA device that supports it, or a CPU with hardware bf16
    matrix products (:func:`cpu_has_bf16_matmul`). Master weights, optimizer states and the
    losses (``kronlm.distill.losses`` upcasts) stay float32 either way.

    Raises:
        ValueError: ``mode`` is not one of "no", "bf16", "auto".
    """
    if mode == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "no"
        return "bf16" if cpu_has_bf16_matmul() else "no"
    if mode not in ("no", "bf16"):
        raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'auto', got {mode!r}")
    return mode


def make_accelerator(config: TrainingConfig, out_dir: str | os.PathLike):
    """The :class:`accelerate.Accelerator` a run of ``config`` uses.

    Gradient accumulation over ``config.grad_accum_steps`` micro-batches, mixed precision from
    :func:`resolve_mixed_precision`, TensorBoard logs under ``config.log_dir`` (default
    ``out_dir/logs``). FSDP and its settings come from ``accelerate launch --use_fsdp ...``
    (its ``FSDP_*`` environment variables). On a machine without an accelerator device, a
    multi-process launch (``WORLD_SIZE`` > 1, e.g. ``torchrun`` on CPU) runs as CPU DDP over
    gloo; accelerate would otherwise treat each process as a separate single-process run. Create
    it before loading data so ``accelerator.main_process_first()`` can order the tokenisation.

    Raises:
        ValueError: a process layout :func:`check_distributed_setup` refuses (checked here too,
            so a launch fails before it loads data), or ``ACCELERATE_*`` settings from
            ``accelerate launch`` that contradict the config (raised by accelerate).
    """

    if _deepspeed_requested():  # before accelerate, which would first ask to install DeepSpeed
        raise ValueError(_DEEPSPEED_REFUSAL)
    has_device = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    mixed_precision = resolve_mixed_precision(config.mixed_precision)
    if not multi_process:
        _forget_other_precision(mixed_precision)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.grad_accum_steps,
        mixed_precision=mixed_precision,
        log_with="tensorboard",
        project_dir=str(config.log_dir or Path(out_dir) / "logs"),
        cpu=multi_process and not has_device,
    )
    check_distributed_setup(accelerator)
    return accelerator


def _forget_other_precision(mixed_precision: str) -> None:
    """Let one process run trainings in different precisions one after the other.

    Accelerate keeps one process-wide ``AcceleratorState`` and refuses an ``Accelerator`` whose
    mixed precision differs from the first one's (a GLUE fine-tune in float32, then a recovery
    with ``auto`` = bf16 on an AMX CPU, in one Python session). In a single process nothing else
    depends on that state, so it is dropped and rebuilt; a multi-process launch keeps
    accelerate's refusal, since every process must agree.
    """
    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") not in (None, mixed_precision):
        AcceleratorState._reset_state()


_DEEPSPEED_REFUSAL = (
    "DeepSpeed is not supported (its ZeRO engine owns the optimizer and writes its own checkpoint format); "
    "shard with FSDP instead: accelerate launch --use_fsdp --fsdp_version 2 ..."
)


def _deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def is_sharded(accelerator) -> bool:
    """Whether the run shards the student over processes (Accelerate's FSDP plugin)."""

    return accelerator.distributed_type == DistributedType.FSDP


def check_distributed_setup(accelerator) -> None:
    """Refuse the process layouts kronlm cannot train and checkpoint correctly, before any work.

    Supported: one process, DDP (``MULTI_GPU`` / ``MULTI_CPU`` / ...), FSDP2, and FSDP1 with
    ``use_orig_params=True``.

    Raises:
        ValueError: DeepSpeed; FSDP1 without ``use_orig_params`` (the optimizer's parameter
            groups are built on the model's own parameters, which FSDP1 otherwise replaces by
            flat parameters); or ``accelerate launch --use_fsdp`` / ``--use_deepspeed`` on a
            machine where accelerate runs another layout (FSDP needs accelerator devices; on
            CPU accelerate silently runs DDP).
    """

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED or _deepspeed_requested():
        raise ValueError(_DEEPSPEED_REFUSAL)
    if kind == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        if plugin.fsdp_version == 1 and not plugin.use_orig_params:
            raise ValueError(
                "FSDP1 without use_orig_params is not supported (the optimizer's parameter groups would lose "
                "their parameters): use --fsdp_version 2, or --fsdp_use_orig_params true"
            )
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ValueError(
            f"FSDP was requested (accelerate launch --use_fsdp) but accelerate runs this as {kind.value}: "
            "FSDP needs GPUs (or other accelerator devices); on CPU launch without --use_fsdp (DDP)"
        )


def fill_from_process_0(accelerator, module: nn.Module, device: torch.device) -> bool:
    """Under FSDP, give every process process 0's weights where some process holds none.

    ``accelerate launch --use_fsdp`` turns on CPU-RAM-efficient loading by default, under which
    ``from_pretrained`` may leave a model's weights on the meta device on every process but 0.
    Where any process holds a parameter or buffer of ``module`` on the meta device, those
    processes allocate it on ``device`` (and re-tie tied weights), and process 0 broadcasts
    every parameter and buffer, by name, in the same order everywhere. Nothing happens without
    FSDP or when every process holds real weights.

    Returns:
        Whether the weights were broadcast.

    Raises:
        ValueError: process 0 itself holds weights on the meta device.
    """

    if not is_sharded(accelerator):
        return False
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    on_meta = any(t.is_meta for _, t in named)
    flags = accelerator.gather(torch.tensor([int(on_meta)], device=accelerator.device))
    if not flags.any():
        return False
    if flags[0]:
        raise ValueError(f"{type(module).__name__} has no weights on process 0 (its parameters are on the meta device)")
    if on_meta:
        module.to_empty(device=device)
        if hasattr(module, "tie_weights"):
            module.tie_weights()  # to_empty gives each name its own tensor
    for _, tensor in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        # Collectives run on the accelerator's device (NCCL takes no CPU tensors).
        staged = tensor.data.to(accelerator.device)
        dist.broadcast(staged, src=0)
        if staged is not tensor.data:
            tensor.data.copy_(staged)
    return True


def place_teacher(accelerator, teacher: nn.Module) -> None:
    """Freeze the teacher (eval mode, no gradients) and put it whole on this process's device.

    The teacher is never wrapped or sharded: under FSDP every process holds all of it, filled
    from process 0 where CPU-RAM-efficient loading left it on the meta device
    (:func:`fill_from_process_0`).

    Raises:
        ValueError: as :func:`fill_from_process_0`.
    """
    teacher.requires_grad_(False)
    teacher.eval()
    fill_from_process_0(accelerator, teacher, accelerator.device)
    teacher.to(accelerator.device)


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """``{alias: first name}`` for parameters reachable under several names (tied embeddings).

    GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``: the result is
    ``{"lm_head.weight": "transformer.wte.weight"}``. Call it on the unwrapped model.
    """
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def _gather_options(accelerator):

    # Full states gathered into the CPU memory of process 0 only; the others get empty dicts.
    # FSDP1 on a CPU device cannot: its "offload" then frees storage the gathered tensors still
    # use (a crash), so there every process gathers (only tests run FSDP on CPU).
    fsdp1_on_cpu = accelerator.device.type == "cpu" and accelerator.state.fsdp_plugin.fsdp_version == 1
    return StateDictOptions(full_state_dict=True, cpu_offload=not fsdp1_on_cpu)


def _load_options():

    # Process 0 broadcasts tensor by tensor, on the device; every process keeps its shard there.
    return StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)


def _raw_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    # accelerate's AcceleratedOptimizer skips steps while gradients accumulate; torch's state-dict
    # helpers may call step() (with zero learning rate) to create the state, which must happen.
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def gather_model_state(accelerator, model: nn.Module, aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    """The full state dict of the student; a collective under FSDP (every process must call it).

    Args:
        accelerator: the run's accelerator.
        model: the student as prepared by the accelerator.
        aliases: :func:`tied_aliases` of the unwrapped student; under FSDP each alias is made
            the same tensor as its first name again, so a checkpoint stores it once.

    Returns:
        name -> tensor (Hugging Face names, as ``unwrapped.state_dict()``). Under FSDP the tensors
        are on the CPU of process 0 and the other processes get an empty dict (FSDP1 on a CPU
        device: every process gets them).
    """
    if not is_sharded(accelerator):
        return accelerator.get_state_dict(model)

    state = get_model_state_dict(model, options=_gather_options(accelerator))
    for alias, name in aliases.items():
        if alias in state and name in state:
            state[alias] = state[name]
    return state


def gather_optimizer_state(accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, param_names: list[str]) -> dict[str, Any]:
    """The full optimizer state in ``torch.optim.Optimizer.state_dict()``'s layout.

    A collective under FSDP (every process must call it).

    Args:
        accelerator: the run's accelerator.
        model: the student as prepared by the accelerator.
        optimizer: its optimizer (prepared or not).
        param_names: :func:`kronlm.distill.optim.optimizer_param_names` of the unwrapped student
            (name of parameter ``i``).

    Returns:
        ``{"state": {i: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...]}`` with full
        (unsharded) tensors; under FSDP on the CPU of process 0, an empty dict elsewhere (FSDP1 on
        a CPU device: every process gets them).

    Raises:
        ValueError: under FSDP, the gathered state names a parameter missing from ``param_names``.
    """
    raw = _raw_optimizer(optimizer)
    if not is_sharded(accelerator):
        return raw.state_dict()

    by_name = get_optimizer_state_dict(model, raw, options=_gather_options(accelerator))
    if not by_name:
        return {}
    return _index_keyed(by_name, param_names)


def restore_model_state(accelerator, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full student state dict (strict) into the prepared student.

    Without FSDP every process passes the full state. Under FSDP process 0 passes it and the
    others pass an empty dict: process 0 broadcasts every tensor and each process keeps its shard.

    Raises:
        RuntimeError: missing or unexpected keys, or mismatched shapes (raised by torch).
    """
    if not is_sharded(accelerator):
        accelerator.unwrap_model(model).load_state_dict(state, strict=True)
        return

    set_model_state_dict(model, state if accelerator.is_main_process else {},
                         options=_load_options())


def restore_optimizer_state(accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                            param_names: list[str]) -> None:
    """Load a full optimizer state (``Optimizer.state_dict()`` layout) into the prepared optimizer.

    Without FSDP every process passes the full state; under FSDP process 0 passes it and the
    others an empty dict (broadcast from process 0, each process keeps its shard). Learning
    rates and the other param-group settings are restored as saved.

    Raises:
        ValueError: the state has another number of parameters or groups than the optimizer,
            or (under FSDP) a parameter index outside ``param_names``.
    """
    raw = _raw_optimizer(optimizer)
    if accelerator.is_main_process or not is_sharded(accelerator):
        saved = sum(len(group["params"]) for group in state["param_groups"])
        if len(state["param_groups"]) != len(raw.param_groups) or saved != len(param_names):
            raise ValueError(
                f"the checkpoint's optimizer has {len(state['param_groups'])} parameter groups with {saved} "
                f"parameters, the student's {len(raw.param_groups)} groups with {len(param_names)}"
            )
    if not is_sharded(accelerator):
        raw.load_state_dict(state)
        return

    by_name = _name_keyed(state, param_names) if accelerator.is_main_process else {}
    set_optimizer_state_dict(model, raw, by_name, options=_load_options())


def _index_keyed(state: dict[str, Any], param_names: list[str]) -> dict[str, Any]:
    """Parameter-name keys (``torch.distributed.checkpoint``) -> indices (``Optimizer.state_dict()``)."""
    index = {name: i for i, name in enumerate(param_names)}
    unknown = sorted(set(state["state"]) - set(index))
    for group in state["param_groups"]:
        unknown += [name for name in group["params"] if name not in index]
    if unknown:
        raise ValueError(f"the gathered optimizer state names parameters the student does not have: {sorted(set(unknown))[:5]}")
    groups = [dict(group, params=sorted(index[name] for name in group["params"])) for group in state["param_groups"]]
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def _name_keyed(state: dict[str, Any], param_names: list[str]) -> dict[str, Any]:
    """Indices (``Optimizer.state_dict()``) -> parameter-name keys (``torch.distributed.checkpoint``)."""
    def name(i) -> str:
        i = int(i)
        if not 0 <= i < len(param_names):
            raise ValueError(f"the checkpoint's optimizer state has parameter {i}, the student's optimizer {len(param_names)}")
        return param_names[i]

    groups = [dict(group, params=[name(i) for i in group["params"]]) for group in state["param_groups"]]
    return {"state": {name(i): value for i, value in state["state"].items()}, "param_groups": groups}


def grad_norm_value(norm: torch.Tensor | None) -> float:
    """The global gradient norm from ``accelerator.clip_grad_norm_`` as a float (NaN when None).

    Under FSDP2 the norm is a replicated ``DTensor``; its local value is the global norm.
    """
    if norm is None:
        return float("nan")
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device (no memory).

    Ties survive (a tied parameter is one object in the copy too). Under FSDP, process 0 keeps
    one, taken before sharding, to export the student: :func:`full_student` fills it with the
    gathered weights.
    """
    memo: dict[int, Any] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(model, memo)


@contextlib.contextmanager
def full_student(accelerator, model: nn.Module, shell: nn.Module | None, aliases: dict[str, str]) -> Iterator[nn.Module | None]:
    """An unsharded student with the current weights, for export; a collective under FSDP.

    Without FSDP it is the unwrapped model itself. Under FSDP the full state is gathered and
    assigned into ``shell`` (a :func:`meta_copy` taken before sharding) on process 0, which
    yields it; the other processes yield None. On exit the shell goes back to the meta device.
    """
    if not is_sharded(accelerator):
        yield accelerator.unwrap_model(model)
        return
    state = gather_model_state(accelerator, model, aliases)
    if not accelerator.is_main_process:
        yield None
        return
    shell.load_state_dict(state, strict=True, assign=True)
    try:
        yield shell
    finally:
        del state
        shell.to("meta")


__all__ = [
    "check_distributed_setup",
    "fill_from_process_0",
    "full_student",
    "gather_model_state",
    "gather_optimizer_state",
    "grad_norm_value",
    "is_sharded",
    "make_accelerator",
    "meta_copy",
    "place_teacher",
    "resolve_mixed_precision",
    "restore_model_state",
    "restore_optimizer_state",
    "tied_aliases",
]
