"""The Kronecker student of a fine-tuned task teacher, and KroneckerBERT's stage 1 (docs/tasks.md).

- :func:`make_student`: a copy of the fine-tuned teacher compressed with a compression config
  (a KroneckerBERT preset or any config); the task head (and BERT's pooler, unless the config
  names it) is copied, not compressed.
- :func:`general_distill` (stage 1, optional): intermediate-layer KD of a compressed *encoder*
  from the pretrained encoder on plain text, with :func:`kronlm.distill.train` (recipe
  ``ilkd-kroneckerbert``; an encoder has no logits, so only the embedding, attention-score and
  hidden-state terms are computed). :func:`load_general_distilled` puts its weights into a task
  student.
- :func:`count_embedding_linear_parameters`: the parameter count the compression targets are
  stated on.
- :func:`copy_head`: a student that was not made from the fine-tuned teacher (a compressed or
  truncated *pretrained* model, KnGPT2 / DistilGPT2 style) starts from the teacher's task head.
- :func:`resolve_compression`: a compression config from a config object, file or preset name.

Stage 2 (task distillation against the fine-tuned teacher) is the training loop with the
:class:`~kronlm.distill.objective.DistillationObjective` of the run's recipe; see
:mod:`kronlm.tasks.pipeline`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from kronlm.compression.config import CompressionConfig
from kronlm.compression.presets import get_preset
from kronlm.compression.surgery import plan_compression
from kronlm.distill.trainer import train
from kronlm.layers import KroneckerEmbedding, KroneckerLinear
from kronlm.modeling import compress, compression_report, load

__all__ = [
    "copy_head",
    "count_embedding_linear_parameters",
    "general_distill",
    "load_general_distilled",
    "make_student",
    "resolve_compression",
]


def resolve_compression(spec: CompressionConfig | str) -> tuple[CompressionConfig, str]:
    """(config, name) from a :class:`CompressionConfig`, a config file (.yaml / .yml / .json) or a preset name.

    Raises:
        FileNotFoundError: a config file that does not exist.
        ValueError: an unknown preset or a bad config file.
    """
    if isinstance(spec, CompressionConfig):
        return spec, spec.name or "compressed"
    if Path(spec).suffix in (".yaml", ".yml", ".json"):
        config = CompressionConfig.from_file(spec)
    else:
        config = get_preset(spec)
    return config, config.name or str(spec)


def copy_head(teacher: nn.Module, student: nn.Module, head_name: str) -> None:
    """Overwrite the student's task head (``head_name``: ``classifier``, ``score``, ``qa_outputs``)
    with the teacher's weights, in place.

    For a student built from a pretrained model rather than from the fine-tuned teacher (a
    truncated or compressed pretrained decoder): its head is new, and the teacher's was trained on
    the task over hidden states of the same width, so it is the better start. A head with
    compressed (Kronecker) layers is refused: heads are never compressed.

    Raises:
        ValueError: either model lacks the head, or the heads' tensors differ in names or shapes
            (names the first one).
    """
    heads = []
    for who, model in (("teacher", teacher), ("student", student)):
        head = getattr(getattr(model, "module", model), head_name, None)
        if not isinstance(head, nn.Module):
            raise ValueError(f"the {who} ({type(model).__name__}) has no task head {head_name!r}")
        heads.append(head.state_dict())
    source, target = heads
    if source.keys() != target.keys():
        raise ValueError(f"task head {head_name!r}: the teacher has tensors {sorted(source)}, the student {sorted(target)}")
    for key in source:
        if source[key].shape != target[key].shape:
            raise ValueError(f"task head {head_name}.{key}: teacher shape {tuple(source[key].shape)}, "
                             f"student shape {tuple(target[key].shape)}")
    with torch.no_grad():
        for key in source:
            target[key].copy_(source[key])


def count_embedding_linear_parameters(model: nn.Module, *, head_name: str | None = None) -> int:
    """Parameters held by embedding and linear layers (dense or Kronecker), each tensor once.

    Counts the weights and biases of ``nn.Embedding``, ``nn.Linear``, GPT-2's ``Conv1D``,
    ``KroneckerEmbedding`` and ``KroneckerLinear`` modules (factors A, B, scalars and bias); norms
    are left out, and so is the task head ``head_name`` (``classifier`` / ``score``, copied from
    the teacher and never compressed) when given. This is the quantity the ">= 5x fewer
    parameters" target of the GLUE benchmark is stated on.
    """
    kinds = (nn.Embedding, nn.Linear, Conv1D, KroneckerEmbedding, KroneckerLinear)
    head_prefix = None if head_name is None else head_name + "."
    seen: dict[int, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        if head_prefix is not None and (name + ".").startswith(head_prefix):
            continue
        for p in module.parameters(recurse=False):
            seen[id(p)] = p.numel()
        if isinstance(module, (KroneckerEmbedding, KroneckerLinear)):
            for p in module.parameters():
                seen[id(p)] = p.numel()
    return sum(seen.values())


def make_student(teacher: PreTrainedModel, config: CompressionConfig, head_name: str, *, progress: bool = False):
    """Compress a copy of the fine-tuned ``teacher``; the teacher is left untouched.

    Args:
        teacher: a fine-tuned task model (``*ForSequenceClassification``, ...).
        config: the compression config (e.g. ``get_preset("kroneckerbert8")`` for BERT-base
            shapes, or ``configs/glue-minilm-kb8.yaml`` for MiniLM's 384-wide layers).
        head_name: the task head module (``classifier``), which must not be compressed.

    Returns:
        (student, :class:`kronlm.compression.report.CompressionReport`). The student's head holds
        exactly the teacher's head weights; all its parameters are trainable, whatever the
        teacher's ``requires_grad`` flags.

    Raises:
        ValueError: the config selects the head, or the config's factor shapes do not divide a
            selected matrix (from ``compress``).
    """
    student = copy.deepcopy(teacher)
    # A teacher that already served in a run is frozen (requires_grad False); the student is not.
    student.requires_grad_(True)
    hit = [c.name for c in plan_compression(student, config) if c.name == head_name or c.name.startswith(head_name + ".")]
    if hit:
        raise ValueError(f"the compression config selects the task head ({', '.join(hit)}); the head is copied "
                         "from the teacher, not compressed")
    compress(student, config, progress=progress)
    return student, compression_report(student)


def general_distill(
    teacher_encoder: PreTrainedModel,
    config: CompressionConfig,
    blocks: Any,
    training_config,
    out_dir: str | Path,
    *,
    tokenizer=None,
) -> Path:
    """Stage 1: compress a copy of a pretrained encoder and distil it on plain text.

    The Python form of ``kronlm compress ENCODER --config C --out DIR`` followed by
    ``kronlm distill --student DIR --teacher ENCODER --recipe ilkd-kroneckerbert ...``
    (KroneckerBERT; docs/method.md, "The papers"). With validation blocks, ``out_dir/best`` is chosen by the held-out
    distillation loss (an encoder has no LM head for perplexity).

    Args:
        teacher_encoder: the pretrained encoder (e.g. ``AutoModel`` MiniLM), not fine-tuned.
        config: the same compression config the task student will use.
        blocks: token blocks of plain text (a :class:`kronlm.data.blocks.TokenBlocks` or
            ``{"train": (N, block) int64 tensor, "val": None}``).
        training_config: a :class:`kronlm.distill.TrainingConfig`, recipe ``ilkd-kroneckerbert``
            (KD and CE find no logits on an encoder and are skipped).
        out_dir: run folder of :func:`kronlm.distill.train`; the student lands in ``out_dir/final``.

    Returns:
        ``out_dir/final``, the folder to pass to :func:`load_general_distilled` / ``--general-distill``.

    Raises:
        ValueError: see :func:`kronlm.compress` and :func:`kronlm.distill.train`.
    """
    student = copy.deepcopy(teacher_encoder)
    compress(student, config, progress=False)
    result = train(student, teacher_encoder, blocks, training_config, out_dir, tokenizer=tokenizer)
    return Path(result.final_dir)


def load_general_distilled(student: PreTrainedModel, folder: str | Path, *, keep_pooler: bool = True) -> None:
    """Replace the task student's encoder weights by those of a stage-1 student, in place.

    The stage-1 folder holds a compressed encoder (``kronlm distill`` / :func:`general_distill`
    output, loaded with ``AutoModel``). Its embedding and layer weights (Kronecker factors
    included) overwrite the task student's; the task head, and by default BERT's pooler, stay
    the fine-tuned teacher's (stage 1 never trains the pooler).

    Raises:
        FileNotFoundError: no such folder.
        ValueError: the stage-1 encoder's tensors do not match the student's encoder (another
            compression config or model): names the first differing tensors.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: stage-1 (general distillation) student folder not found")
    encoder = load(folder, auto_class=AutoModel)
    source = encoder.state_dict()
    target = student.base_model.state_dict()
    skip = ("pooler.",) if keep_pooler else ()
    wanted = {k for k in target if not k.startswith(skip)}
    missing = sorted(wanted - set(source))
    shapes = sorted(k for k in wanted & set(source) if source[k].shape != target[k].shape)
    if missing or shapes:
        detail = (f"missing {missing[:3]}" if missing else "") + (
            f" shape mismatch {[(k, tuple(source[k].shape), tuple(target[k].shape)) for k in shapes[:3]]}" if shapes else "")
        raise ValueError(f"{folder}: the stage-1 encoder does not match the student's encoder ({detail.strip()}); "
                         "compress both with the same config")
    with torch.no_grad():
        for k in wanted:
            target[k].copy_(source[k])
