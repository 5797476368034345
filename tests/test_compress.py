"""kronlm.compress on tiny GPT-2 / Llama / BERT, the report, and the papers' presets (docs/method.md, "Parameter counts")."""

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama

import kronlm
from kronlm import CompressionConfig, KroneckerTarget
from kronlm.compression import PRESETS, count_parameters, preset_parameter_counts
from kronlm.compression.config import layer_index
from kronlm.layers import KroneckerEmbedding, KroneckerLinear, KroneckerTiedLMHead


def test_gpt2_conv1d_full_rank_is_exact():
    model = tiny_gpt2().double()
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        ref = model(ids).logits
    # c_fc (64, 32) = A (8, 4) ⊗ B (8, 8): R = 32 = min(8*4, 8*8) reproduces W exactly.
    cfg = CompressionConfig(targets=[KroneckerTarget(["**.h.*.mlp.c_fc"], (8, 4), (8, 8), rank=32)], svd_solver="exact")
    report = kronlm.compress(model, cfg, progress=False).compression_report
    assert all(isinstance(model.transformer.h[i].mlp.c_fc, KroneckerLinear) for i in range(4))
    assert max(m.relative_error for m in report.modules) < 1e-10
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref, atol=1e-9)


def test_report_counts_are_exact_for_gpt2():
    model = tiny_gpt2()
    before = count_parameters(model)
    cfg = CompressionConfig(
        targets=[
            KroneckerTarget(["**.h.*.mlp.c_fc"], b_shape=(2, 1), layers=[1, 3]),
            KroneckerTarget(["**.h.*.mlp.c_proj"], b_shape=(1, 2), layers=[1, 3]),
        ]
    )
    report = kronlm.compress(model, cfg, progress=False).compression_report
    assert [m.name for m in report.modules] == [f"transformer.h.{i}.mlp.{n}" for i in (1, 3) for n in ("c_fc", "c_proj")]
    # c_fc (64, 32) -> A (32, 32) ⊗ B (2, 1): 1024 + 2 (+ 64 bias); c_proj (32, 64) -> A (32, 32) ⊗ B (1, 2): 1026 (+ 32 bias).
    per_layer_saved = (64 * 32 - 1026) * 2
    assert report.params_before == before
    assert report.params_after == before - 2 * per_layer_saved == count_parameters(model)
    m = report.modules[0]
    assert (m.weight_shape, m.a_shape, m.b_shape, m.rank) == ((64, 32), (32, 32), (2, 1), 1)
    assert (m.params_before, m.params_after) == (64 * 32 + 64, 1026 + 64)
    assert 0 < m.relative_error < 1
    assert "4 modules compressed" in report.summary()


def _kron_weight(layer: KroneckerLinear) -> torch.Tensor:
    # Σ_r s_r A_r ⊗ B_r with torch.kron, independent of the layer's own einsum reconstruction.
    scales = layer.scales if layer.scales is not None else torch.ones(layer.rank, dtype=layer.A.dtype)
    return sum(s * torch.kron(a, b) for s, a, b in zip(scales, layer.A, layer.B))


def _check_against_dense(model, dense_weights, report):
    """Every replaced module: torch.kron of its factors is its forward map, and is W up to the reported error."""
    for m in report.modules:
        layer = model.get_submodule(m.name)
        W_hat = _kron_weight(layer).detach()
        W = dense_weights[m.name]
        assert W_hat.shape == W.shape == m.weight_shape
        assert torch.allclose(torch.linalg.matrix_norm(W - W_hat) / torch.linalg.matrix_norm(W), torch.tensor(m.relative_error, dtype=W.dtype), rtol=1e-6, atol=1e-9)
        x = torch.randn(3, W.shape[1], dtype=W.dtype)
        ref = x @ W_hat.T + (layer.bias if layer.bias is not None else 0)
        assert torch.allclose(layer(x), ref, atol=1e-10)


def _dense_weights(model, names):
    return {n: model.get_submodule(n).weight.detach().clone() for n in names}


def test_llama_mlp_matches_dense_reconstruction_and_exact_rank_keeps_logits():
    llama = tiny_llama().double()
    names = [f"model.layers.{i}.mlp.{p}" for i in range(3) for p in ("gate_proj", "up_proj", "down_proj")]
    weights = _dense_weights(llama, names)
    cfg = CompressionConfig(targets=[KroneckerTarget(["**.mlp.gate_proj", "**.mlp.up_proj", "**.mlp.down_proj"], compression_ratio=2.0)])
    report = kronlm.compress(llama, cfg, progress=False).compression_report
    assert [m.name for m in report.modules] == names
    assert all(m.params_after * 2 <= m.params_before * 1.005 and 0 < m.relative_error < 1 for m in report.modules)
    _check_against_dense(llama, weights, report)

    # gate/up (48, 32) = A (8, 4) ⊗ B (6, 8) and down (32, 48) = A (4, 8) ⊗ B (8, 6) with R = 32 terms,
    # the rank of the rearranged matrix: exact, so a factor in the wrong orientation would show.
    dense, exact = tiny_llama().double(), tiny_llama().double()
    cfg = CompressionConfig(targets=[
        KroneckerTarget(["**.mlp.gate_proj", "**.mlp.up_proj"], (8, 4), (6, 8), rank=32),
        KroneckerTarget(["**.mlp.down_proj"], (4, 8), (8, 6), rank=32),
    ], svd_solver="exact")
    report = kronlm.compress(exact, cfg, progress=False).compression_report
    assert max(m.relative_error for m in report.modules) < 1e-12
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        assert torch.allclose(exact(ids).logits, dense(ids).logits, atol=1e-9)


def test_bert_all_linears_match_dense_reconstruction_and_exact_rank_keeps_outputs():
    bert = tiny_bert().double()
    attention = ["**.attention.self.query", "**.attention.self.key", "**.attention.self.value", "**.attention.output.dense"]
    cfg = CompressionConfig(
        targets=[
            KroneckerTarget(attention, (16, 16), (2, 2)),
            KroneckerTarget(["**.encoder.layer.*.intermediate.dense"], (8, 2), (8, 16)),
            KroneckerTarget(["**.encoder.layer.*.output.dense"], (2, 8), (16, 8)),
        ]
    )
    names = [n for n, m in bert.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("encoder.")]
    weights = _dense_weights(bert, names)
    report = kronlm.compress(bert, cfg, progress=False).compression_report
    assert sorted(m.name for m in report.modules) == sorted(names) and len(names) == 2 * 6
    assert isinstance(bert.encoder.layer[0].output.dense, KroneckerLinear)
    assert not isinstance(bert.pooler.dense, KroneckerLinear)
    _check_against_dense(bert, weights, report)

    # Full rank of every rearranged matrix: attention (32, 32) = (16, 16) ⊗ (2, 2) has rank 4,
    # the FFN (64, 32) = (8, 2) ⊗ (8, 16) rank 16: the compressed encoder is the dense one.
    dense, exact = tiny_bert().double(), tiny_bert().double()
    cfg = CompressionConfig(
        targets=[
            KroneckerTarget(attention, (16, 16), (2, 2), rank=4),
            KroneckerTarget(["**.encoder.layer.*.intermediate.dense"], (8, 2), (8, 16), rank=16),
            KroneckerTarget(["**.encoder.layer.*.output.dense"], (2, 8), (16, 8), rank=16),
        ],
        svd_solver="exact",
    )
    kronlm.compress(exact, cfg, progress=False)
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        assert torch.allclose(exact(ids).last_hidden_state, dense(ids).last_hidden_state, atol=1e-9)


@pytest.mark.parametrize("mode", ["tied", "dense"])
def test_factored_embedding_with_tied_head(mode):
    model = tiny_llama().double()
    emb_dense = model.get_input_embeddings().weight.detach().clone()
    cfg = CompressionConfig(targets=[KroneckerTarget(["**.embed_tokens"], b_shape=(1, 2))], lm_head=mode)
    report = kronlm.compress(model, cfg, progress=False).compression_report
    emb = model.get_input_embeddings()
    assert isinstance(emb, KroneckerEmbedding) and report.lm_head == mode
    head = model.get_output_embeddings()
    h = torch.randn(3, 32, dtype=torch.float64)
    if mode == "tied":
        assert isinstance(head, KroneckerTiedLMHead)
        assert torch.allclose(head(h), h @ emb.to_dense().T, atol=1e-12)
        assert report.params_after == report.params_after_no_head
    else:
        assert torch.equal(head.weight, emb_dense)
        assert report.params_after - report.params_after_no_head == 96 * 32
    assert model.config.tie_word_embeddings is False


def test_layer_filter_and_pattern_syntax():
    assert layer_index("transformer.h.11.mlp.c_fc") == 11
    assert layer_index("lm_head") is None
    t = KroneckerTarget(["**.h.*.mlp.c_fc"], b_shape=(2, 1), layers=[1])
    assert t.matches("transformer.h.1.mlp.c_fc") and t.matches("h.1.mlp.c_fc")
    assert not t.matches("transformer.h.2.mlp.c_fc") and not t.matches("transformer.h.1.mlp.c_fc.x")
    bert_out = KroneckerTarget(["**.encoder.layer.*.output.dense"], b_shape=(2, 1))
    assert bert_out.matches("encoder.layer.0.output.dense")
    assert not bert_out.matches("encoder.layer.0.attention.output.dense")
    assert KroneckerTarget(["re:.*c_(fc|proj)"], b_shape=(2, 1)).matches("transformer.h.0.mlp.c_proj")


def test_bad_configs_name_the_problem():
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.mlp\.c_fc.*\(5, 1\).*\(64, 32\)"):
        kronlm.compress(tiny_gpt2(), CompressionConfig(targets=[KroneckerTarget(["**.mlp.c_fc"], b_shape=(5, 1))]), progress=False)
    with pytest.raises(ValueError, match=r"R=3 exceeds.*\(2048, 1\).*1"):
        kronlm.compress(tiny_gpt2(), CompressionConfig(targets=[KroneckerTarget(["**.mlp.c_fc"], b_shape=(1, 1), a_shape=(64, 32), rank=3)]), progress=False)
    with pytest.raises(ValueError, match=r"matches no module"):
        kronlm.compress(tiny_gpt2(), CompressionConfig(targets=[KroneckerTarget(["**.mlp.fc_in"], b_shape=(2, 1))]), progress=False)
    with pytest.raises(ValueError, match=r"LayerNorm, which kronlm cannot factor"):
        kronlm.compress(tiny_gpt2(), CompressionConfig(targets=[KroneckerTarget(["**.ln_1"], b_shape=(2, 1))]), progress=False)
    with pytest.raises(ValueError, match=r"compression config: unknown key target \(valid keys: targets,"):
        CompressionConfig.from_dict({"target": []})
    with pytest.raises(ValueError, match=r"targets must be a list of rules, got dict"):
        CompressionConfig.from_dict({"targets": {"modules": ["x"]}})
    with pytest.raises(ValueError, match=r"target 0: unknown key module "):
        CompressionConfig.from_dict({"targets": [{"module": ["x"], "b_shape": [2, 1]}]})
    with pytest.raises(ValueError, match=r"module pattern 're:\(unclosed' is not a valid regular expression"):
        CompressionConfig.from_dict({"targets": [{"modules": ["re:(unclosed"], "b_shape": [2, 1]}]})
    with pytest.raises(ValueError, match=r"unknown initialiser 'vanloan'"):
        CompressionConfig.from_dict({"targets": [{"modules": ["x"], "b_shape": [2, 1], "init": "vanloan"}]})
    with pytest.raises(ValueError, match="unknown preset 'krony-pt-1m'"):
        kronlm.get_preset("krony-pt-1m")


def test_example_config_file_applies():
    from pathlib import Path

    cfg = CompressionConfig.from_file(Path(__file__).parents[1] / "configs" / "compress-example.yaml")
    report = kronlm.compress(tiny_llama(), cfg, progress=False).compression_report
    assert len(report.modules) == 9  # gate/up/down of the 3 tiny layers
    assert {m.b_shape for m in report.modules} == {(2, 1), (1, 2)}


def test_config_json_and_yaml_round_trip(tmp_path):
    cfg = kronlm.get_preset("kngpt2")
    for name in ("c.json", "c.yaml"):
        cfg.to_file(tmp_path / name)
        assert CompressionConfig.from_file(tmp_path / name).to_dict() == cfg.to_dict()
    (tmp_path / "bad.yaml").write_text("targets: [\n")
    with pytest.raises(ValueError, match="bad.yaml: cannot parse"):
        CompressionConfig.from_file(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        CompressionConfig.from_file(tmp_path / "missing.yaml")


# docs/method.md, "Parameter counts": parameter counts reproducible from the configurations alone (GPT-2 124M tied: 124,439,808;
# BERT-base with pooler: 109,482,240).
PAPER_COUNTS = {
    "krony-pt-67m": 67_893_504,
    "krony-pt-81m": 81_972_576,
    "krony-pt-80m-2": 80_400_048 + 48,
    "krony-pt-96m": 96_128_304,
    "kroneckerbert8": 14_310_160,
    "kroneckerbert21": 5_228_272,
}


@pytest.mark.parametrize("name", list(PAPER_COUNTS))
def test_paper_presets_reproduce_spec_parameter_counts(name):
    counts = preset_parameter_counts(name)
    assert counts["before"] == (109_482_240 if "bert" in name else 124_439_808)
    assert counts["after"] == PAPER_COUNTS[name]
    assert counts["scalars"] == (48 if name == "krony-pt-80m-2" else 0)


def test_kngpt2_preset_is_83_9m_without_head():
    counts = preset_parameter_counts("kngpt2")
    # wte by n=2: 50257*384 + 2; six odd blocks' c_attn, attn c_proj, c_fc, mlp c_proj halved (+2 each).
    expected = 124_439_808 - (50257 * 768 - (50257 * 384 + 2)) - 6 * ((768 * 2304 + 768 * 768 + 2 * 768 * 3072) // 2 - 4 * 2)
    assert counts["after_no_head"] == expected
    assert round(counts["after_no_head"] / 1e6, 1) == 83.9
    assert counts["after"] - counts["after_no_head"] == 50257 * 768  # the untied dense head


@pytest.mark.parametrize("name,k,rank,scalars", [
    ("krony-pt-llama-mlp-2x", 2, 1, False),
    ("krony-pt-llama-mlp-2x-prune", 2, 1, False),
    ("krony-pt-llama-mlp-4x", 4, 1, False),
    ("krony-pt-llama-mlp-4x-r2", 8, 2, True),
])
def test_llama_presets_on_smollm2_architecture(name, k, rank, scalars):
    counts = preset_parameter_counts(name)
    assert counts["before"] == 134_515_008  # SmolLM2-135M (docs/protocols.md, "Models used by the benchmarks")
    # 90 MLP matrices of 1536·576 weights, each now R·(1536·576/k + k) (+ R scalars).
    per_matrix = rank * (1536 * 576 // k + k) + (rank if scalars else 0)
    assert counts["after"] == 134_515_008 - 90 * 1536 * 576 + 90 * per_matrix
    assert {p.name for p in PRESETS.values() if p.family == "llama"} >= {name}


def test_keys_of_earlier_versions_still_read():
    # `svd` (the solver) became `svd_solver` and `lowrank` (k of the low-rank part) `lowrank_rank`;
    # config files and the compression record of saved models written before still read.
    old = {"targets": [{"modules": ["x"], "b_shape": [2, 1], "lowrank": 2, "init": "van_loan"}], "svd": "exact"}
    cfg = CompressionConfig.from_dict(old)
    assert cfg.svd_solver == "exact" and cfg.targets[0].lowrank_rank == 2
    assert cfg.to_dict() == {"targets": [{"modules": ["x"], "b_shape": [2, 1], "rank": 1, "init": "van_loan", "learnable_scales": False,
                                          "lowrank_rank": 2}], "lm_head": "tied", "svd_solver": "exact"}
    with pytest.raises(ValueError, match="give svd_solver only"):
        CompressionConfig.from_dict({"targets": [], "svd": "exact", "svd_solver": "auto"})
    with pytest.raises(ValueError, match=r"target 0: give lowrank_rank only \(lowrank is its earlier name\)"):
        CompressionConfig.from_dict({"targets": [{"modules": ["x"], "b_shape": [2, 1], "lowrank": 2, "lowrank_rank": 2}]})


def test_balance_factors_rebalances_a_student_saved_unbalanced_without_changing_its_logits():
    """A student saved by an earlier kronlm (pruning init: A = W[0::2], B = [1, 0.1]) is brought to
    the balanced storage ``compress`` now writes; the model computes the same logits."""
    from kronlm.compression import balance_factors

    model = kronlm.compress(tiny_llama(), CompressionConfig(targets=[KroneckerTarget(["**.mlp.up_proj"], b_shape=(2, 1), init="pruning")]))
    layers = [m for m in model.modules() if isinstance(m, KroneckerLinear)]
    assert layers and all(torch.allclose(m.A.norm(), m.B.norm(), rtol=1e-5) for m in layers)
    with torch.no_grad():
        for m in layers:  # what an earlier version stored: the init's own split
            m.A.mul_(7.0)
            m.B.div_(7.0)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    before = model(ids).logits
    assert balance_factors(model) == len(layers)
    assert all(torch.allclose(m.A.norm(), m.B.norm(), rtol=1e-5) for m in layers)
    assert torch.allclose(model(ids).logits, before, atol=1e-5)
