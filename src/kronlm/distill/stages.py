"""Recovery in stages: local reconstruction, then block-wise, then end-to-end distillation, each
with its own settings and time budget, run one after the other on the same student.

The three modes fix different parts of a compressed model's error at different prices per
token: local reconstruction (:mod:`kronlm.distill.local`) the error of each module on the inputs
it receives, over many cheap passes of captured activations; block-wise distillation
(:mod:`kronlm.distill.blockwise`) what the modules of a block get wrong together, including the
attention and the non-linearities between them; end-to-end distillation
(:func:`kronlm.distill.trainer.train`) the output distribution itself, the quantity perplexity
measures, at the full price of the teacher and the student on every token. A
:class:`RecoveryConfig` lists stages (each a :class:`~kronlm.distill.config.TrainingConfig`);
:func:`recover` runs them in order on the same token blocks, the block modes sharing one
teacher hidden-state cache.

Every stage ends with the student it chose on the held-out blocks (each block's best step in
the block modes, the best validation perplexity end to end). The validation perplexity after each
stage is recorded; the student returned is the stage result with the lowest one, so a stage that
makes things worse is undone. Run folder: ``stage-1-local/``, ``stage-2-blockwise/``, ... (one run
folder per stage), ``teacher_cache/`` (shared by the block stages unless a stage names its own
``blockwise.cache_dir``), ``best/`` (the chosen student), ``recovery_summary.json``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from kronlm.distill.block_runs import copy_model, split_blocks, validation_ppl
from kronlm.distill.blockwise import distill_blockwise
from kronlm.distill.config import TrainingConfig
from kronlm.distill.distributed import make_accelerator
from kronlm.distill.local import distill_local
from kronlm.distill.trainer import train
from kronlm.modeling import load
from kronlm.utils.atomic import folder_lock, write_json
from kronlm.utils.config import ConfigBase, merge_settings, read_config_file
from kronlm.utils.files import json_ready, read_json
from kronlm.utils.memory import release_memory

DEFAULT_RECIPE = Path(__file__).with_name("defaults") / "recover.yaml"
SUMMARY_FILE = "recovery_summary.json"
STAGE_DONE_FILE = "stage_done.json"
# ``kronlm compress --recover``: tokens of the training text used, and the share held out (the
# last 1/16) to choose each stage's student.
DEFAULT_RECOVER_TOKENS = 32768
RECOVER_VAL_FRACTION = 0.0625
# A stage after one that overran its budget still gets this share of its own.
MIN_STAGE_SHARE = 0.25


def recovery_folder(out: str | os.PathLike) -> Path:
    """The run folder of ``kronlm compress --recover`` beside the model folder ``out``: ``OUT.recovery``."""
    out = Path(out)
    return out.with_name(out.name + ".recovery")


@dataclass
class RecoveryConfig(ConfigBase):
    """Stages of a recovery, run in order on one student (module docstring).

    In a file, ``defaults`` holds the settings every stage starts from and ``stages`` the
    settings of each stage on top of them (a nested section such as ``local:`` merges key by
    key); a file without ``stages`` is one stage. ``max_minutes`` of a stage is that stage's
    wall-clock budget, its teacher cache included (in the block modes shared out over the
    blocks); :func:`recover` gives what a stage leaves to the next one and takes what it overruns
    from the next one (down to ``MIN_STAGE_SHARE`` of that stage's own budget).

    Attributes:
        stages: the stages' :class:`TrainingConfig`s, in order.

    Raises:
        ValueError: no stage, or a stage's invalid setting (named with its position).
    """

    stages: list[TrainingConfig] = field(default_factory=list)

    config_name = "recovery config"

    @classmethod
    def _from_plain(cls, data: dict[str, Any], source: str) -> dict[str, Any]:
        stages = data.get("stages")
        if isinstance(stages, list):
            data["stages"] = [s if isinstance(s, TrainingConfig) else TrainingConfig.from_dict(s, source=f"{source}, stage {i + 1}")
                              for i, s in enumerate(stages)]
        return data

    def validate(self) -> None:
        """At least one stage, each a TrainingConfig."""
        if not isinstance(self.stages, list) or not self.stages:
            raise ValueError("stages must be a non-empty list of training configs")
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, TrainingConfig):
                raise ValueError(f"stage {i + 1} must be a training config, got {type(stage).__name__}")

    @classmethod
    def from_file(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> RecoveryConfig:
        """Read a staged file (``defaults`` + ``stages``) or a one-stage training config file;
        ``overrides`` apply to every stage.

        Raises:
            FileNotFoundError: no such file.
            ValueError: unknown keys or bad values (file and stage named), a stage list that is
                not a list of mappings.
        """
        data = read_config_file(path, cls.config_name)
        source = f"{cls.config_name} {path}"
        if "stages" not in data:
            return cls(stages=[TrainingConfig.from_file(path, overrides)])
        cls_keys = {"defaults", "stages"}
        unknown = sorted(set(data) - cls_keys)
        if unknown:
            raise ValueError(f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                             f"(a staged file holds {', '.join(sorted(cls_keys))})")
        defaults, stages = data.get("defaults") or {}, data["stages"]
        if not isinstance(defaults, dict):
            raise ValueError(f"{source}: defaults must be a mapping, got {type(defaults).__name__}")
        if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
            raise ValueError(f"{source}: stages must be a non-empty list of mappings")
        merged = [merge_settings(merge_settings(defaults, s), overrides or {}) for s in stages]
        return cls.from_dict({"stages": merged}, source=source)

    def with_budget(self, minutes: float) -> RecoveryConfig:
        """A copy whose stage budgets add up to ``minutes``: stages with a ``max_minutes`` are
        scaled in proportion; a stage without one gets the minutes the others leave (equal shares
        when none has one).

        Raises:
            ValueError: ``minutes`` is not positive.
        """
        if not minutes > 0:
            raise ValueError(f"a recovery budget must be positive, got {minutes!r} minutes")
        given = [s.max_minutes for s in self.stages if s.max_minutes is not None]
        open_stages = len(self.stages) - len(given)
        if not given:
            shares = [minutes / len(self.stages)] * len(self.stages)
        elif open_stages == 0:
            scale = minutes / sum(given)
            shares = [s.max_minutes * scale for s in self.stages]
        else:
            fixed = min(sum(given), minutes * 0.5)
            scale = fixed / sum(given)
            rest = (minutes - fixed) / open_stages
            shares = [s.max_minutes * scale if s.max_minutes is not None else rest for s in self.stages]
        return RecoveryConfig(stages=[s.replace(max_minutes=m) for s, m in zip(self.stages, shares)])


def default_recovery_config(minutes: float | None = None) -> RecoveryConfig:
    """The recovery ``kronlm compress --recover`` runs: the stages of the packaged
    ``defaults/recover.yaml`` (local -> block-wise -> end-to-end; ``configs/recover.yaml`` is a
    copy), their budgets scaled to ``minutes`` in all when given.

    Raises:
        ValueError: ``minutes`` is not positive.
    """
    config = RecoveryConfig.from_file(DEFAULT_RECIPE)
    return config if minutes is None else config.with_budget(minutes)


@dataclass
class StageRecord:
    """What one stage did (``recovery_summary.json``).

    Attributes:
        index: 1-based position; mode: the stage's mode; folder: its run folder.
        seconds: wall-clock seconds of the stage (its teacher cache included).
        tokens: training tokens one block (block modes) or the whole model (end to end) saw.
        val_ppl_before, val_ppl_after: validation perplexity on the held-out blocks before and
            after the stage (after = the student the stage chose).
    """

    index: int
    mode: str
    folder: str
    seconds: float = 0.0
    tokens: int = 0
    val_ppl_before: float | None = None
    val_ppl_after: float | None = None


@dataclass
class RecoveryResult:
    """What :func:`recover` did.

    Attributes:
        stages: one :class:`StageRecord` per stage.
        chosen: the 1-based stage whose student was kept (lowest validation perplexity; 0 = the
            starting student, when no stage improved on it).
        val_ppl: validation perplexity of the kept student.
        seconds: wall-clock seconds of all stages.
        best_dir: ``out_dir/best``, the kept student (None when the starting student was kept).
    """

    stages: list[StageRecord] = field(default_factory=list)
    chosen: int = 0
    val_ppl: float | None = None
    seconds: float = 0.0
    best_dir: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return json_ready(self)


def stage_folder(out_dir: Path, index: int, mode: str) -> Path:
    """The run folder of stage ``index`` (1-based): ``out_dir/stage-1-local``."""
    return out_dir / f"stage-{index}-{mode}"


def recover(
    student: nn.Module,
    teacher: nn.Module,
    blocks: Any,
    config: RecoveryConfig | TrainingConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    tokenizer=None,
    progress: bool = True,
    run_settings: dict[str, Any] | None = None,
) -> RecoveryResult:
    """Run the stages of ``config`` on ``student`` in order (module docstring); in place.

    Args:
        student: a compressed copy of ``teacher`` (truncated students recover end to end only).
        teacher: the dense model (frozen).
        blocks: a ``TokenBlocks`` or ``{"train": (N, T), "val": (M, T)}`` int64 token blocks; ``val``
            are held-out training tokens (never the test split): they choose each stage's student
            and the stage kept.
        config: the stages (a single :class:`TrainingConfig` is one stage).
        out_dir: run folder (module docstring).
        resume: continue an interrupted recovery: finished stages are loaded, the interrupted one
            resumes from its checkpoints.
        tokenizer: saved with the exported students.
        progress: tqdm bars.
        run_settings: settings outside ``config`` that change the result, recorded and compared on
            resume by every stage.

    Returns:
        A :class:`RecoveryResult`; ``student`` holds the kept stage's weights.

    Raises:
        ValueError: see :func:`~kronlm.distill.local.distill_local`,
            :func:`~kronlm.distill.blockwise.distill_blockwise` and
            :func:`~kronlm.distill.trainer.train`; a resumed run whose stages differ.
        OSError: a cache or captures the disk cannot hold; another process writes ``out_dir``.
    """
    if isinstance(config, TrainingConfig):
        config = RecoveryConfig(stages=[config])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(out_dir.absolute()):
        config.to_file(out_dir / "recovery_config.yaml")
        return _recover(student, teacher, blocks, config, out_dir, resume, tokenizer, progress, run_settings)


def _recover(student, teacher, blocks, config: RecoveryConfig, out_dir: Path, resume: bool, tokenizer, progress: bool,
             run_settings) -> RecoveryResult:
    _, val_ids = split_blocks(blocks)
    result = RecoveryResult()
    started = time.perf_counter()
    # The starting student, in case no stage improves on it.
    start = {k: v.detach().to("cpu", copy=True) for k, v in student.state_dict().items()}
    current = validation_ppl(student, val_ids, make_accelerator(config.stages[0], out_dir), config.stages[0].micro_batch_size)
    best_ppl, best_folder = current, None
    # Minutes an earlier stage left of its budget, given to the next one; negative when it overran
    # (a teacher cache, a last validation), taken from the next one down to a quarter of its own
    # budget, so that the recovery as a whole keeps to the minutes it was given where it can.
    leftover = 0.0
    for index, stage in enumerate(config.stages, start=1):
        folder = stage_folder(out_dir, index, stage.mode)
        if stage.max_minutes is not None and leftover != 0:
            stage = stage.replace(max_minutes=max(stage.max_minutes + leftover, MIN_STAGE_SHARE * stage.max_minutes))
        t0 = time.perf_counter()
        done = folder / STAGE_DONE_FILE
        if resume and done.is_file():
            record = StageRecord(**read_json(done))
            chosen = folder / "best"
            student.load_state_dict(load(chosen).state_dict())
        else:
            record, chosen = _run_stage(index, student, teacher, blocks, stage, folder, resume, tokenizer, progress, run_settings)
            release_memory()  # the stage's captures and activations are gone; give their pages back before the next
            record.val_ppl_before = current
            record.seconds = time.perf_counter() - t0
            write_json(done, dataclasses.asdict(record))
        result.stages.append(record)
        leftover = stage.max_minutes - record.seconds / 60.0 if stage.max_minutes is not None else 0.0
        current = record.val_ppl_after
        if best_ppl is None or (current is not None and current < best_ppl):
            best_ppl, best_folder, result.chosen = current, chosen, index
        else:  # this stage made it worse: the next one starts from the best student so far
            if best_folder is not None:
                student.load_state_dict(load(best_folder).state_dict())
            else:
                student.load_state_dict(start)
            current = best_ppl
    result.val_ppl = best_ppl
    result.seconds = time.perf_counter() - started
    if best_folder is not None:
        result.best_dir = copy_model(best_folder, out_dir / "best")
    write_json(out_dir / SUMMARY_FILE, result.to_dict())
    return result


def _run_stage(index: int, student, teacher, blocks, stage: TrainingConfig, folder: Path, resume: bool, tokenizer, progress: bool,
               run_settings) -> tuple[StageRecord, Path]:
    record = StageRecord(index, stage.mode, str(folder))
    if stage.mode in ("local", "blockwise") and stage.blockwise.cache_dir is None:
        # One teacher hidden-state cache for all block stages of the recovery: the same teacher and tokens.
        stage = stage.replace(blockwise={**stage.blockwise.to_dict(), "cache_dir": str(folder.parent / "teacher_cache")})
    if stage.mode == "local":
        out = distill_local(student, teacher, blocks, stage, folder, resume=resume, tokenizer=tokenizer, progress=progress,
                            run_settings=run_settings)
        trained = [b for b in out.blocks if b.trained]
        record.tokens = trained[0].tokens if trained else 0
        record.val_ppl_after = out.val_ppl_after
        return record, out.best_dir
    if stage.mode == "blockwise":
        out = distill_blockwise(student, teacher, blocks, stage, folder, resume=resume, tokenizer=tokenizer, progress=progress,
                                run_settings=run_settings)
        trained = [b for b in out.blocks if b.trained]
        record.tokens = trained[0].tokens if trained else 0
        record.val_ppl_after = min(p for p in (out.val_ppl_blockwise, out.val_ppl_end_to_end) if p is not None) \
            if out.val_ppl_blockwise is not None else None
        student.load_state_dict(load(out.best_dir).state_dict())
        return record, out.best_dir
    run = train(student, teacher, blocks, stage, folder, resume=resume and (folder / "checkpoints").is_dir(), tokenizer=tokenizer,
                run_settings=run_settings, check_student=True)
    record.tokens = run.tokens_seen
    record.val_ppl_after = run.best_val_ppl
    chosen = run.best_dir if run.best_dir is not None else run.final_dir
    student.load_state_dict(load(chosen).state_dict())
    return record, chosen


__all__ = [
    "DEFAULT_RECIPE",
    "DEFAULT_RECOVER_TOKENS",
    "RECOVER_VAL_FRACTION",
    "RecoveryConfig",
    "RecoveryResult",
    "StageRecord",
    "default_recovery_config",
    "recover",
    "recovery_folder",
    "stage_folder",
]
