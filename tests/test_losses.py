"""Loss terms of kronlm.distill.losses against values computed with explicit Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from kronlm.distill.losses import (
    attention_kl,
    attention_score_mse,
    causal_lm_ce,
    check_layer_map,
    embedding_mse,
    hidden_cosine,
    hidden_mse,
    logit_kd,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)  # (2, 4): right padding


def _loop_mse(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> float:
    s, t, m = s.tolist(), t.tolist(), mask.tolist()
    total, count = 0.0, 0
    for b in range(len(s)):
        for i in range(len(s[b])):
            if not m[b][i]:
                continue
            for d in range(len(s[b][i])):
                total += (s[b][i][d] - t[b][i][d]) ** 2
                count += 1
    return total / count


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    e = [math.exp(x - top) for x in row]
    z = sum(e)
    return [x / z for x in e]


# ---------------------------------------------------------------- embedding / hidden MSE


def test_embedding_mse_tiny_by_hand():
    s = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])
    t = torch.tensor([[[0.0, 0.0], [5.0, 5.0]]])
    mask = torch.tensor([[True, False]])
    # Only position 0 counts: ((1-0)^2 + (2-0)^2) / 2 = 2.5
    out = embedding_mse(s, t, mask)
    assert out.dim() == 0
    assert out.item() == pytest.approx(2.5)


def test_embedding_mse_matches_loops_and_ignores_padding():
    s = torch.randn(2, 4, 3, generator=_gen(1), dtype=torch.float64)
    t = torch.randn(2, 4, 3, generator=_gen(2), dtype=torch.float64)
    out = embedding_mse(s, t, MASK)
    assert out.item() == pytest.approx(_loop_mse(s, t, MASK), rel=1e-12)
    s2 = s.clone()
    s2[~MASK] = float("inf")
    t2 = t.clone()
    t2[~MASK] = float("nan")
    assert embedding_mse(s2, t2, MASK).item() == out.item()


def test_embedding_mse_accepts_integer_mask_and_upcasts_half():
    s = torch.randn(2, 4, 3, generator=_gen(3))
    t = torch.randn(2, 4, 3, generator=_gen(4))
    ref = embedding_mse(s, t, MASK)
    assert embedding_mse(s, t, MASK.long()).item() == ref.item()
    out16 = embedding_mse(s.bfloat16(), t.bfloat16(), MASK)
    assert out16.dtype == torch.float32
    assert out16.item() == pytest.approx(_loop_mse(s.bfloat16().float(), t.bfloat16().float(), MASK), rel=1e-6)


def test_hidden_mse_sums_mapped_layers():
    student = [torch.randn(2, 4, 3, generator=_gen(10 + i), dtype=torch.float64) for i in range(2)]
    teacher = [torch.randn(2, 4, 3, generator=_gen(20 + i), dtype=torch.float64) for i in range(4)]
    layer_map = [1, 3]
    expected = _loop_mse(student[0], teacher[1], MASK) + _loop_mse(student[1], teacher[3], MASK)
    assert hidden_mse(student, teacher, layer_map, MASK).item() == pytest.approx(expected, rel=1e-12)


def test_hidden_mse_errors_name_the_numbers():
    student = [torch.zeros(2, 4, 3)] * 2
    teacher = [torch.zeros(2, 4, 3)] * 4
    with pytest.raises(ValueError, match="layer map has 3 entries but the student has 2 layers"):
        hidden_mse(student, teacher, [0, 1, 2], MASK)
    with pytest.raises(ValueError, match="entry 1 is 4 but the teacher has 4 layers"):
        hidden_mse(student, teacher, [0, 4], MASK)
    with pytest.raises(ValueError, match="entry 0 is -1"):
        check_layer_map([-1, 0], 2, 4)
    with pytest.raises(ValueError, match=r"\(2, 4, 3\).*\(2, 4, 5\)"):
        hidden_mse(student, [torch.zeros(2, 4, 5)] * 4, [0, 1], MASK)


def test_shape_and_mask_errors():
    a = torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match=r"student shape \(2, 4, 3\) does not match teacher shape \(2, 5, 3\)"):
        embedding_mse(a, torch.zeros(2, 5, 3), MASK)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 3\) but the inputs need \(2, 4\)"):
        embedding_mse(a, a, MASK[:, :3])
    with pytest.raises(ValueError, match="selects no position"):
        embedding_mse(a, a, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="dtype"):
        embedding_mse(a, a, MASK.float())
    with pytest.raises(ValueError, match="3 dimensions"):
        embedding_mse(torch.zeros(2, 4), torch.zeros(2, 4), MASK)


# ---------------------------------------------------------------- attention


def _valid_pair(mask: list[list[bool]], b: int, q: int, k: int, causal: bool) -> bool:
    return mask[b][q] and mask[b][k] and (k <= q or not causal)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_score_mse_matches_loops(causal):
    s = torch.randn(2, 3, 4, 4, generator=_gen(5), dtype=torch.float64)
    t = torch.randn(2, 3, 4, 4, generator=_gen(6), dtype=torch.float64)
    m = MASK.tolist()
    total, count = 0.0, 0
    for b in range(2):
        for h in range(3):
            for q in range(4):
                for k in range(4):
                    if _valid_pair(m, b, q, k, causal):
                        total += (s[b, h, q, k].item() - t[b, h, q, k].item()) ** 2
                        count += 1
    out = attention_score_mse(s, t, MASK, causal=causal)
    assert out.dim() == 0
    assert out.item() == pytest.approx(total / count, rel=1e-12)


def test_attention_score_mse_tiny_by_hand():
    # One head, two tokens, causal: valid pairs (0,0), (1,0), (1,1); (0,1) is in the future.
    s = torch.tensor([[[[1.0, 100.0], [2.0, 3.0]]]])
    t = torch.tensor([[[[0.0, -100.0], [0.0, 1.0]]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert attention_score_mse(s, t, mask, causal=True).item() == pytest.approx((1 + 4 + 4) / 3)


def test_attention_score_mse_masked_infinities_give_finite_value_and_grad():
    s = torch.randn(2, 3, 4, 4, generator=_gen(7))
    t = torch.randn(2, 3, 4, 4, generator=_gen(8))
    ref = attention_score_mse(s, t, MASK, causal=True).item()
    future = torch.ones(4, 4, dtype=torch.bool).triu(1)
    padded = ~(MASK[:, :, None] & MASK[:, None, :])
    invalid = (future[None] | padded)[:, None].expand_as(s)
    s_inf = s.clone()
    s_inf[invalid] = float("-inf")
    t_inf = t.clone()
    t_inf[invalid] = torch.finfo(torch.float32).min
    s_inf.requires_grad_(True)
    out = attention_score_mse(s_inf, t_inf, MASK, causal=True)
    assert out.item() == pytest.approx(ref, rel=1e-6)
    out.backward()
    assert torch.isfinite(s_inf.grad).all()
    assert (s_inf.grad[invalid] == 0).all()
    assert (s_inf.grad[~invalid] != 0).any()


def _loop_attention_kl(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, causal: bool) -> float:
    m = mask.tolist()
    total, rows = 0.0, 0
    B, H, T, _ = s.shape
    for b in range(B):
        for h in range(H):
            for q in range(T):
                if not m[b][q]:
                    continue
                rows += 1
                for k in range(T):
                    pt, ps = t[b, h, q, k].item(), s[b, h, q, k].item()
                    if _valid_pair(m, b, q, k, causal) and pt > 0:
                        total += pt * (math.log(pt) - math.log(ps))
    return total / rows


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor, causal: bool) -> torch.Tensor:
    T = scores.shape[-1]
    allowed = mask[:, None, None, :].expand(-1, 1, T, T)
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool).tril()
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_kl_matches_loops(causal):
    s = _masked_softmax(torch.randn(2, 3, 4, 4, generator=_gen(9), dtype=torch.float64), MASK, causal)
    t = _masked_softmax(torch.randn(2, 3, 4, 4, generator=_gen(10), dtype=torch.float64), MASK, causal)
    out = attention_kl(s, t, MASK, causal=causal)
    assert out.dim() == 0
    assert out.item() == pytest.approx(_loop_attention_kl(s, t, MASK, causal), rel=1e-12)
    assert out.item() > 0


def test_attention_kl_tiny_by_hand():
    # One head, two tokens, causal. Row 0: both put all mass on key 0 -> 0.
    # Row 1: teacher (0.5, 0.5), student (0.25, 0.75) -> 0.5 ln 2 + 0.5 ln(2/3).
    t = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    s = torch.tensor([[[[1.0, 0.0], [0.25, 0.75]]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    expected = (0.0 + 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)) / 2
    assert attention_kl(s, t, mask, causal=True).item() == pytest.approx(expected, rel=1e-6)


def test_attention_kl_zero_probs_and_masked_entries_are_safe():
    s = _masked_softmax(torch.randn(2, 3, 4, 4, generator=_gen(11)), MASK, True)
    t = _masked_softmax(torch.randn(2, 3, 4, 4, generator=_gen(12)), MASK, True)
    ref = attention_kl(s, t, MASK, causal=True).item()
    # Garbage in invalid entries (future keys / padding) must not matter.
    future = torch.ones(4, 4, dtype=torch.bool).triu(1)
    invalid = (future[None] | ~(MASK[:, :, None] & MASK[:, None, :]))[:, None].expand_as(s)
    s2, t2 = s.clone(), t.clone()
    s2[invalid] = float("nan")
    t2[invalid] = 7.0
    s2.requires_grad_(True)
    out = attention_kl(s2, t2, MASK, causal=True)
    assert out.item() == pytest.approx(ref, rel=1e-6)
    out.backward()
    assert torch.isfinite(s2.grad).all()
    # Student probability exactly 0 where the teacher has mass: large but finite.
    s3 = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]], requires_grad=True)
    t3 = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    out3 = attention_kl(s3, t3, torch.ones(1, 2, dtype=torch.bool), causal=True)
    assert torch.isfinite(out3) and out3.item() > 10
    out3.backward()
    assert torch.isfinite(s3.grad).all()


def test_attention_identical_is_zero():
    p = _masked_softmax(torch.randn(2, 3, 4, 4, generator=_gen(13)), MASK, True)
    assert attention_kl(p, p, MASK, causal=True).item() == 0.0
    assert attention_score_mse(p, p, MASK, causal=True).item() == 0.0


# ---------------------------------------------------------------- logits


def _loop_logit_kd(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, T: float) -> float:
    m = mask.tolist()
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if not m[b][i]:
                continue
            ps = _softmax([x / T for x in s[b, i].tolist()])
            pt = _softmax([x / T for x in t[b, i].tolist()])
            total += sum(a * (math.log(a) - math.log(c)) for a, c in zip(pt, ps))
            count += 1
    return total / count * T * T


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_logit_kd_matches_loops(temperature):
    s = torch.randn(2, 4, 5, generator=_gen(14), dtype=torch.float64)
    t = torch.randn(2, 4, 5, generator=_gen(15), dtype=torch.float64)
    out = logit_kd(s, t, MASK, temperature)
    assert out.dim() == 0
    assert out.item() == pytest.approx(_loop_logit_kd(s, t, MASK, temperature), rel=1e-12)


def test_logit_kd_is_per_token_and_ignores_padding():
    s = torch.randn(2, 4, 5, generator=_gen(16))
    t = torch.randn(2, 4, 5, generator=_gen(17))
    ref = logit_kd(s, t, MASK, 2.0)
    s2, t2 = s.clone(), t.clone()
    s2[~MASK] = float("-inf")
    t2[~MASK] = float("nan")
    assert logit_kd(s2, t2, MASK, 2.0).item() == ref.item()
    # Per token: row 0 has 3 real tokens, row 1 has 2 -> weights 3/5 and 2/5, not 1/2 each.
    row0 = logit_kd(s[:1], t[:1], MASK[:1], 2.0)
    row1 = logit_kd(s[1:], t[1:], MASK[1:], 2.0)
    assert ref.item() == pytest.approx((3 * row0.item() + 2 * row1.item()) / 5, rel=1e-6)


def test_logit_kd_teacher_minus_inf_logit_is_safe():
    s = torch.randn(1, 2, 4, generator=_gen(18), requires_grad=True)
    t = torch.randn(1, 2, 4, generator=_gen(19))
    t[0, :, 3] = float("-inf")
    out = logit_kd(s, t, torch.ones(1, 2, dtype=torch.bool), 1.0)
    expected = _loop_logit_kd(s.detach()[..., :3], t[..., :3], torch.ones(1, 2, dtype=torch.bool), 1.0)
    # The student's mass on token 3 adds -log(1 - p_s3) per row relative to the 3-token version.
    ps3 = s.detach().softmax(-1)[0, :, 3]
    expected += (-torch.log1p(-ps3)).mean().item()
    assert out.item() == pytest.approx(expected, rel=1e-5)
    out.backward()
    assert torch.isfinite(s.grad).all()


def test_logit_kd_bad_temperature():
    a = torch.zeros(2, 4, 5)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        logit_kd(a, a, MASK, 0.0)


def test_causal_lm_ce_matches_loops_with_left_and_right_padding():
    logits = torch.randn(2, 4, 6, generator=_gen(20), dtype=torch.float64)
    ids = torch.tensor([[1, 2, 3, 0], [0, 0, 4, 5]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    # Scored targets: row 0 -> positions 1, 2 (predicted at 0, 1); row 1 -> position 3 (predicted at 2).
    total, count = 0.0, 0
    for b, i in [(0, 0), (0, 1), (1, 2)]:
        p = _softmax(logits[b, i].tolist())
        total += -math.log(p[ids[b, i + 1].item()])
        count += 1
    out = causal_lm_ce(logits, ids, mask)
    assert out.dim() == 0
    assert out.item() == pytest.approx(total / count, rel=1e-12)
    # Logits at and of padded positions do not matter.
    logits2 = logits.clone()
    logits2[0, 2:] = 1e6
    logits2[1, :2] = float("nan")
    logits2[1, 3] = float("nan")
    assert causal_lm_ce(logits2, ids, mask).item() == out.item()


def test_causal_lm_ce_errors():
    logits = torch.zeros(2, 4, 6)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 6\)"):
        causal_lm_ce(logits, torch.full((2, 4), 6), MASK)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        causal_lm_ce(torch.zeros(2, 1, 6), torch.zeros(2, 1, dtype=torch.long), MASK[:, :1])
    with pytest.raises(ValueError, match="no position has a real token followed"):
        causal_lm_ce(logits, torch.zeros(2, 4, dtype=torch.long), torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]]))
    with pytest.raises(ValueError, match=r"input_ids has shape \(2, 3\)"):
        causal_lm_ce(logits, torch.zeros(2, 3, dtype=torch.long), MASK)


def test_hidden_cosine_matches_loops():
    s = torch.randn(2, 4, 3, generator=_gen(21), dtype=torch.float64)
    t = torch.randn(2, 4, 3, generator=_gen(22), dtype=torch.float64)
    m = MASK.tolist()
    total, count = 0.0, 0
    for b in range(2):
        for i in range(4):
            if m[b][i]:
                a, c = s[b, i].tolist(), t[b, i].tolist()
                dot = sum(x * y for x, y in zip(a, c))
                na = math.sqrt(sum(x * x for x in a))
                nc = math.sqrt(sum(y * y for y in c))
                total += 1 - dot / (na * nc)
                count += 1
    out = hidden_cosine(s, t, MASK)
    assert out.dim() == 0
    assert out.item() == pytest.approx(total / count, rel=1e-12)
    s2 = s.clone()
    s2[~MASK] = float("nan")
    assert hidden_cosine(s2, t, MASK).item() == out.item()
    # Scale-invariant, and opposite vectors give 2.
    assert hidden_cosine(3 * s, t, MASK).item() == pytest.approx(out.item(), rel=1e-12)
    assert hidden_cosine(-t, t, MASK).item() == pytest.approx(2.0, rel=1e-12)


def test_relative_hidden_mse_divides_each_layer_by_teacher_mean_square():
    from kronlm.distill.losses import hidden_mse

    g = torch.Generator().manual_seed(7)
    teacher = [torch.randn(2, 3, 4, generator=g, dtype=torch.float64) * scale for scale in (1.0, 300.0)]
    student = [t + torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for t in teacher]
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    expected = 0.0
    for s, t in zip(student, teacher):
        diffs, squares = [], []
        for b in range(2):
            for i in range(3):
                if mask[b, i]:
                    diffs += [(s[b, i, k] - t[b, i, k]).item() ** 2 for k in range(4)]
                    squares += [t[b, i, k].item() ** 2 for k in range(4)]
        expected += (sum(diffs) / len(diffs)) / (sum(squares) / len(squares))
    got = hidden_mse(student, teacher, [0, 1], mask, normalize=True)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # Scale-free: multiplying both models' states by 10 leaves it unchanged.
    scaled = hidden_mse([10 * s for s in student], [10 * t for t in teacher], [0, 1], mask, normalize=True)
    assert scaled.item() == pytest.approx(expected, rel=1e-12)


def _autograd_logit_kd(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, T: float) -> torch.Tensor:
    # The textbook formula through autograd: the reference the chunked closed form must equal.
    log_s = torch.log_softmax(s[mask].double() / T, dim=-1)
    log_t = torch.log_softmax(t[mask].double() / T, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean() * T * T


@pytest.mark.parametrize("chunk", [1, 3, 256])
def test_logit_kd_chunked_gradient_equals_autograd(monkeypatch, chunk):
    from kronlm.distill import losses

    monkeypatch.setattr(losses, "KD_CHUNK_ROWS", chunk)
    s = torch.randn(2, 4, 7, generator=_gen(30), dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 7, generator=_gen(31), dtype=torch.float64)
    for mask in (MASK, torch.ones(2, 4, dtype=torch.bool)):
        s.grad = None
        (3.0 * logit_kd(s, t, mask, 2.0)).backward()
        got = s.grad.clone()
        s.grad = None
        ref = _autograd_logit_kd(s, t, mask, 2.0)
        (3.0 * ref).backward()
        assert torch.allclose(got, s.grad, rtol=1e-10, atol=1e-14)
        assert logit_kd(s, t, mask, 2.0).item() == pytest.approx(ref.item(), rel=1e-12)
        assert (got[~mask] == 0).all()  # padding gets no gradient
    assert torch.autograd.gradcheck(lambda x: logit_kd(x, t, MASK, 1.5), (s,))


def test_logit_kd_half_precision_logits_get_a_gradient_of_their_dtype():
    s = torch.randn(2, 4, 7, generator=_gen(32)).bfloat16().requires_grad_()
    t = torch.randn(2, 4, 7, generator=_gen(33)).bfloat16()
    out = logit_kd(s, t, MASK, 2.0)
    assert out.dtype == torch.float32
    out.backward()
    assert s.grad.dtype == torch.bfloat16
    sf = s.detach().float().requires_grad_()
    _autograd_logit_kd(sf, t.float(), MASK, 2.0).backward()
    assert torch.allclose(s.grad.float(), sf.grad, atol=1e-3)
