"""Sequential calibration: block statistics from the partially compressed model (GPTQ order), and
the corrected target that fits the compressed inputs to the dense outputs."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from kronlm import CompressionConfig, KroneckerTarget
from kronlm.compression.calibration import collect_calibration
from kronlm.compression.sequential import SequentialCalibration, block_of
from kronlm.decompose.activation_aware import corrected_target
from kronlm.layers import dense_weight
from kronlm.modeling import compress

IDS = torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(0))


def test_block_of_names():
    assert block_of("model.layers.3.mlp.up_proj") == ("model.layers", 3)
    assert block_of("transformer.h.11.attn.c_attn") == ("transformer.h", 11)
    assert block_of("lm_head") is None


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
def test_without_compression_the_statistics_are_the_dense_ones(builder):
    model = builder()
    names = [n for n, m in model.named_modules() if n.endswith(("mlp.down_proj", "self_attn.q_proj", "mlp.c_fc", "attn.c_attn"))]
    dense = collect_calibration(model, names, IDS, progress=False)
    seq = SequentialCalibration(model, names, IDS, batch_size=4, progress=False)
    for name in names:
        got = seq.get(name)
        assert torch.allclose(got.inputs.covariance(), dense[name].inputs.covariance(), rtol=1e-6, atol=1e-9)
        # x̃ = x: the cross moment is the second moment, and the corrected target is W itself.
        assert torch.allclose(got.cross_moment, dense[name].inputs.covariance(), rtol=1e-6, atol=1e-9)
        W = dense_weight(model.get_submodule(name)).double()
        assert torch.allclose(corrected_target(W, got.inputs.covariance(), got.cross_moment), W, atol=1e-8)


def test_later_blocks_see_the_compressed_earlier_blocks_and_the_fit_corrects_them():
    cfg = CompressionConfig(targets=[KroneckerTarget(["model.layers.*.mlp.down_proj"], a_shape=(32, 1), b_shape=(1, 64), rank=4,
                                                     init="activation_aware")])
    model = tiny_llama(intermediate_size=64)
    reference = tiny_llama(intermediate_size=64)
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
    seq = SequentialCalibration(model, names, IDS, batch_size=4, progress=False)
    compress(model, cfg, statistics=seq, progress=False)
    # Block 2's statistics equal a capture on a model whose blocks 0 and 1 are compressed (as they were then).
    partial = tiny_llama(intermediate_size=64)
    for i in (0, 1):
        partial.model.layers[i].mlp.down_proj = model.model.layers[i].mlp.down_proj
    manual = collect_calibration(partial, [names[2]], IDS, progress=False)[names[2]].inputs.covariance()
    got = seq.get(names[2]).inputs.covariance()
    assert torch.allclose(got, manual, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(got, collect_calibration(reference, [names[2]], IDS, progress=False)[names[2]].inputs.covariance(), rtol=1e-3)

    # The corrected fit beats a fit to W on the error against the dense outputs, E||W x - Ŵ x̃||² (+ the ridge).
    entry = seq.get(names[2])
    C, S = entry.inputs.covariance(), entry.cross_moment
    W = dense_weight(reference.get_submodule(names[2])).double()
    dense_C = collect_calibration(reference, [names[2]], IDS, progress=False)[names[2]].inputs.covariance()
    delta = 1e-2 * C.diagonal().mean()

    def objective(What):
        What = What.double()
        return (torch.trace(W @ dense_C @ W.T) - 2 * torch.trace(What @ S.T @ W.T) + torch.trace(What @ C @ What.T)
                + delta * (What - W).square().sum()).item()

    corrected = model.model.layers[2].mlp.down_proj.to_dense()
    only2 = CompressionConfig(targets=[cfg.targets[0].replace(layers=[2])])
    plain = compress(tiny_llama(intermediate_size=64), only2, statistics={names[2]: type(entry)(entry.inputs, entry.out_features)},
                     progress=False).model.layers[2].mlp.down_proj.to_dense()
    assert objective(corrected) < objective(plain)


def test_bad_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="target must be one of output, weight, got 'loss'"):
        SequentialCalibration(model, ["model.layers.0.mlp.up_proj"], IDS, target="loss", progress=False)
    with pytest.raises(ValueError, match="the model has no module 'model.layers.9.mlp.up_proj'"):
        SequentialCalibration(model, ["model.layers.9.mlp.up_proj"], IDS, progress=False)
