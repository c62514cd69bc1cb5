"""LyCORIS adapters in a pipeline: a file read onto its layers, and the forward hook that adds them.

Each layer a LyCORIS file touches (a ``Linear``, ``Conv2d``, ``GroupNorm`` or ``LayerNorm`` of the
denoiser or a text encoder) gets one :class:`LycorisLayer`: a forward hook that adds, for each adapter,

    weight * layer_op(x, delta)    (F.linear / F.conv2d with the layer's stride and padding / the norm)

to the layer's output; the base weights are never changed. Which adapters and weights apply is
either the pipeline's active set (``lora.activate_adapters``: the text encoders, the sequential
engine, ``merge``) or, while a ``routing.LoraRouter`` routes the batch, its row ranges (the batched
engine, one weight per sample). Everything is linear in the weight, DoRA included (see
``lycoris.dora_delta``), so a sample's adapters add up row by row.

The dense ``delta`` of a layer is built from the file's factors when first used and kept while a
router has the layer installed (one composition), so a LoHa or LoKr is rebuilt once per call, not
once per sample or step.

A file layer can be several modules of the model (Flux's BFL names: ``img_attn_qkv`` is diffusers'
``to_q``, ``to_k`` and ``to_v``; ``kohya_names.Fused``): its update is built for the stacked weight,
DoRA's norms over the stacked weight too, and each module adds its own rows of it.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .errors import CLoRAError
from .kohya_names import Fused, KohyaResolver
from .lycoris import KNOWN_KINDS, LayerUpdate, dora_delta, read_layer, split_key

ROUTABLE = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)


@dataclass
class LycorisAdapters:
    """A pipeline's LyCORIS adapters: the active set its layers share, and each adapter's layer counts."""

    active: dict[str, float] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # adapter -> component -> layers

    def layer_for(self, module: torch.nn.Module) -> LycorisLayer:
        """The module's ``LycorisLayer`` (kept on the module as ``_clora_lycoris``), made on first use."""
        layer = lycoris_layer(module)
        if layer is None:
            layer = LycorisLayer(module, self.active)
            module.__dict__["_clora_lycoris"] = layer
        return layer


def lycoris_layer(module: torch.nn.Module) -> LycorisLayer | None:
    """The ``LycorisLayer`` of a module that any LyCORIS adapter touches, else None."""
    return module.__dict__.get("_clora_lycoris")


def adapters_of(pipe: Any) -> LycorisAdapters:
    """The pipeline's LyCORIS adapters (created empty on first use)."""
    adapters = pipe.__dict__.get("_clora_lycoris")
    if adapters is None:
        adapters = pipe.__dict__["_clora_lycoris"] = LycorisAdapters()
    return adapters


class LycorisLayer:
    """One layer's LyCORIS adapters and the forward hook that adds them (installed for good)."""

    def __init__(self, module: torch.nn.Module, active: Mapping[str, float]) -> None:
        self.module = module
        self.active = active
        self.updates: dict[str, LayerUpdate] = {}
        self.fused: dict[str, Fused] = {}  # adapters whose file layer is several modules, this one among them
        self.router: Any = None  # a routing.LoraRouter while it has this layer installed
        self._cache: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] | None = None
        module.register_forward_hook(self._hook)

    @contextlib.contextmanager
    def caching(self) -> Iterator[None]:
        """Keep the dense deltas built inside this block (one composition)."""
        self._cache = {}
        try:
            yield
        finally:
            self._cache = None

    def weights(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Adapter ``name``'s (weight delta, bias delta) at weight 1, in the layer's dtype and device."""
        if self._cache is not None and name in self._cache:
            return self._cache[name]
        update, weight, fused = self.updates[name], self.module.weight, self.fused.get(name)
        delta = update.delta(weight.shape if fused is None else fused.shape)
        if delta is not None:
            delta = delta.to(weight.device)
            if update.dora_scale is not None:
                base = weight if fused is None else fused.weight()
                delta = dora_delta(base.detach(), delta, update.dora_scale.to(weight.device))
            delta = (delta if fused is None else fused.rows_of(self.module, delta)).to(weight.dtype)
        bias = update.bias_delta
        if bias is not None:
            bias = (bias if fused is None else fused.rows_of(self.module, bias)).to(weight.device, weight.dtype)
        if self._cache is not None:
            self._cache[name] = (delta, bias)
        return delta, bias

    def output(self, name: str, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The adapter's change of the layer's output (shaped as ``like``) for input ``x``, at weight 1."""
        delta, bias = self.weights(name)
        module, out = self.module, None
        x = x.to(module.weight.dtype)
        if delta is not None:
            if isinstance(module, torch.nn.Linear):
                out = F.linear(x, delta)
            elif isinstance(module, torch.nn.Conv2d):
                out = F.conv2d(x, delta, None, module.stride, module.padding, module.dilation, module.groups)
            elif isinstance(module, torch.nn.GroupNorm):  # the normalised input times the update
                out = F.group_norm(x, module.num_groups, delta, None, module.eps)
            else:
                out = F.layer_norm(x, module.normalized_shape, delta, None, module.eps)
        if bias is not None:
            if isinstance(module, (torch.nn.Conv2d, torch.nn.GroupNorm)):  # channels first
                bias = bias.view(-1, *[1] * (like.ndim - 2))
            out = bias.expand_as(like) if out is None else out + bias
        return out.to(like.dtype)

    def _hook(self, _module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        groups = self.router.groups if self.router is not None else None
        if groups or any(self.active.values()):
            output = addable(output)
        if groups:
            for name, ranges in groups:
                if name in self.updates:
                    for start, stop, weight in ranges:
                        rows = output[start:stop]
                        rows.add_(self.output(name, x[start:stop], rows), alpha=weight)
        else:
            for name, weight in self.active.items():
                if weight and name in self.updates:
                    output.add_(self.output(name, x, output), alpha=weight)
        return output


def addable(output: torch.Tensor) -> torch.Tensor:
    """``output``, or a copy of it where autograd refuses an in-place add: the output of a custom autograd
    Function (bitsandbytes' 4-bit matmul) is a view that takes no ``add_`` in a gradient pass. Every
    hook that adds an adapter's update to a layer's output (here and ``routing``) goes through it."""
    if isinstance(output.grad_fn, torch.autograd.function.BackwardCFunction):
        return output.clone()
    return output


def load_lycoris(pipe: Any, state_dict: Mapping[str, torch.Tensor], path: Any, name: str) -> dict[str, int]:
    """Put a LyCORIS file's layers on the pipeline as adapter ``name``; returns its layers per component.

    Every key must be applied: a key of an unknown kind, a layer the model lacks, or keys a layer's
    format leaves over fail the whole file with one line (nothing is attached)."""
    resolver = KohyaResolver(pipe)
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        layer, kind = split_key(key)
        by_layer.setdefault(layer, {})[kind] = tensor
    unknown, missing, leftover = Counter(), Counter(), Counter()
    examples: dict[str, str] = {}
    planned = []
    for layer, tensors in by_layer.items():
        strange = set(tensors) - KNOWN_KINDS
        if strange:
            unknown.update(strange)
            examples.setdefault("unknown", f"{layer}.{min(strange)}")
            continue
        found = resolver.resolve(layer)
        if found is None or not all(isinstance(module, ROUTABLE) for module in _modules(found[1])):
            missing.update(tensors.keys())
            examples.setdefault("missing", layer)
            continue
        component, target = found
        update, used = read_layer(tensors)
        if update is not None:
            try:
                _check_shapes(update, target)
            except ValueError as exc:
                raise CLoRAError(
                    f"{path}: layer {layer}: {exc}; was this LoRA trained for another base model?"
                ) from None
            planned.append((component, target, update))
        if set(tensors) - used:
            leftover.update(set(tensors) - used)
            examples.setdefault("leftover", layer)
    total = len(state_dict)
    for counter, why, example in (
        (unknown, "are of kinds clora does not read", "unknown"),
        (missing, "name layers this model does not have", "missing"),
        (leftover, "are incomplete for any format", "leftover"),
    ):
        if counter:
            kinds = ", ".join(sorted(counter))
            raise CLoRAError(
                f"{path}: {sum(counter.values())} of {total} keys {why} ({kinds}; e.g. {examples[example]}); "
                "clora applies a LoRA file whole or not at all"
            )
    adapters = adapters_of(pipe)
    counts: Counter[str] = Counter()
    for component, target, update in planned:
        for module in _modules(target):
            layer = adapters.layer_for(module)
            layer.updates[name] = update
            if isinstance(target, Fused):
                layer.fused[name] = target
        counts[component] += 1
    adapters.counts[name] = dict(counts)
    return adapters.counts[name]


def _modules(target: torch.nn.Module | Fused) -> tuple[torch.nn.Module, ...]:
    return target.modules if isinstance(target, Fused) else (target,)


def _check_shapes(update: LayerUpdate, target: torch.nn.Module | Fused) -> None:
    shape = target.shape if isinstance(target, Fused) else target.weight.shape
    update.delta(shape)  # raises ValueError when the factors do not make the weight's shape
    bias = update.bias_delta
    if bias is not None and bias.numel() != shape[0]:
        raise ValueError(f"its bias update has {bias.numel()} entries, the layer {shape[0]}")
