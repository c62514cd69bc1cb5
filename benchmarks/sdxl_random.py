"""Stable Diffusion XL's architecture as plain data (the hub's SDXL base 1.0 configs), with seeded random
weights, and random rank-r kohya SDXL LoRAs for it.

UNet 2.6B parameters, CLIP ViT-L (123M) and OpenCLIP bigG (695M) text encoders, the 84M VAE: the real
model's compute; nothing is downloaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from sd15_random import VAE as SD15_VAE
from tiny_sd import SDXL_SCHEDULER, TOKENIZER_FILES

UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
POOLED_DIM = 1280  # the second text encoder's projection: SDXL's "text_embeds"
_CLIP = dict(vocab_size=49408, max_position_embeddings=77, pad_token_id=1, bos_token_id=49406, eos_token_id=49407)
TEXT_ENCODER = dict(
    _CLIP,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act="quick_gelu",
)
TEXT_ENCODER_2 = dict(
    _CLIP,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=POOLED_DIM,
)
VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
"""SD's VAE layout with SDXL's scaling; it overflows in fp16, so pipelines decode it in float32."""
LORA_TARGETS = tuple(f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0"))
LORA_TARGETS += ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
"""UNet layers a typical kohya SDXL LoRA adapts (SDXL's proj_in/proj_out are linear layers)."""


def fill_random(module: torch.nn.Module, seed: int) -> None:
    """Seeded random values in place: matrices and kernels with std 1/sqrt(fan-in) (activations keep
    their size through the layers, as with trained weights), norm scales 1, biases 0."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in module.named_parameters():
        if parameter.dim() >= 2:
            fan_in = parameter[0].numel()
            parameter.data.copy_(torch.randn(parameter.shape, generator=generator) / fan_in**0.5)
        elif name.endswith("weight"):
            parameter.data.fill_(1.0)
        else:
            parameter.data.zero_()


def build_sdxl(folder: Path, dtype: torch.dtype, tokenizer_dir: Path, seed: int = 0) -> dict[str, torch.nn.Module]:
    """Write the SDXL architecture with seeded random weights as a diffusers folder (in ``dtype``, like
    the hub's fp16 variant) and return its UNet and text encoders (for LoRA shapes).

    The modules are created without initialising (``init_empty_weights``) and filled in ``dtype``:
    diffusers' own initialisation of 3.5B fp32 parameters would take minutes and 14 GB. Both
    tokenizers are the CLIP BPE files in ``tokenizer_dir`` (SDXL's two split text alike).
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with init_empty_weights():
        modules = {
            "unet": UNet2DConditionModel(**UNET),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2)),
            "vae": AutoencoderKL(**VAE),
        }
    for offset, (name, module) in enumerate(modules.items()):
        modules[name] = module.to(dtype).to_empty(device="cpu").requires_grad_(False)  # no fp32 copy on the way
        fill_random(modules[name], seed + offset)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    pipe = StableDiffusionXLPipeline(
        **modules, tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER)
    )
    pipe.save_pretrained(folder)
    for name in ("tokenizer", "tokenizer_2"):  # the real tokenizer files, verbatim
        shutil.rmtree(folder / name)
        (folder / name).mkdir()
        for file in TOKENIZER_FILES:
            shutil.copyfile(tokenizer_dir / file, folder / name / file)
    return {name: modules[name] for name in ("unet", "text_encoder", "text_encoder_2")}


def write_random_kohya_sdxl_lora(
    components: dict[str, Any], path: Path, seed: int, rank: int = 32, alpha: float = 16.0
) -> Path:
    """A seeded random kohya-format SDXL LoRA (fp16): ``LORA_TARGETS`` of the UNet in SGM numbering and
    both text encoders' attention projections (``lora_te1_``/``lora_te2_``)."""
    from lora_files import LoraLayer, make_lora_weights, write_kohya_lora

    weights = make_lora_weights(components, targets=LORA_TARGETS, rank=rank, alpha=alpha, seed=seed)
    half = {key: LoraLayer(layer.down.half(), layer.up.half(), layer.alpha) for key, layer in weights.items()}
    return write_kohya_lora(half, path, sdxl=True)
