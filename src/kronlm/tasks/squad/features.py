"""SQuAD features: question + context windows for an encoder with a span-prediction head, and batching.

Follows the Hugging Face ``run_qa.py`` example (``prepare_train_features`` /
``prepare_validation_features``): the question and the context are tokenised as a pair with a
fast tokenizer, ``truncation="only_second"``, ``max_length`` and ``stride=doc_stride``, so a
context longer than one window becomes several overlapping windows ("features") that share
``doc_stride`` context tokens with the previous one. Only the padding side "right" (question
first, as BERT-family models are trained) is supported.

A feature is a dict:

- ``input_ids``: list of int, at most ``max_length`` tokens, special tokens included, unpadded.
- ``token_type_ids``: list of int (0 = question segment, 1 = context), when the tokenizer makes them.
- ``example_index``: index of the example in the list given; ``example_id``: its question id.
- ``cls_index``: position of the CLS token (0 for BERT), the "no answer" position.
- evaluation only: ``offset_mapping``: per token, ``(char_start, char_end)`` in the example's
  context for context tokens and ``None`` for question and special tokens (so span decoding never
  lands outside the context).
- training only: ``start_positions`` / ``end_positions``: token positions (inclusive) of the first
  gold answer inside this window, or ``cls_index`` when the answer is not fully inside the window
  or the question is unanswerable (SQuAD v2.0).

Both functions cut the same windows from the same examples, so the i-th training feature and the
i-th evaluation feature cover the same tokens (training features leave out the offsets to save
memory on large training sets).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kronlm.tasks.squad.data import SquadExample

__all__ = ["SquadCollator", "prepare_eval_features", "prepare_train_features"]


def _check_settings(tokenizer, max_length: int, doc_stride: int, max_positions: int | None) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast (Rust tokenizers) tokenizer; SQuAD windows need its offset mapping")
    if tokenizer.padding_side != "right":
        raise ValueError(f"tokenizer padding_side is {tokenizer.padding_side!r}; SQuAD features put the question first and need 'right'")
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1 token, got {max_length}")
    if doc_stride < 0 or doc_stride >= max_length:
        raise ValueError(f"doc_stride must be in [0, max_length={max_length}) tokens, got {doc_stride}")
    if max_positions is not None and max_length > max_positions:
        raise ValueError(f"max_length {max_length} tokens exceeds the model's position limit of {max_positions}")


def _answer_positions(example: SquadExample, offsets: list[tuple[int, int] | None], cls_index: int) -> tuple[int, int]:
    """Token positions (inclusive) of the first gold answer in one window, or (cls, cls)."""
    if example.is_impossible or not example.answer_texts:
        return cls_index, cls_index
    start_char = example.answer_starts[0]
    end_char = start_char + len(example.answer_texts[0])
    context_tokens = [i for i, o in enumerate(offsets) if o is not None]
    first, last = context_tokens[0], context_tokens[-1]
    if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
        return cls_index, cls_index
    # Same walk as run_qa.py: the last token starting at or before the answer start, and the first
    # token ending at or after the answer end; context tokens are contiguous in a window.
    start = first
    while start <= last and offsets[start][0] <= start_char:
        start += 1
    end = last
    while end >= first and offsets[end][1] >= end_char:
        end -= 1
    return start - 1, end + 1


def _features(
    examples: Sequence[SquadExample], tokenizer, max_length: int, doc_stride: int, max_positions: int | None,
    training: bool, batch_size: int,
) -> list[dict[str, Any]]:
    _check_settings(tokenizer, max_length, doc_stride, max_positions)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 example, got {batch_size}")
    n_special = tokenizer.num_special_tokens_to_add(pair=True)
    features: list[dict[str, Any]] = []
    for first in range(0, len(examples), batch_size):
        chunk = examples[first:first + batch_size]
        # run_qa.py strips leading whitespace: some SQuAD v2.0 questions start with many spaces.
        questions = [ex.question.lstrip() for ex in chunk]
        question_ids = tokenizer(questions, add_special_tokens=False)["input_ids"]
        for ex, ids in zip(chunk, question_ids):
            room = max_length - n_special - len(ids)
            # The Rust tokenizer panics (not a Python error) when the context room is not larger
            # than the stride, so both cases are refused here with the numbers.
            if room < 1:
                raise ValueError(
                    f"question {ex.id!r} has {len(ids)} tokens; with {n_special} special tokens no context token fits in max_length {max_length}"
                )
            if room <= doc_stride:
                raise ValueError(
                    f"question {ex.id!r} has {len(ids)} tokens; with {n_special} special tokens only {room} context tokens fit in "
                    f"max_length {max_length}, not more than doc_stride {doc_stride}"
                )
        enc = tokenizer(
            questions,
            [ex.context for ex in chunk],
            truncation="only_second",
            max_length=max_length,
            stride=doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
        has_types = "token_type_ids" in enc
        for i, input_ids in enumerate(enc["input_ids"]):
            index = first + enc["overflow_to_sample_mapping"][i]
            example = examples[index]
            sequence_ids = enc.sequence_ids(i)
            offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][i], sequence_ids)]
            if all(o is None for o in offsets):
                raise ValueError(f"question {example.id!r}: its context ({len(example.context)} characters) gives no token")
            cls_id = tokenizer.cls_token_id
            cls_index = input_ids.index(cls_id) if cls_id is not None and cls_id in input_ids else 0
            feature: dict[str, Any] = {"input_ids": list(input_ids)}
            if has_types:
                feature["token_type_ids"] = list(enc["token_type_ids"][i])
            feature.update(example_index=index, example_id=example.id, cls_index=cls_index)
            if training:
                feature["start_positions"], feature["end_positions"] = _answer_positions(example, offsets, cls_index)
            else:
                feature["offset_mapping"] = offsets
            features.append(feature)
    return features


def prepare_train_features(
    examples: Sequence[SquadExample], tokenizer, max_length: int = 384, doc_stride: int = 128,
    max_positions: int | None = None, batch_size: int = 1000,
) -> list[dict[str, Any]]:
    """Training windows with answer token positions (the run_qa.py ``prepare_train_features``).

    Args:
        examples: the examples (v1.1 or v2.0).
        tokenizer: a fast Hugging Face tokenizer with padding side "right" (BERT WordPiece, ...).
        max_length: tokens per window, special tokens included (run_qa default 384).
        doc_stride: context tokens shared by consecutive windows of one example (default 128).
        max_positions: the model's position limit (``config.max_position_embeddings``); checked
            against ``max_length`` when given.
        batch_size: examples tokenised per tokenizer call (memory only; the result is the same).

    Returns:
        features in example order (see the module docstring), each with ``start_positions`` and
        ``end_positions``: the first gold answer's token span (inclusive), or ``cls_index`` when
        the answer is not fully inside the window or the question is unanswerable.

    Raises:
        ValueError: a slow tokenizer, left padding, ``max_length`` < 1, ``doc_stride`` outside
            [0, max_length), ``max_length`` above ``max_positions`` (names both numbers), or a
            question so long that no context token (or no more than ``doc_stride`` of them)
            fits in a window (names the question id, its token count, the special tokens and
            ``max_length``).
    """
    return _features(examples, tokenizer, max_length, doc_stride, max_positions, True, batch_size)


def prepare_eval_features(
    examples: Sequence[SquadExample], tokenizer, max_length: int = 384, doc_stride: int = 128,
    max_positions: int | None = None, batch_size: int = 1000,
) -> list[dict[str, Any]]:
    """Evaluation windows (the run_qa.py ``prepare_validation_features``).

    Same arguments, windows (in the same order) and errors as :func:`prepare_train_features`;
    each feature has ``offset_mapping`` instead of answer positions. Decode the model's logits with
    :func:`kronlm.tasks.squad.postprocess.decode_predictions` using these features.
    """
    return _features(examples, tokenizer, max_length, doc_stride, max_positions, False, batch_size)


class SquadCollator:
    """Pads features on the right to the longest one of the batch.

    Args:
        pad_token_id: id written into padded positions (masked by ``attention_mask``).

    Calling it on a list of features returns a dict of int64 tensors: "input_ids" (batch, seq),
    "attention_mask" (batch, seq) (1 = real token), "token_type_ids" (batch, seq) (padded with 0)
    when the features have them, and "start_positions" / "end_positions" (batch,) when they have
    them (training features). Other keys (offsets, ids) are left out; keep the feature list to
    decode predictions.

    Raises:
        ValueError: no pad token id; an empty batch; features that disagree on having
            token_type_ids or answer positions (names the feature index in the batch).
    """

    def __init__(self, pad_token_id: int | None):
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token id; set tokenizer.pad_token first")
        self.pad_token_id = int(pad_token_id)

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch of SQuAD features")
        has_types = "token_type_ids" in features[0]
        has_positions = "start_positions" in features[0]
        for i, f in enumerate(features):
            if ("token_type_ids" in f) != has_types or ("start_positions" in f) != has_positions:
                raise ValueError(f"feature {i} of the batch differs from feature 0 in having token_type_ids / answer positions")
        seq = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), seq), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), seq), dtype=torch.long)
        types = torch.zeros((len(features), seq), dtype=torch.long) if has_types else None
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
            mask[i, :n] = 1
            if types is not None:
                types[i, :n] = torch.tensor(f["token_type_ids"], dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            batch["token_type_ids"] = types
        if has_positions:
            batch["start_positions"] = torch.tensor([f["start_positions"] for f in features], dtype=torch.long)
            batch["end_positions"] = torch.tensor([f["end_positions"] for f in features], dtype=torch.long)
        return batch
