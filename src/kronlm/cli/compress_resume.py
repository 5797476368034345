"""``kronlm compress --recover ... --resume``: continue a recovery that was interrupted.

Before its first stage, ``kronlm compress --recover`` saves the compressed student in
``OUT.recovery/compressed`` and the settings that made it in ``OUT.recovery/compress_settings.json``.
``--resume`` loads that student instead of compressing again (a budget allocation takes minutes,
and a calibration on another machine or thread count need not give the same bits), refuses a
command whose compression settings differ from the saved ones, and hands ``resume=True`` to
:func:`kronlm.recover`: finished stages are kept, the interrupted one continues from its
checkpoints, and each stage checks that its data, teacher and starting student are the ones it
began with (docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import click

from kronlm.compression import BudgetConfig, CompressionConfig, count_parameters
from kronlm.modeling import load, save
from kronlm.utils import claim_run_folder, read_json, write_json

STUDENT_DIR = "compressed"
SETTINGS_FILE = "compress_settings.json"


def compression_settings(job, config: CompressionConfig | BudgetConfig) -> dict[str, Any]:
    """What decides the compressed student of a ``kronlm compress`` job, as JSON values: the model,
    the preset / config file (name and SHA-256 of its bytes) or the budget's settings, the
    initialiser and SVD solver overrides, and the calibration."""
    config_file = None
    if job.config_file is not None:
        config_file = {"path": str(job.config_file), "sha256": hashlib.sha256(Path(job.config_file).read_bytes()).hexdigest()}
    settings = {
        "model": job.model,
        "preset": job.preset,
        "config_file": config_file,
        "budget": config.to_dict() if isinstance(config, BudgetConfig) else None,
        "svd_solver": job.svd_solver,
        "init": job.init_name,
        "calibration": [f"{item.spec}={item.weight:g}" for item in job.calibration],
        "calibration_split": job.calibration_split,
        "calibration_field": job.calibration_field,
        "calibration_sequences": job.calibration_sequences,
        "calibration_length": job.calibration_length,
        "calibration_seed": job.calibration_seed,
    }
    return json.loads(json.dumps(settings))  # tuples as lists: what the file will give back


def check_resumable(run_dir: Path, resume: bool) -> None:
    """Before any work: ``--resume`` needs a saved student in ``run_dir``; a fresh run needs a
    recovery folder that holds no earlier recovery.

    Raises:
        click.UsageError: ``--resume`` without a saved student, or an earlier recovery in
            ``run_dir`` without ``--resume`` (names the folder and both ways on).
    """
    saved = (run_dir / STUDENT_DIR / "config.json").is_file() and (run_dir / SETTINGS_FILE).is_file()
    if resume and not saved:
        raise click.UsageError(f"--resume: {run_dir} holds no compressed student to continue from; run the command "
                               "without --resume to compress and recover from the start")
    started = (run_dir / STUDENT_DIR).exists() or any(run_dir.glob("stage-*"))
    if not resume and started:
        raise click.UsageError(f"{run_dir} holds an earlier recovery: add --resume to continue it (the same command "
                               "otherwise), or delete the folder to start again")


def save_student(student, tokenizer, run_dir: Path, settings: dict[str, Any]) -> None:
    """Claim ``run_dir`` as a run folder and save the compressed ``student`` (atomically, with the
    tokenizer) and then its ``settings``; a crash in between leaves a folder ``--resume`` refuses
    by name, never a student with another command's settings."""
    run_dir = claim_run_folder(run_dir)
    save(student, run_dir / STUDENT_DIR, tokenizer=tokenizer)
    write_json(run_dir / SETTINGS_FILE, settings)


def load_student(run_dir: Path, settings: dict[str, Any]):
    """The compressed student saved in ``run_dir``, after checking that ``settings`` (this
    command's :func:`compression_settings`) are the ones it was made with.

    Raises:
        click.UsageError: a setting differs (each one named with the saved and the new value).
        ValueError, FileNotFoundError: a corrupt or incomplete saved student (from :func:`kronlm.load`).
    """
    saved = read_json(run_dir / SETTINGS_FILE)
    changed = [f"{key} {saved.get(key)!r} -> {settings.get(key)!r}" for key in sorted(set(saved) | set(settings))
               if saved.get(key) != settings.get(key)]
    if changed:
        raise click.UsageError(f"cannot resume {run_dir}: its student was compressed with other settings ({'; '.join(changed)}); "
                               "give the command it was started with, or delete the folder to start again")
    student = load(run_dir / STUDENT_DIR)
    click.echo(f"resuming {run_dir}: the compressed student saved before recovery ({count_parameters(student):,} params)")
    return student
