"""FLUX.1's original (BFL) layer names, as sd-scripts writes them (``lora_unet_double_blocks_0_img_attn_qkv``),
-> diffusers' ``FluxTransformer2DModel`` modules.

BFL fuses some of diffusers' linears: a double block's ``img_attn.qkv`` is ``attn.to_q/to_k/to_v``,
``txt_attn.qkv`` is ``attn.add_q_proj/add_k_proj/add_v_proj`` and a single block's ``linear1`` is
``attn.to_q/to_k/to_v`` + ``proj_mlp``, their weights stacked by rows in that order. The final layer's
``adaLN_modulation.1`` is diffusers' ``norm_out.linear`` with its two halves swapped (shift, scale against
scale, shift). The tables follow diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``.
"""

from __future__ import annotations

import re

DOUBLE_BLOCK = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",),
    "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_mod_lin": ("norm1_context.linear",),
}
"""A ``double_blocks_N_`` layer -> its ``transformer_blocks.N.`` modules, in the order of the layer's rows."""

SINGLE_BLOCK = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
"""A ``single_blocks_N_`` layer -> its ``single_transformer_blocks.N.`` modules, in row order."""

TOP_LEVEL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}
"""Layers outside the blocks -> diffusers modules."""

SWAPPED_HALVES = frozenset({"final_layer_adaLN_modulation_1"})
"""Layers whose two row halves are in the other order in diffusers."""

_BLOCK = re.compile(r"^(double|single)_blocks_(\d+)_(.+)$")


def is_flux_transformer(model: object) -> bool:
    """Whether ``model`` has the module layout of diffusers' ``FluxTransformer2DModel``."""
    return hasattr(model, "transformer_blocks") and hasattr(model, "single_transformer_blocks")


def bfl_modules(name: str) -> tuple[tuple[str, ...], bool] | None:
    """The diffusers module paths (``_`` for ``.``, in row order) a BFL layer name stands for, and whether
    its row halves are swapped; None for a name that is not a BFL layer.

    >>> bfl_modules("single_blocks_3_linear2")
    (('single_transformer_blocks_3_proj_out',), False)
    >>> bfl_modules("double_blocks_0_txt_attn_qkv")[0][1]
    'transformer_blocks_0_attn_add_k_proj'
    """
    match = _BLOCK.match(name)
    if match is None:
        target = TOP_LEVEL.get(name)
        return None if target is None else ((target.replace(".", "_"),), name in SWAPPED_HALVES)
    kind, index, layer = match.groups()
    table, block = (
        (DOUBLE_BLOCK, "transformer_blocks") if kind == "double" else (SINGLE_BLOCK, "single_transformer_blocks")
    )
    if layer not in table:
        return None
    return tuple(f"{block}.{index}.{module}".replace(".", "_") for module in table[layer]), False
