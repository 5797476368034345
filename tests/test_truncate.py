"""Layer truncation (Li et al., arXiv 2110.08460) on tiny GPT-2, Llama, BERT and Gemma2 configs."""

from __future__ import annotations

import json

import pytest
import torch
from shared_paths import SHARED_DATA
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from kronlm.compression.truncate import (
    TRUNCATION_FILE,
    find_block_list,
    save_truncated,
    truncate_layers,
)

VOCAB = 128


def tiny_gpt2(n_layer: int = 6) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=n_layer, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def tiny_llama(n_layer: int = 4, tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(1)
    config = LlamaConfig(
        num_hidden_layers=n_layer,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


def tiny_bert(n_layer: int = 4) -> BertForSequenceClassification:
    torch.manual_seed(2)
    config = BertConfig(
        num_hidden_layers=n_layer,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


def block_list(model):
    return find_block_list(model)[1]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tokens(seed: int = 0, length: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (2, length), generator=generator)


CASES = [
    (tiny_gpt2, "transformer.h", [0, 2, 4]),
    (tiny_gpt2, "transformer.h", [5, 1]),
    (tiny_llama, "model.layers", [0, 3]),
    (tiny_llama, "model.layers", [2, 1, 0]),
    (tiny_bert, "bert.encoder.layer", [1, 3]),
]


@pytest.mark.parametrize(("build", "path", "layers"), CASES)
def test_blocks_copied_exactly(build, path, layers):
    teacher = build()
    student = truncate_layers(teacher, layers)
    assert type(student) is type(teacher)
    assert find_block_list(teacher)[0] == path
    assert student.config.num_hidden_layers == len(layers)
    assert teacher.config.num_hidden_layers == len(block_list(teacher))  # teacher untouched
    s_blocks, t_blocks = block_list(student), block_list(teacher)
    assert len(s_blocks) == len(layers)
    for i, j in enumerate(layers):
        s_state, t_state = s_blocks[i].state_dict(), t_blocks[j].state_dict()
        assert s_state.keys() == t_state.keys()
        for key in t_state:
            assert torch.equal(s_state[key], t_state[key]), (i, j, key)
            # a copy, not shared storage with the teacher
            assert s_state[key].data_ptr() != t_state[key].data_ptr()
    # everything outside the blocks is copied
    prefix = path + "."
    s_all, t_all = student.state_dict(), teacher.state_dict()
    outside = [k for k in t_all if not k.startswith(prefix)]
    assert outside
    for key in outside:
        assert torch.equal(s_all[key], t_all[key]), key


@pytest.mark.parametrize(("build", "path", "layers"), CASES)
def test_parameter_count(build, path, layers):
    teacher = build()
    student = truncate_layers(teacher, layers)
    t_blocks = block_list(teacher)
    removed = sum(n_params(t_blocks[j]) for j in range(len(t_blocks)) if j not in layers)
    assert removed > 0
    assert n_params(student) == n_params(teacher) - removed


def test_layer_idx_is_student_position():
    gpt2 = truncate_layers(tiny_gpt2(), [5, 3, 1])
    assert [block.attn.layer_idx for block in gpt2.transformer.h] == [0, 1, 2]
    llama = truncate_layers(tiny_llama(), [3, 1])
    assert [layer.self_attn.layer_idx for layer in llama.model.layers] == [0, 1]


def test_tied_embeddings_stay_tied():
    gpt2 = truncate_layers(tiny_gpt2(), [0, 3])
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    llama = truncate_layers(tiny_llama(tied=True), [1])
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
    untied_teacher = tiny_llama(tied=False)
    untied = truncate_layers(untied_teacher, [1])
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert torch.equal(untied.lm_head.weight, untied_teacher.lm_head.weight)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama, tiny_bert])
def test_all_layers_reproduce_teacher_bit_identically(build):
    teacher = build()
    depth = teacher.config.num_hidden_layers
    student = truncate_layers(teacher, list(range(depth)))
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(student(ids).logits, teacher(ids).logits)


def test_truncated_gpt2_matches_manual_block_stack():
    """The 3-block student computes embeddings -> teacher blocks 4, 0, 2 -> ln_f -> head."""
    teacher = tiny_gpt2()
    layers = [4, 0, 2]
    student = truncate_layers(teacher, layers)
    ids = tokens(1)
    with torch.no_grad():
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        hidden = teacher.transformer.wte(ids) + teacher.transformer.wpe(positions)
        for j in layers:
            out = teacher.transformer.h[j](hidden)
            hidden = out[0] if isinstance(out, tuple) else out
        expected = teacher.lm_head(teacher.transformer.ln_f(hidden))
        actual = student(ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_save_reload_bit_identical_causal_lm(tmp_path):
    for build, layers in [(tiny_gpt2, [0, 2, 4]), (tiny_llama, [3, 0])]:
        teacher = build()
        teacher.config.name_or_path = "tiny/teacher"
        out = tmp_path / type(teacher).__name__
        student = save_truncated(teacher, layers, out)
        assert (out / "model.safetensors").is_file()
        assert not list(out.glob("*.bin"))
        record = json.loads((out / TRUNCATION_FILE).read_text())
        assert record["layers"] == layers
        assert record["source_model"] == "tiny/teacher"
        assert record["source_num_layers"] == teacher.config.num_hidden_layers
        assert record["num_layers"] == len(layers)
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
        assert type(reloaded) is type(teacher)
        assert reloaded.config.num_hidden_layers == len(layers)
        ids = tokens(2)
        with torch.no_grad():
            assert torch.equal(reloaded(ids).logits, student(ids).logits)
        assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight


def test_save_reload_bert_with_pooler_and_head(tmp_path):
    teacher = tiny_bert()
    student = save_truncated(teacher, [3, 1], tmp_path / "bert")
    assert torch.equal(student.bert.pooler.dense.weight, teacher.bert.pooler.dense.weight)
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert").eval()
    ids = tokens(3)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, student(ids).logits)


def test_save_refuses_non_empty_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"out: exists and is not a model folder \(it holds 1 entries: keep\.txt\)"):
        save_truncated(tiny_gpt2(2), [0], tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
    save_truncated(tiny_gpt2(2), [0], tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists()


def test_save_with_tokenizer(tmp_path):
    data = SHARED_DATA
    tok_dir = data.parent / "tokenizers" / "gpt2" if data is not None else None
    if tok_dir is None or not (tok_dir / "vocab.json").is_file():
        pytest.skip("GPT-2 tokenizer files not available")
    from transformers import AutoTokenizer, GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast.from_pretrained(tok_dir)
    save_truncated(tiny_gpt2(2), [1], tmp_path / "out", tokenizer=tokenizer)
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("Hello world")["input_ids"] == [15496, 995]


def test_generate_on_truncated_llama_uses_cache_correctly():
    student = truncate_layers(tiny_llama(), [3, 1])
    ids = tokens(4, length=6)[:1]
    out = student.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)
    assert torch.equal(out[:, :6], ids)
    # incremental decoding through the KV cache must match a full forward pass: a cache indexed by
    # the teacher's layer numbers would mix up the two blocks' keys and values
    with torch.no_grad():
        prefix = student(out[:, :8], use_cache=True)
        step = student(out[:, 8:9], past_key_values=prefix.past_key_values, use_cache=True).logits[:, -1]
        full = student(out[:, :9]).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
    # greedy generation picks the argmax of the full forward pass
    with torch.no_grad():
        for t in range(6, 9):
            assert student(out[:, :t]).logits[0, -1].argmax().item() == out[0, t].item()


def test_per_layer_config_lists_reindexed():
    torch.manual_seed(3)
    config = Gemma2Config(
        num_hidden_layers=4,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=VOCAB,
        sliding_window=4,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
    )
    teacher = Gemma2ForCausalLM(config).eval()
    assert teacher.config.layer_types == ["sliding_attention", "full_attention"] * 2
    student = truncate_layers(teacher, [1, 2, 3])
    assert student.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    windows = [layer.self_attn.sliding_window for layer in student.model.layers]
    assert windows == [teacher.model.layers[j].self_attn.sliding_window for j in [1, 2, 3]]
    full = truncate_layers(teacher, [0, 1, 2, 3])
    ids = tokens(5, length=10)
    with torch.no_grad():
        assert torch.equal(full(ids).logits, teacher(ids).logits)


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([], "empty"),
        ([0, 6], r"layer index 6 .*teacher has 6 layers"),
        ([-1], r"layer index -1 .*teacher has 6 layers"),
        ([1, 2, 1], r"repeats teacher block\(s\) \[1\]"),
        ([0.5], "not an integer"),
        ([True], "bool"),
    ],
)
def test_bad_layer_lists(layers, message):
    with pytest.raises(ValueError, match=message):
        truncate_layers(tiny_gpt2(), layers)


def test_unsupported_architectures():
    t5 = T5ForConditionalGeneration(
        T5Config(num_layers=2, d_model=32, d_ff=64, num_heads=2, d_kv=16, vocab_size=VOCAB)
    )
    with pytest.raises(ValueError, match="T5ForConditionalGeneration"):
        truncate_layers(t5, [0])
    with pytest.raises(ValueError, match="Linear"):
        truncate_layers(torch.nn.Linear(3, 3), [0])


def test_caller_rng_untouched():
    teacher = tiny_gpt2(2)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    truncate_layers(teacher, [1])
    assert torch.equal(torch.rand(3), expected)
