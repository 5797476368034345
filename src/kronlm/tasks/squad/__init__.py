"""SQuAD v1.1 / v2.0 extractive question answering: data, windows, decoding, metrics and the task run.

Modules: :mod:`data` (official JSON files and Hugging Face ``squad`` / ``squad_v2`` rows into
:class:`SquadExample`), :mod:`features` (question + context windows, answer token positions,
batching; the Hugging Face ``run_qa.py`` recipe), :mod:`postprocess` (span decoding, the v2.0
null-answer threshold), :mod:`metrics` (the official evaluation scripts v1.1 / v2.0),
:mod:`config` (run settings) and :mod:`family` (SQuAD as a family of the task pipeline:
teacher fine-tuning with a span head, KroneckerBERT task ILKD of a compressed student, report;
:func:`run_squad`, the command ``kronlm squad``).
Sources: Rajpurkar et al. 2016 (SQuAD), 2018 (SQuAD 2.0); KroneckerBERT (Tahaei et al., NAACL
2022) reports both beside GLUE.
"""

from kronlm.tasks.squad.config import SquadTrainConfig
from kronlm.tasks.squad.data import (
    LOCAL_SQUAD_DIR,
    SquadExample,
    default_squad_dir,
    examples_from_hf_rows,
    load_hf_squad,
    load_squad_split,
    read_squad_json,
)
from kronlm.tasks.squad.family import (
    QA_HEAD,
    SquadEvalSet,
    SquadFamily,
    check_qa_model,
    evaluate_squad,
    hold_out_by_paragraph,
    position_limit,
    run_squad,
    span_logits,
    subset_questions,
)
from kronlm.tasks.squad.features import (
    SquadCollator,
    prepare_eval_features,
    prepare_train_features,
)
from kronlm.tasks.squad.metrics import (
    exact_match_score,
    f1_score,
    normalize_answer,
    question_scores,
    references_from_examples,
    squad_metrics,
)
from kronlm.tasks.squad.postprocess import (
    SquadPredictions,
    apply_null_threshold,
    best_null_threshold,
    decode_predictions,
)

__all__ = [
    "LOCAL_SQUAD_DIR",
    "QA_HEAD",
    "SquadCollator",
    "SquadEvalSet",
    "SquadExample",
    "SquadFamily",
    "SquadPredictions",
    "SquadTrainConfig",
    "apply_null_threshold",
    "best_null_threshold",
    "check_qa_model",
    "decode_predictions",
    "default_squad_dir",
    "evaluate_squad",
    "exact_match_score",
    "examples_from_hf_rows",
    "f1_score",
    "hold_out_by_paragraph",
    "load_hf_squad",
    "load_squad_split",
    "normalize_answer",
    "position_limit",
    "prepare_eval_features",
    "prepare_train_features",
    "question_scores",
    "read_squad_json",
    "references_from_examples",
    "run_squad",
    "span_logits",
    "squad_metrics",
    "subset_questions",
]
