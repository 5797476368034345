"""Recipes, layer maps and DistillationObjective on tiny GPT-2 / BERT / Llama students and teachers."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from kronlm.distill.objective import (
    DistillationObjective,
    LossOutput,
    uniform_layer_map,
)
from kronlm.distill.recipes import RECIPES, LossWeights, get_recipe

VOCAB = 97


TERMS = ("embedding", "attention", "hidden", "kd", "ce", "cosine")


def gpt2(seed: int = 0, n_layer: int = 2, n_embd: int = 32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=VOCAB, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def llama(seed: int = 0, n_layer: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        num_hidden_layers=n_layer, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=16, bos_token_id=0, eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def bert_config(**kw) -> BertConfig:
    return BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw,
    )


def bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(bert_config())


BUILDERS = {"gpt2": gpt2, "llama": llama, "bert": bert}


def make_batch(left_pad: bool = False) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (3, 8), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(3, 8, dtype=torch.long)
    if left_pad:
        mask[1, :3] = 0
    else:
        mask[1, 5:] = 0
    mask[2, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# ---------------------------------------------------------------- recipes


def test_recipes_hold_the_paper_weights():
    assert sorted(RECIPES) == ["ce", "distilgpt2", "ilkd-kngpt2", "ilkd-kroneckerbert", "kd"]
    kb = RECIPES["ilkd-kroneckerbert"]
    assert (kb.embedding, kb.attention, kb.hidden, kb.kd, kb.ce, kb.cosine) == (1, 1, 1, 1, 1, 0)
    assert kb.attention_loss == "score_mse"
    kn = RECIPES["ilkd-kngpt2"]
    assert (kn.embedding, kn.attention, kn.hidden, kn.kd, kn.ce, kn.cosine) == (1, 1, 1, 1, 1, 0)
    assert kn.attention_loss == "kl"
    d = RECIPES["distilgpt2"]
    assert (d.embedding, d.attention, d.hidden, d.kd, d.ce, d.cosine, d.temperature) == (0, 0, 0, 5, 2, 1, 2)
    c = RECIPES["ce"]
    assert (c.embedding, c.attention, c.hidden, c.kd, c.ce, c.cosine) == (0, 0, 0, 0, 1, 0)
    k = RECIPES["kd"]
    assert (k.embedding, k.attention, k.hidden, k.kd, k.ce, k.cosine, k.temperature) == (0, 0, 0, 1, 0, 0, 1)


def test_get_recipe_overrides_and_errors():
    r = get_recipe("distilgpt2", temperature=4.0, ce=0)
    assert r.temperature == 4.0 and r.ce == 0.0 and r.kd == 5.0
    assert RECIPES["distilgpt2"].temperature == 2.0  # the registry is not modified
    valid = r"\['ce', 'distilgpt2', 'ilkd-kngpt2', 'ilkd-kroneckerbert', 'kd'\]"
    with pytest.raises(ValueError, match=r"unknown recipe 'tinybert'; valid recipes are " + valid):
        get_recipe("tinybert")
    with pytest.raises(ValueError, match=r"unknown LossWeights fields \['alpha'\]"):
        get_recipe("ce", alpha=1.0)
    with pytest.raises(ValueError, match="loss weight kd must be finite and >= 0, got -1"):
        get_recipe("ce", kd=-1.0)
    with pytest.raises(ValueError, match="attention_loss must be one of"):
        LossWeights(attention_loss="cosine")
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        LossWeights(temperature=0.0)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_json_round_trip(name):
    weights = get_recipe(name, hidden=0.25)
    text = json.dumps(weights.to_dict())
    back = LossWeights.from_dict(json.loads(text))
    assert back == weights
    assert json.dumps(back.to_dict()) == text


def test_from_dict_is_strict():
    data = RECIPES["ce"].to_dict()
    with pytest.raises(ValueError, match=r"unknown keys \['extra'\]"):
        LossWeights.from_dict({**data, "extra": 1})
    del data["kd"]
    with pytest.raises(ValueError, match=r"missing keys \['kd'\]"):
        LossWeights.from_dict(data)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kd_recipe_is_ce_turned_into_pure_logit_kd(family):
    # Configs used to write recipe ce with loss_weights {ce: 0, kd: 1}; recipe kd must train the same.
    assert get_recipe("kd") == get_recipe("ce", ce=0.0, kd=1.0)
    teacher, batch = BUILDERS[family](seed=0).eval(), make_batch(left_pad=family == "llama")
    outs, grads = [], []
    for weights in (get_recipe("kd"), get_recipe("ce", ce=0.0, kd=1.0)):
        student = BUILDERS[family](seed=1).train()
        out = DistillationObjective(weights)(student, teacher, batch)
        out.total.backward()
        outs.append(out)
        grads.append([p.grad for p in student.parameters()])
    assert set(outs[0].terms) == set(outs[1].terms) == {"kd"}
    assert torch.equal(outs[0].total, outs[1].total) and outs[0].total.item() > 0
    assert all(torch.equal(a, b) for a, b in zip(*grads))


# ---------------------------------------------------------------- layer maps and needs


def test_uniform_layer_map():
    assert uniform_layer_map(6, 12) == [1, 3, 5, 7, 9, 11]
    assert uniform_layer_map(4, 30) == [7, 14, 22, 29]
    assert uniform_layer_map(3, 3) == [0, 1, 2]
    assert uniform_layer_map(1, 12) == [11]
    with pytest.raises(ValueError, match="student has 13 layers, more than the teacher's 12"):
        uniform_layer_map(13, 12)
    with pytest.raises(ValueError, match="at least 1 layer, got 0"):
        uniform_layer_map(0, 12)


def test_needs_follow_the_weights():
    ce = DistillationObjective(get_recipe("ce"))
    assert not ce.needs_teacher
    assert ce.student_needs == {"logits"} and ce.teacher_needs == set()
    kb = DistillationObjective(get_recipe("ilkd-kroneckerbert"))
    assert kb.needs_teacher
    assert kb.teacher_needs == {"embeddings", "hidden", "attention_scores", "logits"}
    assert kb.student_needs == kb.teacher_needs
    kn = DistillationObjective(get_recipe("ilkd-kngpt2", kd=0, embedding=0))
    assert kn.teacher_needs == {"hidden", "attention_probs"}
    assert kn.student_needs == {"hidden", "attention_probs", "logits"}
    dg = DistillationObjective(get_recipe("distilgpt2"))
    assert dg.teacher_needs == {"logits", "last_hidden"}


# ---------------------------------------------------------------- objective on tiny models


CASES = [
    ("gpt2", "ilkd-kroneckerbert"), ("gpt2", "ilkd-kngpt2"), ("gpt2", "distilgpt2"), ("gpt2", "ce"),
    ("llama", "ilkd-kroneckerbert"), ("llama", "ilkd-kngpt2"), ("llama", "distilgpt2"), ("llama", "ce"),
    ("bert", "ilkd-kroneckerbert"), ("bert", "ilkd-kngpt2"),
]


def expected_terms(family: str, recipe: str) -> set[str]:
    w = RECIPES[recipe]
    terms = {name for name in TERMS if getattr(w, name) > 0}
    if family == "bert":  # BertModel has no logits: kd and ce are skipped
        terms -= {"kd", "ce"}
    return terms


@pytest.mark.parametrize("family,recipe", CASES)
def test_objective_finite_with_student_only_gradients(family, recipe):
    build = BUILDERS[family]
    teacher, student = build(seed=0), build(seed=1).train()
    for p in teacher.parameters():
        assert p.requires_grad
    teacher.train()
    objective = DistillationObjective(get_recipe(recipe))
    batch = make_batch(left_pad=family == "llama")
    out = objective(student, teacher if objective.needs_teacher else None, batch)
    assert isinstance(out, LossOutput)
    assert set(out.terms) == expected_terms(family, recipe)
    assert out.total.dim() == 0 and torch.isfinite(out.total) and out.total.requires_grad
    weights = RECIPES[recipe]
    by_hand = sum(getattr(weights, name) * value.item() for name, value in out.terms.items())
    assert out.total.item() == pytest.approx(by_hand, rel=1e-5)
    for value in out.terms.values():
        assert value.dim() == 0 and not value.requires_grad and value.dtype == torch.float32
        assert math.isfinite(value.item()) and value.item() > 0
    out.total.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    if objective.needs_teacher:
        assert not teacher.training
        assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("family,recipe", [c for c in CASES if c[1] != "ce"])
def test_identical_student_and_teacher_give_zero_except_ce(family, recipe):
    teacher = BUILDERS[family](seed=0)
    student = copy.deepcopy(teacher).eval()
    out = DistillationObjective(get_recipe(recipe))(student, teacher, make_batch(left_pad=family == "llama"))
    for name, value in out.terms.items():
        if name == "ce":
            assert value.item() > 1.0  # random model: about ln(97) = 4.6 nats
        else:
            assert value.item() == pytest.approx(0.0, abs=1e-6), name


def test_truncated_student_and_layer_maps():
    teacher = gpt2(seed=0, n_layer=4).eval()
    # Student = teacher's first two blocks with the teacher's embeddings, final norm and head.
    student = gpt2(seed=1, n_layer=2).eval()
    student.transformer.wte.load_state_dict(teacher.transformer.wte.state_dict())
    student.transformer.wpe.load_state_dict(teacher.transformer.wpe.state_dict())
    student.transformer.ln_f.load_state_dict(teacher.transformer.ln_f.state_dict())
    for l in range(2):
        student.transformer.h[l].load_state_dict(teacher.transformer.h[l].state_dict())
    recipe = get_recipe("ilkd-kroneckerbert", kd=0, ce=0)
    batch = make_batch()

    hint = r"student has 2 layers and the teacher 4.*uniform_layer_map\(2, 4\) = \[1, 3\]"
    with pytest.raises(ValueError, match=hint):
        DistillationObjective(recipe)(student, teacher, batch)
    with pytest.raises(ValueError, match="student has 4 layers and the teacher 2"):
        DistillationObjective(recipe)(teacher, student, batch)
    with pytest.raises(ValueError, match="entry 1 is 4 but the teacher has 4 layers"):
        DistillationObjective(recipe, layer_map=[0, 4])(student, teacher, batch)

    # The map [0, 1] pairs every student block with the teacher block it copies: exact zeros.
    same = DistillationObjective(recipe, layer_map=[0, 1])(student, teacher, batch)
    assert same.terms["embedding"].item() == 0.0
    assert same.terms["hidden"].item() == 0.0
    assert same.terms["attention"].item() == 0.0
    # The uniform map [1, 3] pairs them with other blocks.
    uniform = DistillationObjective(recipe, layer_map=uniform_layer_map(2, 4))(student, teacher, batch)
    assert uniform.terms["hidden"].item() > 0 and uniform.terms["attention"].item() > 0


def test_hidden_size_mismatch_raises():
    teacher, student = gpt2(seed=0, n_embd=64), gpt2(seed=1, n_embd=32)
    with pytest.raises(ValueError, match="student hidden size 32 differs from teacher hidden size 64.*no projection"):
        DistillationObjective(get_recipe("ilkd-kngpt2"))(student, teacher, make_batch())
    with pytest.raises(ValueError, match="cosine term: student hidden size 32 differs from teacher hidden size 64"):
        DistillationObjective(get_recipe("distilgpt2"))(student, teacher, make_batch())
    # Logit-only distillation across widths is fine.
    out = DistillationObjective(get_recipe("distilgpt2", cosine=0))(student, teacher, make_batch())
    assert set(out.terms) == {"kd", "ce"}


def test_missing_teacher_and_batch_errors():
    with pytest.raises(ValueError, match="teacher is None"):
        DistillationObjective(get_recipe("ilkd-kngpt2"))(gpt2(), None, make_batch())
    with pytest.raises(ValueError, match="no 'input_ids'"):
        DistillationObjective(get_recipe("ce"))(gpt2(), None, {"ids": torch.zeros(1, 2)})


def test_ce_objective_without_teacher_and_without_mask():
    student = gpt2()
    batch = make_batch()
    out = DistillationObjective(get_recipe("ce"))(student, None, {"input_ids": batch["input_ids"]})
    assert set(out.terms) == {"ce"}
    reference = student(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
    assert out.total.item() == pytest.approx(reference.item(), rel=1e-5)


def test_bert_heads():
    batch = make_batch()
    torch.manual_seed(0)
    t_mlm = BertForMaskedLM(bert_config())
    torch.manual_seed(1)
    s_mlm = BertForMaskedLM(bert_config())
    with pytest.raises(ValueError, match="ce weight is 1.0 but the student is not a causal LM"):
        DistillationObjective(get_recipe("ilkd-kroneckerbert"))(s_mlm, t_mlm, batch)
    out = DistillationObjective(get_recipe("ilkd-kroneckerbert", ce=0))(s_mlm, t_mlm, batch)
    assert set(out.terms) == {"embedding", "attention", "hidden", "kd"}

    torch.manual_seed(0)
    t_cls = BertForSequenceClassification(bert_config(num_labels=3))
    torch.manual_seed(1)
    s_cls = BertForSequenceClassification(bert_config(num_labels=3)).eval()
    with torch.no_grad():  # spread the near-zero initial logits so the KL is far from rounding noise
        t_cls.classifier.weight.mul_(50.0)
        s_cls.classifier.weight.mul_(50.0)
    objective = DistillationObjective(get_recipe("ilkd-kroneckerbert", ce=0, temperature=2.0))
    out = objective(s_cls, t_cls, batch)
    # Classification KD: one distribution per row, averaged over rows, times T².
    with torch.no_grad():
        s_logits = s_cls(**batch).logits.tolist()
        t_logits = t_cls(**batch).logits.tolist()
    kl = 0.0
    for s_row, t_row in zip(s_logits, t_logits):
        zs = sum(math.exp(x / 2) for x in s_row)
        zt = sum(math.exp(x / 2) for x in t_row)
        for s_x, t_x in zip(s_row, t_row):
            pt, ps = math.exp(t_x / 2) / zt, math.exp(s_x / 2) / zs
            kl += pt * math.log(pt / ps)
    assert kl / 3 * 4 > 0.01
    assert out.terms["kd"].item() == pytest.approx(kl / 3 * 4, rel=1e-4)
    # token_type_ids reach both models.
    with_types = objective(s_cls, t_cls, {**batch, "token_type_ids": torch.ones_like(batch["input_ids"])})
    assert with_types.terms["embedding"].item() != pytest.approx(out.terms["embedding"].item(), rel=1e-3)


@pytest.mark.parametrize(
    "family,recipe,overrides,layers,lr",
    [
        # Pure layer-wise distillation (no CE), so the drop is the student approaching the teacher.
        ("gpt2", "ilkd-kngpt2", {"ce": 0.0}, 4, 0.3),
        ("llama", "ilkd-kroneckerbert", {"ce": 0.0}, 4, 0.3),
        ("gpt2", "distilgpt2", {}, 2, 0.05),
    ],
)
def test_sgd_steps_reduce_the_loss(family, recipe, overrides, layers, lr):
    teacher = BUILDERS[family](seed=0, n_layer=layers)
    student = BUILDERS[family](seed=1, n_layer=2).train()
    objective = DistillationObjective(get_recipe(recipe, **overrides), layer_map=uniform_layer_map(2, layers))
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9)
    batch = make_batch(left_pad=family == "llama")
    history = []
    for _ in range(12):
        out = objective(student, teacher, batch)
        optimizer.zero_grad()
        out.total.backward()
        optimizer.step()
        history.append(out)
    first, last = history[0], history[-1]
    assert last.total.item() < 0.8 * first.total.item(), [o.total.item() for o in history]
    if overrides.get("ce") == 0.0:
        for name in first.terms:
            assert last.terms[name] < first.terms[name], name
