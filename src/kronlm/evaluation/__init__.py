"""Evaluation: token perplexity under named protocols (:mod:`kronlm.evaluation.perplexity`)."""

from kronlm.evaluation.perplexity import (
    PROTOCOLS,
    PerplexityResult,
    Window,
    perplexity,
    perplexity_of_text,
    plan_windows,
)

__all__ = ["PROTOCOLS", "PerplexityResult", "Window", "perplexity", "perplexity_of_text", "plan_windows"]
