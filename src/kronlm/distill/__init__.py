"""Recovery training by distillation (SPEC §4): loss terms, model tracing, recipes, objective.

Public API is re-exported here, one block per module; add new modules' exports as new blocks
and extend ``__all__`` with them.
"""

from kronlm.distill.capture import ModelTrace, is_causal_model, trace
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
from kronlm.distill.objective import DistillationObjective, LossOutput, uniform_layer_map
from kronlm.distill.recipes import RECIPES, LossWeights, get_recipe

__all__ = [
    # capture
    "ModelTrace",
    "is_causal_model",
    "trace",
    # losses
    "attention_kl",
    "attention_score_mse",
    "causal_lm_ce",
    "check_layer_map",
    "embedding_mse",
    "hidden_cosine",
    "hidden_mse",
    "logit_kd",
    # objective
    "DistillationObjective",
    "LossOutput",
    "uniform_layer_map",
    # recipes
    "RECIPES",
    "LossWeights",
    "get_recipe",
]
