"""Sequential calibration: each block's input statistics from the partially compressed model.

Collecting every module's input statistics from the dense model (``collect_calibration``) fits
each module as if all the others were exact. They are not: by block 20 the inputs of a compressed
model have drifted from the dense ones, and a factorisation fitted to the dense inputs is fitted
to the wrong distribution. GPTQ (Frantar et al. 2023) therefore quantises block by block and
collects block b's inputs from the model whose blocks before b are already quantised.

:class:`SequentialCalibration` does the same for ``compress``: it is passed as the
``statistics`` of :func:`kronlm.compression.compress_modules` (a mapping of module names to
statistics, filled lazily), which asks it for the modules in model order, after replacing every
earlier module. On the first request for a module of block b it

1. runs block b (still dense) on the dense model's hidden states and records each chosen module's
   input x (and the block output, the dense stream's next state);
2. runs block b (still dense) on the partially compressed model's hidden states and accumulates,
   per chosen module, C̃ = E[x̃ x̃ᵀ] and, with ``target="output"``, S = E[x x̃ᵀ];
3. hands out ``ModuleCalibration(inputs=C̃, cross_moment=S)``; the activation-aware fits then fit
   ``corrected_target`` W (S + δI)(C̃ + δI)⁻¹ under C̃, which minimises E||W x - Ŵ x̃||², the error
   against the dense model's output (``target="weight"`` hands out C̃ alone: GPTQ's objective
   E||(W - Ŵ) x̃||²).

When a later block is requested, the compressed stream first runs through block b, now holding
its compressed modules. Each block runs three times per calibration batch in all (dense stream,
compressed stream before and after), so the whole pass costs about three forward passes of the
model; the two streams' hidden states (2 · tokens · hidden floats) are held in memory.

Blocks are the children of the ``nn.ModuleList`` that holds the modules (``model.layers``,
``transformer.h``); they are re-run with the positional and keyword arguments the model passed
them (attention mask, position embeddings), recorded in one dense forward pass. Modules outside
that list get statistics from the dense model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from kronlm.compression.calibration import (
    InputStatistics,
    ModuleCalibration,
    collect_calibration,
)
from kronlm.layers import dense_weight

TARGETS = ("output", "weight")
_BLOCK = re.compile(r"^(?P<list>.*?)\.?(?P<index>\d+)(?:\.|$)")


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early."""


def block_of(name: str) -> tuple[str, int] | None:
    """(ModuleList name, block index) of a module name: the part before its first all-digit
    component and that number (``model.layers.3.mlp.up_proj`` -> ("model.layers", 3)), or None."""
    match = _BLOCK.match(name)
    if match is None:
        return None
    return match.group("list"), int(match.group("index"))


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class SequentialCalibration(Mapping):
    """Per-module input statistics from the partially compressed model (module docstring).

    Use as ``compress(model, config, statistics=SequentialCalibration(model, names, ids))``; the
    model must be the one ``compress`` is changing, still dense when this object is made. It is a
    read-only mapping {module name: ``ModuleCalibration``} over ``module_names`` whose entries are
    collected when first asked for, so they must be asked for in model order.

    Args:
        model: the dense model.
        module_names: the modules that will be compressed (model order).
        input_ids: (num_sequences, seq_len) calibration token ids.
        batch_size: sequences per forward pass.
        target: "output" (fit to the dense model's outputs: hands out the cross moment too) or
            "weight" (GPTQ: fit W under the compressed model's input statistics).
        progress: tqdm bar over blocks.

    Raises:
        ValueError: an unknown ``target``, ``input_ids`` that is not 2-D, a module name the model
            does not have, or modules spread over more than one ``nn.ModuleList``.
    """

    def __init__(
        self,
        model: nn.Module,
        module_names: Iterable[str],
        input_ids: torch.Tensor,
        *,
        batch_size: int = 4,
        target: str = "output",
        progress: bool = True,
    ) -> None:
        if target not in TARGETS:
            raise ValueError(f"sequential calibration: target must be one of {', '.join(TARGETS)}, got {target!r}")
        if input_ids.dim() != 2:
            raise ValueError(f"calibration input_ids must be (num_sequences, seq_len), got shape {tuple(input_ids.shape)}")
        self.model, self.target, self.progress = model, target, progress
        names = list(module_names)
        self.names = names
        lists = {}
        outside = []
        for name in names:
            try:
                model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"sequential calibration: the model has no module {name!r}") from None
            where = block_of(name)
            parent = model.get_submodule(where[0]) if where is not None and where[0] else None
            if isinstance(parent, nn.ModuleList):
                lists.setdefault(where[0], []).append(name)
            else:
                outside.append(name)
        if len(lists) > 1:
            raise ValueError(f"sequential calibration: modules sit in {len(lists)} block lists ({', '.join(sorted(lists))}); expected one")
        self.list_name = next(iter(lists), None)
        self.blocks: nn.ModuleList | None = model.get_submodule(self.list_name) if self.list_name else None
        self.by_block: dict[int, list[str]] = {}
        for name in lists.get(self.list_name, []):
            self.by_block.setdefault(block_of(name)[1], []).append(name)
        self.dense_stats: dict[str, ModuleCalibration] = (
            collect_calibration(model, outside, input_ids, batch_size=batch_size, progress=False) if outside else {}
        )
        self.stats: dict[str, ModuleCalibration] = {}
        self.next_block = 0  # blocks below this one: both streams have passed them
        self.pending: int | None = None  # block whose statistics are out, compressed stream not yet through it
        self.bar = tqdm(total=len(self.blocks) if self.blocks is not None else 0, desc="sequential calibration", unit="block", disable=not progress)
        self.dense_h: list[torch.Tensor] = []
        self.comp_h: list[torch.Tensor] = []
        self.call_args: list[list[tuple[tuple, dict]]] = []
        if self.blocks is not None:
            self._capture(input_ids, batch_size)

    def __bool__(self) -> bool:
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        # Without collecting anything: Mapping's default would ask for the statistics.
        return name in self.names

    def __getitem__(self, name: str) -> ModuleCalibration:
        stats = self.get(name)
        if stats is None:
            raise KeyError(name)
        return stats

    @torch.no_grad()
    def _capture(self, input_ids: torch.Tensor, batch_size: int) -> None:
        """One dense forward per batch: block 0's input and every block's other arguments."""
        records: list[tuple[tuple, dict]] = []

        def hook(index: int):
            def pre(module, args, kwargs):
                records.append((args[1:], dict(kwargs)))
                if index == 0:
                    self.dense_h.append(args[0].detach() if args else kwargs["hidden_states"].detach())
                if index == len(self.blocks) - 1:
                    raise _StopForward
            return pre

        handles = [block.register_forward_pre_hook(hook(i), with_kwargs=True) for i, block in enumerate(self.blocks)]
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        try:
            for batch in input_ids.split(batch_size):
                records.clear()
                try:
                    self.model(input_ids=batch.to(device), use_cache=False)
                except _StopForward:
                    pass
                self.call_args.append(list(records))
        finally:
            for handle in handles:
                handle.remove()
            self.model.train(was_training)
        for per_batch in self.call_args:
            for args, kwargs in per_batch:
                kwargs.pop("hidden_states", None)
        self.comp_h = [h.clone() for h in self.dense_h]

    def _run(self, index: int, hidden: torch.Tensor, batch: int) -> torch.Tensor:
        args, kwargs = self.call_args[batch][index]
        return _first(self.blocks[index](hidden, *args, **kwargs))

    @torch.no_grad()
    def _advance(self, index: int) -> None:
        """Pass the compressed stream through block ``index`` (now compressed)."""
        self.comp_h = [self._run(index, h, b) for b, h in enumerate(self.comp_h)]

    @torch.no_grad()
    def _collect(self, index: int) -> None:
        """Statistics of block ``index``'s chosen modules; the dense stream moves past it."""
        if self.pending is not None:  # the block before, compressed since its statistics went out
            self._advance(self.pending)
            self.pending = None
        names = self.by_block.get(index, [])
        modules = {name: self.model.get_submodule(name) for name in names}
        dense_inputs: dict[str, torch.Tensor] = {}
        stats: dict[str, InputStatistics] = {}
        cross: dict[str, torch.Tensor] = {}
        phase = {"dense": True}

        def hook(name: str):
            def pre(module, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                if phase["dense"]:
                    dense_inputs[name] = x
                    return
                entry = stats.setdefault(name, InputStatistics(x.shape[-1]))
                entry.add(x, None)
                if self.target == "output":
                    s = (dense_inputs[name].float().mT @ x.float()).double().cpu()
                    cross[name] = s if name not in cross else cross[name] + s
            return pre

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
        was_training = self.model.training
        self.model.eval()
        try:
            for b in range(len(self.dense_h)):
                phase["dense"] = True
                dense_out = self._run(index, self.dense_h[b], b)
                if names:
                    phase["dense"] = False
                    self._run(index, self.comp_h[b], b)
                self.dense_h[b] = dense_out
                dense_inputs.clear()
        finally:
            for handle in handles:
                handle.remove()
            self.model.train(was_training)
        for name in names:
            entry = stats[name]
            moment = None if self.target != "output" else cross[name] / max(entry.tokens, 1)
            self.stats[name] = ModuleCalibration(inputs=entry, out_features=dense_weight(modules[name]).shape[0], cross_moment=moment)
        if not names:  # nothing to compress here: the compressed stream passes the dense block too
            self._advance(index)
        else:
            self.pending = index
        self.next_block = index + 1
        self.bar.update(1)

    def get(self, name: str, default=None) -> ModuleCalibration | None:
        """The statistics of ``name``, collecting its block first (see the module docstring).

        Must be asked in model order, after every module of earlier blocks has been replaced.

        Raises:
            ValueError: a module of a block already passed that was not calibrated.
        """
        if name in self.dense_stats:
            return self.dense_stats[name]
        where = block_of(name)
        if self.blocks is None or where is None or where[0] != self.list_name:
            return default
        index = where[1]
        if name not in self.stats:
            if index < self.next_block:
                raise ValueError(f"sequential calibration: {name} was not among the modules given, and block {index} is already passed")
            for skipped in range(self.next_block, index + 1):
                self._collect(skipped)
        if index == len(self.blocks) - 1 and self.bar is not None:
            self.bar.close()
        return self.stats.get(name, default)


__all__ = ["TARGETS", "SequentialCalibration", "block_of"]
