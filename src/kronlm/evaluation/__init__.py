"""Evaluation: token perplexity under named protocols (:mod:`kronlm.evaluation.perplexity`;
``evaluate`` of a data spec is ``kronlm.evaluate``) and lm-evaluation-harness tasks in-process
(:mod:`kronlm.evaluation.harness`, needs the ``eval`` extra)."""

from kronlm.evaluation.harness import (
    HarnessResult,
    harness_table,
    lambada_task,
    require_lm_eval,
    run_harness,
)
from kronlm.evaluation.perplexity import (
    DEFAULT_STRIDE,
    PROTOCOLS,
    PerplexityResult,
    Window,
    evaluate,
    perplexity,
    perplexity_of_text,
    plan_windows,
    protocol_label,
    window_length,
)

__all__ = [
    "DEFAULT_STRIDE",
    "PROTOCOLS",
    "HarnessResult",
    "PerplexityResult",
    "Window",
    "evaluate",
    "harness_table",
    "lambada_task",
    "perplexity",
    "perplexity_of_text",
    "plan_windows",
    "protocol_label",
    "require_lm_eval",
    "run_harness",
    "window_length",
]
