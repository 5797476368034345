"""Speed work, correctness only (no timing assertions): every contraction plan against the dense
product, the multiply-add and measured plan choice, torch.compile against eager, and the benchmark
functions' rows and tables on tiny shapes."""

import itertools
import re
import sys

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from kronlm.bench.layers import (
    LayerShape,
    layer_speed_markdown,
    layer_speed_rows,
    preset_layer_shapes,
)
from kronlm.bench.memory import peak_memory
from kronlm.bench.models import (
    compressed_copy,
    linear_macs_per_token,
    model_speed_markdown,
    model_speed_rows,
)
from kronlm.bench.markdown import append_result_row, markdown_table, read_result_rows, write_markdown
from kronlm.bench.timing import time_interleaved
from kronlm.compression.config import CompressionConfig, KroneckerTarget
from kronlm.layers import linear as kl
from kronlm.layers.linear import (
    KroneckerLinear,
    autotune_plan,
    candidate_plans,
    default_middle,
    kronecker_matmul,
    token_bucket,
)
from kronlm.modeling import compress

PLANS = list(itertools.product(("b_first", "a_first"), ("gemm", "bmm")))
SHAPES = [
    ((4, 3), (5, 2), 1),
    ((4, 3), (5, 2), 3),
    ((2, 6), (8, 1), 3),  # n2 = 1: A first is one GEMM
    ((16, 2), (1, 6), 2),  # m2 = 1: B first is one GEMM
    ((3, 5), (1, 1), 2),
    ((1, 4), (6, 3), 2),
    ((3, 2), (20, 17), 2),  # wide B: the "bmm" side of default_middle
]


def _kron(A, B):
    return sum(torch.kron(A[r], B[r]) for r in range(A.shape[0]))


def _assert_same_backward(y, ref, pairs):
    """Back-propagate one random cotangent through ``y`` and ``ref``; each (tensor, twin) pair's gradients agree."""
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    for got, want in pairs:
        assert torch.allclose(got.grad, want.grad, atol=1e-11)


@pytest.mark.parametrize("a_shape,b_shape,rank", SHAPES)
@pytest.mark.parametrize("order,middle", PLANS)
def test_every_plan_matches_dense_forward_and_backward(a_shape, b_shape, rank, order, middle):
    torch.manual_seed(0)
    A = torch.randn(rank, *a_shape, dtype=torch.float64, requires_grad=True)
    B = torch.randn(rank, *b_shape, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, a_shape[1] * b_shape[1], dtype=torch.float64, requires_grad=True)
    y = kronecker_matmul(x, A, B, order, middle)
    A2, B2, x2 = (t.detach().clone().requires_grad_() for t in (A, B, x))
    ref = x2 @ _kron(A2, B2).T
    assert y.shape == (2, 3, a_shape[0] * b_shape[0])
    assert torch.allclose(y, ref, atol=1e-12)
    _assert_same_backward(y, ref, ((A, A2), (B, B2), (x, x2)))


@pytest.mark.parametrize("b_shape", [(1, 3), (3, 1)])
@pytest.mark.parametrize("tokens", [1, 6, 7, 40])
def test_per_term_path_for_few_tokens_matches_dense(b_shape, tokens):
    # A (16, 12): N·(16 + 12) < 192 holds for N <= 6, so 1 and 6 tokens take the per-term batched
    # path, 7 and 40 tokens the stacked one; both must equal the dense product, gradients included.
    torch.manual_seed(5)
    A = torch.randn(3, 16, 12, dtype=torch.float64, requires_grad=True)
    B = torch.randn(3, *b_shape, dtype=torch.float64, requires_grad=True)
    x = torch.randn(tokens, 12 * b_shape[1], dtype=torch.float64)
    order = "b_first" if b_shape[0] == 1 else "a_first"
    y = kronecker_matmul(x, A, B, order, "gemm")  # a named middle: no rule forms W for these tiny shapes
    A2, B2 = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    ref = x @ _kron(A2, B2).T
    assert torch.allclose(y, ref, atol=1e-12)
    y.sum().backward()
    ref.sum().backward()
    assert torch.allclose(A.grad, A2.grad, atol=1e-11) and torch.allclose(B.grad, B2.grad, atol=1e-11)


def test_a_many_term_product_forms_w_exactly_when_its_multiply_adds_exceed_the_dense_ones():
    # (576, 576) as A (36, 12) ⊗ B (16, 48) with R = 168 (a budget Kronecker choice): dense
    # 331,776 multiply-adds per token; factored B first 168·12·16·(48 + 36) = 2,709,504, counted
    # twice: forming W (168·331,776) pays from 11 tokens on.
    assert kl.materializes(11, 168, (36, 12), (16, 48)) and not kl.materializes(10, 168, (36, 12), (16, 48))
    # A (3, 192) ⊗ B (192, 3), R = 28: A first 28·3·3·(192 + 192) = 96,768, twice that is below dense.
    assert not kl.materializes(4096, 28, (3, 192), (192, 3))
    # A (2, 576) ⊗ B (768, 1), R = 276: A first is two flat GEMMs, counted once: 276·2·(576 + 768)
    # = 741,888 < 884,736 dense, so the factors stay; with B (2, 576) and A (768, 1) the same
    # count of terms costs 278·2·(576 + 768)·2 = 1,494,528 B first, and W is formed.
    assert not kl.materializes(2048, 276, (2, 576), (768, 1)) and kl.materializes(2048, 278, (768, 1), (2, 576))
    # One term never forms W (Krony-PT's MLPs).
    assert not kl.materializes(4096, 1, (768, 576), (2, 1))


def test_the_formed_weight_matches_the_factored_product_forward_and_backward(monkeypatch):
    torch.manual_seed(3)
    A = torch.randn(6, 2, 4, dtype=torch.float64, requires_grad=True)
    B = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    assert kl.materializes(5, 6, (2, 4), (3, 2))
    A2, B2, x2 = (t.detach().clone().requires_grad_() for t in (A, B, x))
    ref = kronecker_matmul(x2, A2, B2, "a_first", "bmm")  # a named plan: factored
    def factored(*args):
        raise AssertionError("the rule should have formed W")
    monkeypatch.setattr(kl, "a_first_matmul", factored)
    y = kronecker_matmul(x, A, B, "a_first")
    assert torch.allclose(y, ref, atol=1e-12)
    _assert_same_backward(y, ref, ((A, A2), (B, B2), (x, x2)))


def test_training_with_many_terms_takes_the_bmm_middle(monkeypatch):
    # A (16, 2) ⊗ B (8, 16), R = 2: B first, 8 columns per token -> "gemm" by default_middle; with
    # R·m2 = 16 >= 4·n1 = 8 a backward pass would sum a per-token gradient of B, so training uses "bmm".
    seen = []
    real = kl.b_first_matmul
    monkeypatch.setattr(kl, "b_first_matmul", lambda x2, A, B, middle, few: seen.append(middle) or real(x2, A, B, middle, few))
    A = torch.randn(2, 16, 2, dtype=torch.float64, requires_grad=True)
    B = torch.randn(2, 8, 16, dtype=torch.float64, requires_grad=True)
    x = torch.randn(64, 32, dtype=torch.float64)
    assert not kl.materializes(64, 2, (16, 2), (8, 16)) and default_middle("b_first", (8, 16)) == "gemm"
    y = kronecker_matmul(x, A, B, "b_first")
    with torch.no_grad():
        y_eval = kronecker_matmul(x, A, B, "b_first")
    assert seen == ["bmm", "gemm"]
    assert torch.allclose(y, y_eval, atol=1e-12)


def test_non_contiguous_input_and_bad_plan_names():
    A, B = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 5, 2, dtype=torch.float64)
    x = torch.randn(6, 7, dtype=torch.float64).t()[:, :6]  # (7, 6) strided view
    for order, middle in PLANS:
        assert torch.allclose(kronecker_matmul(x, A, B, order, middle), x @ _kron(A, B).T, atol=1e-12)
    with pytest.raises(ValueError, match="order must be one of"):
        kronecker_matmul(x, A, B, "c_first")
    with pytest.raises(ValueError, match="middle must be one of"):
        kronecker_matmul(x, A, B, "b_first", "loop")


def test_order_from_multiply_adds_on_preset_shapes():
    # Krony-PT 81M c_fc: A (768,768) ⊗ B (4,1). B first: 768·1·4 + 768·768·4 = 2,362,368;
    # A first: 768·768·1 + 768·1·4 = 592,896 -> A first. Its c_proj (768,768) ⊗ (1,4): the mirror.
    assert KroneckerLinear(768, 3072, (768, 768), (4, 1), device="meta").order == "a_first"
    assert KroneckerLinear(3072, 768, (768, 768), (1, 4), device="meta").order == "b_first"
    # KroneckerBERT8 FFN A (8,2) ⊗ B (384,384): B first 2·384·384 + 8·2·384 = 301,056 < A first
    # 8·2·384 + 8·384·384 = 1,185,792.
    assert KroneckerLinear(768, 3072, (8, 2), (384, 384), device="meta").order == "b_first"
    # Middle-axis layout: per-token matrices with m2 (B first) or n2 (A first) columns.
    assert default_middle("b_first", (2, 16)) == "gemm"
    assert default_middle("b_first", (384, 384)) == "bmm"
    assert default_middle("a_first", (48, 24)) == "bmm"
    assert default_middle("a_first", (3, 3)) == "gemm"


def test_token_buckets_and_candidates():
    assert [token_bucket(n) for n in (1, 2, 3, 16, 17, 512, 4096)] == [1, 2, 4, 16, 32, 512, 4096]
    assert candidate_plans((4, 3), (5, 2)) == PLANS
    assert candidate_plans((4, 3), (1, 6)) == [("b_first", "gemm"), ("a_first", "gemm"), ("a_first", "bmm")]
    assert candidate_plans((4, 3), (6, 1)) == [("b_first", "gemm"), ("b_first", "bmm"), ("a_first", "gemm")]


def test_autotune_picks_the_fastest_measured_plan_once_per_bucket(monkeypatch):
    monkeypatch.setattr(kl, "_PLAN_CACHE", {})
    A, B = torch.randn(2, 4, 3), torch.randn(2, 5, 2)
    fake = {("b_first", "gemm"): 3.0, ("b_first", "bmm"): 2.0, ("a_first", "gemm"): 1.0, ("a_first", "bmm"): 1.5}
    calls = []

    def measure(order, middle):
        calls.append((order, middle))
        return fake[(order, middle)]

    assert autotune_plan(torch.randn(10, 6), A, B, measure) == ("a_first", "gemm")
    assert len(calls) == 4
    # 9..16 tokens share the bucket 16: cached, not measured again.
    assert autotune_plan(torch.randn(2, 8, 6), A, B, measure) == ("a_first", "gemm")
    assert len(calls) == 4
    fake[("b_first", "bmm")] = 0.5
    assert autotune_plan(torch.randn(100, 6), A, B, measure) == ("b_first", "bmm")
    assert len(calls) == 8


def test_autotuned_forward_equals_rule_forward(monkeypatch):
    monkeypatch.setattr(kl, "_PLAN_CACHE", {})
    torch.manual_seed(3)
    layer = KroneckerLinear(12, 10, (5, 3), (2, 4), rank=2, learnable_scales=True, dtype=torch.float64)
    x = torch.randn(9, 12, dtype=torch.float64)
    y = layer(x)
    kl.set_autotune(True)
    try:
        y_tuned = layer(x)
    finally:
        kl.set_autotune(False)
    assert len(kl._PLAN_CACHE) == 1
    assert torch.allclose(y_tuned, y, atol=1e-12)


def test_inductor_compiled_layer_equals_eager():
    torch.manual_seed(4)
    layer = KroneckerLinear(48, 40, (4, 6), (10, 8), rank=2, learnable_scales=True)
    x = torch.randn(3, 5, 48)
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), layer(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("order,middle", PLANS)
def test_every_plan_traces_in_one_graph_with_gradients(order, middle):
    torch._dynamo.reset()
    A = torch.randn(2, 4, 6, requires_grad=True)
    B = torch.randn(2, 10, 8, requires_grad=True)
    x = torch.randn(7, 48)
    fn = torch.compile(lambda x, A, B: kronecker_matmul(x, A, B, order, middle), backend="aot_eager", fullgraph=True)
    y = fn(x, A, B)
    assert torch.allclose(y, kronecker_matmul(x, A, B, order, middle), atol=1e-5, rtol=0)
    y.sum().backward()
    gA = A.grad.clone()
    A.grad = None
    kronecker_matmul(x, A, B, order, middle).sum().backward()
    assert torch.allclose(gA, A.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_compiled_tiny_compressed_model_equals_eager(family):
    # aot_eager keeps the file fast; inductor on the same models was checked by hand (docs/benchmarks.md).
    torch._dynamo.reset()
    if family == "gpt2":
        model = tiny_gpt2(n_layer=2)
        targets = [KroneckerTarget(["**.h.*.mlp.c_fc"], b_shape=(2, 1)), KroneckerTarget(["**.h.*.mlp.c_proj"], a_shape=(8, 16), b_shape=(4, 4), rank=2)]
    else:
        model = tiny_llama(num_hidden_layers=2)
        targets = [KroneckerTarget(["**.layers.*.mlp.gate_proj", "**.layers.*.mlp.up_proj"], b_shape=(4, 1)),
                   KroneckerTarget(["**.layers.*.mlp.down_proj"], a_shape=(8, 24), b_shape=(4, 2), rank=2)]
    compress(model, CompressionConfig(targets=targets), progress=False)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, backend="aot_eager")(ids).logits
    assert torch.allclose(compiled, eager, atol=1e-5, rtol=0)


def test_preset_layer_shapes_are_deduplicated():
    shapes = preset_layer_shapes()
    keys = [(s.out_features, s.in_features, s.a_shape, s.b_shape, s.rank, s.learnable_scales) for s in shapes]
    assert len(keys) == len(set(keys))
    # 4 Krony-PT GPT-2 presets × (c_fc, c_proj) + KnGPT2's c_attn and attn c_proj (its FFN is Krony-PT 96M's)
    # + 3 per KroneckerBERT + 2 per Llama preset (the pruning variant shares the 2x shapes).
    assert len(shapes) == 8 + 2 + 3 + 3 + 2 + 2 + 2
    shared = [s for s in shapes if s.a_shape == (1536, 768) and s.b_shape == (2, 1)]
    assert len(shared) == 1 and set(shared[0].presets) == {"krony-pt-96m", "kngpt2"}
    (r2,) = [s for s in shapes if s.b_shape == (3, 3) and s.out_features == 3072]
    assert (r2.rank, r2.learnable_scales, r2.a_shape) == (2, True, (1024, 256))
    assert r2.mac_ratio == pytest.approx(3072 * 768 / min(2 * (256 * 3 * 3 + 1024 * 256 * 3), 2 * (1024 * 256 * 3 + 1024 * 3 * 3)))
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        preset_layer_shapes(["nope"])


def _table_lines(text):
    return [line for line in text.splitlines() if line.startswith("|")]


def test_layer_speed_rows_and_table_on_tiny_shapes():
    shapes = [LayerShape(96, 32, (8, 4), (12, 8), 2, True, ("x",)), LayerShape(24, 36, (24, 9), (1, 4))]
    rows = layer_speed_rows(shapes, tokens=(1, 5), autotune=True, repeats=1, warmup=0, sample_s=0.0)
    assert [(r["out"], r["in"], r["tokens"]) for r in rows] == [(96, 32, 1), (96, 32, 5), (24, 36, 1), (24, 36, 5)]
    for r in rows:
        for key in ("fwd_dense_s", "fwd_kron_s", "fwdbwd_dense_s", "fwdbwd_kron_s", "fwd_tuned_s"):
            assert r[key] > 0
        assert r["fwd_ratio"] == pytest.approx(r["fwd_dense_s"] / r["fwd_kron_s"])
        assert r["tuned_plan"].split("/")[0] in ("b_first", "a_first")
    assert rows[2]["mac_ratio"] == pytest.approx(24 * 36 / (9 * 4 + 24 * 9))  # B (1,4): B first
    lines = _table_lines(layer_speed_markdown(rows, command="kronlm bench layers"))
    assert len(lines) == 2 + len(rows)
    assert len({line.count("|") for line in lines}) == 1
    with pytest.raises(ValueError, match="token counts must be >= 1"):
        layer_speed_rows(shapes, tokens=(0,))


def test_model_speed_rows_and_macs_on_tiny_models():
    dense = tiny_llama()
    # hidden 32, 2 KV heads of 8, MLP 48, 3 layers: q 1024 + k 512 + v 512 + o 1024 + 3 × 1536 = 7680 a layer.
    assert linear_macs_per_token(dense) == 3 * 7680
    assert linear_macs_per_token(dense, include_head=True) == 3 * 7680 + 96 * 32
    small = compressed_copy(dense, "krony-pt-llama-mlp-2x")
    # gate/up (48,32) = (24,32) ⊗ (2,1): A first 24·32 + 24·2; down (32,48) = (32,24) ⊗ (1,2): B first 24·2 + 32·24.
    assert linear_macs_per_token(small) == 3 * (3072 + 2 * (768 + 48) + (48 + 768))
    rows = model_speed_rows({"dense": dense, "2x": small}, prefill_shapes=((1, 6), (2, 6)), new_tokens=3, prompt_tokens=2, repeats=1, warmup=0)
    assert [r["model"] for r in rows] == ["dense", "2x"]
    assert rows[0]["mac_ratio"] == 1.0 and rows[1]["mac_ratio"] > 1.0
    assert rows[1]["params_bytes"] < rows[0]["params_bytes"]
    for r in rows:
        assert set(r["prefill_tok_s"]) == {(1, 6), (2, 6)} and all(v > 0 for v in r["prefill_tok_s"].values())
        assert r["decode_tok_s"] > 0 and r["peak_bytes"] >= r["peak_extra_bytes"] >= 0
    assert rows[0]["decode_speedup"] == 1.0
    lines = _table_lines(model_speed_markdown(rows, title="t", new_tokens=3, prompt_tokens=2))
    assert len(lines) == 4 and len({line.count("|") for line in lines}) == 1


def test_kronecker_low_rank_layers_count_both_parts_of_their_multiply_adds():
    from kronlm.layers.lowrank import KroneckerLowRankLinear

    layer = KroneckerLowRankLinear(32, 48, (24, 32), (2, 1), rank=1, lowrank=4)
    # Kronecker part A first: 24·32 + 24·2 = 816; low-rank part: 4 · (32 + 48) = 320.
    assert linear_macs_per_token(torch.nn.Sequential(layer)) == 816 + 320


def test_cli_times_saved_folders_against_the_first_merged_back_to_dense(tmp_path, capsys):
    from kronlm.cli import main
    from kronlm.modeling import save

    small = tmp_path / "small"
    save(compressed_copy(tiny_llama(), "krony-pt-llama-mlp-2x"), small)
    out = tmp_path / "saved.md"
    args = ["bench", "models", "--model", str(small), "--prefill", "1x6", "--new-tokens", "2", "--prompt-tokens", "2", "--repeats", "1"]
    assert main([*args, "--out", str(out)]) == 0
    text = out.read_text()
    assert "Saved weights; the baseline is the first folder merged back to dense" in text
    rows = _table_lines(text)[2:]
    assert [row.split("|")[1].strip() for row in rows] == ["dense (small merged)", "small"]
    # The merged baseline counts the dense MACs of tiny_llama: 3 layers × 7,680 linear + attention.
    assert float(rows[1].split("|")[4]) > 1.0
    capsys.readouterr()
    assert main([*args, "--presets", "krony-pt-llama-mlp-2x"]) == 1
    assert "--presets (random weights) or --model (saved folders), not both" in capsys.readouterr().err
    assert main([*args, "--model", str(tmp_path / "missing")]) == 1
    assert "missing" in capsys.readouterr().err
    other = tmp_path / "other"
    save(tiny_llama(vocab_size=80), other)
    assert main([*args, "--model", str(other)]) == 1
    assert "other has a vocabulary of 80 tokens, the baseline dense (small merged) 96" in capsys.readouterr().err


def test_peak_memory_sees_a_large_temporary():
    def allocate():
        t = torch.ones(16 * 2**20)  # 64 MiB, touched
        return float(t[-1])

    peak, start, method = peak_memory(allocate)
    assert peak - start >= 60 * 2**20, method


def test_timing_and_table_errors(tmp_path):
    with pytest.raises(ValueError, match="no callables"):
        time_interleaved({})
    with pytest.raises(ValueError, match="repeats >= 1"):
        time_interleaved({"a": lambda: None}, repeats=0)
    t = time_interleaved({"a": lambda: None, "b": lambda: None}, warmup=0, repeats=3)
    assert len(t["a"].times_s) == 3 and t["b"].median_s >= 0
    with pytest.raises(ValueError, match="row 0 has 1 cells but there are 2 columns"):
        markdown_table(["a", "b"], [["x"]])
    path = write_markdown(markdown_table(["a", "b"], [[1, 2]]), tmp_path / "t.md")
    assert path.read_text() == "| a | b |\n| --- | ---: |\n| 1 | 2 |\n"


def test_reports_carry_no_absolute_path_of_the_recording_machine(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "wikitext-2-raw").mkdir(parents=True)
    monkeypatch.setenv("KRONLM_DATA_DIR", str(data))
    monkeypatch.chdir(tmp_path)
    text = (f"calibration: WikiText-2 (local copy {data}/wikitext-2-raw/wiki.valid.raw); model {sys.prefix}/lib/m.gguf; "
            f"saved to {tmp_path}/runs/x; {tmp_path}x stays")
    path = write_markdown(text, tmp_path / "r.md")
    assert path.read_text() == (f"calibration: WikiText-2 (local copy .../wikitext-2-raw/wiki.valid.raw); model .../lib/m.gguf; "
                                f"saved to ./runs/x; {tmp_path}x stays\n")


def test_results_rows_append_and_read_back_with_portable_paths(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("KRONLM_DATA_DIR", str(data))
    path = tmp_path / "docs" / "bench.jsonl"  # the folder does not exist yet
    assert read_result_rows(path) == []
    append_result_row(path, {"name": "a", "ppl": 1.5, "calibration": f"{data}/wikitext-2-raw/wiki.valid.raw"})
    path.write_text(path.read_text() + "\n")  # a blank line (a hand edit) is skipped
    append_result_row(path, {"name": "b", "ppl": 2.0})
    assert read_result_rows(path) == [{"name": "a", "ppl": 1.5, "calibration": ".../wikitext-2-raw/wiki.valid.raw"},
                                      {"name": "b", "ppl": 2.0}]


def test_cli_writes_the_table_and_reports_bad_presets(tmp_path, capsys):
    from kronlm.cli import main

    out = tmp_path / "layers.md"
    code = main(["bench", "layers", "--presets", "kroneckerbert21", "--tokens", "2", "--repeats", "1", "--no-backward", "--out", str(out)])
    assert code == 0
    text = out.read_text()
    assert re.search(r"Machine: .*cores.*torch", text)
    assert len(_table_lines(text)) == 2 + 3  # KroneckerBERT21 has 3 distinct linear shapes
    assert main(["bench", "layers", "--presets", "nope", "--tokens", "2"]) == 1
    assert "unknown preset 'nope'" in capsys.readouterr().err


def test_layer_train_speed_benchmark_times_every_factored_layer_three_ways(tmp_path):
    import importlib.util
    from pathlib import Path

    from kronlm.modeling import save

    spec = importlib.util.spec_from_file_location("layer_train_speed", Path(__file__).resolve().parents[1] / "benchmarks" / "layer_train_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # q_proj (32, 32) as A (16, 16) ⊗ B (2, 2) with R = 4: the factored product (4,608 multiply-adds
    # per token, counted twice) is dearer than dense (1,024), so the rules form W; the MLP's one term never does.
    config = CompressionConfig(targets=[KroneckerTarget(["**.self_attn.q_proj"], b_shape=(2, 2), rank=4),
                                        KroneckerTarget(["**.mlp.gate_proj"], b_shape=(4, 1))])
    folder = save(compress(tiny_llama(), config, progress=False), tmp_path / "student")
    out = tmp_path / "speed.md"
    assert bench.main(["--model", str(folder), "--tokens", "16", "--repeats", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "6 factored layers" in text
    assert re.search(r"\| \(32, 32\) \| A \(16, 16\) ⊗ B \(2, 2\) \| 4 \| 3 \| W formed \|", text)
    assert re.search(r"\| \(48, 32\) \| A \(12, 32\) ⊗ B \(4, 1\) \| 1 \| 3 \| a_first \|", text)
    with pytest.raises(SystemExit, match="not a model folder"):
        bench.main(["--model", str(tmp_path / "missing")])
