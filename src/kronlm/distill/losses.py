"""Distillation loss terms on plain tensors (docs/method.md, "Recovery objectives").

Every function takes the student's and the teacher's tensors for the same batch plus a padding
mask ``mask`` of shape (batch, seq) (True / 1 = real token, False / 0 = padding) and returns a
0-dim tensor. Padded positions are removed by boolean indexing *before* any arithmetic, so
whatever they hold (-inf, nan, huge values) never reaches the result or its gradient.

Tensors in float16 / bfloat16 are upcast to float32 for the arithmetic; float32 and float64 are
kept as they are.

Conventions:

- Means are over *tokens* (valid positions pooled across the whole batch), not per sequence then
  per batch: a sequence with 10 real tokens weighs twice one with 5.
- Attention tensors are (batch, heads, query, key). A (query, key) pair is valid when both
  positions are real tokens and, for causal models, key <= query.

Sources: TinyBERT (Jiao et al., 2020) and KroneckerBERT (Tahaei et al., NAACL 2022) for the
embedding / hidden / attention-score MSE terms; KnGPT2 (Edalati et al., ACL 2022) for the
attention KL; Hinton et al. (2015) and DistilBERT / DistilGPT2 (Sanh et al., 2019) for the
temperature-scaled logit KD, the cross-entropy and the cosine loss on the last hidden state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "attention_kl",
    "attention_score_mse",
    "causal_lm_ce",
    "check_layer_map",
    "embedding_mse",
    "hidden_cosine",
    "hidden_mse",
    "logit_kd",
    "sequence_classification_loss",
]


def _as_float(x: torch.Tensor) -> torch.Tensor:
    # Half-precision squares and exp/log lose too much; compute in at least float32.
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def _check_same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: student shape {tuple(student.shape)} does not match teacher shape {tuple(teacher.shape)}"
        )


def _check_mask(mask: torch.Tensor, batch: int, seq: int, what: str) -> torch.Tensor:
    """Return ``mask`` as a (batch, seq) bool tensor, or raise ValueError."""
    if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] != seq:
        raise ValueError(f"{what}: mask has shape {tuple(mask.shape)} but the inputs need ({batch}, {seq})")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise ValueError(f"{what}: mask must be bool or integer 0/1, got dtype {mask.dtype}")
    mask = mask.bool()
    if not bool(mask.any()):
        raise ValueError(f"{what}: mask selects no position (all {batch * seq} positions are padding)")
    return mask


def _check_dims(x: torch.Tensor, dims: int, what: str, name: str) -> None:
    if x.dim() != dims:
        raise ValueError(f"{what}: {name} must have {dims} dimensions, got shape {tuple(x.shape)}")


def _pair_mask(mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """(batch, seq) bool -> (batch, query, key) bool of valid attention pairs."""
    pairs = mask[:, :, None] & mask[:, None, :]
    if causal:
        seq = mask.shape[1]
        pairs = pairs & torch.ones(seq, seq, dtype=torch.bool, device=mask.device).tril()
    return pairs


def embedding_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error between embedding-layer outputs over real tokens.

    Args:
        student: (batch, seq, hidden) student embedding output (what block 0 receives).
        teacher: (batch, seq, hidden) teacher embedding output.
        mask: (batch, seq) bool or 0/1 integer; True = real token.

    Returns:
        0-dim tensor: Σ over real positions and features of (S - T)² divided by
        (number of real positions · hidden), i.e. the mean over unmasked positions and features.

    Raises:
        ValueError: shapes differ, inputs are not 3-D, the mask has the wrong shape or dtype, or the
            mask selects no position.

    Source: TinyBERT / KroneckerBERT embedding-layer distillation (docs/method.md, "Recovery objectives", the α_emb term).
    """
    what = "embedding_mse"
    _check_dims(student, 3, what, "student")
    _check_same_shape(student, teacher, what)
    mask = _check_mask(mask, student.shape[0], student.shape[1], what)
    diff = _as_float(student[mask]) - _as_float(teacher[mask])
    return diff.pow(2).mean()


def check_layer_map(layer_map: list[int], n_student: int, n_teacher: int) -> None:
    """Validate a student -> teacher layer map.

    Args:
        layer_map: ``layer_map[l]`` is the 0-based teacher layer that student layer ``l`` learns from.
        n_student: number of student layers.
        n_teacher: number of teacher layers.

    Raises:
        ValueError: the map has a length other than ``n_student``, or an entry outside
            ``[0, n_teacher)`` (the message names the entry and both numbers).
    """
    if len(layer_map) != n_student:
        raise ValueError(f"layer map has {len(layer_map)} entries but the student has {n_student} layers")
    for l, t in enumerate(layer_map):
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < n_teacher:
            raise ValueError(
                f"layer map entry {l} is {t!r} but the teacher has {n_teacher} layers (valid: 0..{n_teacher - 1})"
            )


def hidden_mse(
    student_states: list[torch.Tensor],
    teacher_states: list[torch.Tensor],
    layer_map: list[int],
    mask: torch.Tensor,
    *,
    normalize: bool = False,
) -> torch.Tensor:
    """Sum over student layers of the MSE between mapped hidden states.

    Args:
        student_states: list of n_student tensors (batch, seq, hidden), the output of each student block.
        teacher_states: list of n_teacher tensors (batch, seq, hidden), the output of each teacher block.
        layer_map: n_student ints; student layer ``l`` is compared with teacher layer ``layer_map[l]``.
        mask: (batch, seq) bool or 0/1 integer; True = real token.
        normalize: divide each layer's MSE by the teacher layer's mean square over the same
            entries (detached), making every layer's term scale-free. Llama-family models carry
            hidden states with entries in the hundreds (massive activations), whose plain MSE is
            ~10⁵ and drowns every other term; the papers' recipes (GPT-2, BERT) use plain MSE.

    Returns:
        0-dim tensor: Σ_l embedding_mse(H_S,l, H_T,layer_map[l], mask) (divided by mean(H_T,l²) when
        ``normalize``), each term the mean over real positions and features. The papers' objective (docs/method.md, "Recovery objectives") *sums* over
        layers, so the term grows with depth.

    Raises:
        ValueError: empty student list, layer map of the wrong length or with an index out of range,
            any shape mismatch or bad mask (see :func:`embedding_mse`).

    Source: TinyBERT / KroneckerBERT hidden-state distillation (docs/method.md, "Recovery objectives", the α_hid term).
    """
    if len(student_states) == 0:
        raise ValueError("hidden_mse: the student has 0 hidden states")
    check_layer_map(layer_map, len(student_states), len(teacher_states))
    total = None
    for l, t in enumerate(layer_map):
        term = embedding_mse(student_states[l], teacher_states[t], mask)
        if normalize:
            scale = _as_float(teacher_states[t][mask.bool()]).detach().pow(2).mean()
            term = term / scale.clamp_min(torch.finfo(term.dtype).tiny)
        total = term if total is None else total + term
    return total


def attention_score_mse(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, *, causal: bool
) -> torch.Tensor:
    """MSE between pre-softmax attention scores QKᵀ/√d_k over valid (query, key) pairs.

    Args:
        student: (batch, heads, seq, seq) student scores, query along dim 2, key along dim 3.
        teacher: (batch, heads, seq, seq) teacher scores.
        mask: (batch, seq) bool or 0/1 integer; True = real token.
        causal: True for decoder models: pairs with key > query are excluded as well.

    Returns:
        0-dim tensor: mean of (S - T)² over heads and valid pairs (a pair is valid when query and
        key are real tokens and, if ``causal``, key <= query). Invalid entries may hold -inf or
        large negatives: they are dropped before subtracting, so they give neither nan nor inf,
        in the value or in the gradient.

    Raises:
        ValueError: shapes differ, inputs are not (batch, heads, seq, seq), bad mask.

    Source: KroneckerBERT / TinyBERT attention distillation, D = MSE on scores (docs/method.md, "Recovery objectives").
    """
    what = "attention_score_mse"
    _check_dims(student, 4, what, "student")
    _check_same_shape(student, teacher, what)
    b, h, q, k = student.shape
    if q != k:
        raise ValueError(f"{what}: scores must be square (self-attention), got {q} queries and {k} keys")
    mask = _check_mask(mask, b, q, what)
    pairs = _pair_mask(mask, causal)[:, None].expand(b, h, q, k)
    diff = _as_float(student[pairs]) - _as_float(teacher[pairs])
    return diff.pow(2).mean()


def attention_kl(
    student_probs: torch.Tensor, teacher_probs: torch.Tensor, mask: torch.Tensor, *, causal: bool
) -> torch.Tensor:
    """KL(teacher ‖ student) between attention distributions, per query row.

    Args:
        student_probs: (batch, heads, seq, seq) post-softmax attention of the student.
        teacher_probs: (batch, heads, seq, seq) post-softmax attention of the teacher.
        mask: (batch, seq) bool or 0/1 integer; True = real token.
        causal: True for decoder models: keys after the query are excluded as well.

    Returns:
        0-dim tensor: for each head and each real query row, Σ over valid keys of
        p_T · (log p_T - log p_S), then the mean over (heads × real query rows) of the batch.
        Invalid keys are left out (no renormalisation: the model already gives them ~0 mass).
        Terms with p_T = 0 count 0; p_S is clamped below at the smallest normal float of its
        dtype, so p_S = 0 where p_T > 0 gives a large finite value instead of inf. Value and
        gradient are nan-free whatever the invalid entries hold.

    Raises:
        ValueError: shapes differ, inputs are not (batch, heads, seq, seq), bad mask.

    Source: KnGPT2 attention distillation, D = KL between attention distributions (docs/method.md, "Recovery objectives").
    """
    what = "attention_kl"
    _check_dims(student_probs, 4, what, "student_probs")
    _check_same_shape(student_probs, teacher_probs, what)
    b, h, q, k = student_probs.shape
    if q != k:
        raise ValueError(f"{what}: attention must be square (self-attention), got {q} queries and {k} keys")
    mask = _check_mask(mask, b, q, what)
    s = _as_float(student_probs)
    t = _as_float(teacher_probs)
    pairs = _pair_mask(mask, causal)[:, None].expand(b, h, q, k)
    # Replace every unused entry by 1 before the logs so neither branch of the where can make nan.
    used = pairs & (t > 0)
    t_safe = torch.where(used, t, torch.ones_like(t))
    s_safe = torch.where(used, s, torch.ones_like(s)).clamp_min(torch.finfo(s.dtype).tiny)
    elem = torch.where(used, t_safe * (t_safe.log() - s_safe.log()), torch.zeros_like(t))
    row_kl = elem.sum(dim=-1)  # (batch, heads, query)
    rows = mask[:, None, :].expand(b, h, q)
    return row_kl[rows].mean()


# Rows of logits per chunk in logit_kd: each chunk's float32 temporaries are chunk x vocab (about
# 50 MB at a 49,152-token vocabulary), instead of a dozen (tokens x vocab) tensors at once.
KD_CHUNK_ROWS = 256


class _LogitKD(torch.autograd.Function):
    """Σ_rows w_row · KL(softmax(t/T) ‖ softmax(s/T)) · T², computed chunk by chunk.

    Forward saves only the inputs; backward recomputes both softmaxes per chunk and writes the
    closed-form gradient T · w_row · (softmax(s/T) − softmax(t/T)) (Hinton et al., 2015, eq. 2)
    into one tensor of the student logits' shape and dtype. The teacher gets no gradient.
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, temperature: float) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64, device=student.device)
        for start in range(0, student.shape[0], KD_CHUNK_ROWS):
            rows = slice(start, start + KD_CHUNK_ROWS)
            log_q = F.log_softmax(_as_float(student[rows]) / temperature, dim=-1)
            log_p = F.log_softmax(_as_float(teacher[rows]) / temperature, dim=-1)
            p = log_p.exp()
            # Where p == 0 (a teacher logit of -inf) log_p - log_q may be nan: such entries add 0.
            kl = (p * torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))).sum(dim=-1)
            total += (kl * weights[rows]).sum().double()
        ctx.save_for_backward(student, teacher, weights)
        ctx.temperature = temperature
        return (total * temperature**2).to(_as_float(student[:1]).dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        student, teacher, weights = ctx.saved_tensors
        temperature = ctx.temperature
        grad = torch.empty_like(student)
        for start in range(0, student.shape[0], KD_CHUNK_ROWS):
            rows = slice(start, start + KD_CHUNK_ROWS)
            q = F.softmax(_as_float(student[rows]) / temperature, dim=-1)
            p = F.softmax(_as_float(teacher[rows]) / temperature, dim=-1)
            scale = (weights[rows] * temperature).unsqueeze(-1) * grad_out
            grad[rows] = ((q - p) * scale).to(grad.dtype)
        return grad, None, None, None


def logit_kd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Temperature-scaled knowledge distillation on output logits.

    Args:
        student_logits: (batch, seq, vocab) student logits.
        teacher_logits: (batch, seq, vocab) teacher logits (no gradient flows into them).
        mask: (batch, seq) bool or 0/1 integer; True = real token.
        temperature: T > 0 (dimensionless).

    Returns:
        0-dim tensor: KL(softmax(t/T) ‖ softmax(s/T)) · T², averaged per *token*: the sum over
        real positions divided by the number of real positions of the whole batch (not per
        sequence first). The T² factor keeps gradient magnitudes comparable across temperatures
        (Hinton et al., 2015). Entries of the teacher distribution that are exactly 0 contribute 0.

    Memory: the loss and its gradient are computed :data:`KD_CHUNK_ROWS` positions at a time with
    the gradient in closed form, so beyond the two logit tensors only the gradient (student shape)
    and one chunk's temporaries are held: at 4 x 512 positions and a 49,152-token vocabulary about
    1.2 GB instead of several GB for the autograd graph of the same arithmetic.

    Raises:
        ValueError: shapes differ, inputs are not 3-D, temperature <= 0, bad mask.

    Source: Hinton et al. (2015); DistilGPT2 recipe 5·KD at T = 2 (docs/method.md, "Recovery objectives").
    """
    what = "logit_kd"
    _check_dims(student_logits, 3, what, "student_logits")
    _check_same_shape(student_logits, teacher_logits, what)
    if not temperature > 0:
        raise ValueError(f"{what}: temperature must be > 0, got {temperature}")
    mask = _check_mask(mask, student_logits.shape[0], student_logits.shape[1], what)
    vocab = student_logits.shape[-1]
    if bool(mask.all()):  # the common case (full training blocks): views, no copies
        student, teacher = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    else:
        student, teacher = student_logits[mask], teacher_logits[mask]
    weights = torch.full((student.shape[0],), 1.0 / student.shape[0], dtype=_as_float(student[:1]).dtype, device=student.device)
    return _LogitKD.apply(student, teacher.detach(), weights, float(temperature))


def causal_lm_ce(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM (labels are the inputs shifted by one).

    Args:
        logits: (batch, seq, vocab); ``logits[:, i]`` predicts token ``input_ids[:, i + 1]``.
        input_ids: (batch, seq) int token ids.
        mask: (batch, seq) bool or 0/1 integer; True = real token.

    Returns:
        0-dim tensor: mean negative log-likelihood in nats per scored token. Target ``i + 1`` is
        scored when positions ``i`` and ``i + 1`` are both real tokens, so padded targets are
        ignored (right padding) and the first real token of a left-padded row, which would be
        predicted from padding, is not scored either.

    Raises:
        ValueError: wrong dimensions, shapes that disagree, seq < 2, a token id outside
            [0, vocab), a bad mask, or no scored token.

    Source: standard causal-LM loss (Krony-PT trains with this alone; docs/method.md, "Recovery objectives").
    """
    what = "causal_lm_ce"
    _check_dims(logits, 3, what, "logits")
    _check_dims(input_ids, 2, what, "input_ids")
    b, t, v = logits.shape
    if tuple(input_ids.shape) != (b, t):
        raise ValueError(f"{what}: input_ids has shape {tuple(input_ids.shape)} but logits need ({b}, {t})")
    if t < 2:
        raise ValueError(f"{what}: need at least 2 tokens per row to score a next token, got {t}")
    mask = _check_mask(mask, b, t, what)
    scored = mask[:, :-1] & mask[:, 1:]
    if not bool(scored.any()):
        raise ValueError(f"{what}: no position has a real token followed by a real token")
    targets = input_ids[:, 1:][scored]
    if targets.min() < 0 or targets.max() >= v:
        raise ValueError(
            f"{what}: token ids must lie in [0, {v}), got min {int(targets.min())} and max {int(targets.max())}"
        )
    return F.cross_entropy(_as_float(logits[:, :-1][scored]), targets)


def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cosine embedding loss between last hidden states, DistilGPT2 style.

    Args:
        student: (batch, seq, hidden) student last hidden state.
        teacher: (batch, seq, hidden) teacher last hidden state.
        mask: (batch, seq) bool or 0/1 integer; True = real token.

    Returns:
        0-dim tensor: mean over real positions of 1 - cos(S_i, T_i) (cosine along the hidden
        dimension, norms clamped at 1e-8), i.e. ``nn.CosineEmbeddingLoss`` with target +1 on
        the real positions, as in the DistilBERT / DistilGPT2 training script.

    Raises:
        ValueError: shapes differ, inputs are not 3-D, bad mask.

    Source: Sanh et al. (2019), DistilGPT2 recipe 1·cosine (docs/method.md, "Recovery objectives").
    """
    what = "hidden_cosine"
    _check_dims(student, 3, what, "student")
    _check_same_shape(student, teacher, what)
    mask = _check_mask(mask, student.shape[0], student.shape[1], what)
    cos = F.cosine_similarity(_as_float(student[mask]), _as_float(teacher[mask]), dim=-1, eps=1e-8)
    return (1.0 - cos).mean()


def sequence_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Supervised loss of a sequence classifier or regressor on its gold labels.

    Args:
        logits: (batch, num_labels) classifier outputs; num_labels = 1 means regression (STS-B).
        labels: (batch,) int64 class ids in [0, num_labels) for classification, float targets
            for regression.

    Returns:
        0-dim tensor: mean cross-entropy in nats per example (num_labels > 1), or mean squared
        error (num_labels = 1), as ``BertForSequenceClassification`` computes its loss.

    Raises:
        ValueError: logits not 2-D, a batch size that differs from the labels', or a class id
            outside [0, num_labels).

    Source: the α_ce term of task ILKD (KroneckerBERT; docs/method.md, "Recovery objectives"); Devlin et al. (2019) fine-tuning.
    """
    what = "sequence_classification_loss"
    _check_dims(logits, 2, what, "logits")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{what}: labels have shape {tuple(labels.shape)} but the logits need ({logits.shape[0]},)")
    if logits.shape[1] == 1:
        return F.mse_loss(_as_float(logits[:, 0]), labels.to(_as_float(logits).dtype))
    labels = labels.long()
    bad = (labels < 0) | (labels >= logits.shape[1])
    if bool(bad.any()):
        first = int(labels[bad][0])
        raise ValueError(f"{what}: label {first} is outside [0, {logits.shape[1]}) for a {logits.shape[1]}-label classifier")
    return F.cross_entropy(_as_float(logits), labels)
