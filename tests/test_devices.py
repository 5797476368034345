"""Devices: `auto` resolved, a device this machine lacks refused up front (library, loading and
every command with --device), and, where a CUDA GPU is visible, compression of a model that lives on
it: calibration passes on the GPU, factor fits on the CPU, the same factors as on the CPU."""

import copy

import pytest
import torch
from conftest import rule_ids, tiny_llama

import kronlm
from kronlm.cli import main
from kronlm.compression import BudgetConfig, CompressionConfig
from kronlm.utils import resolve_device

NO_CUDA = not torch.cuda.is_available()


def test_cpu_and_auto_resolve_to_torch_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_a_name_torch_does_not_know_is_refused_by_name():
    with pytest.raises(ValueError, match=r"device 'gpu0' is not a device name torch knows"):
        resolve_device("gpu0")


@pytest.mark.skipif(not NO_CUDA, reason="a CUDA GPU is visible")
def test_cuda_without_a_gpu_is_refused_before_any_model_is_loaded(tmp_path):
    with pytest.raises(ValueError, match=r"device 'cuda:1': torch sees no CUDA GPU on this machine \(torch "):
        resolve_device("cuda:1")
    # The device is checked before the spec: a missing folder is not even looked for.
    with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
        kronlm.load_model(str(tmp_path / "nowhere"), device="cuda")


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
def test_a_cuda_index_beyond_the_gpus_is_refused_with_the_count():
    count = torch.cuda.device_count()
    with pytest.raises(ValueError, match=rf"this machine has {count} CUDA GPU"):
        resolve_device(f"cuda:{count}")


@pytest.mark.skipif(not NO_CUDA, reason="a CUDA GPU is visible")
@pytest.mark.parametrize("argv", [
    ["compress", "./nowhere", "--preset", "krony-pt-96m"],
    ["eval", "./nowhere", "--data", "wikitext2"],
    ["bench", "layers", "--presets", "krony-pt-mlp-2x"],
])
def test_every_command_with_a_device_flag_refuses_cuda_here_in_one_line(argv, tmp_path, capsys):
    out = tmp_path / "out"
    extra = ["--out", str(out)] if argv[0] != "eval" else []
    assert main([*argv, *extra, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "'--device'" in err and "torch sees no CUDA GPU" in err and "Traceback" not in err
    assert not out.exists()


def _compressed(model, config, ids):
    kronlm.compress(model, config, calibration=ids, progress=False)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("config", [
    CompressionConfig.from_dict({"targets": [{"modules": ["**.mlp.*_proj"], "b_shape": [4, 4], "init": "activation_aware"}]}),
    BudgetConfig(target_fraction=0.85, sensitivity_sequences=4, held_out_sequences=2),
], ids=["activation_aware", "budget"])
def test_a_model_on_any_device_compresses_to_the_factors_the_cpu_gives(config, device):
    """On the CPU the two runs are the same computation (bit-identical); on a GPU the calibration
    sums run there in float32, so the factors agree to float32 accuracy."""
    dense = tiny_llama(0)
    ids = rule_ids(12, 0, length=24)
    on_cpu = _compressed(copy.deepcopy(dense), config, ids)
    moved = copy.deepcopy(dense).to(device)
    on_device = _compressed(moved, config, ids)
    assert {p.device.type for p in moved.parameters()} == {device}
    assert any(isinstance(m, kronlm.KroneckerLinear) for m in moved.modules())
    assert on_device.keys() == on_cpu.keys()
    for key in on_cpu:
        if device == "cpu":
            assert torch.equal(on_device[key], on_cpu[key]), key
        else:
            torch.testing.assert_close(on_device[key], on_cpu[key], rtol=1e-3, atol=1e-4, msg=key)
    logits = moved(input_ids=ids[:2].to(device)).logits
    assert torch.isfinite(logits).all()
