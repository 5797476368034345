"""Token perplexity of a causal language model under two named protocols (docs/protocols.md).

``"sliding"``: the Hugging Face guide "Perplexity of fixed-length models" (transformers docs).
Windows of ``max_length`` tokens start every ``stride`` tokens; each window scores only the tokens
that no earlier window scored, so with ``stride < max_length`` every token but the first is scored
exactly once, with up to ``max_length - 1`` tokens of context. ``ppl = exp(sum of NLL / tokens
scored)``.

``"disjoint"``: the Krony-PT protocol (Ayad et al., arXiv 2412.12351, and its evaluation code).
The text is cut into non-overlapping ``max_length`` windows; each window's mean NLL is taken over
its ``max_length - 1`` predictions, and ``ppl = exp(mean of the window means)``.

The NLL is summed here from the logits (log-softmax in float64) rather than read from
``model(labels=...).loss``: that loss is a mean whose token count depends on the internal label
shift, and the guide's code, which multiplies it back by ``valid labels - 1``, undercounts every
window after the first by one token (on the first 4,096 WikiText-2 test tokens with SmolLM2: 4,089
tokens and ppl 20.156 there, 4,095 and 20.160 here).
"""

from __future__ import annotations

import inspect
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kronlm.data.sources import resolve_source
from kronlm.data.text import load_text_for_tokens
from kronlm.modeling.loading import has_lm_head

PROTOCOLS = ("sliding", "disjoint")
DEFAULT_STRIDE = 512


@dataclass(frozen=True)
class Window:
    """One model call's worth of tokens.

    Attributes:
        begin: index of the window's first token in the sequence.
        end: one past its last token; the window holds ``end - begin`` tokens.
        first_scored: index of the first token whose NLL counts; tokens ``first_scored .. end - 1``
            are scored, each from the logits at the previous position. Always ``> begin``: a
            window's first token has no context inside it.
    """

    begin: int
    end: int
    first_scored: int

    @property
    def length(self) -> int:
        """Tokens in the window (model input length)."""
        return self.end - self.begin

    @property
    def scored(self) -> int:
        """Tokens whose prediction this window scores."""
        return self.end - self.first_scored


@dataclass(frozen=True)
class PerplexityResult:
    """Outcome of :func:`perplexity`.

    Attributes:
        ppl: the perplexity under ``protocol``.
        nll: summed negative log-likelihood of the scored tokens, in nats.
        tokens_scored: number of tokens whose NLL is in ``nll``.
        windows: number of model windows evaluated.
        seconds: wall-clock time of the evaluation loop (seconds).
        tokens_per_second: ``tokens_scored / seconds``.
        protocol: ``"sliding"`` or ``"disjoint"``.
        max_length: window length in tokens.
        stride: window advance in tokens (``max_length`` for the disjoint protocol).
    """

    ppl: float
    nll: float
    tokens_scored: int
    windows: int
    seconds: float
    tokens_per_second: float
    protocol: str
    max_length: int
    stride: int

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return asdict(self)

    def protocol_label(self) -> str:
        """The protocol with its parameters, as the command line prints it."""
        return protocol_label(self.protocol, self.max_length, self.stride)

    def __str__(self) -> str:
        name = "sliding window (HF guide)" if self.protocol == "sliding" else "disjoint windows (Krony-PT)"
        return (
            f"ppl {self.ppl:.4f} [{name}, max_length {self.max_length}, stride {self.stride}]: "
            f"{self.tokens_scored:,} tokens scored in {self.windows} windows, "
            f"{self.seconds:.1f} s ({self.tokens_per_second:,.0f} tokens/s)"
        )


def protocol_label(protocol: str, max_length: int, stride: int) -> str:
    """Human-readable name of a perplexity protocol with its parameters (docs/protocols.md)."""
    if protocol == "sliding":
        return f"sliding window, max_length {max_length}, stride {stride}"
    return f"Krony-PT disjoint windows of {max_length}"


def window_length(model: torch.nn.Module, max_length: int) -> int:
    """``max_length`` capped at the model's context length, when its config gives one."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(max_length, limit) if limit else max_length


def plan_windows(n_tokens: int, max_length: int, stride: int | None = None, protocol: str = "sliding") -> list[Window]:
    """The windows a protocol evaluates on a sequence of ``n_tokens`` tokens.

    ``"sliding"`` (HF guide): windows begin at ``0, stride, 2 * stride, ...`` and end at
    ``min(begin + max_length, n_tokens)``; the last one ends at ``n_tokens``. Each scores the tokens
    after the previous window's end; the very first token is never scored. With ``stride <
    max_length`` consecutive windows overlap, so every token but the first is scored:
    ``n_tokens - 1`` in all. With ``stride == max_length`` they do not overlap and each window's
    first token has no context, so ``n_tokens - windows`` tokens are scored (as in the guide's code,
    whose label shift drops it).

    ``"disjoint"`` (Krony-PT, ``stride`` ignored): ``n_tokens // max_length`` windows ``[k * max_length, (k + 1) *
    max_length)``, each scoring its last ``max_length - 1`` tokens. A trailing partial window is
    dropped, as in Krony-PT's code, unless it is the only window (``n_tokens < max_length``).

    Raises:
        ValueError: see :func:`perplexity`.
    """
    stride = _check_arguments(n_tokens, max_length, stride, protocol)
    if protocol == "disjoint":
        if n_tokens < max_length:
            return [Window(0, n_tokens, 1)]
        return [
            Window(k * max_length, (k + 1) * max_length, k * max_length + 1) for k in range(n_tokens // max_length)
        ]
    windows = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def _check_arguments(n_tokens: int, max_length: int, stride: int | None, protocol: str) -> int:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown perplexity protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    if max_length < 2:
        raise ValueError(f"max_length is {max_length} but a window needs at least 2 tokens (one context, one scored)")
    if protocol == "disjoint":
        # The windows never overlap, so the window advance is max_length whatever stride says: a
        # caller can pass one set of options for both protocols (the CLI does).
        stride = max_length
    elif stride is None:
        stride = min(DEFAULT_STRIDE, max_length)
    if stride < 1 or stride > max_length:
        raise ValueError(f"stride is {stride} but must be between 1 and max_length ({max_length})")
    if n_tokens < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {n_tokens}")
    return stride


def _model_device(model: torch.nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _window_nll(logits: torch.Tensor, input_ids: torch.Tensor, window: Window) -> torch.Tensor:
    """Summed NLL (float64 scalar, nats) of a window's scored tokens.

    Args:
        logits: (kept, vocab) logits of the window's last ``kept`` positions, any float dtype.
        input_ids: (n_tokens,) the whole sequence, on the logits' device.
    """
    # Position j of the window predicts token begin + j + 1; logits row 0 is position length - kept.
    offset = window.length - logits.shape[0]
    start = window.first_scored - window.begin - 1 - offset
    stop = window.end - window.begin - 1 - offset
    scored_logits = logits[start:stop].to(torch.float64)
    targets = input_ids[window.first_scored : window.end]
    return F.cross_entropy(scored_logits, targets, reduction="sum")


def perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    max_length: int = 1024,
    stride: int | None = None,
    protocol: str = "sliding",
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str | None = None,
) -> PerplexityResult:
    """Token perplexity of a causal LM on one token sequence.

    Protocols are described in the module docstring and :func:`plan_windows`. Windows of equal
    length are run ``batch_size`` at a time; the result equals ``batch_size=1`` up to float
    rounding. Logits are upcast to float64 before the log-softmax and the NLL is summed in float64,
    so a bfloat16 model loses nothing in the accumulation.

    Args:
        model: a causal LM whose forward takes ``input_ids`` of shape (batch, length) and returns
            ``.logits`` of shape (batch, length, vocab). Put in eval mode and run under
            ``torch.inference_mode``; every module's training flag is restored afterwards.
        input_ids: (n_tokens,) integer token ids, one sequence (e.g. ``tokenizer(text)["input_ids"]``).
        max_length: window length in tokens; at most ``config.max_position_embeddings``.
        stride: window advance in tokens for ``"sliding"``; None means ``min(512, max_length)``
            (the guide's 512 for ``max_length`` 1024). ``"disjoint"`` ignores it: its windows
            advance by ``max_length``, and the result reports ``stride = max_length``.
        protocol: ``"sliding"`` (HF guide) or ``"disjoint"`` (Krony-PT).
        batch_size: windows per forward pass.
        device: where to run; None uses the model's device. A model elsewhere is moved there.
        progress: show a tqdm bar over windows.
        desc: label of the progress bar.

    Returns:
        a :class:`PerplexityResult`.

    Raises:
        ValueError: unknown protocol; ``max_length < 2``; ``stride`` outside ``1 .. max_length``
            (sliding); fewer than 2 tokens; ``input_ids`` not a 1-D
            integer tensor; ``max_length`` above the model's ``max_position_embeddings``; a token id
            outside the model's vocabulary; ``batch_size < 1``; a model without an LM head (an
            encoder such as ``BertModel``, or a classifier).
    """

    stride = _check_inputs(model, input_ids, max_length=max_length, stride=stride, protocol=protocol, batch_size=batch_size)
    windows = plan_windows(input_ids.numel(), max_length, stride, protocol)
    device = torch.device(device) if device is not None else _model_device(model)
    if _model_device(model) != device:
        model.to(device)
    input_ids = input_ids.to(device=device, dtype=torch.long)
    start_time = time.perf_counter()
    window_nll = _score_windows(model, input_ids, windows, batch_size, progress, desc or f"perplexity ({protocol})")
    seconds = time.perf_counter() - start_time
    tokens_scored = sum(w.scored for w in windows)
    nll = math.fsum(window_nll)
    if protocol == "sliding":
        ppl = math.exp(nll / tokens_scored)
    else:
        ppl = math.exp(math.fsum(s / w.scored for s, w in zip(window_nll, windows)) / len(windows))
    return PerplexityResult(
        ppl=ppl,
        nll=nll,
        tokens_scored=tokens_scored,
        windows=len(windows),
        seconds=seconds,
        tokens_per_second=tokens_scored / seconds if seconds > 0 else float("inf"),
        protocol=protocol,
        max_length=max_length,
        stride=stride,
    )


def _check_inputs(model: torch.nn.Module, input_ids: torch.Tensor, *, max_length: int, stride: int | None, protocol: str,
                  batch_size: int) -> int:
    """The window advance of the protocol, after checking the model and the tokens (see
    :func:`perplexity` for what is refused)."""
    if not has_lm_head(model):
        raise ValueError(
            f"perplexity needs a model with a language-modelling head; {type(model).__name__} has none "
            "(an encoder or a classifier)"
        )
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1 or input_ids.is_floating_point():
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a 1-D integer tensor of token ids, got {shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size} but must be at least 1")
    stride = _check_arguments(input_ids.numel(), max_length, stride, protocol)
    config = getattr(model, "config", None)
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is not None and max_length > max_positions:
        raise ValueError(f"max_length is {max_length} but the model has only {max_positions} positions")
    vocab_size = getattr(config, "vocab_size", None)
    lowest, highest = int(input_ids.min()), int(input_ids.max())
    if lowest < 0:
        raise ValueError(f"token id {lowest} is negative")
    if vocab_size is not None and highest >= vocab_size:
        raise ValueError(f"token id {highest} is outside the model's vocabulary of {vocab_size}")
    return stride


def _score_windows(model: torch.nn.Module, input_ids: torch.Tensor, windows: list[Window], batch_size: int, progress: bool,
                   desc: str) -> list[float]:
    """Summed NLL (nats) of every window's scored tokens, windows of equal length run
    ``batch_size`` at a time in eval mode; every module's training flag is restored afterwards."""
    # Consecutive windows of equal length form a batch; in practice all but the last are full.
    batches: list[list[Window]] = []
    for window in windows:
        if batches and len(batches[-1]) < batch_size and batches[-1][0].length == window.length:
            batches[-1].append(window)
        else:
            batches.append([window])
    # Models that take ``logits_to_keep`` (transformers' causal LMs) project only the positions a
    # window scores onto the vocabulary: with stride 512 of 1024 that halves the LM-head work.
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    # Restore each module's own flag afterwards: model.train(flag) would also flip submodules that
    # were deliberately left in another mode (a frozen teacher inside a training wrapper).
    training_flags = [(module, module.training) for module in model.modules()]
    model.eval()
    window_nll: list[float] = []
    bar = tqdm(total=len(windows), desc=desc, unit="window", disable=not progress)
    try:
        with torch.inference_mode():
            for batch in batches:
                batch_ids = torch.stack([input_ids[w.begin : w.end] for w in batch])
                extra = {}
                if keeps_logits:
                    # The last position predicts past the window; keep it so the count is simple.
                    extra["logits_to_keep"] = min(max(w.scored for w in batch) + 1, batch_ids.shape[1])
                logits = model(input_ids=batch_ids, use_cache=False, **extra).logits
                for row, window in enumerate(batch):
                    window_nll.append(_window_nll(logits[row], input_ids, window).item())
                bar.update(len(batch))
    finally:
        bar.close()
        for module, flag in training_flags:
            module.training = flag
    return window_nll


def perplexity_of_text(
    model: torch.nn.Module,
    tokenizer,
    text: str,
    *,
    max_tokens: int | None = None,
    **kwargs,
) -> PerplexityResult:
    """Tokenise ``text`` and return :func:`perplexity` of its first ``max_tokens`` tokens.

    Tokenisation follows the HF guide: ``tokenizer(text, return_tensors="pt")`` with the tokenizer's
    default special tokens. GPT-2 adds none; a tokenizer whose ``add_bos_token`` is set (Llama-style)
    prepends its BOS token, which then counts as the unscored first token. ``max_tokens`` cuts the
    token sequence (not the text), so the first ``max_tokens`` tokens are exactly those of the full
    text.

    Args:
        model: see :func:`perplexity`.
        tokenizer: a ``transformers`` tokenizer.
        text: the text, e.g. from :func:`kronlm.data.text.load_text`.
        max_tokens: keep only the first this many tokens; None keeps all.
        **kwargs: passed on to :func:`perplexity` (``max_length``, ``stride``, ``protocol``, ...).

    Raises:
        ValueError: ``max_tokens < 2``, and everything :func:`perplexity` raises.
    """
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens is {max_tokens} but perplexity needs at least 2 tokens")
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    if max_tokens is not None:
        input_ids = input_ids[:max_tokens]
    return perplexity(model, input_ids, **kwargs)


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    data: str | os.PathLike,
    *,
    split: str = "test",
    data_config: str | None = None,
    text_field: str = "text",
    data_dir: str | os.PathLike | None = None,
    max_tokens: int | None = None,
    max_length: int = 1024,
    stride: int = DEFAULT_STRIDE,
    protocol: str = "sliding",
    batch_size: int = 1,
    progress: bool = True,
    desc: str | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on the text named by ``data`` under a named protocol
    (docs/protocols.md): what ``kronlm eval --data`` and ``kronlm compress --eval`` measure.

    The text is resolved and read as :func:`kronlm.data.load_text` reads it (only the beginning
    that holds the first ``max_tokens`` tokens), tokenised as :func:`perplexity_of_text` does, and
    scored with windows of ``max_length`` tokens capped at the model's context
    (:func:`window_length`), advancing by ``stride`` (at most the window).

    Args:
        model: a causal LM (see :func:`perplexity`).
        tokenizer: its ``transformers`` tokenizer.
        data: a data spec: a text / JSON Lines / CSV / TSV / Parquet file, a dataset folder, an
            alias (``wikitext2``) or a hub dataset id (:func:`kronlm.data.resolve_source`).
        split: dataset split (a local file ignores it).
        data_config: dataset configuration name of a hub dataset or folder.
        text_field: the column or field holding the text.
        data_dir: folder of local copies of public data; None: ``$KRONLM_DATA_DIR``.
        max_tokens: score only the first this many tokens; None: all.
        max_length: window length in tokens.
        stride: window advance in tokens (sliding protocol).
        protocol: ``"sliding"`` (Hugging Face guide) or ``"disjoint"`` (Krony-PT).
        batch_size: windows per forward pass.
        progress: tqdm bar over windows.
        desc: label of the progress bar.

    Returns:
        a :class:`PerplexityResult`.

    Raises:
        FileNotFoundError: ``data`` looks like a path but does not exist.
        ValueError: see :func:`kronlm.data.resolve_source`, :func:`kronlm.data.load_text` and
            :func:`perplexity`.
    """
    source = resolve_source(data, split=split, name=data_config, data_dir=data_dir, text_field=text_field)
    text = load_text_for_tokens(source, tokenizer, max_tokens)
    length = window_length(model, max_length)
    return perplexity_of_text(model, tokenizer, text, max_tokens=max_tokens, max_length=length, stride=min(stride, length),
                              protocol=protocol, batch_size=batch_size, progress=progress, desc=desc)


__all__ = [
    "DEFAULT_STRIDE",
    "PROTOCOLS",
    "PerplexityResult",
    "Window",
    "evaluate",
    "perplexity",
    "perplexity_of_text",
    "plan_windows",
    "protocol_label",
    "window_length",
]
