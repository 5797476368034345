"""Block-wise distillation: recover a compressed student one transformer block at a time.

End-to-end distillation runs the teacher, the whole student, its LM head and a backward pass
through everything for every token. Block-wise distillation (ZeroQuant's layer-by-layer
distillation, Yao et al. 2022; BRECQ's block reconstruction, Li et al. 2021) trains each block
that holds compressed modules alone, to map the hidden state entering it to the one the dense
teacher block produces:

    min over the block's compressed modules of  E || block_S(x_l) - h_{l+1} ||²,

where h_0 .. h_L are the teacher's hidden states at the block boundaries, computed once over the
training tokens and cached on disk (:mod:`kronlm.distill.hidden_cache`), and x_l is either the
teacher's h_l ("teacher" inputs: blocks are independent) or the output of the already recovered
student blocks 0..l-1 ("student" inputs, sequential: block l also learns to correct the error the
blocks before it left, as GPTQ calibrates each layer on the quantised prefix's outputs). No
embedding, LM head or other block runs while a block trains, and the backward pass stops at the
block's first trainable module, so a token costs a fraction of an end-to-end step.

Each block is one run of the training engine (:class:`kronlm.distill.trainer.Trainer`): the same
optimizer groups, schedule, clipping, NaN stop, TensorBoard logs, checkpoints and resume, with a
held-out MSE (on the validation sequences) choosing the block's best step. Only the compressed
modules (Kronecker factors and scalars), and optionally the block's norms, are trainable. A block
that finished writes its trained tensors and a ``done.json``; a resumed run loads finished blocks,
resumes the interrupted one from its checkpoint, and continues. An optional short end-to-end pass
(``blockwise.end_to_end_steps``) follows.

Run folder: ``blocks/block-007/`` (one engine run per block: checkpoints, logs, ``best/``),
``teacher_cache/`` (unless ``blockwise.cache_dir``), ``blockwise/`` (the student after the
block-wise pass), ``end_to_end/`` (the optional pass), ``final/`` (the last student), ``best/``
(the student with the lowest validation perplexity among those), ``blockwise_summary.json``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

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
from kronlm.distill.hidden_cache import (
    CacheKey,
    capture_block_kwargs,
)
from kronlm.distill.objective import LossOutput
from kronlm.distill.trainer import Trainer, train
from kronlm.distill.validators import Validator, evaluation_mode
from kronlm.layers import KRONECKER_MODULES
from kronlm.modeling import save
from kronlm.utils.atomic import folder_lock, write_json
from kronlm.utils.files import json_ready

SUMMARY_FILE = "blockwise_summary.json"


class BlockPairs(Dataset):
    """(input hidden state, target hidden state) pairs of one block: item i is
    ``{"inputs": (T, d), "targets": (T, d)}`` from (N, T, d) tensors.

    ``fingerprint`` names what the pairs were computed from (the run key: teacher, tokens,
    starting student, settings; the block; the split), so a resumed block run can check its
    data without hashing gigabytes of hidden states (:func:`kronlm.distill.fingerprint.data_fingerprint`).
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, fingerprint: str | None = None):
        if inputs.shape != targets.shape:
            raise ValueError(f"block inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} differ in shape")
        self.inputs, self.targets, self.fingerprint = inputs, targets, fingerprint

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.inputs[index], "targets": self.targets[index]}


def block_loss(output: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """The block objective: "mse" = mean squared error; "relative_mse" = Σ(y - t)² / Σ t²."""
    error = (output.float() - target.float()).square()
    if kind == "relative_mse":
        return error.sum() / target.float().square().sum().clamp_min(torch.finfo(torch.float32).tiny)
    return error.mean()


class BlockObjective:
    """``objective(model, teacher, batch) -> LossOutput`` for the engine: the block loss of
    ``batch["inputs"]`` against ``batch["targets"]``; logs the plain MSE as term "mse"."""

    needs_teacher = False

    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, model: nn.Module, teacher: nn.Module | None, batch: dict[str, torch.Tensor]) -> LossOutput:
        output = model(batch["inputs"])
        loss = block_loss(output, batch["targets"], self.kind)
        mse = F.mse_loss(output.detach().float(), batch["targets"].float())
        return LossOutput(total=loss, terms={"mse": mse})


class BlockValidator(Validator):
    """Held-out block loss on the validation sequences (lower is better); one process."""

    name, key, greater_is_better = "block_loss", "loss", False

    def __init__(self, pairs: BlockPairs, kind: str, batch_size: int):
        self.pairs, self.kind, self.batch_size = pairs, kind, batch_size

    def __call__(self, model: nn.Module, accelerator) -> dict[str, float]:
        total, mse, count = 0.0, 0.0, 0
        with evaluation_mode(model, accelerator) as net, torch.no_grad():
            for start in range(0, len(self.pairs), self.batch_size):
                x = self.pairs.inputs[start : start + self.batch_size].to(accelerator.device)
                t = self.pairs.targets[start : start + self.batch_size].to(accelerator.device)
                y = net(x)
                n = x.shape[0]
                total += block_loss(y, t, self.kind).item() * n
                mse += F.mse_loss(y.float(), t.float()).item() * n
                count += n
        return {"loss": total / count, "mse": mse / count, "sequences": count}


def trainable_block_parameters(block: nn.Module, train_norms: bool, train_uncompressed: bool = False) -> dict[str, nn.Parameter]:
    """The parameters block-wise distillation trains in ``block``, by name: every parameter of its
    Kronecker modules (factors, scalars, bias), with ``train_norms`` its norm weights, and with
    ``train_uncompressed`` all of them."""
    if train_uncompressed:
        return dict(block.named_parameters())
    names: dict[str, nn.Parameter] = {}
    for module_name, module in block.named_modules():
        is_norm = "norm" in type(module).__name__.lower()
        if isinstance(module, KRONECKER_MODULES) or (train_norms and is_norm):
            prefix = f"{module_name}." if module_name else ""
            for name, param in module.named_parameters(recurse=isinstance(module, KRONECKER_MODULES)):
                names[prefix + name] = param
    return names


@dataclass
class BlockwiseResult:
    """What :func:`distill_blockwise` did.

    Attributes:
        blocks: one :class:`BlockRecord` per block.
        cache_seconds: seconds spent computing (or 0 when reusing) the teacher cache.
        train_seconds: seconds of block-wise training (all blocks, input propagation included).
        block_tokens: training tokens seen summed over blocks (tokens x trained blocks).
        tokens_per_second: training tokens through the whole stack per wall-clock second:
            tokens seen by one trained block (the same for every block) / ``train_seconds``.
        val_ppl_before, val_ppl_blockwise, val_ppl_end_to_end: validation perplexity of the
            student before, after the block-wise pass and after the end-to-end pass (None when
            not run or without validation data).
        final_dir, best_dir: the exported students.
    """

    blocks: list[BlockRecord] = field(default_factory=list)
    cache_seconds: float = 0.0
    train_seconds: float = 0.0
    block_tokens: int = 0
    tokens_per_second: float = 0.0
    val_ppl_before: float | None = None
    val_ppl_blockwise: float | None = None
    val_ppl_end_to_end: float | None = None
    final_dir: Path | None = None
    best_dir: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return json_ready(self)


def distill_blockwise(
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
) -> BlockwiseResult:
    """Recover ``student`` block by block against ``teacher`` (module docstring); in place.

    Args:
        student: a compressed copy of ``teacher`` (same depth, same hidden size; the tensors of
            uncompressed modules keep the teacher's shapes).
        teacher: the dense model (frozen).
        blocks: token blocks: a ``TokenBlocks`` (``.train``, ``.val`` int64 (N, block_size)) or
            ``{"train": ..., "val": ...}``; ``val`` are held-out training tokens (never the test
            split) for the block losses and the validation perplexity.
        config: a ``TrainingConfig`` with ``mode == "blockwise"``: its optimizer, schedule and
            step counts apply to each block, ``config.blockwise`` to the method.
        out_dir: run folder (module docstring).
        resume: continue an interrupted run in ``out_dir``.
        tokenizer: saved with the exported students.
        progress: tqdm bars.
        run_settings: settings outside ``config`` that change the result (the command line's
            ``--max-tokens``, ...), recorded by every engine run and compared on resume.

    Returns:
        A :class:`BlockwiseResult`.

    Raises:
        ValueError: a student that is not a compressed version of the teacher (depth, hidden size
            or a module's shape differ), a model without a recognisable block list, a cache made
            for another teacher or other tokens, a resumed run whose cache, starting student or
            settings differ (named).
        OSError: the disk cannot hold the hidden-state cache; another process is writing
            ``out_dir`` (``FolderBusyError``).
        kronlm.distill.TrainingDiverged: a block's loss became NaN / inf.
    """
    out_dir = Path(out_dir)
    # One writer per run folder; what a killed run left (temporary exports, stale locks) goes first.
    with folder_lock(out_dir.absolute()):
        remove_interrupted_writes(out_dir, exports=("blockwise", "final", "best", SUMMARY_FILE))
        return _distill_blockwise(student, teacher, blocks, config, out_dir, resume=resume, tokenizer=tokenizer,
                                  progress=progress, run_settings=run_settings)


def _distill_blockwise(student, teacher, blocks, config: TrainingConfig, out_dir: Path, *, resume: bool, tokenizer,
                       progress: bool, run_settings: dict[str, Any] | None) -> BlockwiseResult:
    settings = config.blockwise
    train_ids, val_ids = split_blocks(blocks)
    student_blocks, _ = check_student(student, teacher)
    if not resume:
        # Refused before any finished block is loaded into the student, so the student a caller
        # passes again with resume=True is still the starting point.
        refuse_earlier_runs(out_dir, len(student_blocks))
    device = next(student.parameters()).device
    result = BlockwiseResult()
    out_dir.mkdir(parents=True, exist_ok=True)
    config.to_file(out_dir / "training_config.yaml")
    accelerator = make_accelerator(config, out_dir)

    to_train = [i for i, b in enumerate(student_blocks) if any(isinstance(m, KRONECKER_MODULES) for m in b.modules())]
    clock = StageClock(config.max_minutes, to_train)
    cache, _ = stage_teacher_cache(teacher, train_ids, val_ids, config, out_dir, progress)
    result.cache_seconds = clock.seconds()
    n_train = train_ids.shape[0]
    block_kwargs = capture_block_kwargs(student, train_ids[:1].to(device))
    key = _run_key(cache.key, config, model_fingerprint(student), run_settings)
    result.val_ppl_before = validation_ppl(student, val_ids, accelerator, config.micro_batch_size)

    for p in student.parameters():
        p.requires_grad_(False)
    started = time.perf_counter()
    inputs = cache.boundary(0)
    for index, block in enumerate(tqdm(student_blocks, desc="blocks", unit="block", disable=not progress)):
        targets = cache.boundary(index + 1)
        x = inputs if settings.inputs == "student" else cache.boundary(index)
        record = _train_block(index, block, block_kwargs, x, targets, n_train, config.replace(max_minutes=clock.block_minutes(index)), out_dir,
                              resume, key, run_settings)
        result.blocks.append(record)
        result.block_tokens += record.tokens
        if settings.inputs == "student":
            inputs = propagate(block, block_kwargs, x, config.micro_batch_size, device)
    result.train_seconds = time.perf_counter() - started
    trained = [r for r in result.blocks if r.trained]
    per_block = trained[0].tokens if trained else 0
    result.tokens_per_second = per_block / result.train_seconds if result.train_seconds > 0 else 0.0
    for p in student.parameters():
        p.requires_grad_(True)

    result.val_ppl_blockwise = validation_ppl(student, val_ids, accelerator, config.micro_batch_size)
    summary = {"mode": "blockwise", "inputs": settings.inputs, "val_ppl": result.val_ppl_blockwise,
               "val_ppl_before": result.val_ppl_before}
    save(student, out_dir / "blockwise", tokenizer=tokenizer, summary=summary, overwrite=True)
    best_dir, best_ppl = out_dir / "blockwise", result.val_ppl_blockwise
    if settings.end_to_end_steps > 0:
        lr = settings.end_to_end_lr or config.lr
        e2e = config.replace(mode="end_to_end", max_steps=settings.end_to_end_steps, epochs=None, lr=lr, max_minutes=None,
                             min_lr=min(config.min_lr * lr / config.lr, lr),
                             warmup_steps=min(config.warmup_steps, settings.end_to_end_steps - 1))
        run = train(student, teacher, {"train": train_ids, "val": val_ids}, e2e, out_dir / "end_to_end", resume=resume,
                    tokenizer=tokenizer, run_settings=run_settings, check_student=True)
        result.val_ppl_end_to_end = run.best_val_ppl
        if run.best_val_ppl is not None and (best_ppl is None or run.best_val_ppl < best_ppl):
            best_dir, best_ppl = run.best_dir, run.best_val_ppl
    result.final_dir = save(student, out_dir / "final", tokenizer=tokenizer,
                            summary={**summary, "end_to_end_steps": settings.end_to_end_steps,
                                     "val_ppl_end_to_end": result.val_ppl_end_to_end}, overwrite=True)
    if best_dir is not None:
        result.best_dir = copy_model(best_dir, out_dir / "best")
    write_json(out_dir / SUMMARY_FILE, result.to_dict())
    return result


def _run_key(cache_key: CacheKey, config: TrainingConfig, student: str, run_settings: dict[str, Any] | None) -> dict[str, Any]:
    # A resumed run must continue the same run: the same teacher and tokens (the cache key), the
    # same starting student, and the settings that change a block's result (not where logs go,
    # not the end-to-end pass, not the time budget).
    settings = config.to_dict()
    for name in ("log_dir", "max_minutes", "local"):
        settings.pop(name, None)
    settings["blockwise"].pop("end_to_end_steps", None)
    settings["blockwise"].pop("cache_dir", None)
    return run_key(cache_key.to_dict(), settings, student, run_settings)


def _train_block(index: int, block: nn.Module, block_kwargs: dict[str, Any], inputs: torch.Tensor, targets: torch.Tensor,
                 n_train: int, config: TrainingConfig, out_dir: Path, resume: bool, key: dict[str, Any],
                 run_settings: dict[str, Any] | None) -> BlockRecord:
    settings = config.blockwise
    params = trainable_block_parameters(block, settings.train_norms, settings.train_uncompressed)
    if not any(isinstance(m, KRONECKER_MODULES) for m in block.modules()):
        return BlockRecord(index, trained=False)
    folder = block_folder(out_dir, index)
    record = finished_block(block, folder, key)
    if record is not None:
        return record
    if not resume and folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{folder}: holds an earlier run; pass --resume to continue it or choose another --out")
    for p in params.values():
        p.requires_grad_(True)
    step = BlockStep(block, block_kwargs)
    train_pairs = BlockPairs(inputs[:n_train], targets[:n_train], pairs_fingerprint(key, index, "train"))
    val_pairs = (BlockPairs(inputs[n_train:], targets[n_train:], pairs_fingerprint(key, index, "val"))
                 if inputs.shape[0] > n_train else None)
    validator = BlockValidator(val_pairs, settings.loss, config.micro_batch_size) if val_pairs is not None else None
    block_config = block_run_config(config, index, n_train)
    trainer = Trainer(step, block_config, train_pairs, folder, val_data=val_pairs, objective=BlockObjective(settings.loss),
                      validator=validator, exporter=BlockStateExporter(list(params)), desc=f"block {index}",
                      run_settings=run_settings, check_student=True)
    run = trainer.run(resume=resume and (folder / "checkpoints").is_dir())
    for p in params.values():
        p.requires_grad_(False)
    chosen = "best" if run.best_dir is not None else "final"
    load_block_state(block, folder / chosen / BLOCK_STATE_FILE)
    record = BlockRecord(index, True, len(params), run.steps, run.tokens_seen, run.seconds,
                         run.losses[0] if run.losses else None, run.losses[-1] if run.losses else None,
                         run.best_val, run.best_step, chosen)
    finish_block(folder, key, chosen, record)
    return record


__all__ = [
    "BlockObjective",
    "BlockPairs",
    "BlockRecord",
    "BlockStep",
    "BlockValidator",
    "BlockwiseResult",
    "block_loss",
    "distill_blockwise",
    "trainable_block_parameters",
]
