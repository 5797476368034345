"""Options shared by the subcommands that measure perplexity."""

from __future__ import annotations

import functools

import click

PROTOCOL_HELP = "sliding: Hugging Face sliding window (SPEC §5); disjoint: Krony-PT's disjoint windows, exp(mean of window means)"


def perplexity_options(fn):
    """Add --split, --max-tokens, --max-length, --stride, --protocol, --batch-size."""

    @click.option("--split", default="test", show_default=True, help="Dataset split to read (a local file ignores it).")
    @click.option("--max-tokens", type=click.IntRange(min=2), default=None, help="Score only the first N tokens of the text.")
    @click.option("--max-length", type=click.IntRange(min=2), default=1024, show_default=True, help="Window length in tokens.")
    @click.option("--stride", type=click.IntRange(min=1), default=512, show_default=True, help="Window advance in tokens (sliding protocol).")
    @click.option("--protocol", type=click.Choice(["sliding", "disjoint"]), default="sliding", show_default=True, help=PROTOCOL_HELP)
    @click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="Windows per forward pass.")
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


def protocol_label(protocol: str, max_length: int, stride: int) -> str:
    """Human-readable name of a perplexity protocol with its parameters."""
    if protocol == "sliding":
        return f"sliding window, max_length {max_length}, stride {stride}"
    return f"Krony-PT disjoint windows of {max_length}"


def window_length(model, max_length: int) -> int:
    """``max_length`` capped at the model's context length, when the config gives one."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or getattr(getattr(model, "config", None), "n_positions", None)
    return min(max_length, limit) if limit else max_length
