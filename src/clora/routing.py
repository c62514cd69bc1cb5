"""Per-sample LoRA selection: every sample of one UNet batch runs with its own adapters and weights.

peft's mixed-batch inference (``adapter_names=``) gives each sample one adapter; a CLoRA branch needs a
set (its concept LoRA plus every style LoRA, each with a weight). ``LoraRouter`` does that with forward
hooks on peft's LoRA layers while the adapters themselves are switched off (diffusers' ``disable_lora``),
so each layer computes its base output once for the whole batch and each hook adds

    weight * scaling * lora_B(lora_A(dropout(x)))

for every adapter on the contiguous rows of the batch that use it. ``scaling`` is the adapter's own
``lora_alpha / r``, the same value ``set_adapters(..., weight)`` multiplies by ``weight``.

LyCORIS adapters (``lycoris_adapters``) have their own hook on each of their layers; the router
hands those layers its row ranges and keeps their dense deltas for the composition.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from .errors import CLoRAError
from .lycoris_adapters import LycorisLayer, addable, lycoris_layer

SampleAdapters = Mapping[str, float]
"""One sample's adapters: adapter name -> weight."""

RowGroups = list[tuple[str, list[tuple[int, int, float]]]]
"""Per adapter, the row ranges [start, stop) of the batch that use it and their weight."""


def row_groups(samples: Sequence[SampleAdapters]) -> RowGroups:
    """Group a batch's per-sample adapter weights into contiguous row ranges per adapter.

    >>> row_groups([{"cat": 1.0}, {"cat": 1.0}, {"dog": 0.5}])
    [('cat', [(0, 2, 1.0)]), ('dog', [(2, 3, 0.5)])]
    """
    groups: dict[str, list[tuple[int, int, float]]] = {}
    for row, adapters in enumerate(samples):
        for name, weight in adapters.items():
            if weight == 0:
                continue
            ranges = groups.setdefault(name, [])
            if ranges and ranges[-1][1] == row and ranges[-1][2] == weight:
                ranges[-1] = (ranges[-1][0], row + 1, weight)
            else:
                ranges.append((row, row + 1, weight))
    return list(groups.items())


class LoraRouter:
    """Per-sample adapters for a fixed set of peft LoRA layers (from ``lora_layers``).

    ``with router.installed():`` hooks the layers once, for a whole composition; inside it, each UNet
    call runs ``with router.routing(groups):`` with the batch's ``row_groups`` (which a runner
    computes once per chunk, not per call). Outside a ``routing`` block the hooks add nothing. The
    caller switches the adapters' own computation off first (``disable_lora``). Each layer's adapter
    modules and scales are looked up once, when the hooks are installed. LyCORIS layers (``LycorisLayer``)
    read the router's row ranges through their own hook while installed.
    """

    def __init__(self, layers: Sequence[torch.nn.Module | LycorisLayer]) -> None:
        self.layers = list(layers)
        self.groups: RowGroups = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[LoraRouter]:
        with contextlib.ExitStack() as stack:
            for layer in self.layers:
                if isinstance(layer, LycorisLayer):
                    stack.enter_context(layer.caching())
                    layer.router = self
                    stack.callback(setattr, layer, "router", None)
                else:
                    stack.callback(layer.register_forward_hook(self._hook_for(layer)).remove)
            try:
                yield self
            finally:
                self.groups = []

    @contextlib.contextmanager
    def routing(self, groups: RowGroups) -> Iterator[None]:
        previous, self.groups = self.groups, groups
        try:
            yield
        finally:
            self.groups = previous

    def _hook_for(self, module: torch.nn.Module) -> Callable[..., torch.Tensor]:
        parts = {}
        for name in module.lora_A:
            dropout = module.lora_dropout[name]
            dropout = None if isinstance(dropout, torch.nn.Identity) else dropout
            parts[name] = (module.lora_A[name], module.lora_B[name], dropout, base_scaling(module, name))

        def hook(_module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            if self.groups:
                output = addable(output)
            for name, ranges in self.groups:
                if name not in parts:
                    continue
                lora_A, lora_B, dropout, scaling = parts[name]
                for start, stop, weight in ranges:
                    rows = x[start:stop]
                    if rows.dtype != lora_A.weight.dtype:
                        rows = rows.to(lora_A.weight.dtype)
                    if dropout is not None:
                        rows = dropout(rows)
                    # the adapter weight rides in the add's scale: no separate multiply per range
                    output[start:stop].add_(lora_B(lora_A(rows)), alpha=scaling * weight)
            return output

        return hook


def base_scaling(module: torch.nn.Module, name: str) -> float:
    """``lora_alpha / r`` (``/ sqrt(r)`` for rank-stabilised LoRA): the scale at adapter weight 1."""
    rank = module.r[name]
    return module.lora_alpha[name] / (math.sqrt(rank) if module.use_rslora.get(name, False) else rank)


def lora_layers(model: torch.nn.Module, adapters: Sequence[str]) -> list[torch.nn.Module | LycorisLayer]:
    """The peft LoRA layers and the LyCORIS layers of ``model`` that carry any of ``adapters``."""
    wanted = set(adapters)
    layers = []
    for module in model.modules():
        lycoris = lycoris_layer(module)
        if lycoris is not None and wanted & lycoris.updates.keys():
            layers.append(lycoris)
        names = set(getattr(module, "lora_A", {}) or {})
        if names & wanted:
            if names & wanted & lora_variants(module):
                raise CLoRAError(
                    "a diffusers/peft-format LoRA file uses DoRA (weight-decomposed LoRA), which the batched engine "
                    "cannot route per sample yet; use engine: sequential (kohya/LyCORIS DoRA files work in both)"
                )
            layers.append(module)
    return layers


def lora_variants(module: torch.nn.Module) -> set[str]:
    """The adapters of a peft layer that are not plain LoRA (DoRA, ...). peft marks DoRA in
    ``use_dora`` (every version) and, since 0.15, every variant in ``lora_variant`` too."""
    dora = {name for name, on in (getattr(module, "use_dora", None) or {}).items() if on}
    return dora | set(getattr(module, "lora_variant", None) or {})
