"""Training with 2 processes (CPU DDP over gloo, launched by ``torchrun``) against one process.

The test launches this file under ``python -m torch.distributed.run --nproc_per_node 2``; each
rank trains the same tiny GPT-2 student with the ``ilkd-kngpt2`` recipe. Afterwards both ranks
must hold bit-identical weights, the loss must have gone down, and the per-step losses must match
a single-process run that sees the same 8 blocks per step (2 processes x 2 micro-batches x 2
accumulation steps vs 1 process x 2 x 4): DDP's gradient averaging and the trainer's data
sharding together must reproduce the single-process gradient. The same holds for a GLUE teacher
fine-tuning through the same loop (variable-length examples, padding collator, length-grouped
steps, validation on held-out examples by every rank): 2 processes x 4 examples = 1 x 8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

# Dropout 0: the ranks would draw different masks than one process.
from training_models import BLOCK, VOCAB, tiny_gpt2

STEPS = 6


def run_config(out_dir: Path, grad_accum_steps: int):
    from kronlm.distill.config import TrainingConfig

    return TrainingConfig(
        recipe="ilkd-kngpt2", block_size=BLOCK, micro_batch_size=2, grad_accum_steps=grad_accum_steps,
        max_steps=STEPS, lr=1e-2, min_lr=1e-3, warmup_steps=1, eval_every=3, save_every=3, mixed_precision="no",
        seed=7, log_dir=str(out_dir / "logs"),
    )


def tiny_blocks():
    from kronlm.data.blocks import TokenBlocks

    ids = (torch.arange(VOCAB * 20) * 5) % VOCAB
    return TokenBlocks.from_ids(ids, BLOCK, val_fraction=0.1)


def glue_teacher_run(out_dir: Path, batch_size: int) -> dict:
    """Fine-tune a dropout-free tiny BERT classifier on synthetic SST-2 (6 steps of 8 examples)."""
    from test_glue_models import WORDS, encode, synthetic_sst2, tiny_tokenizer
    from transformers import BertConfig, BertForSequenceClassification

    from kronlm.tasks import TaskSplits, train_task_model
    from kronlm.tasks.glue import GlueFamily, GlueTrainConfig, get_task

    tok = tiny_tokenizer(out_dir / "tok")
    held_out = encode(tok, synthetic_sst2(16, 2))
    splits = TaskSplits(encode(tok, synthetic_sst2(64, 0)), held_out, held_out, val_examples=16)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    cfg = GlueTrainConfig(batch_size=batch_size, max_steps=6, lr=3e-3, eval_every=3, seed=1, val_fraction=0.2)
    result = train_task_model(GlueFamily(get_task("sst2"), tok), model, splits, cfg, out_dir, role="teacher")
    return {"losses": result.losses, "val": [v["accuracy"] for v in result.val_history], "best_step": result.best_step,
            "weights": {k: v.tolist() for k, v in model.state_dict().items() if k.startswith("classifier")}}


def _worker(out_dir: Path) -> None:
    """One rank of the torchrun job: train, then compare weights across ranks on rank 0."""
    from kronlm.distill.distributed import make_accelerator
    from kronlm.distill.objective import DistillationObjective
    from kronlm.distill.trainer import train

    # Record what the objective is handed: the DDP-wrapped student and the bare teacher.
    seen = set()

    class Recorder:
        def __init__(self, objective):
            self.objective = objective
            self.needs_teacher = objective.needs_teacher

        def __call__(self, student, teacher, batch):
            seen.add((type(student).__name__, type(teacher).__name__))
            return self.objective(student, teacher, batch)

    cfg = run_config(out_dir, grad_accum_steps=2)
    accelerator = make_accelerator(cfg, out_dir)
    student, teacher = tiny_gpt2(1), tiny_gpt2(2)
    objective = Recorder(DistillationObjective(cfg.loss_weights_resolved()))
    result = train(student, teacher, tiny_blocks(), cfg, out_dir, accelerator=accelerator, objective=objective)
    flat = torch.cat([p.detach().flatten() for p in student.parameters()])
    every = accelerator.gather(flat.unsqueeze(0))
    if accelerator.is_main_process:
        report = {
            "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "objective_saw": sorted(seen),
            "teacher_type": type(teacher).__name__,
            "teacher_frozen": not any(p.requires_grad for p in teacher.parameters()) and not teacher.training,
            "max_rank_difference": (every[0] - every[1]).abs().max().item(),
            "losses": result.losses,
            "val_ppl": [v["ppl"] for v in result.val_history],
            "tokens_seen": result.tokens_seen,
        }
        (out_dir / "report.json").write_text(json.dumps(report))
    glue = glue_teacher_run(out_dir / "glue", batch_size=4)
    if accelerator.is_main_process:
        (out_dir / "glue.json").write_text(json.dumps(glue))
    # A clean shutdown: a process group left to the interpreter's exit sometimes aborts the process
    # ("terminate called without an active exception").
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


def test_two_process_ddp_distillation_matches_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, str(tmp_path / "ddp")]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())

    assert report["num_processes"] == 2 and report["distributed_type"] == "DistributedType.MULTI_CPU"
    assert report["objective_saw"] == [["DistributedDataParallel", "GPT2LMHeadModel"]]  # (student, teacher)
    assert report["teacher_type"] == "GPT2LMHeadModel" and report["teacher_frozen"]
    assert report["max_rank_difference"] == 0.0
    losses = report["losses"]
    assert len(losses) == STEPS and losses[-1] < 0.9 * losses[0]
    assert report["tokens_seen"] == STEPS * 8 * BLOCK

    # The checkpoint carries both ranks' RNG states.
    from kronlm.distill.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "ddp")
    assert ckpt.step == STEPS and ckpt.rng_state["torch_cpu"].shape[0] == 2
    assert ckpt.trainer_state["world_size"] == 2
    assert (tmp_path / "ddp" / "final" / "model.safetensors").is_file()

    # One process, 4 accumulation steps: the same blocks per step, so the same losses.
    from kronlm.distill.trainer import train

    single = train(tiny_gpt2(1), tiny_gpt2(2), tiny_blocks(), run_config(tmp_path / "one", grad_accum_steps=4),
                   tmp_path / "one")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single.losses), rtol=1e-4, atol=1e-5)
    # Summation order differs (all-reduce vs accumulation), and Adam's normalised steps carry
    # rounding differences straight into the weights: compare against the size of one update
    # (about lr = 1e-2), not relative to the weights.
    for a, b in zip(ckpt.model_state.values(), load_checkpoint(tmp_path / "one").model_state.values()):
        torch.testing.assert_close(a, b, rtol=0, atol=5e-4)

    # GLUE through the same loop: 2 processes x 4 examples per step = 1 process x 8.
    glue = json.loads((tmp_path / "ddp" / "glue.json").read_text())
    one = glue_teacher_run(tmp_path / "glue-one", batch_size=8)
    assert len(glue["losses"]) == 6 and glue["losses"][-1] < glue["losses"][0]
    torch.testing.assert_close(torch.tensor(glue["losses"]), torch.tensor(one["losses"]), rtol=1e-4, atol=1e-5)
    assert glue["val"] == one["val"] and glue["best_step"] == one["best_step"]
    for name, value in glue["weights"].items():
        torch.testing.assert_close(torch.tensor(value), torch.tensor(one["weights"][name]), rtol=0, atol=5e-4)
    ddp_ckpt = load_checkpoint(tmp_path / "ddp" / "glue")
    assert ddp_ckpt.trainer_state["world_size"] == 2 and ddp_ckpt.trainer_state["length_grouped"]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
