"""The README's Python example, step for step, on a tiny Llama: the public functions chain as shown
(compress to a budget -> recover in stages -> evaluate -> save / load -> merge)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import tiny_llama
from shared_paths import GPT2_TOKENIZER_DIR

import kronlm
from kronlm.compression import calibration_input_ids
from kronlm.data import build_blocks

pytestmark = pytest.mark.skipif(GPT2_TOKENIZER_DIR is None, reason="GPT-2 tokenizer files missing")

TEXT = "\n\n".join(f"The {w} of block {i} follows the {v} of block {i + 1}, as every sentence here does."
                   for i, (w, v) in enumerate([("river", "stone"), ("green", "field"), ("cold", "light")] * 40))


def test_the_readme_python_example_runs_end_to_end(tmp_path):
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(GPT2_TOKENIZER_DIR)
    text_file = tmp_path / "train.txt"
    text_file.write_text(TEXT)
    teacher = tiny_llama(0, vocab_size=len(tok), max_position_embeddings=128)
    ids = torch.tensor(tok.encode(TEXT)[:1024]).view(-1, 32)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for step in range(30):  # a teacher that has learnt the text, so that compressing it costs perplexity
        optimizer.zero_grad()
        batch = ids[step % 8 * 4:step % 8 * 4 + 4]
        teacher(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
    teacher.eval()
    dense_params = kronlm.count_parameters(teacher)
    linear = sum(m.weight.numel() for m in teacher.model.layers.modules() if isinstance(m, torch.nn.Linear))
    target = dense_params - linear // 2  # the embedding (50,257 x 32) dominates a tiny model: take half of its linears away

    calibration = calibration_input_ids(tok, TEXT, 4, 32)
    student = kronlm.compress(copy.deepcopy(teacher), kronlm.BudgetConfig(target_params=target, families=("svd",), sensitivity_sequences=2),
                              calibration=calibration, progress=False)
    params = kronlm.count_parameters(student)
    assert params <= target and "svd" in student.compression_report.allocation.table()

    blocks = build_blocks(str(text_file), tok, block_size=32, max_tokens=1024, val_fraction=0.125)
    config = kronlm.default_recovery_config(minutes=0.5)
    config = dataclasses.replace(config, stages=[dataclasses.replace(s, block_size=32, epochs=1, eval_every=2, save_every=2)
                                                 for s in config.stages])
    held_out = tmp_path / "held_out.txt"  # the validation blocks: text the recovery chooses on but never trains on
    held_out.write_text(tok.decode(blocks.val.flatten().tolist()))
    before = kronlm.evaluate(student, tok, str(held_out), max_length=64, stride=32, progress=False).ppl
    result = kronlm.recover(student, teacher, blocks, config, tmp_path / "smol.recovery", tokenizer=tok, progress=False)
    assert [s.mode for s in config.stages] == ["local", "blockwise", "end_to_end"] and len(result.stages) == 3
    after = kronlm.evaluate(student, tok, str(held_out), max_length=64, stride=32, progress=False).ppl
    assert result.val_ppl < result.stages[0].val_ppl_before and after < before

    kronlm.save(student, tmp_path / "smol", tokenizer=tok)
    model = kronlm.load(tmp_path / "smol")
    ids = torch.tensor([tok.encode("The river of block 3")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, student(ids).logits, rtol=0, atol=0)
        dense = kronlm.merge_and_unload(model)
        assert type(dense).__name__ == "LlamaForCausalLM"
        torch.testing.assert_close(dense(ids).logits, student(ids).logits, rtol=1e-4, atol=1e-4)
