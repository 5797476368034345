"""A user's bad day, recorded: kronlm never destroys what it did not write, survives a crash at
any point of a save, refuses tampered, non-finite or escaping model folders, and refuses to save
broken factors. Tiny models, seconds each."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import struct

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file

import kronlm
import kronlm.utils.atomic as atomic_module
from kronlm import CompressionConfig, KroneckerTarget
from kronlm.utils.atomic import FolderBusyError, folder_lock

CFG = CompressionConfig(targets=[KroneckerTarget(["**.mlp.gate_proj", "**.mlp.up_proj"], b_shape=(2, 1)), KroneckerTarget(["**.mlp.down_proj"], b_shape=(1, 2))])
IDS = torch.arange(12).reshape(2, 6)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _compressed(seed=0):
    return kronlm.compress(tiny_llama(seed), CFG, progress=False)


@pytest.fixture
def saved(tmp_path):
    return kronlm.save(_compressed(), tmp_path / "k")


# ------------------------------------------------------------------ never destroy a user's files


def test_save_refuses_a_folder_that_is_not_a_model(tmp_path):
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("precious")
    (folder / "sub" / "x.csv").write_text("1,2")
    with pytest.raises(FileExistsError, match=r"mine: exists and is not a model folder \(it holds 2 entries: notes.txt, sub\)"):
        kronlm.save(_compressed(), folder)
    assert (folder / "notes.txt").read_text() == "precious" and (folder / "sub" / "x.csv").is_file()
    kronlm.save(_compressed(), folder, overwrite=True)
    assert not (folder / "notes.txt").exists() and (folder / "config.json").is_file()
    file = tmp_path / "afile"
    file.write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        kronlm.save(_compressed(), file, overwrite=True)


def test_a_model_folder_is_replaced_in_place(tmp_path):
    first, second = _compressed(0), _compressed(1)
    kronlm.save(first, tmp_path / "k")
    kronlm.save(second, tmp_path / "k")
    assert torch.equal(_logits(kronlm.load(tmp_path / "k")), _logits(second))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]  # no temporary folder, no lock file left


def _crash_at(op_index: int, folder: str, seed: int) -> None:
    """Child process: save over ``folder`` and die (no cleanup, like SIGKILL) at the op_index-th
    file-system operation of the swap."""
    calls = {"n": 0}

    def dying(real):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == op_index:
                os._exit(7)
            return real(*args, **kwargs)

        return wrapper

    atomic_module.os.replace = dying(os.replace)
    atomic_module.os.chmod = dying(os.chmod)
    atomic_module.shutil.rmtree = dying(shutil.rmtree)
    atomic_module.exchange_paths = dying(atomic_module.exchange_paths)
    kronlm.save(_compressed(seed), folder)
    os._exit(0)


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "two-renames"])
def test_a_crash_at_any_point_of_an_overwrite_leaves_a_loadable_model(tmp_path, exchange, monkeypatch):
    folder = tmp_path / "k"
    old, new = _logits(_compressed(0)), _logits(_compressed(1))
    if not exchange:  # the fallback for file systems without renameat2(RENAME_EXCHANGE)
        monkeypatch.setattr(atomic_module, "exchange_paths", lambda a, b: False)
    seen_new, seen_gap = False, False
    for op in range(1, 80):
        kronlm.save(_compressed(0), folder)
        child = multiprocessing.get_context("fork").Process(target=_crash_at, args=(op, str(folder), 1))
        child.start()
        child.join(120)
        assert child.exitcode in (0, 7)
        if not folder.is_dir():
            # Only the two-rename fallback can crash between its renames; the next save repairs it
            # and loading names the folder it left.
            assert not exchange
            seen_gap = True
            with pytest.raises(FileNotFoundError, match=r"interrupted save left the previous model at .*\.k\.old"):
                kronlm.load(folder)
            assert atomic_module.recover_interrupted_swap(folder)
        logits = _logits(kronlm.load(folder))
        assert torch.equal(logits, old) or torch.equal(logits, new)
        seen_new |= torch.equal(logits, new)
        if child.exitcode == 0:
            break
    assert seen_new and child.exitcode == 0
    assert seen_gap == (not exchange)  # the fallback's one unsafe instant was hit and repaired


def _hold_and_try(folder: str, conn) -> None:
    try:
        kronlm.save(_compressed(), folder)
        conn.send("saved")
    except FolderBusyError as exc:
        conn.send(f"busy: {exc}")
    os._exit(0)


def test_concurrent_writers_one_wins_the_other_is_told(tmp_path):
    folder = tmp_path / "k"
    parent_end, child_end = multiprocessing.Pipe()
    with folder_lock(folder):
        child = multiprocessing.get_context("fork").Process(target=_hold_and_try, args=(str(folder), child_end))
        child.start()
        message = parent_end.recv()
        child.join(60)
        kronlm.save(_compressed(), folder)  # the holder itself may write
    assert message.startswith("busy:") and "another kronlm process is writing this folder" in message and str(folder) in message
    assert torch.equal(_logits(kronlm.load(folder)), _logits(_compressed()))
    assert not (tmp_path / ".k.lock").exists()


# ------------------------------------------------------------------ integrity of saved models


def _flip_byte_in_tensor(path, name):
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    start = json.loads(data[8 : 8 + header_len])[name]["data_offsets"][0]
    data[8 + header_len + start + 1] ^= 0x40
    path.write_bytes(bytes(data))


def test_flipped_bytes_swapped_factors_and_relabelled_dtype_are_refused(saved):
    weights = saved / "model.safetensors"
    pristine = weights.read_bytes()
    _flip_byte_in_tensor(weights, "model.layers.0.mlp.gate_proj.A")
    with pytest.raises(ValueError, match=r"model\.safetensors: SHA-256 differs"):
        kronlm.load(saved)

    weights.write_bytes(pristine)
    tensors = load_file(weights)
    a, b = "model.layers.0.mlp.gate_proj.A", "model.layers.0.mlp.up_proj.A"
    tensors[a], tensors[b] = tensors[b], tensors[a]
    save_file(tensors, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == len(pristine)
    with pytest.raises(ValueError, match=r"model\.safetensors: SHA-256 differs"):
        kronlm.load(saved)

    weights.write_bytes(pristine.replace(b'"F32"', b'"I32"', 1))
    with pytest.raises(ValueError, match=r"model\.safetensors: SHA-256 differs"):
        kronlm.load(saved)
    # Sizes only (verify_checksums=False) cannot see these; the default can.
    weights.write_bytes(pristine)
    assert torch.equal(_logits(kronlm.load_model(str(saved), verify_checksums=False)), _logits(_compressed()))


def test_non_finite_weights_are_refused_on_save_and_on_load(tmp_path, saved):
    model = _compressed()
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")
    with pytest.raises(ValueError, match=r"tensor model\.norm\.weight \(32,\) holds 1 NaN or infinite values"):
        kronlm.save(model, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()

    tensors = load_file(saved / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.B"][0, 0, 1] = float("inf")
    save_file(tensors, saved / "model.safetensors", metadata={"format": "pt"})
    (saved / "kronlm_manifest.json").unlink()
    with pytest.raises(ValueError, match=r"tensor model\.layers\.1\.mlp\.down_proj\.B \(1, 1, 2\) holds 1 NaN"):
        kronlm.load(saved)


@pytest.mark.parametrize("shard", ["../../outside/other.safetensors", "/tmp/elsewhere.safetensors"])
def test_shards_outside_the_folder_are_refused(saved, shard):
    tensors = load_file(saved / "model.safetensors")
    (saved / "model.safetensors").unlink()
    (saved / "kronlm_manifest.json").unlink()
    (saved / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {k: shard for k in tensors}}))
    with pytest.raises(ValueError, match="points outside the model folder"):
        kronlm.load(saved)


def test_a_weights_symlink_out_of_the_folder_is_refused(tmp_path, saved):
    other = tmp_path / "other.safetensors"
    shutil.move(saved / "model.safetensors", other)
    os.symlink(other, saved / "model.safetensors")
    (saved / "kronlm_manifest.json").unlink()
    with pytest.raises(ValueError, match=r"weights file 'model.safetensors' points outside the model folder"):
        kronlm.load(saved)


def test_deleted_plan_or_missing_tensors_are_refused_not_reinitialised(tmp_path, saved):
    (saved / "kronlm_manifest.json").unlink()
    config = json.loads((saved / "config.json").read_text())
    del config["kronlm"]
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.mlp\.(down|gate|up)_proj\.weight of the model is missing"):
        kronlm.load(saved)

    dense = tmp_path / "dense"
    tiny_llama().save_pretrained(dense)
    tensors = load_file(dense / "model.safetensors")
    del tensors["model.layers.2.self_attn.q_proj.weight"]
    save_file(tensors, dense / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"tensor model\.layers\.2\.self_attn\.q_proj\.weight of the model is missing"):
        kronlm.load(dense)

    config = json.loads((dense / "config.json").read_text())
    config["num_hidden_layers"] = 7  # the file holds 3 layers: refused before a model is built
    (dense / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: num_hidden_layers = 7, but the weights hold 3 layers"):
        kronlm.load(dense)


def test_pickled_only_folders_and_bad_plans_give_one_line_errors(tmp_path, saved):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(saved / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match="holds only pytorch_model.bin, a pickled checkpoint kronlm does not load"):
        kronlm.load(folder)

    (saved / "kronlm_manifest.json").unlink()
    config = json.loads((saved / "config.json").read_text())
    config["kronlm"] = "tied"
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="kronlm plan must be a mapping, got str"):
        kronlm.load(saved)


# ------------------------------------------------------------------ numerics at compression time


def test_overflowing_or_nan_weights_are_refused_naming_the_module():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.fill_(1e38)
    exact = CompressionConfig(targets=[KroneckerTarget(["**.mlp.up_proj"], b_shape=(2, 1))], svd_solver="exact")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj: initialiser 'van_loan' produced non-finite factor"):
        kronlm.compress(model, exact, progress=False)

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] = float("nan")
    pruning = CompressionConfig(targets=[KroneckerTarget(["**.mlp.down_proj"], b_shape=(1, 2), init="pruning")])
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.down_proj: the dense weight \(32, 48\) holds NaN or inf"):
        kronlm.compress(model, pruning, progress=False)
