"""Self-contained saved folders: the modeling code travels with the weights, tools without kronlm
load them under trust_remote_code=True with kronlm's logits, dense classes refuse them with a
message, and kronlm itself never runs the folder's code."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from transformers import (
    AutoModelForCausalLM,
    BertModel,
    GPT2LMHeadModel,
    LlamaForCausalLM,
)

import kronlm
from kronlm import CompressionConfig, KroneckerTarget
from kronlm.layers import linear as kronlm_linear
from kronlm.layers import lowrank as kronlm_lowrank
from kronlm.modeling import remote_code
from kronlm.modeling.remote import kronlm_layers

LLAMA_CFG = CompressionConfig(
    targets=[
        KroneckerTarget(["**.embed_tokens"], b_shape=(1, 2)),
        KroneckerTarget(["**.mlp.gate_proj", "**.mlp.up_proj"], b_shape=(2, 1), rank=2, learnable_scales=True),
        KroneckerTarget(["**.mlp.down_proj"], b_shape=(1, 2)),
    ]
)
GPT2_CFG = CompressionConfig(targets=[KroneckerTarget(["**.wte"], b_shape=(1, 2)), KroneckerTarget(["**.mlp.c_fc"], b_shape=(2, 1)),
                                      KroneckerTarget(["**.attn.c_attn"], a_shape=(16, 8), b_shape=(6, 4))])
BERT_CFG = CompressionConfig(targets=[KroneckerTarget(["**.word_embeddings"], b_shape=(1, 4)), KroneckerTarget(["**.intermediate.dense"], b_shape=(2, 1))])
IDS = torch.arange(24).reshape(2, 12) % 96

# Runs in a fresh interpreter where `import kronlm` fails, as in a tool that does not have kronlm.
WITHOUT_KRONLM = """
import sys
sys.modules["kronlm"] = None
import torch, transformers
folder, auto, out = sys.argv[1], sys.argv[2], sys.argv[3]
model = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True).eval()
ids = torch.arange(24).reshape(2, 12) % 96
with torch.no_grad():
    result = model(ids)
torch.save({"out": result.logits if hasattr(result, "logits") else result.last_hidden_state,
            "class": type(model).__name__, "module": type(model).__module__}, out)
"""


def _without_kronlm(tmp_path: Path, folder: Path, auto: str = "AutoModelForCausalLM") -> dict:
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    out = tmp_path / f"{auto}.pt"
    proc = subprocess.run([sys.executable, "-c", WITHOUT_KRONLM, str(folder), auto, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


def _out(model):
    with torch.no_grad():
        result = model(IDS)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


@pytest.mark.parametrize("builder,cfg,auto", [(tiny_llama, LLAMA_CFG, "AutoModelForCausalLM"), (tiny_gpt2, GPT2_CFG, "AutoModelForCausalLM"),
                                              (tiny_bert, BERT_CFG, "AutoModel")])
def test_folder_loads_without_kronlm_with_bit_identical_outputs(tmp_path, builder, cfg, auto):
    model = kronlm.compress(builder(), cfg, progress=False)
    folder = kronlm.save(model, tmp_path / "k")
    config = json.loads((folder / "config.json").read_text())
    assert set(remote_code.REMOTE_FILES) <= {p.name for p in folder.iterdir()}
    assert config["auto_map"]["AutoConfig"].startswith("configuration_kronlm.Kronecker")
    assert auto in config["auto_map"] and config[remote_code.LOAD_GUARD_KEY].startswith(remote_code.LOAD_GUARD_PREFIX)
    for name in remote_code.REMOTE_FILES:  # the code files import torch and transformers only
        assert "kronlm" not in [line.split()[1].split(".")[0] for line in (folder / name).read_text().splitlines() if line.startswith(("import ", "from "))]
    result = _without_kronlm(tmp_path, folder, auto)
    assert result["module"].startswith("transformers_modules.") and result["class"].startswith("Kronecker")
    assert torch.equal(result["out"], _out(kronlm.load(folder)))


def test_kronlm_never_runs_the_folder_code(tmp_path):
    folder = kronlm.save(kronlm.compress(tiny_llama(), LLAMA_CFG, progress=False), tmp_path / "k")
    marker = tmp_path / "ran"
    with (folder / "modeling_kronlm.py").open("a") as fh:
        fh.write(f"\nopen({str(marker)!r}, 'w').write('x')\n")
    (folder / "kronlm_manifest.json").unlink()  # otherwise the changed file is refused by its checksum
    for load in (lambda: kronlm.load(folder), lambda: AutoModelForCausalLM.from_pretrained(folder),
                 lambda: AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)):
        model = load()
        assert type(model).__module__ == "kronlm.modeling.registry"
    assert not marker.exists()


@pytest.mark.parametrize("builder,cfg,dense_cls", [(tiny_llama, LLAMA_CFG, LlamaForCausalLM), (tiny_gpt2, GPT2_CFG, GPT2LMHeadModel), (tiny_bert, BERT_CFG, BertModel)])
def test_dense_classes_refuse_a_compressed_folder_with_instructions(tmp_path, builder, cfg, dense_cls):
    folder = kronlm.save(kronlm.compress(builder(), cfg, progress=False), tmp_path / "k")
    with pytest.raises(ValueError, match=r"kronlm-compressed model .*trust_remote_code=True.*kronlm\.load"):
        dense_cls.from_pretrained(folder)


def test_folders_saved_before_remote_code_still_load(tmp_path):
    model = kronlm.compress(tiny_llama(), LLAMA_CFG, progress=False)
    folder = kronlm.save(model, tmp_path / "k")
    # What kronlm wrote before: no code files, no auto_map, no load guard, no manifest entry for them.
    for name in remote_code.REMOTE_FILES:
        (folder / name).unlink()
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"], config[remote_code.LOAD_GUARD_KEY]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "kronlm_manifest.json").unlink()
    assert torch.equal(_out(kronlm.load(folder)), _out(model))
    assert torch.equal(_out(AutoModelForCausalLM.from_pretrained(folder)), _out(model))


def test_resaving_a_loaded_model_rewrites_the_same_folder(tmp_path):
    first = kronlm.save(kronlm.compress(tiny_llama(), LLAMA_CFG, progress=False), tmp_path / "a")
    loaded = kronlm.load(first)
    assert not hasattr(loaded.config, "auto_map") and not hasattr(loaded.config, remote_code.LOAD_GUARD_KEY)
    second = kronlm.save(loaded, tmp_path / "b")
    for name in (*remote_code.REMOTE_FILES, "config.json"):
        assert (first / name).read_text() == (second / name).read_text(), name


def test_remote_layers_are_kronlms_layers():
    # The folder's kronecker_matmul is a verbatim copy: same source, so the same floating-point operations.
    for name in ("kron_sum", "default_middle", "materializes", "kronecker_matmul", "b_first_matmul", "a_first_matmul"):
        assert inspect.getsource(getattr(kronlm_layers, name)) == inspect.getsource(getattr(kronlm_linear, name)), f"copy {name} into kronlm/modeling/remote/kronlm_layers.py"
    assert (kronlm_layers.BMM_MIN_COLS, kronlm_layers.ORDERS, kronlm_layers.MIDDLES) == (kronlm_linear.BMM_MIN_COLS, kronlm_linear.ORDERS, kronlm_linear.MIDDLES)
    # The low-rank layer's folded Kronecker part, too: the same rule, the same factors, the same GEMMs.
    for name in ("kron_sum_rank_bound", "kron_sum_lowrank", "tensor_version", "folds_kronecker_part", "kronecker_lowrank_matmul"):
        assert inspect.getsource(getattr(kronlm_layers, name)) == inspect.getsource(getattr(kronlm_lowrank, name)), f"copy {name} into kronlm/modeling/remote/kronlm_layers.py"
    for name in ("forward", "uses_fold", "kronecker_fold"):
        ours, theirs = getattr(kronlm_lowrank.KroneckerLowRankLinear, name), getattr(kronlm_layers.KroneckerLowRankLinear, name)
        assert inspect.getsource(theirs) == inspect.getsource(ours), f"copy KroneckerLowRankLinear.{name} into kronlm/modeling/remote/kronlm_layers.py"
    assert kronlm_layers.FOLD_MAX_SHARE == kronlm_lowrank.FOLD_MAX_SHARE
    assert (kronlm_layers.LOAD_GUARD_KEY, kronlm_layers.LOAD_GUARD_PREFIX) == (remote_code.LOAD_GUARD_KEY, remote_code.LOAD_GUARD_PREFIX)
    from kronlm.modeling.plan import MODULE_KINDS

    assert set(kronlm_layers.MODULE_BUILDERS) == set(MODULE_KINDS), "every plan kind needs a builder in the standalone code"
