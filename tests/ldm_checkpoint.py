"""Write a diffusers SD 1.x or SDXL folder as ONE original (CompVis/LDM or SGM) checkpoint, like
``v1-5-pruned-emaonly.safetensors`` or ``sd_xl_base_1.0.safetensors``.

The renaming is the inverse of what diffusers' single-file loader does
(``diffusers.loaders.single_file_utils``: ``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_ldm_clip_checkpoint``), so ``StableDiffusionPipeline.from_single_file(out_file, config=folder)``
rebuilds the folder's UNet, VAE and text encoder exactly. Works for any SD 1.x block layout: the
number of blocks is read from the keys, ``layers_per_block`` from ``unet/config.json``.

LDM layout (L = layers_per_block): ``input_blocks.0`` is ``conv_in``; down block ``b`` layer ``l`` is
``input_blocks.{1 + b(L+1) + l}`` (``.0`` resnet, ``.1`` transformer) and its downsampler is
``input_blocks.{(b+1)(L+1)}.0.op``; ``middle_block.{0,1,2}`` is resnet, transformer, resnet; up block
``b`` layer ``l`` (L+1 layers) is ``output_blocks.{b(L+1) + l}`` (``.0`` resnet, ``.1`` transformer) and
its upsampler the last layer's ``.2.conv`` (``.1.conv`` in blocks without attention). The VAE decoder
counts its levels the other way round (``up.{n-1-i}`` is diffusers' ``up_blocks.{i}``), and its
mid-block attention projections are 1x1 convolutions.

SDXL (SGM) adds ``label_emb.0.{0,2}`` (the pooled-text + size-ids embedding), keeps the first text
encoder under ``conditioner.embedders.0.transformer.`` and stores the second in OpenCLIP's layout
under ``conditioner.embedders.1.model.``: fused ``attn.in_proj_weight`` (q, k, v stacked),
``ln_1``/``ln_2``, ``mlp.c_fc``/``mlp.c_proj``, ``ln_final``, ``positional_embedding`` and a transposed
``text_projection`` (the inverse of diffusers' ``convert_open_clip_checkpoint``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}

UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL
    "add_embedding.linear_2": "label_emb.0.2",
}
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
VAE_TOP = {"conv_norm_out": "norm_out"}  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}  # norm1/conv1/norm2/conv2 keep their names
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(rest: str, table: dict[str, str]) -> str:
    """``rest`` is ``<module>.<weight|bias>``; rename the module through ``table`` (unchanged if absent)."""
    module, _, param = rest.rpartition(".")
    return f"{table.get(module, module)}.{param}"


def _unet_layer(kind: str, rest: str) -> str:
    """Within an LDM block, ``.0`` is the resnet (renamed parts), ``.1`` the transformer (same names)."""
    return f"0.{_rename(rest, UNET_RESNET)}" if kind == "resnets" else f"1.{rest}"


def _unet_key(key: str, layers: int, up_blocks_with_attention: set[int]) -> str:
    step = layers + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * step + int(m[3])}.{_unet_layer(m[2], m[4])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * step}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename(m[2], UNET_RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * step + int(m[3])}.{_unet_layer(m[2], m[4])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        slot = 2 if block in up_blocks_with_attention else 1
        return f"output_blocks.{block * step + layers}.{slot}.conv.{m[2]}"
    module, _, param = key.rpartition(".")
    if module in UNET_TOP:
        return f"{UNET_TOP[module]}.{param}"
    raise KeyError(f"no LDM name for UNet key {key!r}")


def _vae_key(key: str, levels: int) -> tuple[str, bool]:
    """The LDM name of a VAE key, and whether the tensor is a mid-block attention projection (linear -> 1x1 conv)."""
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_rename(m[3], VAE_RESNET)}", False
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", False
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{_rename(m[3], VAE_RESNET)}", False
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}", False
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename(m[3], VAE_RESNET)}", False
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        renamed = _rename(m[2], VAE_ATTENTION)
        return f"{m[1]}.mid.attn_1.{renamed}", not renamed.startswith("norm.")
    if m := re.fullmatch(r"(encoder|decoder)\.(.+)", key):
        return f"{m[1]}.{_rename(m[2], VAE_TOP)}", False
    return key, False  # quant_conv, post_quant_conv


def _open_clip(text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModelWithProjection`` state dict in OpenCLIP's names."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in text.items():
        key = key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}"
        if key == "text_projection.weight":
            out["text_projection"] = value.T
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif m := re.fullmatch(r"text_model\.final_layer_norm\.(weight|bias)", key):
            out[f"ln_final.{m[1]}"] = value
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            out[f"transformer.resblocks.{m[1]}.{OPEN_CLIP_LAYER[m[2]]}.{m[3]}"] = value
        elif not key.endswith("position_ids"):
            raise KeyError(f"no OpenCLIP name for text encoder key {key!r}")
    for (layer, param), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def write_ldm_checkpoint(diffusers_dir: Path, out_file: Path) -> Path:
    """Convert ``diffusers_dir``'s UNet, VAE and text encoder(s) into one LDM/SGM-format ``out_file``."""
    diffusers_dir, out_file = Path(diffusers_dir), Path(out_file)
    layers = json.loads((diffusers_dir / "unet" / "config.json").read_text())["layers_per_block"]
    unet = load_file(diffusers_dir / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(diffusers_dir / "vae" / "diffusion_pytorch_model.safetensors")
    text = load_file(diffusers_dir / "text_encoder" / "model.safetensors")
    sdxl = (diffusers_dir / "text_encoder_2").is_dir()
    text_2 = {}
    if sdxl:
        text_2 = {
            SDXL_OPEN_CLIP_PREFIX + k: v
            for k, v in _open_clip(load_file(diffusers_dir / "text_encoder_2" / "model.safetensors")).items()
        }

    with_attention = {int(k.split(".")[1]) for k in unet if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    levels = len({k.split(".")[2] for k in vae if k.startswith("decoder.up_blocks.")})
    out: dict[str, torch.Tensor] = {}
    for key, value in unet.items():
        out[UNET_PREFIX + _unet_key(key, layers, with_attention)] = value
    for key, value in vae.items():
        name, is_conv = _vae_key(key, levels)
        out[VAE_PREFIX + name] = value[..., None, None] if is_conv and value.ndim == 2 else value
    for key, value in text.items():
        out[(SDXL_CLIP_PREFIX if sdxl else CLIP_PREFIX) + key.removeprefix("text_model.")] = value
    out.update(text_2)
    if len(out) != len(unet) + len(vae) + len(text) + len(text_2):
        raise AssertionError("two diffusers keys map to the same LDM key")
    save_file({k: v.contiguous() for k, v in out.items()}, out_file)
    return out_file
