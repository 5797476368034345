"""Options shared by the subcommands: perplexity measurement, data sources, finite numbers."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import click

from kronlm.utils import default_data_dir
from kronlm.utils import resolve_device as resolve_torch_device


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses ``nan`` and ``inf``: NaN passes every bound check,
    and either would surface later as an error that no longer names the option."""

    def convert(self, value, param, ctx):
        """The float ``value``, checked against the range and for being finite (``click`` names
        the option in the error: ``Invalid value for '--budget': 'nan' is not a finite number``)."""
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


PROTOCOL_HELP = "sliding: Hugging Face sliding window; disjoint: Krony-PT's disjoint windows, exp(mean of window means) (docs/protocols.md)"


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


DATA_DIR_HELP = (
    "Folder of local copies of public data (wikitext-2-raw/, glue/), read before the hub for aliases such as "
    "wikitext2. Default: $KRONLM_DATA_DIR, else ../shared/data relative to the working directory when that "
    "folder exists (the repository's example data), else none."
)
TEXT_FIELD_HELP = "JSON Lines field, or CSV/TSV/Parquet/dataset column, that holds the text."


def data_options(fn):
    """Add --data-dir (a folder, see :data:`DATA_DIR_HELP`) and --text-field (default ``text``)."""

    @click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=default_data_dir,
                  show_default="$KRONLM_DATA_DIR, else ../shared/data", help=DATA_DIR_HELP)
    @click.option("--text-field", default="text", show_default=True, help=TEXT_FIELD_HELP)
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


def resolve_device(device: str) -> str:
    """``--device``: ``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; any other name
    checked against this machine (``kronlm.utils.resolve_device``).

    Raises:
        click.BadParameter: a device this machine lacks or a name torch does not know (named).
    """
    try:
        return str(resolve_torch_device(device))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--device'") from None


def device_option(fn):
    """Add --device (auto, cpu, cuda, cuda:1, ...; default auto: the GPU when there is one)."""

    @click.option("--device", default="auto", show_default=True, help="Where the models run: auto (a GPU when one is visible, else the CPU), cpu, cuda, cuda:N.")
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper
