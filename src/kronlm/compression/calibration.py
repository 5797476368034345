"""Calibration: run the dense model on a little text and record what activation-aware inits need.

For every module to be compressed we accumulate its input second moment C = Σ_t x_t x_tᵀ / N
(in, in) in float64. Inputs wider than ``max_full_dim`` keep only the two partial traces of C for
the module's planned factor shapes (n1, n1) and (n2, n2) (the Kronecker-factored approximation,
see ``kronlm.decompose.activation_aware``), so memory stays bounded by
Σ_modules min(in², n1² + n2²) doubles. Modules that read the same tensor (Q/K/V, gate/up) share
one accumulator.

With ``sensitivity=True`` a backward pass of the summed token NLL also records, per module, the
mean squared gradient of the loss with respect to the module's output per output unit,
s = E_t ||∂L/∂y_t||² / out. Under the usual diagonal-Fisher approximation a weight change ΔW
raises the mean token NLL by about ½ · s · E_t ||ΔW x_t||², which is what budget allocation
(``kronlm.compression.budget``) trades against parameters.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from kronlm.data.sources import TEXT_ALIASES, resolve_source
from kronlm.data.text import load_text, load_text_for_tokens
from kronlm.layers import dense_weight, is_conv1d
from kronlm.utils.atomic import atomic_path

# Calibration token ids of ``kronlm compress --calibration`` and the benchmarks: sequences x tokens.
DEFAULT_CALIBRATION_SEQUENCES = 128
DEFAULT_CALIBRATION_LENGTH = 512


@dataclass
class InputStatistics:
    """Accumulated input statistics of one module (or of several sharing one input).

    Attributes:
        in_features: width of the input.
        tokens: number of input vectors seen.
        moment_sum: (in, in) float64 Σ x xᵀ, or None when only partial traces are kept.
        p1_sum: (n1, n1) float64 Σ X Xᵀ over X = x.reshape(n1, n2), when factored.
        p2_sum: (n2, n2) float64 Σ Xᵀ X, when factored.
    """

    in_features: int
    tokens: int = 0
    moment_sum: torch.Tensor | None = None
    p1_sum: torch.Tensor | None = None
    p2_sum: torch.Tensor | None = None

    def covariance(self) -> torch.Tensor | None:
        """C = Σ x xᵀ / N (in, in) float64, or None when only partial traces were kept."""
        return None if self.moment_sum is None else self.moment_sum / max(self.tokens, 1)

    def partial_traces(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(P1 / N, P2 / N) when factored, else None."""
        if self.p1_sum is None:
            return None
        n = max(self.tokens, 1)
        return self.p1_sum / n, self.p2_sum / n

    def add(self, x: torch.Tensor, input_factors: tuple[int, int] | None) -> None:
        """Accumulate a batch of inputs x (..., in)."""
        flat = x.detach().reshape(-1, self.in_features)
        self.tokens += flat.shape[0]
        if input_factors is None:
            # float32 products per batch, float64 across batches: exact enough and 2x faster.
            gram = (flat.float().mT @ flat.float()).double().cpu()
            self.moment_sum = gram if self.moment_sum is None else self.moment_sum + gram
            return
        n1, n2 = input_factors
        X = flat.float().reshape(-1, n1, n2)
        p1 = torch.einsum("tik,tjk->ij", X, X).double().cpu()
        p2 = torch.einsum("tik,til->kl", X, X).double().cpu()
        self.p1_sum = p1 if self.p1_sum is None else self.p1_sum + p1
        self.p2_sum = p2 if self.p2_sum is None else self.p2_sum + p2


@dataclass
class ModuleCalibration:
    """What ``collect_calibration`` returns per module.

    Attributes:
        inputs: the (possibly shared) ``InputStatistics``.
        out_features: output width of the module.
        grad_sq: mean over tokens of ||∂L/∂y_t||² / out (per output unit), or None when
            sensitivity was not collected. L is the summed token NLL (nats).
        cross_moment: (in, in) float64 E[x x̃ᵀ] between the dense model's input x and the
            statistics' input x̃ on the same tokens, when ``inputs`` come from a partially
            compressed model (``kronlm.compression.sequential``); None otherwise.
        fitted: factors already fitted on these statistics, keyed by the option
            (``kronlm.compression.surgery.fit_key``), so that a budget allocation's error check and
            the compression that follows fit each module once. Not saved.
    """

    inputs: InputStatistics
    out_features: int
    grad_sq: float | None = None
    cross_moment: torch.Tensor | None = None
    fitted: dict = field(default_factory=dict, repr=False)


def calibration_input_ids(tokenizer, text: str, num_sequences: int, seq_len: int, seed: int | None = None, *, source: str = "calibration text") -> torch.Tensor:
    """Cut the tokenised text into ``num_sequences`` disjoint blocks of ``seq_len`` tokens.

    Args:
        tokenizer: a Hugging Face tokenizer.
        text: the calibration text.
        num_sequences, seq_len: how many blocks of how many tokens.
        seed: None takes the first num_sequences·seq_len tokens, consecutive (deterministic, the
            behaviour before seeds existed); an integer draws num_sequences distinct block
            positions out of the text's len // seq_len with ``torch.randperm`` under that seed, in
            text order.
        source: what the text is, for the error message.

    Returns:
        (num_sequences, seq_len) int64 token ids.

    Raises:
        ValueError: non-positive sizes, or a text with fewer than num_sequences·seq_len tokens
            (the message names ``source`` and gives both numbers).
    """
    if num_sequences < 1 or seq_len < 2:
        raise ValueError(f"calibration needs at least 1 sequence of at least 2 tokens, got {num_sequences} x {seq_len}")
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    need = num_sequences * seq_len
    if ids.numel() < need:
        raise ValueError(
            f"{source} has {ids.numel():,} tokens, fewer than the {num_sequences} x {seq_len} = {need:,} asked for"
        )
    if seed is None:
        return ids[:need].reshape(num_sequences, seq_len).clone()
    blocks = ids[: (ids.numel() // seq_len) * seq_len].reshape(-1, seq_len)
    generator = torch.Generator().manual_seed(int(seed))
    picked = torch.randperm(blocks.shape[0], generator=generator)[:num_sequences].sort().values
    return blocks[picked].clone()


def _special_ids(model: nn.Module, tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    config = getattr(model, "config", None)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, key, None)
        ids.update(value if isinstance(value, (list, tuple)) else ([] if value is None else [value]))
    return {int(i) for i in ids}


@torch.no_grad()
def generate_calibration(
    model: nn.Module,
    num_sequences: int,
    seq_len: int,
    *,
    tokenizer=None,
    seed: int = 0,
    batch_size: int = 8,
    temperature: float = 1.0,
    greedy_tokens: int = 4,
    progress: bool = True,
) -> torch.Tensor:
    """Calibration sequences sampled from the model itself (data-free calibration, LLM-QAT).

    As in LLM-QAT (Liu et al. 2023, "data-free quantization-aware training"): the first token of
    each sequence is drawn uniformly from the vocabulary (special tokens excluded), the next
    ``greedy_tokens`` are the model's top-1 choice, and the rest are sampled from its softmax at
    ``temperature``. Special tokens (BOS / EOS / padding and the tokenizer's special ids) are
    never generated, so every sequence is ``seq_len`` tokens of running text. All randomness
    comes from one ``torch.Generator`` seeded with ``seed`` (sampling runs on the CPU), so the same
    seed, batch size, model and machine give the same tokens.

    Args:
        model: a causal LM (``model(input_ids, cache=... or past_key_values=..., use_cache=True)``).
        num_sequences, seq_len: how many sequences of how many tokens (seq_len >= 2).
        tokenizer: its special ids are excluded too (optional).
        seed: sampling seed.
        batch_size: sequences generated together.
        temperature: softmax temperature (> 0).
        greedy_tokens: top-1 tokens after the random first one.
        progress: tqdm bar over generated tokens.

    Returns:
        (num_sequences, seq_len) int64 token ids on the CPU.

    Raises:
        ValueError: non-positive sizes or temperature.
    """
    if num_sequences < 1 or seq_len < 2 or batch_size < 1:
        raise ValueError(f"self-generated calibration needs sizes >= 1 and seq_len >= 2, got {num_sequences} x {seq_len} (batch {batch_size})")
    if not temperature > 0:
        raise ValueError(f"self-generated calibration: temperature must be > 0, got {temperature}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = getattr(head, "out_features", None) or model.config.vocab_size
    banned = sorted(i for i in _special_ids(model, tokenizer) if 0 <= i < vocab)
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[banned] = False
    generator = torch.Generator().manual_seed(int(seed))
    was_training = model.training
    model.eval()
    out = []
    bar = tqdm(total=num_sequences * seq_len, desc="generate calibration", unit="tok", disable=not progress)
    try:
        for start in range(0, num_sequences, batch_size):
            n = min(batch_size, num_sequences - start)
            out.append(_sample_sequences(model, n, seq_len, allowed, generator, temperature, greedy_tokens, bar))
    finally:
        bar.close()
        model.train(was_training)
    return torch.cat(out).long()


def _sample_sequences(model: nn.Module, n: int, seq_len: int, allowed: torch.Tensor, generator: torch.Generator,
                      temperature: float, greedy_tokens: int, bar) -> torch.Tensor:
    """(n, seq_len) token ids of one batch of :func:`generate_calibration`, decoded with the KV cache."""
    device = next(model.parameters()).device
    # transformers 5.x renamed past_key_values to cache (argument and output); accept either.
    cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    allowed_ids = allowed.nonzero().flatten()
    first = allowed_ids[torch.randint(len(allowed_ids), (n,), generator=generator)]
    ids = first[:, None]
    result = model(input_ids=ids.to(device), use_cache=True)
    bar.update(n)
    for step in range(1, seq_len):
        logits = result.logits[:, -1].float().cpu()
        logits[:, ~allowed] = float("-inf")
        if step <= greedy_tokens:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).flatten()
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        bar.update(n)
        if step < seq_len - 1:
            past = result.get("cache", None) if cache_kwarg == "cache" else result.past_key_values
            result = model(input_ids=nxt[:, None].to(device), use_cache=True, **{cache_kwarg: past})
    return ids


SELF_SOURCE = "self"


@dataclass(frozen=True)
class CalibrationSource:
    """One part of a calibration mix.

    Attributes:
        spec: a data source for ``kronlm.data.sources.resolve_source`` (file, alias, hub id), or
            ``"self"`` for sequences generated by the model (:func:`generate_calibration`).
        weight: share of the calibration sequences (relative to the mix's total weight).
    """

    spec: str
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> CalibrationSource:
        """Read ``SPEC`` or ``SPEC=WEIGHT`` (the command line's ``--calibration``).

        Raises:
            ValueError: an empty spec or a weight that is not a positive number (names it).
        """
        spec, sep, weight = str(text).rpartition("=") if "=" in str(text) else (str(text), "", "")
        if not spec:
            raise ValueError(f"calibration source {text!r}: give SPEC or SPEC=WEIGHT")
        if not sep:
            return cls(spec)
        try:
            value = float(weight)
        except ValueError:
            raise ValueError(f"calibration source {text!r}: weight {weight!r} is not a number") from None
        if not value > 0 or value != value or value == float("inf"):
            raise ValueError(f"calibration source {text!r}: weight must be a positive number, got {weight}")
        return cls(spec, value)


def mix_counts(weights: list[float], total: int) -> list[int]:
    """Split ``total`` sequences by ``weights`` (largest remainder: the counts sum to ``total``).

    Raises:
        ValueError: no weights, or a weight that is not positive.
    """
    if not weights or any(not w > 0 for w in weights):
        raise ValueError(f"calibration mix weights must be positive, got {weights}")
    shares = [w / sum(weights) * total for w in weights]
    counts = [int(s) for s in shares]
    for i in sorted(range(len(shares)), key=lambda i: counts[i] - shares[i])[: total - sum(counts)]:
        counts[i] += 1
    return counts


def calibration_mix(
    model: nn.Module,
    tokenizer,
    sources: list[CalibrationSource] | list[str],
    num_sequences: int,
    seq_len: int,
    *,
    seed: int | None = None,
    split: str = "validation",
    data_dir=None,
    text_field: str = "text",
    generation_batch_size: int = 8,
    progress: bool = True,
) -> tuple[torch.Tensor, str]:
    """Calibration token ids drawn from several sources in proportion to their weights.

    Each source gets ``mix_counts`` of the sequences: a data source its blocks from
    :func:`calibration_input_ids` (the first ones, or seeded positions with ``seed``), ``"self"``
    sequences from :func:`generate_calibration` (seed ``seed`` or 0). With more than one source
    the rows are shuffled under the seed (0 when None), so that the first sequences, which the
    sensitivity pass uses, come from every source.

    Args:
        model, tokenizer: the dense model (for ``"self"``) and its tokenizer.
        sources: ``CalibrationSource`` items or their ``SPEC[=WEIGHT]`` strings.
        num_sequences, seq_len: total sequences and tokens per sequence.
        seed: see above.
        split: dataset split of data sources (WikiText: "validation" by default).
        data_dir: folder of local copies of public data (``kronlm.data.sources.data_dir``).
        text_field: column / field of file sources (WikiText aliases always read "text").
        generation_batch_size: sequences generated together for ``"self"``.
        progress: tqdm bars.

    Returns:
        ((num_sequences, seq_len) int64 ids, one line describing where each part came from).

    Raises:
        ValueError: a bad spec or weight, a source whose share rounds to no sequence, a source
            that yields fewer tokens than its share needs (names the source and both numbers),
            or the errors of the data layer (unknown file format, missing split, ...).
    """
    items = [s if isinstance(s, CalibrationSource) else CalibrationSource.parse(s) for s in sources]
    if not items:
        raise ValueError("calibration: give at least one source")
    counts = mix_counts([s.weight for s in items], num_sequences)
    parts, described = [], []
    for index, (item, count) in enumerate(zip(items, counts)):
        if count == 0:
            raise ValueError(
                f"calibration source {item.spec!r} (weight {item.weight:g}) gets 0 of {num_sequences} sequences; raise its weight or the sequence count"
            )
        if item.spec == SELF_SOURCE:
            gen_seed = 0 if seed is None else int(seed)
            parts.append(generate_calibration(model, count, seq_len, tokenizer=tokenizer, seed=gen_seed + index,
                                              batch_size=generation_batch_size, progress=progress))
            described.append(f"{count} generated by the model (seed {gen_seed + index}, LLM-QAT sampling)")
            continue
        field_name = "text" if item.spec in TEXT_ALIASES else text_field
        resolved = resolve_source(item.spec, split=split, data_dir=data_dir, text_field=field_name)
        sub_seed = None if seed is None else int(seed) + index
        # The first blocks need only the beginning of the text; seeded blocks are drawn from all of it.
        text = load_text(resolved) if sub_seed is not None else load_text_for_tokens(resolved, tokenizer, count * seq_len)
        parts.append(calibration_input_ids(tokenizer, text, count, seq_len, sub_seed, source=f"calibration source {item.spec!r}"))
        where = "first blocks" if sub_seed is None else f"blocks drawn with seed {sub_seed}"
        described.append(f"{count} of {resolved.label} ({where})")
    ids = torch.cat(parts)
    if len(parts) > 1:
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        ids = ids[torch.randperm(ids.shape[0], generator=generator)]
    return ids, f"{num_sequences} x {seq_len} tokens: " + "; ".join(described)


def _in_features(module: nn.Module) -> int:
    return dense_weight(module).shape[1]


def collect_calibration(
    model: nn.Module,
    module_names: Iterable[str],
    input_ids: torch.Tensor,
    *,
    batch_size: int = 4,
    input_factors: dict[str, tuple[int, int]] | None = None,
    max_full_dim: int = 8192,
    sensitivity: bool = False,
    progress: bool = True,
) -> dict[str, ModuleCalibration]:
    """Run ``model`` on calibration sequences and collect per-module input statistics.

    Args:
        model: a dense causal LM (``nn.Linear`` / ``Conv1D`` modules to be compressed).
        module_names: names of the modules to calibrate.
        input_ids: (num_sequences, seq_len) token ids, e.g. from ``calibration_input_ids``.
        batch_size: sequences per forward pass.
        input_factors: {name: (n1, n2)} planned input-side factor sizes; used only for modules
            wider than ``max_full_dim``, which then keep partial traces instead of C.
        max_full_dim: widest input whose full (in, in) second moment is kept.
        sensitivity: also run a backward pass and record output-gradient energy (see module
            docstring); costs about twice the forward time and the activations' memory.
        progress: tqdm bar over batches.

    Returns:
        {module name: ``ModuleCalibration``}.

    Raises:
        ValueError: an unknown module name, a module that is not Linear/Conv1D, a wide module
            without ``input_factors``, or ``input_ids`` that is not 2-D.
    """
    names = list(module_names)
    if input_ids.dim() != 2:
        raise ValueError(f"calibration input_ids must be (num_sequences, seq_len), got shape {tuple(input_ids.shape)}")
    recorder = StatisticsRecorder(calibration_modules(model, names, input_factors, max_full_dim), input_factors, max_full_dim)
    handles, frozen = recorder.attach(model, sensitivity)
    was_training = model.training
    model.eval()
    try:
        tokens = _calibration_passes(model, input_ids, batch_size, sensitivity, progress, recorder)
    finally:
        for handle in handles:
            handle.remove()
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    results = recorder.results
    missing = [name for name in names if name not in results]
    if missing:
        raise ValueError(f"calibration: module {missing[0]} was never called in the forward pass")
    if sensitivity:
        for name, entry in results.items():
            entry.grad_sq = recorder.grad_sums[name] / max(tokens, 1) / entry.out_features
    return results


def calibration_modules(model: nn.Module, names: list[str], input_factors: dict[str, tuple[int, int]] | None,
                        max_full_dim: int) -> dict[str, nn.Module]:
    """{name: module} of the modules to calibrate.

    Raises:
        ValueError: an unknown name, a module that is not Linear/Conv1D, or a module wider than
            ``max_full_dim`` without input factors.
    """
    modules: dict[str, nn.Module] = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"calibration: the model has no module {name!r}") from None
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise ValueError(f"calibration: {name} is a {type(module).__name__}; only Linear and Conv1D inputs are collected")
        if _in_features(module) > max_full_dim and (input_factors or {}).get(name) is None:
            raise ValueError(
                f"calibration: {name} has {_in_features(module)} inputs, more than max_full_dim={max_full_dim}; give its input factors (n1, n2)"
            )
        modules[name] = module
    return modules


class StatisticsRecorder:
    """The hooks of :func:`collect_calibration`: a forward pre-hook per module accumulates its
    input statistics (modules reading the same input tensor in a pass share one accumulator), and
    with sensitivity an output hook sums the squared output gradients per module.

    Attributes:
        results: {module name: ``ModuleCalibration``}, filled as modules are first called.
        grad_sums: {module name: Σ ||∂L/∂y_t||²} over the batches seen.
    """

    def __init__(self, modules: dict[str, nn.Module], input_factors: dict[str, tuple[int, int]] | None, max_full_dim: int):
        self.modules, self.input_factors, self.max_full_dim = modules, input_factors, max_full_dim
        self.results: dict[str, ModuleCalibration] = {}
        self.shared: dict[int, tuple[weakref.ref, InputStatistics]] = {}
        self.updated: set[int] = set()
        self.grad_sums = {name: 0.0 for name in modules}

    def new_batch(self) -> None:
        """Forget which inputs this batch has seen (an accumulator is updated once per batch)."""
        self.updated.clear()
        self.shared.clear()

    def pre_hook(self, name: str):
        def hook(module, args):
            x = args[0]
            entry = self.results.get(name)
            if entry is None:
                seen = self.shared.get(id(x))
                stats = seen[1] if seen is not None and seen[0]() is x else InputStatistics(_in_features(module))
                self.shared[id(x)] = (weakref.ref(x), stats)
                entry = self.results[name] = ModuleCalibration(inputs=stats, out_features=dense_weight(module).shape[0])
            if id(entry.inputs) in self.updated:
                return
            self.updated.add(id(entry.inputs))
            wide = entry.inputs.in_features > self.max_full_dim
            entry.inputs.add(x, self.input_factors[name] if wide else None)

        return hook

    def output_hook(self, name: str):
        def hook(module, args, output):
            if output.requires_grad:
                def grad_hook(grad):
                    self.grad_sums[name] += grad.detach().double().square().sum().item()

                output.register_hook(grad_hook)

        return hook

    def attach(self, model: nn.Module, sensitivity: bool) -> tuple[list, list[nn.Parameter]]:
        """Register the hooks; with sensitivity, freeze the parameters (gradients flow from the
        embedding output instead). Returns (hook handles, the parameters frozen here)."""
        handles = []
        for name, module in self.modules.items():
            handles.append(module.register_forward_pre_hook(self.pre_hook(name)))
            if sensitivity:
                handles.append(module.register_forward_hook(self.output_hook(name)))
        frozen = []
        if sensitivity:
            handles.append(model.get_input_embeddings().register_forward_hook(lambda module, args, output: output.requires_grad_()))
            frozen = [p for p in model.parameters() if p.requires_grad]
            for p in frozen:
                p.requires_grad_(False)
        return handles, frozen


def _calibration_passes(model: nn.Module, input_ids: torch.Tensor, batch_size: int, sensitivity: bool, progress: bool,
                        recorder: StatisticsRecorder) -> int:
    """Run the batches (forward, and backward of the summed token NLL with ``sensitivity``);
    returns the tokens seen."""
    device = next(model.parameters()).device
    tokens = 0
    for batch in tqdm(input_ids.split(batch_size), desc="calibrate", unit="batch", disable=not progress):
        batch = batch.to(device)
        recorder.new_batch()
        if sensitivity:
            with torch.enable_grad():
                logits = model(input_ids=batch).logits
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
                )
                loss.backward()
            del logits, loss
        else:
            with torch.no_grad():
                model(input_ids=batch)
        tokens += batch.numel()
    return tokens


def save_calibration(calibration: dict[str, ModuleCalibration], path, metadata: dict[str, str] | None = None) -> None:
    """Write calibration results to one safetensors file, atomically.

    Keys per module: ``<name>.cov`` (in, in) or ``<name>.p1`` / ``<name>.p2``, ``<name>.tokens``,
    ``<name>.out`` and, when collected, ``<name>.grad_sq``; ``metadata`` (str -> str) goes into the
    safetensors header, e.g. how the calibration text was chosen.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in calibration.items():
        stats = entry.inputs
        if stats.moment_sum is not None:
            tensors[f"{name}.cov"] = stats.covariance().contiguous()
        else:
            p1, p2 = stats.partial_traces()
            tensors[f"{name}.p1"], tensors[f"{name}.p2"] = p1.contiguous(), p2.contiguous()
        tensors[f"{name}.tokens"] = torch.tensor([stats.tokens])
        tensors[f"{name}.out"] = torch.tensor([entry.out_features])
        if entry.grad_sq is not None:
            tensors[f"{name}.grad_sq"] = torch.tensor([entry.grad_sq], dtype=torch.float64)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))


def load_calibration(path, metadata: dict[str, str] | None = None) -> dict[str, ModuleCalibration]:
    """Read what ``save_calibration`` wrote (statistics are returned normalised: tokens = 1).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file, or its header metadata differs from ``metadata``
            (both are named in the message).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path}: not found")
    try:
        with safe_open(str(path), "pt") as fh:
            stored = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except SafetensorError as exc:
        raise ValueError(f"calibration file {path}: not a readable safetensors file ({exc})") from None
    if metadata is not None and stored != metadata:
        raise ValueError(f"calibration file {path} was made with {stored}, not {metadata}")
    out: dict[str, ModuleCalibration] = {}
    for key, out_features in tensors.items():
        if not key.endswith(".out"):
            continue
        name = key[: -len(".out")]
        if f"{name}.cov" in tensors:
            cov = tensors[f"{name}.cov"]
            stats = InputStatistics(cov.shape[0], tokens=1, moment_sum=cov)
        else:
            p1, p2 = tensors[f"{name}.p1"], tensors[f"{name}.p2"]
            stats = InputStatistics(p1.shape[0] * p2.shape[0], tokens=1, p1_sum=p1, p2_sum=p2)
        grad = tensors.get(f"{name}.grad_sq")
        out[name] = ModuleCalibration(inputs=stats, out_features=int(out_features.item()), grad_sq=None if grad is None else grad.item())
    return out


__all__ = [
    "DEFAULT_CALIBRATION_LENGTH",
    "DEFAULT_CALIBRATION_SEQUENCES",
    "SELF_SOURCE",
    "CalibrationSource",
    "StatisticsRecorder",
    "InputStatistics",
    "ModuleCalibration",
    "calibration_input_ids",
    "calibration_mix",
    "calibration_modules",
    "collect_calibration",
    "generate_calibration",
    "load_calibration",
    "mix_counts",
    "save_calibration",
]
