"""The reliability attack suite, recorded: every way a user (or a crash) has broken kronlm, as a
test on a tiny model or a file crafted in tmp_path, seconds each.

1. Resume tied to its inputs: a different --data, --max-tokens, --val-fraction, --teacher,
   starting student or result-changing setting is refused, naming the difference.
2. trainer_state.json is covered by the checkpoint manifest and range-checked.
3. A damaged latest checkpoint falls back to the newest earlier one that verifies (saying so) and
   the run continues exactly as the uninterrupted one; with none, each is named.
4. What a killed run left (temporary folders, stale locks) is removed at the next start.
5. The command line: every bad input gives one line ``kronlm: error: ...`` naming the file,
   tensor, key or value, and a non-zero exit status, never a traceback.
6. No command destroys what kronlm did not write: an output that exists is replaced only when
   kronlm wrote it (or with --overwrite), never when it is, holds or lies inside an input, checked
   before any work; a symlinked --out is followed.
7. Every file read from a model folder is a regular file inside it; a folder replaced while it is
   loaded gives one version, never a mixture blamed on the folder.
8. Hostile configs and data: sizes of the wrong type or range, nesting, devices, huge records.
9. A full disk or a file-size limit: one line, the previous model kept.
10. Ecosystem paths that would silently skip the Kronecker layers refuse, saying what to do.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from training_models import BLOCK, VOCAB
from training_models import tiny_gpt2 as _tiny_gpt2
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import kronlm
from kronlm.cli import main
from kronlm.data.blocks import TokenBlocks
from kronlm.distill.checkpoint import (
    MANIFEST_FILE,
    TRAINER_STATE_FILE,
    CheckpointError,
    check_trainer_state,
    checkpoints_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from kronlm.distill import distributed
from kronlm.distill.config import TrainingConfig
from kronlm.distill.fingerprint import model_fingerprint, tokens_fingerprint
from kronlm.distill.trainer import ResumeMismatch, train
from kronlm.utils.atomic import (
    FolderBusyError,
    clean_interrupted_writes,
    folder_lock,
)
from kronlm.utils.files import (
    file_sha256,
    read_json,
)

# ------------------------------------------------------------------------------------------------ helpers


def tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    return _tiny_gpt2(seed, dropout=0.1)


def blocks(multiplier: int = 5, tokens: int = VOCAB * 20) -> TokenBlocks:
    ids = (torch.arange(tokens) * multiplier) % VOCAB
    return TokenBlocks.from_ids(ids, BLOCK, val_fraction=0.1)


def config(tmp_path, **kw) -> TrainingConfig:
    values = {"recipe": "ilkd-kngpt2", "block_size": BLOCK, "micro_batch_size": 2, "max_steps": 6, "lr": 5e-3, "min_lr": 5e-4,
              "warmup_steps": 1, "eval_every": 2, "save_every": 2, "keep_checkpoints": 3, "mixed_precision": "no", "seed": 5,
              "log_dir": str(tmp_path / "logs")}
    values.update(kw)
    return TrainingConfig(**values)


def run(tmp_path, name, *, student_seed=1, teacher_seed=2, data=None, resume=False, **kw):
    cfg = config(tmp_path, **kw.pop("cfg", {}))
    return train(tiny_gpt2(student_seed), _tiny_gpt2(teacher_seed), data or blocks(), cfg, tmp_path / name,
                 resume=resume, **kw)


def rewrite_manifest(folder) -> None:
    """Make a hand-edited checkpoint consistent again, as a careful attacker (or a buggy tool) would."""
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def edit_state(folder, consistent: bool, **values) -> None:
    state = json.loads((folder / TRAINER_STATE_FILE).read_text())
    state.update(values)
    (folder / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2))
    if consistent:
        rewrite_manifest(folder)


# ------------------------------------------------------------------------------------------------ 1. resume tied to inputs


def test_the_checkpoint_records_the_runs_inputs(tmp_path):
    result = run(tmp_path, "a", run_settings={"--max-tokens": 1000})
    state = load_checkpoint(result.last_checkpoint).trainer_state
    fp = state["run"]
    data = blocks()
    assert fp["train_data"] == tokens_fingerprint(data.train) and fp["val_data"] == tokens_fingerprint(data.val)
    assert fp["teacher"] == model_fingerprint(_tiny_gpt2(2))
    assert fp["student_start"] == model_fingerprint(tiny_gpt2(1))  # before training, not the trained weights
    assert fp["settings"] == {"--max-tokens": 1000}
    assert state["format_version"] == 2


RESUME_CHANGES = [
    ("tokens", {"data": "other-tokens"},
     r"training data differ \(sha256 [0-9a-f]{12} in the checkpoint, [0-9a-f]{12} now: their content changed\); validation data differ"),
    ("fewer-examples", {"data": "fewer"}, r"the data order would change \(training examples 72 -> 64\); training data differ"),
    ("teacher", {"teacher_seed": 3}, r"teacher differs \(weights/config sha256 [0-9a-f]{12} in the checkpoint, [0-9a-f]{12} now\)"),
    ("student", {"student_seed": 4, "check_student": True}, r"starting student differs \(weights/config sha256"),
    ("lr", {"cfg": {"lr": 1e-3}}, r"settings differ \(lr 0\.005 -> 0\.001\)"),
    ("recipe", {"cfg": {"recipe": "distilgpt2"}}, r"settings differ \(recipe 'ilkd-kngpt2' -> 'distilgpt2'\)"),
    ("run-settings", {"run_settings": {"--max-tokens": 2000}}, r"--max-tokens 1000 -> 2000"),
]


@pytest.mark.parametrize("name, change, message", RESUME_CHANGES, ids=[c[0] for c in RESUME_CHANGES])
def test_resume_with_other_inputs_is_refused_naming_the_difference(tmp_path, name, change, message):
    run(tmp_path, "r", run_settings={"--max-tokens": 1000}, cfg={"max_steps": 4})
    kw = {"run_settings": {"--max-tokens": 1000}, **change}
    kw["cfg"] = {"max_steps": 6, **change.get("cfg", {})}
    kw["data"] = {None: None, "other-tokens": blocks(multiplier=7), "fewer": blocks(tokens=VOCAB * 18)}[change.get("data")]
    with pytest.raises(ResumeMismatch, match=r"cannot resume from \S*step-0000004: .*" + message):
        run(tmp_path, "r", resume=True, **kw)
    # Nothing was trained or written by the refused resume.
    assert [s for s, _ in list_checkpoints(tmp_path / "r")] == [2, 4]


def test_resume_compares_the_precision_mixed_precision_resolved_to(tmp_path, monkeypatch):
    run(tmp_path, "r", cfg={"max_steps": 4})  # mixed_precision "no"
    assert load_checkpoint(tmp_path / "r").trainer_state["precision"] == "no"
    # `auto` on a machine where it means float32 is the same run: it continues.
    real = distributed.resolve_mixed_precision
    monkeypatch.setattr(distributed, "resolve_mixed_precision", lambda mode: "no" if mode == "auto" else real(mode))
    assert run(tmp_path, "r", resume=True, cfg={"max_steps": 6, "mixed_precision": "auto"}).start_step == 4
    # bf16 is not: refused, naming both settings (the latest checkpoint is the `auto` run's).
    with pytest.raises(ResumeMismatch, match=r"training precision 'no' -> 'bf16' \(mixed_precision 'auto' -> 'bf16' on this machine\)"):
        run(tmp_path, "r", resume=True, cfg={"max_steps": 8, "mixed_precision": "bf16"})


def test_the_same_inputs_resume_and_a_longer_run_is_allowed(tmp_path):
    full = run(tmp_path, "full", cfg={"max_steps": 6})
    run(tmp_path, "r", cfg={"max_steps": 6, "save_every": 2}, check_student=True)
    # A fresh process: the same student start from disk, other seeds in torch's RNG.
    torch.manual_seed(999)
    again = run(tmp_path, "r", resume=True, cfg={"max_steps": 6}, check_student=True)
    assert again.start_step == 6 and again.losses == []
    longer = run(tmp_path, "r", resume=True, cfg={"max_steps": 8, "eval_every": 4}, check_student=True)
    assert longer.start_step == 6 and longer.steps == 8 and len(full.losses) == 6
    # The recorded starting point is still the original student's.
    assert load_checkpoint(tmp_path / "r").trainer_state["run"]["student_start"] == model_fingerprint(tiny_gpt2(1))


def test_by_default_the_python_api_accepts_any_student_of_the_architecture(tmp_path):
    run(tmp_path, "r", cfg={"max_steps": 4})
    resumed = run(tmp_path, "r", resume=True, student_seed=77, cfg={"max_steps": 6})
    assert resumed.start_step == 4  # the checkpoint's weights replaced the given ones


# ------------------------------------------------------------------------------------------------ 2. trainer_state.json


def test_trainer_state_is_covered_by_the_checksums(tmp_path):
    result = run(tmp_path, "r", cfg={"max_steps": 2})
    folder = result.last_checkpoint
    edit_state(folder, consistent=False, step=-5)
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: checkpoint file (corrupt|truncated or altered)"):
        load_checkpoint(folder)
    (folder / MANIFEST_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"manifest\.json: file not found"):
        load_checkpoint(folder)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"step": -5}, r"trainer_state\.json: step = -5 is out of range \(an integer >= 0\)"),
        ({"step": 3}, r"trainer_state\.json: step = 3 but the folder is step-0000002"),
        ({"tokens_seen": -1}, r"tokens_seen = -1 is out of range"),
        ({"tokens_seen": "many"}, r"tokens_seen = 'many' is out of range"),
        ({"world_size": 0}, r"world_size = 0 is out of range \(an integer >= 1\)"),
        ({"best_step": 9}, r"best_step = 9 is after the checkpoint's step 2"),
        ({"best_val": float("nan")}, r"best_val = nan is out of range \(null or a finite number\)"),
        ({"epoch": 5}, r"epoch = 5 and step_in_epoch = 2 do not give step 2"),
        ({"max_steps": 1}, r"step = 2 exceeds max_steps = 1"),
        ({"format_version": 7}, r"format_version = 7 is out of range"),
        ({"run": ["x"]}, r"run = \['x'\] is out of range \(a mapping\)"),
    ],
)
def test_trainer_state_values_are_range_checked(tmp_path, values, message):
    result = run(tmp_path, "r", cfg={"max_steps": 2, "eval_every": 1, "save_every": 2})
    edit_state(result.last_checkpoint, consistent=True, **values)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(result.last_checkpoint)


def test_a_bad_state_is_never_written():
    with pytest.raises(CheckpointError, match=r"state\.json: tokens_seen = -3 is out of range"):
        check_trainer_state({"step": 1, "tokens_seen": -3}, "state.json")


def test_checkpoints_of_format_1_still_resume_with_a_note(tmp_path, capsys):
    full = run(tmp_path, "full")
    run(tmp_path, "r")
    shutil.rmtree(checkpoints_dir(tmp_path / "r") / "step-0000006")  # as if killed during step 5
    (checkpoints_dir(tmp_path / "r") / "latest").write_text("step-0000004\n")
    for _, folder in list_checkpoints(tmp_path / "r"):  # as kronlm wrote them before manifest.json
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        (folder / MANIFEST_FILE).unlink()
        state = json.loads((folder / TRAINER_STATE_FILE).read_text())
        del state["run"]
        state.update(format_version=1, files={k: v for k, v in manifest["files"].items() if k != TRAINER_STATE_FILE})
        (folder / TRAINER_STATE_FILE).write_text(json.dumps(state))
    assert load_checkpoint(tmp_path / "r").format_version == 1
    resumed = run(tmp_path, "r", resume=True)
    assert resumed.start_step == 4
    assert "was written before kronlm recorded a run's inputs" in "".join(capsys.readouterr())
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(full.losses[4:]), rtol=0, atol=1e-6)
    assert load_checkpoint(tmp_path / "r").format_version == 2  # new checkpoints are written in the current format


# ------------------------------------------------------------------------------------------------ 3. fallback


def _damage(folder, how: str) -> None:
    if how == "flip-weights":
        data = bytearray((folder / "model.safetensors").read_bytes())
        data[-3] ^= 0x10
        (folder / "model.safetensors").write_bytes(bytes(data))
    elif how == "negative-step":
        edit_state(folder, consistent=True, step=-5)
    elif how == "missing-optimizer":
        (folder / "optimizer.safetensors").unlink()
    elif how == "garbled-state":
        (folder / TRAINER_STATE_FILE).write_bytes(b"\xd0\xff{")


@pytest.mark.parametrize("how", ["flip-weights", "negative-step", "missing-optimizer", "garbled-state"])
def test_a_damaged_latest_checkpoint_falls_back_and_continues_exactly(tmp_path, capsys, how):
    full = run(tmp_path, "full")
    run(tmp_path, "r")
    latest = latest_checkpoint(tmp_path / "r")
    assert latest.name == "step-0000006"
    _damage(latest, how)
    capsys.readouterr()
    resumed = run(tmp_path, "r", resume=True)
    said = "".join(capsys.readouterr())
    assert "--resume: step-0000006 is unusable: " in said
    assert "resuming from " in said and "step-0000004, the newest checkpoint that verifies" in said
    assert resumed.start_step == 4 and resumed.steps == 6
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(full.losses[4:]), rtol=0, atol=1e-6)
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "r")  # step 6 rewritten, verifies again
    assert all(torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)


def test_checkpoints_of_an_abandoned_timeline_are_pruned(tmp_path):
    run(tmp_path, "r")
    _damage(latest_checkpoint(tmp_path / "r"), "flip-weights")
    resumed = run(tmp_path, "r", resume=True, cfg={"max_steps": 5, "save_every": 1})
    assert resumed.start_step == 4 and resumed.steps == 5
    # The damaged step 6 came after the step the run resumed from: never used again, removed.
    assert [s for s, _ in list_checkpoints(tmp_path / "r")] == [2, 4, 5]


def test_a_garbled_latest_pointer_falls_back_to_the_newest_folder(tmp_path, capsys):
    run(tmp_path, "r", cfg={"max_steps": 4})
    (checkpoints_dir(tmp_path / "r") / "latest").write_bytes(b"\x00\xffnonsense")
    resumed = run(tmp_path, "r", resume=True, cfg={"max_steps": 6})
    assert resumed.start_step == 4
    assert "checkpoints/latest: not UTF-8 text at line 1 (byte 0xff at offset 1)" in "".join(capsys.readouterr())


def test_with_no_checkpoint_that_verifies_each_is_named(tmp_path):
    run(tmp_path, "r", cfg={"max_steps": 4})
    for _, folder in list_checkpoints(tmp_path / "r"):
        _damage(folder, "flip-weights")
    with pytest.raises(CheckpointError, match=r"no checkpoint verifies: step-0000004 is unusable: .*model\.safetensors: checkpoint file "
                                               r"corrupt.*; step-0000002 is unusable: .*model\.safetensors"):
        run(tmp_path, "r", resume=True, cfg={"max_steps": 6})


# ------------------------------------------------------------------------------------------------ 4. leftovers


def test_leftovers_of_a_killed_run_are_removed_at_the_next_start(tmp_path, capsys):
    run(tmp_path, "r", cfg={"max_steps": 4})
    out = tmp_path / "r"
    root = checkpoints_dir(out)
    debris = [root / ".step-0000006.k3j2h1g0.tmp", out / ".best.a1b2c3d4.tmp", out / ".final.zzzzzzzz.tmp"]
    for folder in debris:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    (root / ".latest.q1w2e3r4.tmp").write_text("step-0000006")
    (root / ".step-0000006.lock").write_text("")  # no process holds it
    (out / "notes.txt").write_text("mine")  # not kronlm's: kept
    resumed = run(tmp_path, "r", resume=True, cfg={"max_steps": 6})
    assert resumed.start_step == 4
    assert not any(p.exists() for p in debris) and not (root / ".latest.q1w2e3r4.tmp").exists()
    assert not (root / ".step-0000006.lock").exists() and (out / "notes.txt").read_text() == "mine"
    assert "leftover(s) of an interrupted run" in "".join(capsys.readouterr())
    assert not list(tmp_path.glob(".r.lock"))  # the run's own lock is gone after the run


def _hold_lock(path: str, conn) -> None:
    with folder_lock(path):
        conn.send("held")
        conn.recv()
    os._exit(0)


def test_a_live_writers_temporaries_and_a_second_run_are_left_alone(tmp_path):
    out = tmp_path / "r"
    run(tmp_path, "r", cfg={"max_steps": 2})
    busy = checkpoints_dir(out) / ".step-0000004.abcdefgh.tmp"
    busy.mkdir()
    parent, child_end = multiprocessing.Pipe()
    holders = []
    for path in (checkpoints_dir(out) / "step-0000004", out):
        child = multiprocessing.get_context("fork").Process(target=_hold_lock, args=(str(path), child_end))
        child.start()
        assert parent.recv() == "held"
        holders.append(child)
    try:
        assert clean_interrupted_writes(checkpoints_dir(out)) == [] and busy.is_dir()
        with pytest.raises(FolderBusyError, match="another kronlm process is writing this folder"):
            run(tmp_path, "r", resume=True, cfg={"max_steps": 4})
    finally:
        for child in holders:
            parent.send("done")
            child.join(30)


# ------------------------------------------------------------------------------------------------ 5. the command line

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "then", "sleeps", "in", "the", "sun", "."]


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "<eos>": 1}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>", pad_token="<eos>")


MLP = {"targets": [{"modules": ["**.mlp.c_fc"], "b_shape": [2, 1]}, {"modules": ["**.mlp.c_proj"], "b_shape": [1, 2]}]}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny dense GPT-2 with its own word-level tokenizer, its compressed copy, a teacher with other
    weights, and two text files."""
    root = tmp_path_factory.mktemp("attack")
    tokenizer = _tokenizer()
    paths = {}
    for name, seed in (("dense", 0), ("other_teacher", 1)):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=32, n_layer=2, n_head=2, n_positions=64, n_inner=64))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    config = root / "mlp.yaml"
    config.write_text(yaml.safe_dump(MLP))
    paths["compressed"] = root / "compressed"
    assert main(["compress", str(paths["dense"]), "--config", str(config), "--out", str(paths["compressed"])]) == 0
    for name, words in (("text", WORDS), ("other_text", list(reversed(WORDS)))):
        paths[name] = root / f"{name}.txt"
        paths[name].write_text("\n\n".join(" ".join(words) for _ in range(30)))
    paths["config"] = config
    return paths


def _one_line_error(capsys, argv, code=1) -> str:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("kronlm: error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def _header_edit(fn):
    def edit(folder):
        path = folder / "model.safetensors"
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = fn(json.loads(data[8 : 8 + n]))
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    return edit


def _tensors(header):
    return [k for k in header if k != "__metadata__"]


def _overlap(h):
    first, second = _tensors(h)[:2]
    h[second]["data_offsets"] = h[first]["data_offsets"]
    return h


def _config_edit(fn):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        fn(config)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def _pickled_only(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04\x95not a real pickle")


FOLDER_ATTACKS = [
    ("header-is-a-list", _header_edit(lambda h: [1, 2]), r"model\.safetensors: truncated or corrupt safetensors file \(.*sequence"),
    ("header-entry-not-a-dict", _header_edit(lambda h: {**h, "x": 5}), r"model\.safetensors: truncated or corrupt .*integer `5`"),
    ("overlapping-byte-ranges", _header_edit(_overlap), r"model\.safetensors: truncated or corrupt .*invalid .*offset for tensor"),
    ("unknown-dtype", _header_edit(lambda h: {**h, _tensors(h)[0]: {**h[_tensors(h)[0]], "dtype": "Q99"}}), r"unknown variant `Q99`"),
    ("no-data-offsets", _header_edit(lambda h: {**h, _tensors(h)[0]: {"dtype": "F32", "shape": [1]}}), r"missing field `data_offsets`"),
    ("plan-modules-a-list", _config_edit(lambda c: c["kronlm"].__setitem__("modules", [1, 2])),
     r"kronlm plan: modules must be a mapping of module names to entries, got list"),
    ("plan-a-string", _config_edit(lambda c: c.__setitem__("kronlm", "tied")), r"kronlm plan must be a mapping, got str"),
    ("plan-entry-without-out", _config_edit(lambda c: [v.pop("out") for v in c["kronlm"]["modules"].values()]),
     r"kronlm plan entry 'transformer\.h\.0\.mlp\.c_fc' has no key 'out'"),
    ("config-not-utf8", lambda f: (f / "config.json").write_bytes('{"model_type": "gpt2", "name": "Привет"}'.encode("koi8-r")),
     r"config\.json"),
    ("pickled-only", _pickled_only, r"holds only pytorch_model\.bin, a pickled checkpoint kronlm does not load"),
    ("flipped-byte", lambda f: f.joinpath("model.safetensors").write_bytes(f.joinpath("model.safetensors").read_bytes()[:-1] + b"\x01"),
     r"model\.safetensors: SHA-256 differs from the one recorded"),
]


@pytest.mark.parametrize("name, attack, message", FOLDER_ATTACKS, ids=[a[0] for a in FOLDER_ATTACKS])
def test_a_damaged_model_folder_gives_one_line_naming_it(folders, tmp_path, capsys, name, attack, message):
    folder = tmp_path / name
    shutil.copytree(folders["compressed"], folder)
    if name != "flipped-byte":
        (folder / "kronlm_manifest.json").unlink()  # else every edit is caught as a checksum mismatch
    attack(folder)
    line = _one_line_error(capsys, ["eval", folder, "--data", folders["text"], "--max-length", "16", "--stride", "8"])
    assert str(folder) in line, line
    assert re.search(message, line), line


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("unclosed-pattern", {"targets": [{"modules": ["re:(unclosed"], "b_shape": [2, 1]}]},
         r"target 0: module pattern 're:\(unclosed' is not a valid regular expression"),
        ("targets-a-mapping", {"targets": {"modules": ["**.mlp.c_fc"], "b_shape": [2, 1]}}, r"targets must be a list of rules, got dict"),
        ("not-utf8", b"targets: \xd0\xff\xfe\n", r"bad\.yaml: cannot parse \('utf-8' codec can't decode byte 0xd0"),
        ("nested", b"targets: " + b"[" * 50_000 + b"]" * 50_000, r"bad\.yaml: nested too deeply to parse"),
        ("fifo", None, r"bad\.yaml: is a FIFO \(named pipe\), not a regular file"),
    ],
)
def test_a_bad_compression_config_gives_one_line_naming_it(folders, tmp_path, capsys, name, content, message):
    path = tmp_path / "bad.yaml"
    if content is None:
        os.mkfifo(path)
    else:
        path.write_bytes(content if isinstance(content, bytes) else yaml.safe_dump(content).encode())
    line = _one_line_error(capsys, ["compress", folders["dense"], "--config", path, "--out", tmp_path / "out"])
    assert str(path) in line and re.search(message, line), line
    assert not (tmp_path / "out").exists()


def test_nan_weights_are_named_before_compressing(folders, tmp_path, capsys):
    model = GPT2LMHeadModel.from_pretrained(folders["dense"])
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[3, 4] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    _tokenizer().save_pretrained(tmp_path / "nan")
    line = _one_line_error(capsys, ["compress", tmp_path / "nan", "--config", folders["config"], "--init", "activation_aware",
                                    "--calibration", folders["text"], "--out", tmp_path / "out"])
    assert "tensor transformer.h.1.mlp.c_fc.weight (32, 64) holds 1 NaN or infinite values" in line


@pytest.mark.parametrize("out, message", [(".", r"--out \.: names an existing folder \(.*\), not a new one to write"),
                                          ("", r"--out '': an empty path names no file or folder"),
                                          ("..", r"--out \.\.: names an existing folder")])
def test_out_dot_is_refused_before_compressing(folders, tmp_path, capsys, monkeypatch, out, message):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    (tmp_path / "cwd" / "mine.txt").write_text("precious")
    line = _one_line_error(capsys, ["compress", folders["dense"], "--config", folders["config"], "--out", out], code=2)
    assert re.search(message, line), line
    assert sorted(os.listdir(tmp_path / "cwd")) == ["mine.txt"] and sorted(os.listdir(tmp_path)) == ["cwd"]


def test_text_and_json_readers_name_the_file_on_bad_bytes(folders, tmp_path, capsys):
    text = tmp_path / "latin.txt"
    text.write_bytes("Grüße aus Köln ".encode("latin-1") * 20)
    line = _one_line_error(capsys, ["eval", folders["dense"], "--data", text, "--max-length", "16", "--stride", "8"])
    assert str(text) in line and "UTF-8" in line
    bad = tmp_path / "x.json"
    bad.write_bytes(b'{"a": "\xd0"}')
    with pytest.raises(ValueError, match=r"x\.json: not UTF-8 text at line 1 \(byte 0xd0 at offset 7\)"):
        read_json(bad)


def _distill(folders, out, *extra, teacher=None, data=None):
    return ["distill", "--student", folders["compressed"], "--teacher", teacher or folders["dense"], "--data", data or folders["text"],
            "--out", out, "--max-steps", "2", "--block-size", "16", "--batch-size", "2", "--warmup-steps", "0",
            "--val-fraction", "0.1", *extra]


@pytest.mark.parametrize(
    "change, message",
    [
        (["--max-tokens", "300"], r"--max-tokens None -> 300; .*training data differ"),
        (["--val-fraction", "0.2"], r"--val-fraction 0\.1 -> 0\.2"),
        (["data"], r"--data '.*text\.txt' -> '.*other_text\.txt'; training data differ"),
        (["teacher"], r"teacher differs \(weights/config sha256"),
        (["--lr", "0.5"], r"settings differ \(lr 6e-05 -> 0\.5\)"),
    ],
    ids=["max-tokens", "val-fraction", "data", "teacher", "lr"],
)
def test_distill_resume_with_other_inputs_gives_one_line(folders, tmp_path, capsys, change, message):
    out = tmp_path / "run"
    assert main([str(a) for a in _distill(folders, out)]) == 0
    before = load_checkpoint(out).trainer_state
    kw = {}
    if change == ["data"]:
        kw["data"], change = folders["other_text"], []
    elif change == ["teacher"]:
        kw["teacher"], change = folders["other_teacher"], []
    argv = _distill(folders, out, "--resume", *change, **kw)
    argv[argv.index("--max-steps") + 1] = "4"
    if "--val-fraction" in change:
        del argv[argv.index("--val-fraction") : argv.index("--val-fraction") + 2]
        argv += ["--val-fraction", "0.2"]
    line = _one_line_error(capsys, argv)
    assert line.startswith("kronlm: error: cannot resume from ") and "step-0000002" in line
    assert re.search(message, line), line
    assert load_checkpoint(out).trainer_state == before  # nothing trained


def test_distill_resume_with_the_same_inputs_continues(folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([str(a) for a in _distill(folders, out)]) == 0
    argv = _distill(folders, out, "--resume")
    argv[argv.index("--max-steps") + 1] = "3"
    assert main([str(a) for a in argv]) == 0
    assert load_checkpoint(out).step == 3


def test_distill_resume_with_no_good_checkpoint_gives_one_line(folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([str(a) for a in _distill(folders, out, "--config", _save_every_one(tmp_path))]) == 0
    for _, folder in list_checkpoints(out):
        edit_state(folder, consistent=True, step=-5)
    line = _one_line_error(capsys, _distill(folders, out, "--resume", "--config", _save_every_one(tmp_path)))
    assert "no checkpoint verifies: step-0000002 is unusable: " in line and "trainer_state.json: step = -5 is out of range" in line


def _save_every_one(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"save_every": 1, "eval_every": 1, "keep_checkpoints": 5}))
    return path


def test_saved_files_get_the_users_usual_permissions(folders, tmp_path):
    # transformers 5 writes its shards through a private (0600) temporary file.
    model = kronlm.load(folders["compressed"])
    folder = tmp_path / "shared"
    kronlm.save(model, folder)
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes["model.safetensors"] == 0o666 & ~umask and set(modes.values()) == {0o666 & ~umask}
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask


# ------------------------------------------------------------------------------------------------ 6. never destroy user data

def _user_folder(path, **files):
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name.replace("__", "/")).parent.mkdir(parents=True, exist_ok=True)
        (path / name.replace("__", "/")).write_text(text)
    return _contents(path)


def _contents(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _compress(folders, model, out, *extra):
    return ["compress", model, "--config", folders["config"], "--out", out, *extra]


def test_a_folder_with_a_config_json_is_not_a_model_folder(folders, tmp_path, capsys):
    before = _user_folder(tmp_path / "P", **{"config.json": "{}", "notes.txt": "x", "src__main.py": "print(1)"})
    line = _one_line_error(capsys, _compress(folders, folders["dense"], tmp_path / "P"), code=2)
    assert "P: exists and is not a model folder (it holds 3 entries: config.json, notes.txt, src)" in line
    assert "kronlm replaces only folders it wrote itself (with kronlm_manifest.json)" in line and "--overwrite" in line
    assert _contents(tmp_path / "P") == before


def test_a_kronlm_folder_holding_user_files_is_not_replaced(folders, tmp_path, capsys):
    out = tmp_path / "k"
    shutil.copytree(folders["compressed"], out)
    (out / "my-notes.md").write_text("keep me")
    line = _one_line_error(capsys, _compress(folders, folders["dense"], out), code=2)
    assert "a model folder kronlm wrote, but it also holds 1 entries: my-notes.md that kronlm did not write" in line
    assert (out / "my-notes.md").read_text() == "keep me"
    (out / "my-notes.md").unlink()  # a folder kronlm wrote, and nothing else: replaced
    assert main([str(a) for a in _compress(folders, folders["dense"], out)]) == 0
    (out / "my-notes.md").write_text("keep me")
    assert main([str(a) for a in _compress(folders, folders["dense"], out, "--overwrite")]) == 0
    assert not (out / "my-notes.md").exists()


@pytest.mark.parametrize("where", ["parent", "same", "inside", "symlink-to-input"])
def test_an_out_that_is_holds_or_lies_inside_the_input_is_refused(folders, tmp_path, capsys, where):
    work = tmp_path / "W"
    shutil.copytree(folders["dense"], work / "dense")
    (work / "config.json").write_text("{}")
    (work / "thesis.tex").write_text("chapter 1")
    before = _contents(work)
    out, message = {"parent": (work, "holds the input"), "same": (work / "dense", "is the input"),
                    "inside": (work / "dense" / "k", "lies inside the input"), "symlink-to-input": (tmp_path / "link", "is the input")}[where]
    if where == "symlink-to-input":
        os.symlink(work / "dense", out)
    line = _one_line_error(capsys, _compress(folders, work / "dense", out, "--overwrite"), code=2)
    assert message in line and "refusing to write there" in line, line
    assert _contents(work) == before


def test_export_refuses_a_users_folder(folders, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    before = _user_folder(tmp_path / "U", **{"thesis.tex": "chapter 1"})
    line = _one_line_error(capsys, ["export", folders["compressed"], "--onnx", "--out", tmp_path / "U"], code=2)
    assert "U: exists and is not a model folder (it holds 1 entries: thesis.tex)" in line
    assert _contents(tmp_path / "U") == before


def test_distill_refuses_a_users_folder_before_any_work(folders, tmp_path, capsys, monkeypatch):
    before = _user_folder(tmp_path / "U", **{"training_config.yaml": "mine: 1", "best__notes.txt": "mine"})
    monkeypatch.setattr("kronlm.cli.distill.build_blocks", lambda *a, **k: pytest.fail("tokenised before refusing"))
    line = _one_line_error(capsys, _distill(folders, tmp_path / "U"), code=2)
    assert "U: exists and is not a kronlm run folder (it holds 2 entries: best, training_config.yaml)" in line
    assert _contents(tmp_path / "U") == before
    # A run folder kronlm made (its marker) is written into again, and the student may not sit where the run writes.
    monkeypatch.undo()
    assert main([str(a) for a in _distill(folders, tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "kronlm_run.json").is_file() and (tmp_path / "run" / "final" / "kronlm_manifest.json").is_file()
    argv = _distill(folders, tmp_path / "run")
    argv[argv.index("--student") + 1] = tmp_path / "run" / "final"
    line = _one_line_error(capsys, argv, code=2)
    assert re.search(r"run/final: is the input \S*run/final; refusing to write there", line), line


def test_eval_json_and_merge_gguf_do_not_replace_a_users_file(folders, tmp_path, capsys):
    precious = tmp_path / "precious.txt"
    precious.write_text("my notes")
    eval_argv = ["eval", folders["compressed"], "--data", folders["text"], "--max-length", "16", "--stride", "8", "--json", precious]
    line = _one_line_error(capsys, eval_argv, code=2)
    assert "precious.txt: exists and was not written by kronlm; refusing to replace it (pass --overwrite" in line
    assert precious.read_text() == "my notes"
    line = _one_line_error(capsys, ["merge", folders["compressed"], "--gguf", precious], code=2)
    assert "precious.txt: exists and was not written by kronlm" in line and precious.read_text() == "my notes"
    report = tmp_path / "r.json"
    for _ in range(2):  # a report kronlm wrote is replaced
        assert main([str(a) for a in eval_argv[:-1] + [report]]) == 0
    assert read_json(report)["written_by"] == "kronlm eval"
    assert main([str(a) for a in eval_argv + ["--overwrite"]]) == 0 and "ppl" in read_json(precious)


def test_bench_out_does_not_replace_a_users_file(tmp_path, capsys):
    page = tmp_path / "page.md"
    page.write_text("# my page")
    argv = ["bench", "layers", "--presets", "kroneckerbert21", "--tokens", "2", "--repeats", "1", "--no-backward", "--out", page]
    line = _one_line_error(capsys, argv, code=2)
    assert "page.md: exists and was not written by kronlm" in line and page.read_text() == "# my page"


def test_an_out_below_a_file_or_a_symlink_loop_gives_one_line(folders, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    line = _one_line_error(capsys, _compress(folders, folders["dense"], tmp_path / "afile" / "sub"))
    assert line == f"kronlm: error: {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file, not a folder; cannot write below it"
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    line = _one_line_error(capsys, _compress(folders, folders["dense"], tmp_path / "loop"))
    assert line == f"kronlm: error: {tmp_path / 'loop'}: a symlink loop, leading to no file or folder"


def test_a_symlinked_out_is_followed_and_left_clean(folders, tmp_path, capsys):
    target = tmp_path / "models" / "k"
    shutil.copytree(folders["compressed"], target)
    link = tmp_path / "link"
    os.symlink(target, link)
    # What an earlier version left: an exchanged symlink under a temporary name.
    os.symlink(target, tmp_path / ".link.abcd1234.tmp")
    (tmp_path / "models" / ".k.efgh5678.tmp").mkdir()
    assert main([str(a) for a in _compress(folders, folders["dense"], link)]) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert (target / "kronlm_manifest.json").is_file()
    kronlm.load(link)
    leftovers = [p.name for d in (tmp_path, tmp_path / "models") for p in d.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == [] and (target / "config.json").is_file()  # the old exchanged link removed, not followed


def test_kronlm_save_follows_the_policy(folders, tmp_path):
    model = kronlm.load(folders["compressed"])
    with pytest.raises(FileExistsError, match="is the input"):
        kronlm.save(model, folders["compressed"], inputs=[folders["compressed"]])
    mine = tmp_path / "mine"
    _user_folder(mine, **{"config.json": "{}"})
    with pytest.raises(FileExistsError, match="mine: exists and is not a model folder"):
        kronlm.save(model, mine)
    assert (mine / "config.json").read_text() == "{}"


# ------------------------------------------------------------------------------------------------ 7. what a folder may hold


@pytest.mark.parametrize("name, make, message", [
    ("generation_config.json", lambda p: os.symlink("/dev/zero", p), r"file 'generation_config\.json' points outside the model folder \(to /dev/zero\)"),
    ("tokenizer.json", os.mkfifo, r"tokenizer\.json: is a FIFO \(named pipe\), not a regular file"),
    ("notes.txt", lambda p: os.symlink("/etc/hostname", p), r"file 'notes\.txt' points outside the model folder"),
], ids=["generation-config-to-dev-zero", "tokenizer-a-fifo", "unlisted-symlink-out"])
@pytest.mark.parametrize("command", ["eval", "compress"])
def test_a_symlink_out_of_the_folder_or_a_special_file_is_refused(folders, tmp_path, capsys, name, make, message, command):
    folder = tmp_path / "m"
    shutil.copytree(folders["dense"], folder)
    (folder / name).unlink(missing_ok=True)
    make(folder / name)
    argv = (["eval", folder, "--data", folders["text"], "--max-length", "16", "--stride", "8"] if command == "eval"
            else _compress(folders, folder, tmp_path / "out"))
    line = _one_line_error(capsys, argv)
    assert re.search(message, line), line
    assert not (tmp_path / "out").exists()


def _swap_once(folder, replacement, monkeypatch):
    """Replace ``folder`` by ``replacement`` (atomically, as kronlm.save does) right after the first
    time transformers has read its config, before it reads the weights."""
    import transformers

    real = transformers.AutoConfig.from_pretrained.__func__
    calls = {"n": 0}

    def reading(cls, *args, **kwargs):
        config = real(cls, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            kronlm.save(replacement, folder)
        return config

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", classmethod(reading))
    return calls


def test_a_folder_replaced_during_a_load_gives_one_version(tmp_path, monkeypatch):
    old = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=32, n_layer=3, n_head=2, n_positions=64, n_inner=64)).eval()
    new = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=32, n_layer=2, n_head=2, n_positions=64, n_inner=64)).eval()
    folder = tmp_path / "m"
    kronlm.save(old, folder)
    calls = _swap_once(folder, new, monkeypatch)
    loaded = kronlm.load(folder)  # the 3-layer config with 2-layer weights would be "missing tensors"
    assert calls["n"] >= 2 and loaded.config.n_layer == 2
    ids = torch.arange(8)[None]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, new(ids).logits)


def _rewrite_forever(folder, conn):
    # Another user's process saving two versions (3 and 2 layers) in turn, about twice a second: a
    # read that overlaps a save is repeated, and one that always overlaps (a loaded machine, saves
    # closer than one read takes) is refused by design, which is not what this test is about.
    models = [GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=32, n_layer=n, n_head=2, n_positions=64, n_inner=64)) for n in (3, 2)]
    conn.send("ready")
    i = 0
    while not conn.poll(0.4):
        kronlm.save(models[i % 2], folder)
        i += 1
    conn.send(i)
    os._exit(0)


def test_loads_while_another_process_rewrites_the_folder(tmp_path):
    folder = tmp_path / "m"
    kronlm.save(GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=32, n_layer=2, n_head=2, n_positions=64, n_inner=64)), folder)
    parent, child_end = multiprocessing.Pipe()
    child = multiprocessing.get_context("fork").Process(target=_rewrite_forever, args=(str(folder), child_end))
    child.start()
    assert parent.recv() == "ready"
    depths = []
    try:
        deadline = time.monotonic() + 3.0  # several of the writer's saves
        while time.monotonic() < deadline or len(depths) < 10:
            depths.append(kronlm.load(folder).config.n_layer)  # never a mixture, never "corrupt"
    finally:
        parent.send("stop")
        saves = parent.recv()
        child.join(60)
    assert set(depths) <= {2, 3} and saves >= 3


# ------------------------------------------------------------------------------------------------ 8. hostile configs and data

CONFIG_VALUES = [
    ("layers-a-billion", {"n_layer": 1_000_000_000}, r"config\.json: n_layer = 1,000,000,000 is out of range \(an integer from 1 to 4,096\)"),
    ("layers-more-than-stored", {"n_layer": 7}, r"config\.json: n_layer = 7, but the weights hold 2 layers"),
    ("layers-a-string", {"n_layer": "two"}, r"config\.json: n_layer = 'two' is not an integer"),
    ("layers-a-float", {"n_layer": 2.5}, r"config\.json: n_layer = 2\.5 is not an integer"),
    ("layers-null", {"n_layer": None}, r"config\.json: n_layer = None is not an integer"),
    ("heads-zero", {"n_head": 0}, r"config\.json: n_head = 0 is out of range"),
    ("heads-do-not-divide", {"n_head": 3}, r"config\.json: hidden size 32 is not a multiple of num_attention_heads = 3"),
    ("vocab-huge", {"vocab_size": 10**12}, r"vocab_size = 1,000,000,000,000 is out of range"),
    ("hidden-huge", {"n_embd": 65536, "n_head": 2}, r"the config describes a model of about [\d,]+ parameters, but the weights hold [\d,]+ numbers"),
    ("eps-a-string", {"layer_norm_epsilon": "tiny"}, r"layer_norm_epsilon = 'tiny' is not a finite number"),
    ("model-type-a-number", {"model_type": 5}, r"model_type = 5 is not a model type name"),
    ("architectures-a-string", {"architectures": "GPT2LMHeadModel"}, r"architectures = 'GPT2LMHeadModel' is not a list of class names"),
    ("bool-a-string", {"tie_word_embeddings": "yes"}, r"config\.json: TypeError: Field 'tie_word_embeddings' expected bool, got str"),
    ("activation-unknown", {"activation_function": "nope"}, r"activation_function = 'nope' is not an activation transformers knows"),
]


@pytest.mark.parametrize("name, values, message", CONFIG_VALUES, ids=[c[0] for c in CONFIG_VALUES])
@pytest.mark.parametrize("command", ["eval", "compress"])
def test_a_config_value_of_the_wrong_type_or_size_gives_one_line(folders, tmp_path, capsys, name, values, message, command):
    folder = tmp_path / "m"
    shutil.copytree(folders["dense"], folder)
    _config_edit(lambda c: c.update(values))(folder)
    argv = (["eval", folder, "--data", folders["text"], "--max-length", "16", "--stride", "8"] if command == "eval"
            else _compress(folders, folder, tmp_path / "out"))
    line = _one_line_error(capsys, argv)
    assert str(folder / "config.json") in line and re.search(message, line), line


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", r"config\.json: not a model config \(a JSON list"),
    ("[" * 50_000 + "]" * 50_000, r"config\.json: JSON nested too deeply"),
])
def test_a_config_that_is_not_a_mapping_gives_one_line(folders, tmp_path, capsys, content, message):
    folder = tmp_path / "m"
    shutil.copytree(folders["dense"], folder)
    (folder / "config.json").write_text(content)
    line = _one_line_error(capsys, _compress(folders, folder, tmp_path / "out"))
    assert re.search(message, line), line


@pytest.mark.parametrize("name, content, message", [
    ("generation_config.json", [1], r"generation_config\.json: not a generation config \(a JSON list, not an object\)"),
    ("tokenizer_config.json", [1], r"tokenizer_config\.json: not a tokenizer setting file \(a JSON list"),
    ("tokenizer_config.json", {"model_max_length": "x"}, r"tokenizer_config\.json: model_max_length = 'x' is not a number"),
    ("special_tokens_map.json", "[" * 50_000 + "]" * 50_000, r"special_tokens_map\.json: JSON nested too deeply"),
])
def test_a_malformed_side_file_is_named(folders, tmp_path, capsys, name, content, message):
    folder = tmp_path / "m"
    shutil.copytree(folders["dense"], folder)
    (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    line = _one_line_error(capsys, ["eval", folder, "--data", folders["text"], "--max-length", "16"])
    assert re.search(message, line), line


def test_a_malformed_tokenizer_file_is_named(folders, tmp_path, capsys):
    folder = tmp_path / "m"
    shutil.copytree(folders["dense"], folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    del spec["added_tokens"]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    line = _one_line_error(capsys, ["eval", folder, "--data", folders["text"], "--max-length", "16"])
    assert re.search(r"tokenizer\.json: not a tokenizer file \(it needs a \"model\" object and an \"added_tokens\" list\)", line), line
    (folder / "tokenizer.json").write_text(json.dumps({**spec, "added_tokens": [], "model": {"type": "WordLevel", "vocab": 5}}))
    line = _one_line_error(capsys, ["eval", folder, "--data", folders["text"], "--max-length", "16"])
    assert re.search(r"tokenizer\.json: not a valid tokenizer file \(", line), line


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_data_that_is_a_device_or_a_fifo_is_named(folders, tmp_path, capsys, kind):
    path = "/dev/zero" if kind == "device" else tmp_path / "pipe.txt"
    if kind == "fifo":
        os.mkfifo(path)
    line = _one_line_error(capsys, ["eval", folders["dense"], "--data", path, "--max-length", "16"])
    what = "a character device" if kind == "device" else r"a FIFO \(named pipe\)"
    assert re.search(rf"{re.escape(str(path))}: is {what}, not a regular file", line), line


def test_a_huge_json_lines_record_is_refused_and_max_tokens_reads_a_prefix(folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("kronlm.data.sources.MAX_RECORD_BYTES", 1 << 20)
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"text": "the fox " * 200_000}) + "\n")
    line = _one_line_error(capsys, ["eval", folders["dense"], "--data", big, "--max-tokens", "64", "--max-length", "16"])
    assert "big.jsonl: line 1 is longer than 1 MiB" in line
    nested = tmp_path / "nested.jsonl"
    nested.write_text('{"text": "ok"}\n' + "[" * 50_000 + "]" * 50_000 + "\n")
    line = _one_line_error(capsys, ["eval", folders["dense"], "--data", nested, "--max-length", "16"])
    assert "nested.jsonl: line 2: JSON nested too deeply" in line
    # A plain text file of one 3.2 MB line: --max-tokens 64 reads a few kilobytes, the same 64 tokens.
    from kronlm.data.sources import resolve_source
    from kronlm.data.text import load_text, load_text_for_tokens

    one_line = tmp_path / "one_line.txt"
    one_line.write_text("the quick brown fox jumps over a lazy dog . " * 75_000)
    tokenizer = _tokenizer()
    source = resolve_source(one_line, split="test")
    prefix = load_text_for_tokens(source, tokenizer, 64)
    assert len(prefix) < 20_000
    assert tokenizer(prefix)["input_ids"][:64] == tokenizer(load_text(source))["input_ids"][:64]


def test_a_huge_paragraph_is_refused_before_it_is_tokenised(tmp_path, monkeypatch):
    from kronlm.data.blocks import build_blocks

    monkeypatch.setattr("kronlm.data.blocks.MAX_RECORD_BYTES", 1 << 16)
    text = tmp_path / "corpus.txt"
    text.write_text("a short paragraph\n\n" + "word " * 20_000 + "\n\nanother one\n")
    monkeypatch.setattr("kronlm.data.blocks.tokenize_documents", lambda docs, *a, **k: (list(docs), pytest.fail("not refused")))
    with pytest.raises(ValueError, match=r"corpus\.txt: the paragraph ending at line 3 is longer than 0 Mi characters"):
        build_blocks(text, _tokenizer(), block_size=8, cache_dir=tmp_path / "cache")


def test_nan_and_inf_flags_are_named(folders, tmp_path, capsys):
    line = _one_line_error(capsys, _compress(folders, folders["dense"], tmp_path / "o")[:2] + [
        "--budget", "nan", "--calibration", folders["text"], "--out", tmp_path / "o"], code=2)
    assert "Invalid value for '--budget': 'nan' is not a finite number" in line
    line = _one_line_error(capsys, _distill(folders, tmp_path / "run", "--lr", "inf"), code=2)
    assert "Invalid value for '--lr': 'inf' is not a finite number" in line


# ------------------------------------------------------------------------------------------------ 9. a full disk


def _save_under_file_limit(folder, limit, conn):
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        code = main(["compress", str(folder["dense"]), "--config", str(folder["config"]), "--out", str(folder["out"])])
    except BaseException as exc:  # a traceback is a failure of the test, reported to the parent
        conn.send(("raised", repr(exc)))
        os._exit(0)
    conn.send(("returned", code))
    os._exit(0)


def test_a_file_size_limit_during_save_gives_one_line_and_keeps_the_old_model(folders, tmp_path, capfd):
    out = tmp_path / "k"
    shutil.copytree(folders["compressed"], out)
    before = _contents(out)
    parent, child_end = multiprocessing.Pipe()
    child = multiprocessing.get_context("fork").Process(
        target=_save_under_file_limit, args=({"dense": folders["dense"], "config": folders["config"], "out": out}, 4096, child_end))
    child.start()
    child.join(120)
    assert parent.recv() == ("returned", 1)
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("kronlm: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"kronlm: error: {out}: cannot write it"), errors[0]  # no "[Errno 27]" in front
    assert re.search(rf"{re.escape(str(out))}: cannot write it: a file grew past the file-size limit \(4,096 bytes, see ulimit -f\); "
                     r"about [\d,]+ bytes needed; its previous contents are unchanged", errors[0]), errors[0]
    assert _contents(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]


def test_a_full_disk_during_save_gives_one_line_and_keeps_the_old_model(folders, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    out = tmp_path / "k"
    shutil.copytree(folders["compressed"], out)
    before = _contents(out)
    real = kronlm.modeling.registry.write_compression_file

    def full(folder, *args):
        (Path(folder) / "partial.bin").write_bytes(b"x" * 1000)
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(kronlm.modeling.registry, "write_compression_file", full)
    line = _one_line_error(capsys, _compress(folders, folders["dense"], out))
    monkeypatch.setattr(kronlm.modeling.registry, "write_compression_file", real)
    assert line.startswith(f"kronlm: error: {out}: cannot write it"), line
    assert re.search(rf"{re.escape(str(out))}: cannot write it: no space left on device \(about [\d,]+ bytes needed, [\d,]+ bytes free\); "
                     "its previous contents are unchanged", line), line
    assert _contents(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["k"]


# ------------------------------------------------------------------------------------------------ 10. ecosystem


def test_plain_peft_with_all_linear_is_refused_unless_given_the_model(folders):
    peft = pytest.importorskip("peft")
    from kronlm.modeling import adapters

    model = kronlm.load(folders["compressed"])
    with pytest.raises(ValueError, match=r"target_modules='all-linear': PEFT expands it to nn\.Linear and Conv1D layers only"):
        adapters.register_kronecker_modules(peft.LoraConfig(r=2, target_modules="all-linear"))
    config = adapters.register_kronecker_modules(peft.LoraConfig(r=2, target_modules="all-linear"), model)
    wrapped = peft.get_peft_model(model, config)
    adapted = {n.split("transformer.", 1)[1] for n, m in wrapped.named_modules() if isinstance(m, adapters.KroneckerLoraLinear)}
    assert adapted == {f"h.{i}.mlp.{name}" for i in range(2) for name in ("c_fc", "c_proj")}


def _bpe_tokenizer():
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20], vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    return tok


def test_gguf_keeps_the_chat_template_names_the_model_and_is_replaced_only_when_kronlm_wrote_it(tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    from kronlm.export.gguf_writer import gguf_written_by_kronlm

    folder = tmp_path / "deep" / "path" / "tiny-chat"
    tokenizer = _bpe_tokenizer()
    kronlm.save(GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=32, n_layer=1, n_head=2, n_positions=64, n_inner=64)), folder,
                tokenizer=tokenizer)
    path = tmp_path / "m.gguf"
    for _ in range(2):  # the second run replaces the file the first one wrote
        assert main(["merge", str(folder), "--gguf", str(path)]) == 0
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert fields["general.name"].contents() == "tiny-chat"  # not the folder path
    assert gguf_written_by_kronlm(path)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF" + b"\0" * 60)
    line = _one_line_error(capsys, ["merge", folder, "--gguf", other], code=2)
    assert "other.gguf: exists and was not written by kronlm" in line


def test_dynamic_quantization_says_that_kronecker_layers_stay_float(folders):
    model = kronlm.load(folders["compressed"])
    with pytest.warns(UserWarning, match=r"KroneckerLinear stays float under torch\.ao\.quantization: .*kronlm\.merge_and_unload"):
        quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    assert type(quantized.transformer.h[0].mlp.c_fc).__name__ == "KroneckerLinear"
    assert not hasattr(model.transformer.h[0].mlp.c_fc, "qconfig")  # nothing left on the model that was copied


def test_the_tokenizer_loads_without_kronlm_and_without_a_prompt(folders):
    import subprocess
    import sys

    folder = str(folders["compressed"])
    # Both routes docs/export.md gives: the tokenizer class, and AutoTokenizer told not to run code.
    for load in (f"PreTrainedTokenizerFast.from_pretrained({folder!r})", f"AutoTokenizer.from_pretrained({folder!r}, trust_remote_code=False)"):
        code = ("from transformers import AutoTokenizer, PreTrainedTokenizerFast; import sys; "
                f"print({load}('the fox')['input_ids']); assert 'kronlm' not in sys.modules")
        # stdin is a pipe nobody writes to: a "[y/N]" prompt would wait there until the timeout.
        done = subprocess.run([sys.executable, "-c", code], stdin=subprocess.PIPE, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr
        assert "custom code" not in done.stdout + done.stderr
        assert done.stdout.strip().splitlines()[-1] == str(_tokenizer()("the fox")["input_ids"])
