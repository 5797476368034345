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
(``kronlm.compress.budget``) trades against parameters.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from kronlm.layers import dense_weight, is_conv1d
from kronlm.utils.io import atomic_path


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
    """

    inputs: InputStatistics
    out_features: int
    grad_sq: float | None = None


def calibration_input_ids(tokenizer, text: str, num_sequences: int, seq_len: int) -> torch.Tensor:
    """Cut the tokenised text into ``num_sequences`` consecutive, disjoint blocks of ``seq_len`` tokens.

    Returns:
        (num_sequences, seq_len) int64 token ids, from the start of the text (deterministic).

    Raises:
        ValueError: non-positive sizes, or a text with fewer than num_sequences·seq_len tokens
            (the message gives both numbers).
    """
    if num_sequences < 1 or seq_len < 2:
        raise ValueError(f"calibration needs at least 1 sequence of at least 2 tokens, got {num_sequences} x {seq_len}")
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    need = num_sequences * seq_len
    if ids.numel() < need:
        raise ValueError(
            f"calibration text has {ids.numel():,} tokens, fewer than the {num_sequences} x {seq_len} = {need:,} asked for"
        )
    return ids[:need].reshape(num_sequences, seq_len).clone()


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

    results: dict[str, ModuleCalibration] = {}
    shared: dict[int, tuple[weakref.ref, InputStatistics]] = {}
    updated: set[int] = set()
    grad_sums = {name: 0.0 for name in names}
    handles = []

    def pre_hook(name: str):
        def hook(module, args):
            x = args[0]
            entry = results.get(name)
            if entry is None:
                seen = shared.get(id(x))
                stats = seen[1] if seen is not None and seen[0]() is x else InputStatistics(_in_features(module))
                shared[id(x)] = (weakref.ref(x), stats)
                entry = results[name] = ModuleCalibration(inputs=stats, out_features=dense_weight(module).shape[0])
            if id(entry.inputs) in updated:
                return
            updated.add(id(entry.inputs))
            wide = entry.inputs.in_features > max_full_dim
            entry.inputs.add(x, input_factors[name] if wide else None)

        return hook

    def output_hook(name: str):
        def hook(module, args, output):
            if output.requires_grad:
                def grad_hook(grad):
                    grad_sums[name] += grad.detach().double().square().sum().item()

                output.register_hook(grad_hook)

        return hook

    def embedding_hook(module, args, output):
        return output.requires_grad_()

    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(pre_hook(name)))
        if sensitivity:
            handles.append(module.register_forward_hook(output_hook(name)))
    frozen = []
    if sensitivity:
        handles.append(model.get_input_embeddings().register_forward_hook(embedding_hook))
        frozen = [p for p in model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tokens = 0
    try:
        batches = input_ids.split(batch_size)
        for batch in tqdm(batches, desc="calibrate", unit="batch", disable=not progress):
            batch = batch.to(device)
            updated.clear()
            shared.clear()
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
    finally:
        for handle in handles:
            handle.remove()
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    missing = [name for name in names if name not in results]
    if missing:
        raise ValueError(f"calibration: module {missing[0]} was never called in the forward pass")
    if sensitivity:
        for name, entry in results.items():
            entry.grad_sq = grad_sums[name] / max(tokens, 1) / entry.out_features
    return results


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
    "InputStatistics",
    "ModuleCalibration",
    "calibration_input_ids",
    "collect_calibration",
    "load_calibration",
    "save_calibration",
]
