"""kohya layer names (``lora_unet_down_blocks_0_..._to_q``, ``lora_te1_text_model_...``) -> modules of a pipeline.

The names are module paths with ``.`` written as ``_``; which model a name belongs to is its prefix
(:data:`KOHYA_PREFIXES`, one row per prefix, so a family adds its rows). A name is looked up in a table
made from the model's own module paths, so the lossy ``_`` needs no parsing. Variants of the path are
tried as well: the text encoders' ``text_model.`` level (files from transformers 4 carry it,
transformers 5's ``CLIPTextModel`` has none), for the UNet the original SGM block numbering that
sd-scripts writes for SDXL (``input_blocks_4_1_...`` -> ``down_blocks_1_attentions_0_...``) and, for
Flux's transformer, the original BFL names sd-scripts writes (``double_blocks_0_img_attn_qkv``,
:mod:`clora.flux_names`), where one layer of the file can be several diffusers modules (:class:`Fused`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .flux_names import bfl_modules, is_flux_transformer

KOHYA_PREFIXES: dict[str, tuple[str, ...]] = {
    "lora_unet_": ("unet", "transformer"),  # the denoiser: the first of these the pipeline has (Flux: BFL names)
    "lycoris_": ("unet", "transformer"),  # lycoris-lora wrapping a diffusers denoiser (SimpleTuner)
    "lora_transformer_": ("transformer",),  # Flux in diffusers' module names (OneTrainer)
    "lora_te_": ("text_encoder",),
    "lora_te1_": ("text_encoder",),  # SDXL's first text encoder, Flux's CLIP-L
    "lora_te2_": ("text_encoder_2",),
}

PEFT_PARTS = ("lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

RESNET_PARTS = {
    "in_layers_0": "norm1",
    "in_layers_2": "conv1",
    "emb_layers_1": "time_emb_proj",
    "out_layers_0": "norm2",
    "out_layers_3": "conv2",
    "skip_connection": "conv_shortcut",
}
"""SGM resnet sub-layers -> diffusers ``ResnetBlock2D`` ones."""


Rows = tuple[tuple[int, int], ...]
"""Row ranges [start, stop) of a weight, in order."""


@dataclass(frozen=True, eq=False)
class Fused:
    """A file layer that is several modules of the model (BFL's fused q/k/v), or one module with its rows
    in another order (Flux's final modulation): ``rows[i]`` are the row ranges of the layer's weight
    that ``modules[i]`` holds, in that module's row order."""

    modules: tuple[torch.nn.Module, ...]
    rows: tuple[Rows, ...]

    @classmethod
    def stacked(cls, modules: list[torch.nn.Module], swapped: bool = False) -> Fused:
        """The modules' weights stacked by rows in this order; ``swapped``: each with its halves swapped."""
        rows, offset = [], 0
        for module in modules:
            size = module.weight.shape[0]
            half = size // 2
            rows.append(
                ((offset + half, offset + size), (offset, offset + half)) if swapped else ((offset, offset + size),)
            )
            offset += size
        return cls(tuple(modules), tuple(rows))

    @property
    def shape(self) -> torch.Size:
        """The file layer's weight shape."""
        size = sum(stop - start for ranges in self.rows for start, stop in ranges)
        return torch.Size([size, *self.modules[0].weight.shape[1:]])

    def weight(self) -> torch.Tensor:
        """The file layer's weight, put together from the modules' weights."""
        pieces = []
        for module, ranges in zip(self.modules, self.rows, strict=True):
            offset = 0
            for start, stop in ranges:
                pieces.append((start, module.weight[offset : offset + stop - start]))
                offset += stop - start
        return torch.cat([piece for _, piece in sorted(pieces, key=lambda piece: piece[0])])

    def rows_of(self, module: torch.nn.Module, tensor: torch.Tensor) -> torch.Tensor:
        """The rows of ``tensor`` (the file layer's weight or bias, or an update of it) that ``module`` holds."""
        index = next(i for i, candidate in enumerate(self.modules) if candidate is module)
        return torch.cat([tensor[start:stop] for start, stop in self.rows[index]])


def split_prefix(name: str) -> tuple[str, str] | None:
    """``"lora_te1_text_model_x"`` -> ``("lora_te1_", "text_model_x")``; None without a known prefix."""
    for prefix in sorted(KOHYA_PREFIXES, key=len, reverse=True):
        if name.startswith(prefix):
            return prefix, name[len(prefix) :]
    return None


def component_of(pipe: Any, prefix: str) -> tuple[str, torch.nn.Module] | None:
    """The pipeline component a prefix names, if the pipeline has it."""
    for component in KOHYA_PREFIXES[prefix]:
        model = getattr(pipe, component, None)
        if model is not None:
            return component, model
    return None


def module_table(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every module by its path with ``_`` for ``.``; a layer peft wrapped is listed as the layer
    it wraps (``.base_layer``), so updates land on the original weights either way."""
    table = {}
    for path, module in model.named_modules():
        parts = path.split(".")
        if any(part in PEFT_PARTS for part in parts):
            continue
        if parts[-1] == "base_layer":
            path = path.removesuffix(".base_layer")
        elif path.replace(".", "_") in table:
            continue  # the base layer came first
        table[path.replace(".", "_")] = module
    return table


def sgm_names(unet: torch.nn.Module) -> dict[str, str]:
    """SGM block prefixes -> diffusers ones, for a diffusers ``UNet2DConditionModel`` (``_`` separated)."""
    names = {
        "time_embed_0": "time_embedding_linear_1",
        "time_embed_2": "time_embedding_linear_2",
        "label_emb_0_0": "add_embedding_linear_1",
        "label_emb_0_2": "add_embedding_linear_2",
        "input_blocks_0_0": "conv_in",
        "out_0": "conv_norm_out",
        "out_2": "conv_out",
    }
    per_level = unet.config.layers_per_block
    per_level = per_level if isinstance(per_level, int) else per_level[0]
    for i, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            names[f"input_blocks_{(per_level + 1) * i + j + 1}_0"] = f"down_blocks_{i}_resnets_{j}"
        for j in range(len(getattr(block, "attentions", None) or ())):
            names[f"input_blocks_{(per_level + 1) * i + j + 1}_1"] = f"down_blocks_{i}_attentions_{j}"
        if block.downsamplers:
            names[f"input_blocks_{(per_level + 1) * (i + 1)}_0_op"] = f"down_blocks_{i}_downsamplers_0_conv"
    mid = unet.mid_block
    if mid is not None:
        for j in range(len(mid.resnets)):
            names[f"middle_block_{2 * j}"] = f"mid_block_resnets_{j}"
        for j in range(len(getattr(mid, "attentions", None) or ())):
            names[f"middle_block_{2 * j + 1}"] = f"mid_block_attentions_{j}"
    for i, block in enumerate(unet.up_blocks):
        attentions = len(getattr(block, "attentions", None) or ())
        for j in range(len(block.resnets)):
            names[f"output_blocks_{(per_level + 1) * i + j}_0"] = f"up_blocks_{i}_resnets_{j}"
        for j in range(attentions):
            names[f"output_blocks_{(per_level + 1) * i + j}_1"] = f"up_blocks_{i}_attentions_{j}"
        if block.upsamplers:
            last = (per_level + 1) * i + per_level
            names[f"output_blocks_{last}_{2 if attentions else 1}_conv"] = f"up_blocks_{i}_upsamplers_0_conv"
    return names


def from_sgm(name: str, blocks: dict[str, str]) -> str | None:
    """A diffusers path (``_`` separated) for an SGM-numbered one, or None when no block matches."""
    for sgm in sorted(blocks, key=len, reverse=True):
        if name == sgm or name.startswith(sgm + "_"):
            rest = name[len(sgm) + 1 :]
            target = blocks[sgm]
            if "_resnets_" in target:
                rest = RESNET_PARTS.get(rest, rest)
            return f"{target}_{rest}" if rest else target
    return None


class KohyaResolver:
    """Finds the module of each kohya layer name in one pipeline (tables built once per component)."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self._tables: dict[str, dict[str, torch.nn.Module]] = {}
        self._sgm: dict[str, str] | None = None

    def resolve(self, layer: str) -> tuple[str, torch.nn.Module | Fused] | None:
        """(component, module) of ``layer`` (a name without the key kind), (component, :class:`Fused`) for a
        layer that is several modules of the model, or None."""
        split = split_prefix(layer)
        found = split and component_of(self.pipe, split[0])
        if not found:
            return None
        component, model = found
        table = self._tables.get(component)
        if table is None:
            table = self._tables[component] = module_table(model)
        for candidate in self._candidates(split[1], model):
            if candidate in table:
                return component, table[candidate]
        bfl = bfl_modules(split[1]) if is_flux_transformer(model) else None
        if bfl is not None and all(path in table for path in bfl[0]):
            modules, swapped = [table[path] for path in bfl[0]], bfl[1]
            return component, modules[0] if len(modules) == 1 and not swapped else Fused.stacked(modules, swapped)
        return None

    def _candidates(self, name: str, model: torch.nn.Module) -> Iterator[str]:
        yield name
        yield name.removeprefix("text_model_")
        yield f"text_model_{name}"
        if hasattr(model, "down_blocks") and hasattr(model, "up_blocks"):
            if self._sgm is None:
                self._sgm = sgm_names(model)
            mapped = from_sgm(name, self._sgm)
            if mapped is not None:
                yield mapped
