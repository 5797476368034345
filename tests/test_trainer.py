"""The recovery training loop on tiny GPT-2 students: config, optimizer groups, LR schedule,
validation perplexity, TensorBoard scalars, exports, NaN stop and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from training_models import BLOCK, VOCAB, compressed_gpt2, tiny_gpt2
from transformers import AutoModelForCausalLM

import kronlm
from kronlm.data.blocks import BlockDataset, TokenBlocks
from kronlm.distill.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from kronlm.distill.config import TrainingConfig
from kronlm.distill.data_order import epoch_indices, process_share
from kronlm.distill.distributed import make_accelerator
from kronlm.distill.optim import build_optimizer, build_param_groups, build_scheduler
from kronlm.distill.trainer import TrainingDiverged, train
from kronlm.distill.validators import evaluate_perplexity
from kronlm.modeling import COMPRESSION_FILE


def tiny_blocks(repeats: int = 40, val_fraction: float = 0.1) -> TokenBlocks:
    # A cyclic token stream: learnable in a few steps, so "the loss goes down" is a real signal.
    ids = (torch.arange(VOCAB * repeats) * 5) % VOCAB
    return TokenBlocks.from_ids(ids, BLOCK, val_fraction=val_fraction)


def config(tmp_path, **kw) -> TrainingConfig:
    values = dict(
        recipe="ce", block_size=BLOCK, micro_batch_size=4, grad_accum_steps=1, max_steps=6, lr=1e-2, min_lr=1e-3,
        warmup_steps=2, eval_every=3, save_every=3, mixed_precision="no", log_dir=str(tmp_path / "logs"),
    )
    values.update(kw)
    return TrainingConfig(**values)


def cosine_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """The multiplier before update ``step`` (0-based), written out from the formula."""
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / (total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------ config


def test_config_round_trips_through_yaml_and_json(tmp_path):
    cfg = TrainingConfig(recipe="distilgpt2", loss_weights={"ce": 0.5, "temperature": 3.0}, layer_map=[0, 2, 4],
                         betas=(0.8, 0.99), lr_scalars=1e-3, grad_clip=None, epochs=2.5, eval_batches=7)
    for name in ("c.yaml", "c.json"):
        cfg.to_file(tmp_path / name)
        back = TrainingConfig.from_file(tmp_path / name)
        assert back == cfg
        assert back.betas == (0.8, 0.99)
    assert cfg.loss_weights_resolved().temperature == 3.0
    assert cfg.loss_weights_resolved().kd == 5.0  # the recipe's value, not overridden


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1.0e-4\nlearning_rate: 3\nwarmup: 5\n")
    with pytest.raises(ValueError, match="learning_rate, warmup"):
        TrainingConfig.from_file(path)
    with pytest.raises(ValueError, match="micro_batch_size must be a positive integer, got 0"):
        TrainingConfig(micro_batch_size=0)
    with pytest.raises(ValueError, match="min_lr"):
        TrainingConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainingConfig(mixed_precision="fp16")
    with pytest.raises(ValueError, match="not both"):
        TrainingConfig(max_steps=3, epochs=1.0)
    with pytest.raises(ValueError, match="unknown recipe"):
        TrainingConfig(recipe="nope")
    with pytest.raises(ValueError, match="unknown LossWeights fields"):
        TrainingConfig(loss_weights={"kl": 1.0})


# ------------------------------------------------------------------------------------------------ optimizer


@pytest.mark.parametrize("cuda, cuda_bf16, amx, avx512_bf16, expected", [
    (True, True, False, False, "bf16"), (True, False, True, True, "no"),  # the run is on the GPU: its support decides
    (False, False, True, False, "bf16"), (False, False, False, True, "bf16"),  # a CPU run: AMX-BF16 or AVX512-BF16
    (False, False, False, False, "no"),
])
def test_auto_mixed_precision_is_bf16_where_the_run_device_multiplies_bf16_in_hardware(monkeypatch, cuda, cuda_bf16, amx, avx512_bf16,
                                                                                        expected):
    from kronlm.distill import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": amx, "avx512_bf16": avx512_bf16, "avx2": True})
    assert distributed.resolve_mixed_precision("auto") == expected
    assert distributed.resolve_mixed_precision("no") == "no"
    assert distributed.resolve_mixed_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="'no', 'bf16' or 'auto', got 'fp16'"):
        distributed.resolve_mixed_precision("fp16")


def test_param_groups_split_kronecker_scalars_decay_and_no_decay():
    model = compressed_gpt2()
    cfg = TrainingConfig(lr=1e-3, lr_kronecker=2e-3, lr_scalars=5e-2, weight_decay=0.1)
    optimizer = build_optimizer(model, cfg)
    groups = {g["name"]: g for g in optimizer.param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {k: sorted(names[id(p)] for p in g["params"]) for k, g in groups.items()}
    assert set(groups) == {"kronecker", "scalars", "decay", "no_decay"}
    assert (groups["kronecker"]["lr"], groups["kronecker"]["weight_decay"]) == (2e-3, 0.1)
    assert (groups["scalars"]["lr"], groups["scalars"]["weight_decay"]) == (5e-2, 0.0)
    assert (groups["decay"]["lr"], groups["decay"]["weight_decay"]) == (1e-3, 0.1)
    assert (groups["no_decay"]["lr"], groups["no_decay"]["weight_decay"]) == (1e-3, 0.0)
    assert members["kronecker"] == sorted(
        [f"transformer.h.{i}.mlp.{m}.{f}" for i in range(2) for m in ("c_fc", "c_proj") for f in "AB"]
        + ["transformer.wte.A", "transformer.wte.B"]
    )
    assert members["scalars"] == sorted(f"transformer.h.{i}.mlp.{m}.scales" for i in range(2) for m in ("c_fc", "c_proj"))
    assert all(n.endswith((".bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")) for n in members["no_decay"])
    assert "transformer.h.0.mlp.c_fc.bias" in members["no_decay"]
    assert sorted(members["decay"]) == sorted(
        ["transformer.wpe.weight", "lm_head.weight"]
        + [f"transformer.h.{i}.attn.{m}.weight" for i in range(2) for m in ("c_attn", "c_proj")]
    )
    # Every trainable tensor in exactly one group.
    assert sum(len(v) for v in members.values()) == len(list(model.parameters()))


def test_tied_weights_appear_once_and_freeze_uncompressed():
    dense = tiny_gpt2()
    groups = build_param_groups(dense, TrainingConfig())
    flat = [p for g in groups for p in g["params"]]
    assert len(flat) == len({id(p) for p in flat}) == len(list(dense.parameters()))
    assert dense.lm_head.weight is dense.transformer.wte.weight
    with pytest.raises(ValueError, match="no Kronecker layers"):
        build_param_groups(dense, TrainingConfig(freeze_uncompressed=True))

    model = compressed_gpt2()
    groups = build_param_groups(model, TrainingConfig(freeze_uncompressed=True))
    assert [g["name"] for g in groups] == ["kronecker", "scalars"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith((".A", ".B", ".scales"))}


def test_freeze_uncompressed_trains_the_low_rank_part_of_kronecker_low_rank_layers():
    # U (out, k) and V (k, in) hold most of such a layer's parameters: freezing them would leave
    # end-to-end recovery training only the small Kronecker part.
    from conftest import tiny_llama

    from kronlm.layers import KroneckerLowRankLinear

    model = kronlm.compress(tiny_llama(), kronlm.CompressionConfig(targets=[kronlm.KroneckerTarget(
        ["**.mlp.down_proj"], b_shape=(1, 2), lowrank_rank=4, init="van_loan")]), progress=False)
    groups = build_param_groups(model, TrainingConfig(freeze_uncompressed=True))
    assert [g["name"] for g in groups] == ["kronecker"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    layers = [n for n, m in model.named_modules() if isinstance(m, KroneckerLowRankLinear)]
    assert layers and trainable == {f"{n}.{f}" for n in layers for f in ("A", "B", "U", "V")}
    assert sum(p.numel() for p in groups[0]["params"]) == sum(
        p.numel() for n, p in model.named_parameters() if n.rsplit(".", 1)[0] in layers)


def test_lr_schedule_is_linear_warmup_then_cosine_to_min_lr():
    model = compressed_gpt2()
    cfg = TrainingConfig(lr=1e-3, lr_kronecker=4e-3, min_lr=1e-4, warmup_steps=5)
    optimizer = build_optimizer(model, cfg)
    total = 25
    scheduler = build_scheduler(optimizer, cfg, total)
    peaks = {"kronecker": 4e-3, "scalars": 1e-3, "decay": 1e-3, "no_decay": 1e-3}
    for step in range(total + 1):
        f = cosine_factor(step, 5, total, 0.1)
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(peaks[group["name"]] * f, rel=1e-12, abs=1e-18), (step, group["name"])
        if step < total:
            optimizer.step()
            scheduler.step()
    # The floor: min_lr for the base groups, min_lr / lr of its peak for the Kronecker group.
    assert optimizer.param_groups[0]["lr"] == pytest.approx(4e-4, rel=1e-12)
    with pytest.raises(ValueError, match=r"warmup_steps \(5\) must be smaller than max_steps \(5\)"):
        build_scheduler(optimizer, cfg, 5)


def test_epoch_indices_are_seeded_permutations_truncated_to_whole_steps():
    a = epoch_indices(50, epoch=0, seed=3, per_step=8)
    assert len(a) == 48 and len(set(a)) == 48 and set(a) <= set(range(50))
    assert a == epoch_indices(50, epoch=0, seed=3, per_step=8)
    assert a != epoch_indices(50, epoch=1, seed=3, per_step=8)
    assert a != epoch_indices(50, epoch=0, seed=4, per_step=8)


# ------------------------------------------------------------------------------------------------ validation


def test_validation_perplexity_matches_the_mean_token_cross_entropy(tmp_path):
    model = tiny_gpt2(1).double()
    blocks = torch.randint(0, VOCAB, (7, BLOCK), generator=torch.Generator().manual_seed(0))
    accelerator = make_accelerator(config(tmp_path), tmp_path)
    got = evaluate_perplexity(model, BlockDataset(blocks), accelerator, micro_batch_size=3)
    with torch.no_grad():
        logits = model(input_ids=blocks).logits
        reference = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), blocks[:, 1:].reshape(-1), reduction="mean")
    assert got["tokens"] == 7 * (BLOCK - 1)
    assert got["loss"] == pytest.approx(reference.item(), rel=1e-12)
    assert got["ppl"] == pytest.approx(math.exp(reference.item()), rel=1e-12)
    # eval_batches: only the first two micro-batches (6 blocks).
    first = evaluate_perplexity(model, BlockDataset(blocks), accelerator, micro_batch_size=3, max_batches=2)
    with torch.no_grad():
        ref6 = F.cross_entropy(logits[:6, :-1].reshape(-1, VOCAB), blocks[:6, 1:].reshape(-1))
    assert first["tokens"] == 6 * (BLOCK - 1) and first["loss"] == pytest.approx(ref6.item(), rel=1e-12)


# ------------------------------------------------------------------------------------------------ training


def test_compressed_student_trains_logs_and_exports(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    student = compressed_gpt2()
    cfg = config(tmp_path, lr_kronecker=2e-2, max_steps=8, warmup_steps=2, eval_every=4, save_every=4)
    result = train(student, None, tiny_blocks(), cfg, tmp_path / "run")

    assert result.steps == 8 and len(result.losses) == 8
    assert result.losses[-1] < 0.8 * result.losses[0]
    assert [v["step"] for v in result.val_history] == [4, 8]
    assert result.tokens_seen == 8 * 4 * BLOCK
    assert result.best_step == min(result.val_history, key=lambda v: v["ppl"])["step"]

    # TensorBoard: every loss term, the lr of each group (following the schedule), grad norm,
    # throughput and validation.
    events = EventAccumulator(str(tmp_path / "logs" / "distill"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    groups = ("kronecker", "scalars", "decay", "no_decay")
    assert {"train/loss", "train/ce", "train/grad_norm", "train/tokens_per_s", "val/loss", "val/ppl"} <= tags
    assert {f"train/lr/{g}" for g in groups} <= tags
    kron_lrs = [(e.step, e.value) for e in events.Scalars("train/lr/kronecker")]
    assert [s for s, _ in kron_lrs] == list(range(1, 9))
    for step, value in kron_lrs:  # the lr of update `step` is the schedule at step - 1
        assert value == pytest.approx(2e-2 * cosine_factor(step - 1, 2, 8, 0.1), rel=1e-6, abs=1e-12)
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx(result.losses, rel=1e-6)
    assert [e.value for e in events.Scalars("val/ppl")] == pytest.approx([v["ppl"] for v in result.val_history], rel=1e-6)

    # The final student is in kronlm's format and loads back with the trained weights.
    final = tmp_path / "run" / "final"
    assert (final / COMPRESSION_FILE).is_file()
    loaded = AutoModelForCausalLM.from_pretrained(final)
    assert isinstance(loaded.transformer.h[0].mlp.c_fc, kronlm.KroneckerLinear)
    trained = student.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    summary = json.loads((tmp_path / "run" / "best" / "training_summary.json").read_text())
    assert summary["step"] == result.best_step and summary["val_ppl"] == pytest.approx(result.best_val_ppl)
    # The last checkpoint holds the floor learning rates.
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    lrs = {g["name"]: g["lr"] for g in ckpt.optimizer_state["param_groups"]}
    assert lrs["kronecker"] == pytest.approx(2e-3) and lrs["decay"] == pytest.approx(1e-3)


def test_ilkd_distillation_from_a_teacher_lowers_the_loss(tmp_path):
    teacher = tiny_gpt2(seed=5)
    # Pre-train the teacher a little so it has something to teach.
    train(teacher, None, tiny_blocks(), config(tmp_path, max_steps=30, save_every=100, eval_every=100), tmp_path / "t")
    teacher_params = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    student = tiny_gpt2(seed=6)
    result = train(student, teacher, tiny_blocks(), config(tmp_path, recipe="ilkd-kngpt2", max_steps=15, save_every=100),
                   tmp_path / "s")
    assert set(result.loss_terms[0]) == {"embedding", "attention", "hidden", "kd", "ce"}
    assert result.losses[-1] < 0.7 * result.losses[0]
    assert result.loss_terms[-1]["kd"] < result.loss_terms[0]["kd"]
    # The teacher is frozen and untouched.
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    for n, p in teacher.named_parameters():
        assert torch.equal(p, teacher_params[n]), n


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    student = tiny_gpt2()
    calls = {"n": 0}

    def poison(module, args, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] == 5:  # the first micro-batch of step 5 (one micro-batch per step)
                return output * float("nan")
        return output

    student.lm_head.register_forward_hook(poison)
    cfg = config(tmp_path, max_steps=8, save_every=2, eval_every=100)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 5: total=nan, ce=nan.*step-0000004") as err:
        train(student, None, tiny_blocks(), cfg, tmp_path / "run")
    assert "stopped before the update" in str(err.value)
    run = tmp_path / "run"
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    assert latest_checkpoint(run).name == "step-0000004"
    ckpt = load_checkpoint(latest_checkpoint(run))
    assert ckpt.step == 4 and all(torch.isfinite(t).all() for t in ckpt.model_state.values())
    # No update was applied after the NaN: the in-memory weights equal the step-4 checkpoint,
    # since step 5 never ran its optimizer step.
    for name, tensor in student.state_dict().items():
        assert torch.equal(tensor, ckpt.model_state[name]), name
    assert not (run / "final").exists()


def test_bad_inputs_raise_clear_errors(tmp_path):
    student = tiny_gpt2()
    blocks = tiny_blocks()
    with pytest.raises(ValueError, match="recipe 'ilkd-kngpt2' distils from a teacher, but no teacher"):
        train(student, None, blocks, config(tmp_path, recipe="ilkd-kngpt2"), tmp_path / "a")
    small = TokenBlocks.from_ids(torch.arange(3 * BLOCK) % VOCAB, BLOCK, val_fraction=0.0)
    with pytest.raises(ValueError, match=r"3 blocks, fewer than one optimizer step needs .* = 8"):
        train(student, None, small, config(tmp_path, micro_batch_size=4, grad_accum_steps=2), tmp_path / "b")
    with pytest.raises(ValueError, match="blocks have 16 tokens each but block_size is 32"):
        train(student, None, blocks, config(tmp_path, block_size=32), tmp_path / "c")
    with pytest.raises(ValueError, match=r"warmup_steps \(10\) must be smaller than max_steps \(4\)"):
        # 144 training blocks, 4 per step: 0.1 epoch is 4 steps, known only once the data is seen
        train(student, None, blocks, config(tmp_path, max_steps=None, epochs=0.1, warmup_steps=10), tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="no completed checkpoint"):
        train(student, None, blocks, config(tmp_path), tmp_path / "e", resume=True)


# ------------------------------------------------------------------------------------------------ configs and CLI


def test_example_configs_load_and_comment_every_key():
    import dataclasses
    from pathlib import Path

    import yaml

    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("distill-*.yaml"))
    assert len(files) >= 3
    fields = [f.name for f in dataclasses.fields(TrainingConfig)]
    for file in files:
        TrainingConfig.from_file(file)
        assert list(yaml.safe_load(file.read_text())) == fields, file.name
        lines = file.read_text().splitlines()
        for i, line in enumerate(lines):
            if line and not line.startswith((" ", "#")):  # a top-level key
                assert lines[i - 1].startswith("#"), f"{file.name}: no comment above {line!r}"


def _word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")


def test_cli_truncate_then_distill_then_resume(tmp_path, capsys):
    from kronlm.cli import main

    words = [f"w{i}" for i in range(30)]
    tokenizer = _word_tokenizer(words)
    teacher = tiny_gpt2(3, n_layer=4)
    teacher.resize_token_embeddings(len(tokenizer))
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(" ".join(words[(i * 7 + j) % 30] for j in range(40)) for i in range(40)) + "\n")
    yaml_config = tmp_path / "run.yaml"
    yaml_config.write_text("max_steps: 100\nblock_size: 64\neval_every: 2\nsave_every: 2\nmixed_precision: no\n"
                           f"lr: 5.0e-3\nmin_lr: 5.0e-4\nlog_dir: {tmp_path / 'logs'}\n")

    assert main(["truncate", str(tmp_path / "teacher"), "--layers", "0,2", "--out", str(tmp_path / "student")]) == 0
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert student.config.n_layer == 2

    args = ["distill", "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student"),
            "--data", str(text), "--out", str(tmp_path / "run"), "--recipe", "ilkd-kngpt2", "--layer-map", "1,3",
            "--config", str(yaml_config), "--block-size", "16", "--batch-size", "2", "--warmup-steps", "1"]
    assert main(args + ["--max-steps", "4"]) == 0
    used = TrainingConfig.from_file(tmp_path / "run" / "training_config.yaml")
    assert (used.max_steps, used.block_size, used.layer_map, used.eval_every) == (4, 16, [1, 3], 2)
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert final.config.n_layer == 2 and (tmp_path / "run" / "final" / "tokenizer.json").is_file()
    assert (tmp_path / "run" / "best" / "training_summary.json").is_file()

    assert main(args + ["--max-steps", "6", "--resume"]) == 0
    assert latest_checkpoint(tmp_path / "run").name == "step-0000006"
    capsys.readouterr()

    assert main(args + ["--max-steps", "4", "--layer-map", "1,x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kronlm: error:") and "--layer-map" in err and "'x'" in err and "\n" not in err
    test_split = tmp_path / "wiki.test.raw"
    test_split.write_text(text.read_text())
    bad_data = [a if a != str(text) else str(test_split) for a in args]
    assert main(bad_data + ["--max-steps", "4"]) == 2
    assert "looks like a test split" in capsys.readouterr().err
    assert main(["truncate", str(tmp_path / "teacher"), "--layers", "0,9", "--out", str(tmp_path / "x")]) == 1
    assert "out of range" in capsys.readouterr().err


def test_process_shares_are_disjoint_and_independent_of_the_split():
    indices = list(range(100, 148))  # 48 blocks = 3 steps of 16
    one = process_share(indices, 0, micro_batch_size=2, grad_accum_steps=8, num_processes=1, process_index=0)
    two = [process_share(indices, 0, 2, 4, 2, p) for p in range(2)]
    four = [process_share(indices, 1, 2, 2, 4, p) for p in range(4)]  # from step 1
    assert one == indices
    assert sorted(two[0] + two[1]) == indices and not set(two[0]) & set(two[1])
    for step in range(3):  # each step covers the same 16 blocks however it is split
        assert sorted(two[0][step * 8:(step + 1) * 8] + two[1][step * 8:(step + 1) * 8]) == indices[step * 16:(step + 1) * 16]
    assert two[1][:2] == [102, 103]  # micro-batch 0 of process 1 follows micro-batch 0 of process 0
    assert sorted(sum(four, [])) == indices[16:]


def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
    )
    return LlamaForCausalLM(config)


def test_llama_student_distils_and_rmsnorm_weights_skip_decay(tmp_path):
    teacher = tiny_llama(0)
    train(teacher, None, tiny_blocks(), config(tmp_path, max_steps=20, save_every=100, eval_every=100), tmp_path / "t")
    student = tiny_llama(1)
    groups = {g["name"]: g for g in build_param_groups(student, TrainingConfig())}
    names = {id(p): n for n, p in student.named_parameters()}
    no_decay = sorted(names[id(p)] for p in groups["no_decay"]["params"])
    assert no_decay == sorted(n for n in names.values() if "norm" in n)  # Llama has no biases
    assert groups["no_decay"]["weight_decay"] == 0.0
    result = train(student, teacher, tiny_blocks(), config(tmp_path, recipe="ilkd-kngpt2", max_steps=10, save_every=100),
                   tmp_path / "s")
    assert result.losses[-1] < 0.8 * result.losses[0]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s" / "final")
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, student.state_dict()[name]), name


def test_unsupported_process_layouts_are_refused_before_any_work(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    student = tiny_gpt2()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    deepspeed = SimpleNamespace(gradient_accumulation_steps=1, distributed_type=DistributedType.DEEPSPEED)
    with pytest.raises(ValueError, match=r"DeepSpeed is not supported .*accelerate launch --use_fsdp --fsdp_version 2"):
        train(student, None, tiny_blocks(), config(tmp_path), tmp_path / "a", accelerator=deepspeed)
    plugin = SimpleNamespace(fsdp_version=1, use_orig_params=False)
    fsdp1 = SimpleNamespace(gradient_accumulation_steps=1, distributed_type=DistributedType.FSDP,
                            state=SimpleNamespace(fsdp_plugin=plugin))
    with pytest.raises(ValueError, match=r"FSDP1 without use_orig_params .*--fsdp_version 2, or --fsdp_use_orig_params true"):
        train(student, None, tiny_blocks(), config(tmp_path), tmp_path / "b", accelerator=fsdp1)
    # `accelerate launch --use_fsdp` on a machine without GPUs: accelerate would run plain processes.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match=r"FSDP was requested .* runs this as NO: FSDP needs GPUs"):
        train(student, None, tiny_blocks(), config(tmp_path), tmp_path / "c")
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    # `accelerate launch --use_deepspeed`: refused before accelerate asks for the DeepSpeed package.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="DeepSpeed is not supported"):
        make_accelerator(config(tmp_path), tmp_path / "d")
    assert not any((tmp_path / d).exists() for d in "abcd")
    for name, param in student.named_parameters():
        assert torch.equal(param, before[name]), name


def test_one_process_can_train_in_float32_then_in_bf16(tmp_path):
    # accelerate's process-wide state would refuse the second precision (a fine-tune, then a recovery).
    first = make_accelerator(TrainingConfig(mixed_precision="no", log_dir=str(tmp_path / "a")), tmp_path)
    assert first.mixed_precision == "no"
    second = make_accelerator(TrainingConfig(mixed_precision="bf16", log_dir=str(tmp_path / "b")), tmp_path)
    assert second.mixed_precision == "bf16"
    with second.autocast():
        assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.bfloat16
    third = make_accelerator(TrainingConfig(mixed_precision="no", log_dir=str(tmp_path / "c")), tmp_path)
    with third.autocast():
        assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.float32


def test_a_student_trained_under_bf16_autocast_computes_in_float32_afterwards(tmp_path):
    student = compressed_gpt2()
    train(student, None, tiny_blocks(), config(tmp_path, mixed_precision="bf16", max_steps=3), tmp_path / "run")
    # accelerate's prepare() wrapped forward in autocast for the run; the caller's model is unwrapped again.
    assert "_original_forward" not in student.__dict__
    ids = torch.arange(BLOCK)[None] % VOCAB
    with torch.no_grad():
        logits = student(ids).logits
    assert logits.dtype == torch.float32
    copy = kronlm.load(tmp_path / "run" / "final")
    with torch.no_grad():
        torch.testing.assert_close(copy(ids).logits, logits, rtol=0, atol=0)
