"""Distillation under FSDP with 2 CPU processes (gloo, launched by ``torchrun``): save, resume, gather.

Accelerate shards only on accelerator devices; on CPU it runs several processes as DDP whatever
the FSDP plugin says. The worker therefore builds the usual CPU accelerator (gloo) and switches
Accelerate's shared state to FSDP with a plugin, so ``accelerator.prepare`` takes its real FSDP
path (``fully_shard`` for FSDP2, ``FullyShardedDataParallel`` for FSDP1) on a CPU device mesh.
Everything after that (sharding, gradient reduce-scatter, clipping, the full-state gathers and
broadcasts of :mod:`kronlm.distill.distributed`) is what runs on GPUs.

Runs, in one ``torchrun`` job (both ranks run them in the same order):

1. ``full``: FSDP2, tied GPT-2 student with dropout, ``ilkd-kngpt2`` from a teacher, 6 steps,
   checkpoints at 3 and 6.
2. ``resumed``: the same run killed during step 4, then resumed with a fresh student: the losses
   of steps 4-6 and the final weights must equal run 1's (same shards, same dropout masks).
3. ``fsdp1`` and ``ddp``: run 1's step-3 checkpoint resumed under FSDP1 (``use_orig_params``) and
   under DDP: a checkpoint does not depend on the layout that wrote it, and all three layouts
   compute the same steps.
4. ``kron``: a kronlm-compressed student (Kronecker factors sharded on their rank dimension, the
   embedding's unevenly: rank 1 holds none of it), exported as a kronlm folder.
5. ``launched``: run 1 again in the environment ``accelerate launch --use_fsdp`` sets up
   (CPU-RAM-efficient loading), with student and teacher on the meta device on rank 1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_models import BLOCK, VOCAB, compressed_gpt2, tiny_gpt2

STEPS = 6
HALF = 3


def run_config(out_dir: Path, **kw):
    from kronlm.distill.config import TrainingConfig

    values = dict(
        recipe="ilkd-kngpt2", block_size=BLOCK, micro_batch_size=2, grad_accum_steps=2, max_steps=STEPS, lr=1e-2,
        min_lr=1e-3, warmup_steps=1, eval_every=HALF, save_every=HALF, keep_checkpoints=5, mixed_precision="no",
        seed=7, log_dir=str(out_dir / "logs"),
        eval_batches=3,  # of 4: rank 1 scores one micro-batch, then joins rank 0's second forward pass
    )
    values.update(kw)
    return TrainingConfig(**values)


def tiny_blocks():
    from kronlm.data.blocks import TokenBlocks

    ids = (torch.arange(VOCAB * 20) * 5) % VOCAB
    return TokenBlocks.from_ids(ids, BLOCK, val_fraction=0.1)


def layout_accelerator(cfg, out_dir: Path, layout: str):
    """A CPU accelerator (gloo) whose shared state says ``layout``: "fsdp2", "fsdp1" or "ddp"."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from kronlm.distill.distributed import make_accelerator

    accelerator = make_accelerator(cfg, out_dir)
    if layout == "ddp":
        kind, plugin = DistributedType.MULTI_CPU, None
    else:
        version = int(layout[-1])
        # As `accelerate launch --use_fsdp --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP`: one FSDP
        # unit per GPT2Block (the model's _no_split_modules), plus the root.
        plugin = FullyShardedDataParallelPlugin(fsdp_version=version, auto_wrap_policy="transformer_based_wrap",
                                                **({"use_orig_params": True} if version == 1 else {}))
        kind = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    for shared in (AcceleratorState._shared_state, PartialState._shared_state):
        shared["distributed_type"] = kind
    # Accelerate names the CPU "cpu:0", which FSDP1 compares literally with its parameters' "cpu".
    PartialState._shared_state["device"] = torch.device("cpu")
    return accelerator


def full_gather(model) -> dict[str, torch.Tensor]:
    """The full weights of a sharded model on rank 0 (every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def rewind(src: Path, dst: Path, step: int) -> None:
    """Copy run ``src`` to ``dst`` as if it had been stopped right after the step-``step`` checkpoint."""
    from kronlm.distill.checkpoint import step_dirname

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("logs", "final", "best"))
    for folder in (dst / "checkpoints").iterdir():
        if folder.is_dir() and folder.name != step_dirname(step):
            shutil.rmtree(folder)
    (dst / "checkpoints" / "latest").write_text(step_dirname(step) + "\n")


def _worker(root: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from kronlm.distill.checkpoint import load_checkpoint
    from kronlm.distill.trainer import train

    rank = int(os.environ["RANK"])
    report: dict = {}

    def run(name, layout, student, *, teacher=None, resume=False, crash_at=None, **kw):
        cfg = run_config(root / name, **kw)
        accelerator = layout_accelerator(cfg, root / name, layout)
        if teacher is None and cfg.recipe != "ce":
            teacher = tiny_gpt2(2)
        if crash_at is not None:
            calls = {"n": 0}

            def crash(module, args):
                if module.training:
                    calls["n"] += 1
                    if calls["n"] == crash_at:
                        raise KeyboardInterrupt("simulated kill")

            student.register_forward_pre_hook(crash)
        return train(student, teacher, tiny_blocks(), cfg, root / name, resume=resume, accelerator=accelerator)

    # 1. uninterrupted FSDP2 run
    student = tiny_gpt2(1, dropout=0.1)
    full = run("full", "fsdp2", student)
    params = list(student.parameters())
    report["full"] = {
        "losses": full.losses,
        "val_ppl": [v["ppl"] for v in full.val_history],
        "tokens_seen": full.tokens_seen,
        "all_dtensor": all(isinstance(p, DTensor) for p in params),
        "sharded_blocks": [isinstance(block, FSDPModule) for block in student.transformer.h] + [isinstance(student, FSDPModule)],
        "local_numel": sum(p.to_local().numel() for p in params),
        "full_numel": sum(p.numel() for p in params),
    }
    gathered_full = full_gather(student)
    if dist.get_rank() == 0:
        rewind(root / "full", root / "fsdp1", HALF)
        rewind(root / "full", root / "ddp", HALF)
    dist.barrier()

    # 2. killed during step 4 (micro-batch 2 * 3 + 1 of this rank), resumed with a fresh student
    try:
        run("resumed", "fsdp2", tiny_gpt2(1, dropout=0.1), crash_at=HALF * 2 + 1)
        raise AssertionError("the simulated kill did not happen")
    except KeyboardInterrupt:
        pass
    torch.manual_seed(1234 + rank)
    fresh = tiny_gpt2(99, dropout=0.1)
    resumed = run("resumed", "fsdp2", fresh, resume=True)
    gathered_resumed = full_gather(fresh)
    report["resumed"] = {"start_step": resumed.start_step, "losses": resumed.losses, "tokens_seen": resumed.tokens_seen,
                         "val_ppl": [v["ppl"] for v in resumed.val_history]}

    # 3. run 1's step-3 checkpoint resumed under FSDP1 and under DDP
    for layout in ("fsdp1", "ddp"):
        other = run(layout, layout, tiny_gpt2(50, dropout=0.1), resume=True)
        report[layout] = {"start_step": other.start_step, "losses": other.losses}

    # 4. a compressed student under FSDP2
    kron_student = compressed_gpt2(3)
    kron = run("kron", "fsdp2", kron_student, recipe="ce", lr_kronecker=2e-2, max_steps=4, eval_every=2, save_every=4)
    a = kron_student.transformer.wte.A
    local_rows = [None, None]
    dist.all_gather_object(local_rows, a.to_local().shape[0])
    report["kron"] = {"losses": kron.losses, "wte_A_local_rows": local_rows, "wte_A_rows": a.shape[0]}
    gathered_kron = full_gather(kron_student)

    # 5. the environment `accelerate launch --use_fsdp` sets up, with CPU-RAM-efficient loading (its
    #    default): rank 1 holds student and teacher on the meta device, as from_pretrained may leave
    #    them; the student's weights come from rank 0 through accelerate, the teacher's through the
    #    trainer. Same run as 1.
    def rank0_only(seed, dropout=0.0):
        if rank == 0:
            return tiny_gpt2(seed, dropout=dropout)
        with torch.device("meta"):
            return tiny_gpt2(seed, dropout=dropout)

    launch_env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}
    os.environ.update(launch_env)
    launched_student, launched_teacher = rank0_only(1, dropout=0.1), rank0_only(2)
    on_meta = [None, None]
    dist.all_gather_object(on_meta, [any(p.is_meta for p in m.parameters()) for m in (launched_student, launched_teacher)])
    launched = run("launched", "fsdp2", launched_student, teacher=launched_teacher)
    for name in launch_env:
        del os.environ[name]
    report["launched"] = {"on_meta": on_meta, "losses": launched.losses}

    if rank == 0:
        saved_full = load_checkpoint(root / "full").model_state
        saved_resumed = load_checkpoint(root / "resumed").model_state
        saved_kron = load_checkpoint(root / "kron").model_state
        report["gather_equals_checkpoint"] = {
            "full": all(torch.equal(gathered_full[k], saved_full[k]) for k in saved_full) and set(gathered_full) == set(saved_full),
            "resumed": all(torch.equal(gathered_resumed[k], saved_resumed[k]) for k in saved_resumed),
            "kron": all(torch.equal(gathered_kron[k], saved_kron[k]) for k in saved_kron) and set(gathered_kron) == set(saved_kron),
        }
        report["max_full_vs_resumed"] = max((gathered_full[k] - gathered_resumed[k]).abs().max().item() for k in gathered_full)
        (root / "report.json").write_text(json.dumps(report))
    # A clean shutdown: a process group left to the interpreter's exit sometimes aborts the process.
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp_training_saves_resumes_and_gathers_like_an_unsharded_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    env.pop("ACCELERATE_USE_FSDP", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, str(tmp_path)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads((tmp_path / "report.json").read_text())

    # Really sharded: every parameter a DTensor, each rank holding about half of the elements.
    full = report["full"]
    assert full["all_dtensor"] and full["sharded_blocks"] == [True, True, True]  # each block, and the root
    assert full["local_numel"] < 0.6 * full["full_numel"]
    losses = full["losses"]
    assert len(losses) == STEPS and losses[-1] < 0.9 * losses[0]
    assert full["tokens_seen"] == STEPS * 8 * BLOCK  # 2 processes x 2 micro-batches x 2 blocks per step

    # Resume continues to the same losses and weights as the uninterrupted run.
    resumed = report["resumed"]
    assert resumed["start_step"] == HALF and resumed["tokens_seen"] == full["tokens_seen"]
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(losses[HALF:]), rtol=0, atol=1e-6)
    assert resumed["val_ppl"][-1] == pytest.approx(full["val_ppl"][-1], rel=1e-6)
    assert report["max_full_vs_resumed"] <= 1e-6

    # The full gather of the sharded student is exactly what the checkpoints hold.
    assert report["gather_equals_checkpoint"] == {"full": True, "resumed": True, "kron": True}

    # FSDP1 and DDP continue an FSDP2 checkpoint to the same losses (only the order of float
    # sums in the gradient norm differs between layouts).
    for layout in ("fsdp1", "ddp"):
        assert report[layout]["start_step"] == HALF
        torch.testing.assert_close(torch.tensor(report[layout]["losses"]), torch.tensor(losses[HALF:]), rtol=1e-5, atol=1e-6)

    # Launched like `accelerate launch --use_fsdp`: models on the meta device on rank 1, same run.
    assert report["launched"]["on_meta"] == [[False, False], [True, True]]
    torch.testing.assert_close(torch.tensor(report["launched"]["losses"]), torch.tensor(losses), rtol=0, atol=1e-6)

    # Checkpoint files: full (unsharded) tensors in safetensors + JSON, tied weights once.
    from safetensors import safe_open

    from kronlm.distill.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "full")
    assert ckpt.step == STEPS and ckpt.trainer_state["distributed_type"] == "FSDP"
    reference = tiny_gpt2(0)
    assert {k: tuple(v.shape) for k, v in ckpt.model_state.items()} == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ckpt.model_state["lm_head.weight"].data_ptr() == ckpt.model_state["transformer.wte.weight"].data_ptr()
    with safe_open(str(ckpt.path / "model.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" not in set(handle.keys())
    names = [n for n, _ in reference.named_parameters()]  # the optimizer's order: by group, then by name
    state = ckpt.optimizer_state["state"]
    assert sorted(state) == list(range(len(names)))
    shapes = sorted(tuple(v["exp_avg"].shape) for v in state.values())
    assert shapes == sorted(tuple(p.shape) for p in reference.parameters())
    assert all(v["exp_avg"].shape == v["exp_avg_sq"].shape for v in state.values())

    # The exported students hold the gathered weights.
    from transformers import AutoModelForCausalLM

    import kronlm

    final = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "final")
    for name, tensor in final.state_dict().items():
        assert torch.equal(tensor, ckpt.model_state[name]), name
    # The sharded validation (uneven split over the ranks) scores what one process scores.
    from kronlm.data.blocks import BlockDataset
    from kronlm.distill.distributed import make_accelerator
    from kronlm.distill.validators import evaluate_perplexity

    cfg = run_config(tmp_path / "check")
    single = evaluate_perplexity(final.double(), BlockDataset(tiny_blocks().val), make_accelerator(cfg, tmp_path / "check"),
                                 cfg.micro_batch_size, cfg.eval_batches)
    assert single["tokens"] == 3 * 2 * (BLOCK - 1)
    assert full["val_ppl"][-1] == pytest.approx(single["ppl"], rel=1e-5)
    kron = report["kron"]
    assert kron["wte_A_rows"] == 1 and kron["wte_A_local_rows"] == [1, 0]  # an uneven shard: rank 1 holds none
    assert kron["losses"][-1] < kron["losses"][0]
    kron_ckpt = load_checkpoint(tmp_path / "kron")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "kron" / "final")
    assert isinstance(loaded.transformer.h[0].mlp.c_fc, kronlm.KroneckerLinear)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, kron_ckpt.model_state[name]), name
    assert (tmp_path / "kron" / "best" / "model.safetensors").is_file()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
