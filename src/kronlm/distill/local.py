"""Local reconstruction: recover a compressed student one module at a time on captured activations.

End-to-end distillation sees each training token once per epoch and pays for the teacher, the
whole student, the LM head and a backward pass through everything on every token. On a CPU that
buys a few tens of thousands of tokens in a quarter of an hour. Most of what a freshly compressed
module gets wrong, however, is local: its output differs from the dense module's on the inputs it
receives. Local reconstruction (the layer-wise knowledge distillation of ZeroQuant, Yao et al.
2022; the per-layer reconstruction of GPTQ, Frantar et al. 2023, and of BRECQ, Li et al. 2021)
fixes that part with data reuse: the inputs of every compressed module are captured once, and the
module alone is fitted to a target output over many passes of those tokens, at the cost of the
module's own matrix products.

For each block, in order:

1. the student's hidden states entering the block come from the already recovered blocks before
   it (sequential, as GPTQ calibrates each layer on the quantised prefix), the teacher's from the
   hidden-state cache (:mod:`kronlm.distill.hidden_cache`, shared with block-wise distillation);
2. the block's compressed modules are grouped by the input they share (q/k/v, o, gate/up, down
   in a Llama block) and taken group by group in the order the block calls them, so that each
   group's inputs are captured after the groups before it were fitted;
3. each module's target on those tokens is ``target: teacher`` — the dense teacher module's output
   on the teacher's own inputs, so the fit also corrects the error earlier blocks left in the
   student's inputs — or ``target: dense`` — the dense weight applied to the student's inputs
   (GPTQ's objective, which only undoes the module's own approximation);
4. closed-form refit (``refit``): with X the captured inputs and Y the targets, the weight that
   minimises ||Y - Ŵ X||² + δ||Ŵ - W||² is W* = (E[y xᵀ] + δW)(E[x xᵀ] + δI)⁻¹, and the module's own
   family is fitted to W* under E[x xᵀ] by the activation-aware fits of compression: the
   whitened truncated SVD for a low-rank module (the reduced-rank regression of Y on X, Izenman
   1975), whitened Van Loan followed by alternating least squares (one factor given the other is
   a linear least-squares problem) for Kronecker factors, both for Kronecker + low rank. The refit
   replaces the module only where it lowers the held-out output error;
5. gradient epochs: all of the block's compressed modules train together, each on its own
   (input, target) pairs, to the mean relative squared error Σ(ŷ - y)² / Σ y², with the training
   engine (:class:`kronlm.distill.trainer.Trainer`: AdamW, warm-up + cosine, clipping, NaN stop,
   checkpoints, resume) and the held-out tokens' relative error choosing the best step and
   stopping early;
6. the fitted block's outputs become the next block's student inputs.

Captures of one block are held in memory as float32 up to ``local.capture_memory_gb`` and go to
disk as bfloat16 beyond it (refused up front when the disk cannot hold them).

Run folder: ``blocks/block-007/`` (one engine run per block), ``teacher_cache/`` (unless
``blockwise.cache_dir``), ``captures/`` (only while a block spills to disk), ``final/`` and
``best/`` (the recovered student; best = final: each block already keeps its best step),
``local_summary.json``.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from kronlm.compression.calibration import InputStatistics, ModuleCalibration
from kronlm.compression.surgery import fit_factors
from kronlm.compression.truncate import find_block_list
from kronlm.decompose.initializers import INITIALIZERS, get_initializer
from kronlm.distill.block_runs import (
    BLOCK_STATE_FILE,
    BlockRecord,
    BlockStateExporter,
    BlockStep,
    StageClock,
    block_folder,
    block_run_config,
    check_student,
    copy_model,
    finish_block,
    finished_block,
    load_block_state,
    pairs_fingerprint,
    propagate,
    refuse_earlier_runs,
    run_key,
    split_blocks,
    stage_teacher_cache,
    validation_ppl,
)
from kronlm.distill.checkpoint import remove_interrupted_writes
from kronlm.distill.config import TrainingConfig
from kronlm.distill.distributed import make_accelerator
from kronlm.distill.fingerprint import model_fingerprint
from kronlm.distill.hidden_cache import capture_block_kwargs
from kronlm.distill.objective import LossOutput
from kronlm.distill.trainer import Trainer
from kronlm.distill.validators import Validator, evaluation_mode
from kronlm.layers import KroneckerLinear, KroneckerLowRankLinear, dense_weight
from kronlm.modeling import compression_report, save
from kronlm.utils.atomic import folder_lock, write_json
from kronlm.utils.files import json_ready

SUMMARY_FILE = "local_summary.json"
CAPTURE_DIR = "captures"
LOCAL_MODULES = (KroneckerLinear, KroneckerLowRankLinear)


class _Stop(Exception):
    """Raised by a capture hook once everything wanted from a forward pass is recorded."""


def compressed_modules(block: nn.Module, prefix: str = "", skip_inits: dict[str, str] | None = None) -> list[str]:
    """Names (relative to ``block``) of its factored linear modules, in registration order.

    Args:
        prefix: the block's own name in the model (``model.layers.3``), for ``skip_inits``.
        skip_inits: {full module name: initialiser}; a module listed with an initialiser that
            needs calibration data (activation-aware) is left out.
    """
    out = []
    for name, module in block.named_modules():
        if not isinstance(module, LOCAL_MODULES):
            continue
        init = (skip_inits or {}).get(f"{prefix}.{name}" if prefix else name)
        if init is not None and init in INITIALIZERS and get_initializer(init).needs_calibration:
            continue
        out.append(name)
    return out


@torch.no_grad()
def module_groups(block: nn.Module, block_kwargs: dict[str, Any], sample: torch.Tensor, names: list[str]) -> list[list[str]]:
    """The modules ``names`` of ``block`` grouped by the input tensor they share, in the order the
    block calls them: ``[["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]`` for a Llama block.

    Args:
        sample: (1, T, d) hidden states to run the block on once.

    Raises:
        ValueError: a module of ``names`` that the block's forward pass never calls.
    """
    groups: list[list[str]] = []
    inputs: list[torch.Tensor] = []

    def hook(name: str):
        def record(module, args):
            x = args[0]
            for index, seen in enumerate(inputs):
                if x is seen:
                    groups[index].append(name)
                    return
            inputs.append(x)
            groups.append([name])
        return record

    handles = [block.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        BlockStep(block, block_kwargs)(sample)
    finally:
        for handle in handles:
            handle.remove()
    called = {n for g in groups for n in g}
    missing = [n for n in names if n not in called]
    if missing:
        raise ValueError(f"local reconstruction: the block's forward pass never calls {missing[0]}")
    return groups


@torch.no_grad()
def joint_units(block: nn.Module, block_kwargs: dict[str, Any], sample: torch.Tensor, names: list[str]) -> dict[str, tuple[int, int, list[str]]]:
    """Children of ``block`` that hold some of the compressed modules ``names`` and are called with
    one tensor and nothing else (a Llama or GPT-2 MLP; not an attention module, which also takes
    masks and position embeddings): ``{child name: (input width, output width, its modules)}``.

    Their modules are fitted jointly in the gradient epochs, to the child's output, so the
    activations between them are free to differ from the teacher's (module docstring, step 5).

    Args:
        sample: (1, T, d) hidden states to run the block on once.
    """
    calls: dict[str, tuple[bool, int, int]] = {}
    handles = []
    for child_name, child in block.named_children():
        inside = [n for n in names if n.startswith(child_name + ".")]
        if not inside:
            continue

        def record(module, args, kwargs, output, name=child_name):
            single = (len(args) == 1 and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor)
                      and not any(isinstance(v, torch.Tensor) for v in kwargs.values()))
            calls[name] = (single and name not in calls, args[0].shape[-1] if single else 0, output.shape[-1] if single else 0)
        handles.append(child.register_forward_hook(record, with_kwargs=True))
    try:
        BlockStep(block, block_kwargs)(sample)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (width_in, width_out, [n for n in names if n.startswith(name + ".")])
            for name, (single, width_in, width_out) in calls.items() if single}


class CaptureStore:
    """Captured tensors of one block: float32 in memory up to ``memory_bytes``, else bfloat16 in
    files under ``folder`` (removed by :meth:`close`).

    Args:
        shapes: {name: (N, T, width)} of everything the block will capture.
        memory_bytes: the most bytes held in memory.
        folder: where spilled captures go.

    Raises:
        OSError: the captures fit neither in ``memory_bytes`` nor on the disk holding ``folder``
            (both sizes named).
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], memory_bytes: float, folder: Path):
        self.folder = folder
        elements = sum(math.prod(s) for s in shapes.values())
        self.in_memory = elements * 4 <= memory_bytes
        self.tensors: dict[str, torch.Tensor] = {}
        if self.in_memory:
            self.tensors = {name: torch.empty(shape, dtype=torch.float32) for name, shape in shapes.items()}
            return
        folder.mkdir(parents=True, exist_ok=True)
        need, free = elements * 2, shutil.disk_usage(folder).free
        if need > free:
            raise OSError(f"local reconstruction: one block's captures need {elements * 4:,} bytes in memory (more than "
                          f"capture_memory_gb allows) or {need:,} bytes on disk, but {folder} has {free:,} free; "
                          "use fewer tokens or raise local.capture_memory_gb")
        tqdm.write(f"local reconstruction: captures of {need / 1e9:.2f} GB (bfloat16) go to {folder}")
        for name, shape in shapes.items():
            path = folder / f"{name}.bin"
            self.tensors[name] = torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=torch.bfloat16).view(shape)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def close(self) -> None:
        """Drop the tensors; remove spilled files."""
        self.tensors = {}
        if not self.in_memory and self.folder.is_dir():
            shutil.rmtree(self.folder, ignore_errors=True)


@torch.no_grad()
def capture(block: nn.Module, block_kwargs: dict[str, Any], hidden: torch.Tensor, wanted: dict[str, tuple[str, torch.Tensor]],
            batch_size: int, device, stop: bool) -> None:
    """Run ``block`` over ``hidden`` (N, T, d) and copy tensors seen on the way into ``wanted``'s
    (N, T, width) tensors: ``{module name: ("input", tensor)}`` or ``("output", tensor)``.

    With ``stop`` the forward pass of each batch ends as soon as everything is recorded.
    """
    seen: dict[str, torch.Tensor] = {}

    def pre(name: str):
        def hook(module, args):
            seen[name] = args[0]
            if stop and len(seen) == len(wanted):
                raise _Stop
        return hook

    def post(name: str):
        def hook(module, args, output):
            seen[name] = output
            if stop and len(seen) == len(wanted):
                raise _Stop
        return hook

    handles = []
    for name, (kind, _) in wanted.items():
        module = block.get_submodule(name)
        handles.append(module.register_forward_pre_hook(pre(name)) if kind == "input" else module.register_forward_hook(post(name)))
    was_training = block.training
    block.eval()
    step = BlockStep(block, block_kwargs)
    try:
        for start in range(0, hidden.shape[0], batch_size):
            seen.clear()
            try:
                step(hidden[start : start + batch_size].to(device).float())
            except _Stop:
                pass
            for name, (_, tensor) in wanted.items():
                tensor[start : start + batch_size] = seen[name].to("cpu", tensor.dtype)
    finally:
        for handle in handles:
            handle.remove()
        block.train(was_training)


@torch.no_grad()
def input_gram(inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Σ x xᵀ over the (N, T, in) inputs: (in, in) float64 (float32 products per batch)."""
    in_f = inputs.shape[-1]
    gram = torch.zeros(in_f, in_f, dtype=torch.float64)
    for start in range(0, inputs.shape[0], batch_size):
        x = inputs[start : start + batch_size].float().reshape(-1, in_f)
        gram += (x.mT @ x).double()
    return gram


@torch.no_grad()
def closed_form_refit(module: nn.Module, weight: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor | None, *,
                      damping: float, batch_size: int, name: str, gram: torch.Tensor | None = None) -> None:
    """Refit a factored linear module, in place, to map ``inputs`` onto ``targets`` (module docstring, step 4).

    Args:
        module: a ``KroneckerLinear`` (any factor shapes; the SVD family is A (out, 1), B (1, in))
            or ``KroneckerLowRankLinear``; its bias stays.
        weight: (out, in) the dense weight it replaces (the ridge's centre).
        inputs: (N, T, in) captured inputs.
        targets: (N, T, out) target outputs; None = ``weight`` applied to ``inputs`` (then the
            fit is the dense weight's activation-aware fit under the inputs' second moment).
        damping: δ relative to mean(diag E[x xᵀ]).
        name: module name for error messages.
        gram: :func:`input_gram` of ``inputs`` when already computed (modules sharing an input).

    Raises:
        ValueError: non-finite factors (named), or the shape errors of the fits.
    """
    in_f = weight.shape[1]
    gram = input_gram(inputs, batch_size) if gram is None else gram
    tokens = inputs.shape[0] * inputs.shape[1]
    cross = None
    if targets is not None:
        cross = torch.zeros(weight.shape[0], in_f, dtype=torch.float64)
        bias = module.bias.detach().float().cpu() if module.bias is not None else None
        for start in range(0, inputs.shape[0], batch_size):
            x = inputs[start : start + batch_size].float().reshape(-1, in_f)
            y = targets[start : start + batch_size].float().reshape(x.shape[0], -1)
            if bias is not None:
                y = y - bias
            cross += (y.mT @ x).double()
    W = weight.detach().double().cpu()
    C = gram / tokens
    if cross is not None:
        delta = damping * C.diagonal().mean().clamp_min(0).item()
        eye = torch.eye(in_f, dtype=torch.float64)
        # W* (C + δI) = E[y xᵀ] + δW, with C + δI symmetric positive definite.
        W = torch.linalg.solve(C + delta * eye, (cross / tokens + delta * W).mT).mT
    stats = ModuleCalibration(InputStatistics(in_f, tokens=tokens, moment_sum=gram), out_features=weight.shape[0])
    lowrank = getattr(module, "lowrank", 0) if isinstance(module, KroneckerLowRankLinear) else 0
    factors = fit_factors(W.to(torch.float32), module.a_shape, module.b_shape, module.rank, lowrank_rank=lowrank,
                          init="activation_aware", calibration=stats, name=name)
    for label in ("A", "B", "U", "V", "scales"):
        tensor = getattr(factors, label, None)
        if tensor is not None and not torch.isfinite(tensor).all():
            raise ValueError(f"{name}: the closed-form refit produced non-finite factor {label}")
    module.load_factors(factors)  # copy_ moves the factors to the module's device and dtype


class LocalPairs(Dataset):
    """One block's captured tensors, by sequence: item i is ``{key: tensor[i] (T, width)}`` (float32)
    for the ``keys`` the gradient epochs read (inputs and targets of each fit).

    ``fingerprint`` names what the pairs were computed from (run key, block, split), so a resumed
    block run can check its data without hashing the captures.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], keys: list[str], rows: slice, fingerprint: str | None = None):
        self.tensors, self.keys, self.fingerprint = tensors, keys, fingerprint
        self.offset = rows.start or 0
        self.count = (rows.stop if rows.stop is not None else tensors[keys[0]].shape[0]) - self.offset

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        i = self.offset + index
        return {k: self.tensors[k][i].float() for k in self.keys}


def relative_errors(block: nn.Module, fits: list[tuple[str, str, str]], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ(f(x) - y)² / Σ y² of every fit ``(submodule of block, input key, target key)`` on a batch: (fits,)."""
    errors = []
    for name, x_key, y_key in fits:
        y = batch[y_key]
        diff = block.get_submodule(name)(batch[x_key]).float() - y
        errors.append(diff.square().sum() / y.square().sum().clamp_min(torch.finfo(torch.float32).tiny))
    return torch.stack(errors)


class LocalModules(nn.Module):
    """What the gradient epochs of one block train, as one model: ``forward(batch)`` returns the
    relative squared error Σ(ŷ - y)² / Σ y² of each fit, shape (fits,).

    Args:
        block: the block (held as ``.block`` for the exporter).
        fits: ``(name, input key, target key)``: a compressed module, or a child of the block
            holding compressed modules that is called with one tensor (an MLP: its modules are
            then fitted jointly, to the child's output, so the intermediate activations are free),
            with the keys of its captured inputs and targets in the batch.
    """

    def __init__(self, block: nn.Module, fits: list[tuple[str, str, str]]):
        super().__init__()
        self.block = block
        self.fits = fits

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Relative squared errors (fits,) of a batch of ``LocalPairs`` items."""
        return relative_errors(self.block, self.fits, batch)


class LocalObjective:
    """``objective(model, teacher, batch) -> LossOutput``: the mean relative squared error of the
    block's fits; logs it as term "rel_err" too."""

    needs_teacher = False

    def __call__(self, model: nn.Module, teacher: nn.Module | None, batch: dict[str, torch.Tensor]) -> LossOutput:
        errors = model(batch)
        loss = errors.mean()
        return LossOutput(total=loss, terms={"rel_err": loss.detach()})


class LocalValidator(Validator):
    """Held-out relative output error, mean over the block's fits (lower is better); one process."""

    name, key, greater_is_better = "rel_err", "rel_err", False

    def __init__(self, pairs: LocalPairs, batch_size: int):
        self.pairs, self.batch_size = pairs, batch_size

    def __call__(self, model: nn.Module, accelerator) -> dict[str, float]:
        inner = model.module if hasattr(model, "module") else model
        sums = torch.zeros(len(inner.fits), 2, dtype=torch.float64)
        with evaluation_mode(model, accelerator), torch.no_grad():
            for start in range(0, len(self.pairs), self.batch_size):
                items = [self.pairs[i] for i in range(start, min(start + self.batch_size, len(self.pairs)))]
                batch = {k: torch.stack([it[k] for it in items]).to(accelerator.device) for k in items[0]}
                for f, (name, x_key, y_key) in enumerate(inner.fits):
                    y = batch[y_key].double()
                    sums[f, 0] += (inner.block.get_submodule(name)(batch[x_key]).double() - y).square().sum().item()
                    sums[f, 1] += y.square().sum().item()
        errors = (sums[:, 0] / sums[:, 1].clamp_min(1e-300)).tolist()
        return {"rel_err": sum(errors) / len(errors), "max_rel_err": max(errors), "sequences": len(self.pairs)}


@dataclass
class LocalResult:
    """What :func:`distill_local` did.

    Attributes:
        blocks: one :class:`~kronlm.distill.block_runs.BlockRecord` per block (with the held-out
            relative output error before, after the refit, and the best of the gradient epochs).
        cache_seconds: seconds spent computing (or 0 when reusing) the teacher cache.
        train_seconds: seconds of the local pass (captures, refits, gradient epochs, propagation).
        val_ppl_before, val_ppl_after: validation perplexity of the student before and after.
        final_dir, best_dir: the exported student (the same model: each block keeps its best step).
    """

    blocks: list[BlockRecord] = field(default_factory=list)
    cache_seconds: float = 0.0
    train_seconds: float = 0.0
    val_ppl_before: float | None = None
    val_ppl_after: float | None = None
    final_dir: Path | None = None
    best_dir: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return json_ready(self)


def distill_local(
    student: nn.Module,
    teacher: nn.Module,
    blocks: Any,
    config: TrainingConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    tokenizer=None,
    progress: bool = True,
    run_settings: dict[str, Any] | None = None,
) -> LocalResult:
    """Recover ``student`` module by module against ``teacher`` (module docstring); in place.

    Args:
        student: a compressed copy of ``teacher`` (same depth and hidden size; uncompressed
            tensors keep the teacher's shapes). Only factored linear modules inside the blocks
            are fitted; a factored embedding or LM head is left to the other modes.
        teacher: the dense model (frozen).
        blocks: token blocks, a ``TokenBlocks`` or ``{"train": (N, T), "val": (M, T)}`` int64;
            ``val`` are held-out training tokens (never the test split) for the held-out errors
            and the validation perplexity.
        config: a ``TrainingConfig`` with ``mode == "local"``: its optimizer, schedule and run
            length apply to each block's gradient epochs (``max_minutes``: all blocks together),
            ``config.local`` to the method, ``config.blockwise.cache_dir`` / ``cache_dtype`` to
            the teacher hidden-state cache.
        out_dir: run folder (module docstring).
        resume: continue an interrupted run in ``out_dir``.
        tokenizer: saved with the exported student.
        progress: tqdm bars.
        run_settings: settings outside ``config`` that change the result (recorded by every
            engine run and compared on resume).

    Returns:
        A :class:`LocalResult`.

    Raises:
        ValueError: a student that is not a compressed copy of the teacher, a model without a
            block list, a cache made for another teacher or other tokens, a resumed run whose
            cache, starting student or settings differ (named).
        OSError: the disk cannot hold the hidden-state cache or a block's spilled captures;
            another process is writing ``out_dir``.
        kronlm.distill.TrainingDiverged: a block's loss became NaN / inf.
    """
    out_dir = Path(out_dir)
    with folder_lock(out_dir.absolute()):
        remove_interrupted_writes(out_dir, exports=("final", "best", SUMMARY_FILE))
        return _distill_local(student, teacher, blocks, config, out_dir, resume=resume, tokenizer=tokenizer,
                              progress=progress, run_settings=run_settings)


def _distill_local(student, teacher, blocks, config: TrainingConfig, out_dir: Path, *, resume: bool, tokenizer, progress: bool,
                   run_settings: dict[str, Any] | None) -> LocalResult:
    train_ids, val_ids = split_blocks(blocks)
    student_blocks, teacher_blocks = check_student(student, teacher)
    if not resume:
        refuse_earlier_runs(out_dir, len(student_blocks))
    device = next(student.parameters()).device
    result = LocalResult()
    out_dir.mkdir(parents=True, exist_ok=True)
    config.to_file(out_dir / "training_config.yaml")
    accelerator = make_accelerator(config, out_dir)

    list_name, _ = find_block_list(student)
    report = compression_report(student)
    inits = ({m.name: m.init for m in report.modules} if report is not None and config.local.modules == "data_free" else None)
    chosen = {i: compressed_modules(b, f"{list_name}.{i}", inits) for i, b in enumerate(student_blocks)}
    to_train = [i for i, names in chosen.items() if names]
    if not to_train:  # nothing to fit (e.g. only activation-aware modules with modules: data_free): no cache, no captures
        result.val_ppl_before = result.val_ppl_after = validation_ppl(student, val_ids, accelerator, config.micro_batch_size)
        result.blocks = [BlockRecord(i, trained=False) for i in range(len(student_blocks))]
        return _export(student, config, result, out_dir, tokenizer)

    clock = StageClock(config.max_minutes, to_train)
    cache, all_ids = stage_teacher_cache(teacher, train_ids, val_ids, config, out_dir, progress)
    result.cache_seconds = clock.seconds()
    block_kwargs = capture_block_kwargs(student, train_ids[:1].to(device))
    key = _run_key(cache.key.to_dict(), config, model_fingerprint(student), run_settings)
    result.val_ppl_before = validation_ppl(student, val_ids, accelerator, config.micro_batch_size)

    for p in student.parameters():
        p.requires_grad_(False)
    started = time.perf_counter()
    inputs = _student_block_inputs(student, all_ids, config.micro_batch_size, device)
    for index, block in enumerate(tqdm(student_blocks, desc="local", unit="block", disable=not progress)):
        if index in to_train:
            # This block's share of what is left; captures and refits spend from it, the gradient epochs get the rest.
            minutes = clock.block_minutes(index)
            deadline = None if minutes is None else time.perf_counter() + 60.0 * minutes
            record = _fit_block(index, block, chosen[index], teacher_blocks[index], block_kwargs, inputs, cache.boundary(index),
                                cache.boundary(index + 1), train_ids.shape[0], config, out_dir, resume, key, run_settings, device,
                                deadline)
        else:
            record = BlockRecord(index, trained=False)
        result.blocks.append(record)
        if index < len(student_blocks) - 1:
            inputs = propagate(block, block_kwargs, inputs, config.micro_batch_size, device)
    result.train_seconds = time.perf_counter() - started
    for p in student.parameters():
        p.requires_grad_(True)

    result.val_ppl_after = validation_ppl(student, val_ids, accelerator, config.micro_batch_size)
    return _export(student, config, result, out_dir, tokenizer)


def _export(student: nn.Module, config: TrainingConfig, result: LocalResult, out_dir: Path, tokenizer) -> LocalResult:
    summary = {"mode": "local", "target": config.local.target, "val_ppl": result.val_ppl_after, "val_ppl_before": result.val_ppl_before}
    result.final_dir = save(student, out_dir / "final", tokenizer=tokenizer, summary=summary, overwrite=True)
    result.best_dir = copy_model(result.final_dir, out_dir / "best")
    write_json(out_dir / SUMMARY_FILE, result.to_dict())
    return result


def _run_key(cache_key: dict[str, Any], config: TrainingConfig, student: str, run_settings: dict[str, Any] | None) -> dict[str, Any]:
    # What changes a block's result: not where logs go, the time budget, or the block-wise section
    # (whose cache settings are covered by the cache key).
    settings = config.to_dict()
    for name in ("log_dir", "max_minutes", "blockwise"):
        settings.pop(name, None)
    settings["local"].pop("capture_memory_gb", None)
    return run_key(cache_key, settings, student, run_settings)


@torch.no_grad()
def _student_block_inputs(student: nn.Module, ids: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """The student's own hidden states entering block 0 (its embedding may be compressed): (N, T, d)."""
    _, blocks = find_block_list(student)
    out: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        out.append((args[0] if args else kwargs["hidden_states"]).detach().float().cpu())
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, ids.shape[0], batch_size):
            try:
                student.base_model(input_ids=ids[start : start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(out)


def _fit_block(index: int, block: nn.Module, names: list[str], teacher_block: nn.Module, block_kwargs: dict[str, Any], inputs: torch.Tensor,
               teacher_inputs: torch.Tensor, teacher_outputs: torch.Tensor, n_train: int, config: TrainingConfig, out_dir: Path,
               resume: bool, key: dict[str, Any], run_settings: dict[str, Any] | None, device, deadline: float | None) -> BlockRecord:
    settings = config.local
    folder = block_folder(out_dir, index)
    record = finished_block(block, folder, key)
    if record is not None:
        return record
    if not resume and folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{folder}: holds an earlier run; pass --resume to continue it or choose another --out")
    sample = inputs[:1].to(device).float()
    groups = module_groups(block, block_kwargs, sample, names)
    order = [n for g in groups for n in g]
    units = joint_units(block, block_kwargs, sample, order) if settings.joint else {}
    N, T = inputs.shape[:2]
    shapes = {f"x{g}": (N, T, block.get_submodule(group[0]).in_features) for g, group in enumerate(groups)}
    shapes.update({f"y{m}": (N, T, block.get_submodule(n).out_features) for m, n in enumerate(order)})
    for k, (width_in, width_out, _) in enumerate(units.values()):
        shapes.update({f"u{k}": (N, T, width_in), f"v{k}": (N, T, width_out)})
    store = CaptureStore(shapes, settings.capture_memory_gb * 1e9, out_dir / CAPTURE_DIR / f"block-{index:03d}")
    batch = config.micro_batch_size
    # What decides is the block's output on held-out sequences: a module fitted better on its own
    # tokens can still move the block away from the teacher's (attention scores, the gate).
    held_out = (inputs[n_train:], teacher_outputs[n_train:]) if N > n_train else None

    def block_error() -> float | None:
        return None if held_out is None else block_output_error(block, block_kwargs, *held_out, batch, device)

    try:
        xs = [store[f"x{g}"] for g in range(len(groups))]
        ys = [store[f"y{m}"] for m in range(len(order))]
        if settings.target == "teacher":
            wanted = {n: ("output", ys[m]) for m, n in enumerate(order)}
            wanted.update({u: ("output", store[f"v{k}"]) for k, u in enumerate(units)})
            capture(teacher_block, block_kwargs, teacher_inputs, wanted, batch, device, stop=False)
        error_before = error = block_error()
        m = 0
        for g, group in enumerate(groups):
            capture(block, block_kwargs, inputs, {group[0]: ("input", xs[g])}, batch, device, stop=True)
            for name in group:
                if settings.target == "dense":
                    _apply(teacher_block.get_submodule(name), xs[g], ys[m], batch, device)
                m += 1
            if settings.refit:
                error = _refit_group(block, teacher_block, group, xs[g], [ys[order.index(n)] for n in group], n_train, error, settings,
                                     batch, block_error, device)
        error_refit = error
        if units:  # their inputs, now that the modules before them are fitted
            capture(block, block_kwargs, inputs, {u: ("input", store[f"u{k}"]) for k, u in enumerate(units)}, batch, device, stop=True)
            if settings.target == "dense":
                for k, u in enumerate(units):
                    _apply(teacher_block.get_submodule(u), store[f"u{k}"], store[f"v{k}"], batch, device)
        in_units = {n for _, _, modules in units.values() for n in modules}
        fits = [(n, f"x{g}", f"y{order.index(n)}") for g, group in enumerate(groups) for n in group if n not in in_units]
        fits += [(u, f"u{k}", f"v{k}") for k, u in enumerate(units)]
        BlockStateExporter(list(_parameters(block, order)))(LocalModules(block, fits), folder / "refit", {"error": error_refit})
        minutes = None if deadline is None else max(deadline - time.perf_counter(), 1.0) / 60.0
        record = _gradient_epochs(index, block, order, fits, store.tensors, n_train, config.replace(max_minutes=minutes), folder, resume,
                                  key, run_settings)
        record.error_after = block_error()
        if record.error_after is not None and error_refit is not None and record.error_after > error_refit:
            load_block_state(block, folder / "refit" / BLOCK_STATE_FILE)
            record.chosen, record.error_after = "refit", error_refit
        record.error_before, record.error_refit = error_before, error_refit if settings.refit else None
        finish_block(folder, key, record.chosen, record)
        return record
    finally:
        store.close()


@torch.no_grad()
def block_output_error(block: nn.Module, block_kwargs: dict[str, Any], inputs: torch.Tensor, targets: torch.Tensor, batch_size: int,
                       device) -> float:
    """Relative squared error Σ||block(x) - h||² / Σ||h||² of the block's outputs for (N, T, d) inputs
    against (N, T, d) target hidden states (float64 sums), in eval mode."""
    step = BlockStep(block, block_kwargs)
    was_training = block.training
    block.eval()
    err = norm = 0.0
    for start in range(0, inputs.shape[0], batch_size):
        y = step(inputs[start : start + batch_size].to(device).float()).double()
        t = targets[start : start + batch_size].to(device).double()
        err += (y - t).square().sum().item()
        norm += t.square().sum().item()
    block.train(was_training)
    return err / max(norm, 1e-300)


@torch.no_grad()
def _apply(dense: nn.Module, inputs: torch.Tensor, out: torch.Tensor, batch_size: int, device) -> None:
    for start in range(0, inputs.shape[0], batch_size):
        out[start : start + batch_size] = dense(inputs[start : start + batch_size].to(device).float()).to("cpu", out.dtype)


def _refit_group(block, teacher_block, group: list[str], x: torch.Tensor, ys: list[torch.Tensor], n_train: int, error: float | None,
                 settings, batch: int, block_error, device) -> float | None:
    """Refit the modules of one input group; keep the refit only when the held-out block output
    error does not grow (always, without held-out sequences). Returns the block error after."""
    modules = [block.get_submodule(n) for n in group]
    saved = [{n: p.detach().clone() for n, p in module.named_parameters()} for module in modules]
    gram = input_gram(x[:n_train], batch)
    for name, module, y in zip(group, modules, ys):
        closed_form_refit(module, dense_weight(teacher_block.get_submodule(name)), x[:n_train],
                          y[:n_train] if settings.target == "teacher" else None, damping=settings.refit_damping, batch_size=batch,
                          name=name, gram=gram)
    after = block_error()
    if error is None or after <= error:
        return after
    with torch.no_grad():
        for module, state in zip(modules, saved):
            for n, p in module.named_parameters():
                p.copy_(state[n])
    return error


def _gradient_epochs(index, block, order: list[str], fits, tensors: dict[str, torch.Tensor], n_train: int, config: TrainingConfig,
                     folder: Path, resume: bool, key, run_settings) -> BlockRecord:
    params = _parameters(block, order)
    for p in params.values():
        p.requires_grad_(True)
    model = LocalModules(block, fits)
    keys = sorted({k for _, x_key, y_key in fits for k in (x_key, y_key)})
    N = tensors[keys[0]].shape[0]
    train_pairs = LocalPairs(tensors, keys, slice(0, n_train), pairs_fingerprint(key, index, "train"))
    val_pairs = LocalPairs(tensors, keys, slice(n_train, N), pairs_fingerprint(key, index, "val")) if N > n_train else None
    validator = LocalValidator(val_pairs, config.micro_batch_size) if val_pairs is not None else None
    block_config = block_run_config(config, index, n_train)
    trainer = Trainer(model, block_config, train_pairs, folder, val_data=val_pairs, objective=LocalObjective(), validator=validator,
                      exporter=BlockStateExporter(list(params)), desc=f"local {index}", run_settings=run_settings, check_student=True)
    try:
        run = trainer.run(resume=resume and (folder / "checkpoints").is_dir())
    finally:
        for p in params.values():
            p.requires_grad_(False)
    chosen = "best" if run.best_dir is not None else "final"
    load_block_state(block, folder / chosen / BLOCK_STATE_FILE)
    return BlockRecord(index, True, len(params), run.steps, run.tokens_seen, run.seconds,
                       run.losses[0] if run.losses else None, run.losses[-1] if run.losses else None,
                       run.best_val, run.best_step, chosen)


def _parameters(block: nn.Module, names: list[str]) -> dict[str, nn.Parameter]:
    """The parameters of the named modules, by their names relative to ``block``."""
    return {f"{n}.{pn}": p for n in names for pn, p in block.get_submodule(n).named_parameters()}


__all__ = [
    "CaptureStore",
    "LocalModules",
    "LocalObjective",
    "LocalPairs",
    "LocalResult",
    "LocalValidator",
    "capture",
    "block_output_error",
    "closed_form_refit",
    "input_gram",
    "joint_units",
    "relative_errors",
    "compressed_modules",
    "distill_local",
    "module_groups",
]
