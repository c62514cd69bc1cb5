"""Stable Diffusion 1.5's architecture with seeded random weights, and random rank-r kohya LoRAs for it.

Same layer sizes as the hub's SD 1.5 (UNet 860M, CLIP ViT-L/14 text encoder 123M, VAE 84M), so the
compute is the real model's; nothing is downloaded. The configs are SD 1.5's, as plain data.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "tests" / "fixtures" / "sd15_tokenizer"
sys.path.insert(0, str(ROOT / "tests"))

UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
TEXT_ENCODER = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    pad_token_id=1,
    bos_token_id=49406,
    eos_token_id=49407,
)
VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
LORA_TARGETS = tuple(f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0"))
LORA_TARGETS += ("ff.net.0.proj", "ff.net.2")
"""UNet layers a typical kohya SD 1.5 LoRA adapts (with proj_in/proj_out, 1x1 convolutions, added below)."""


def build_sd15(folder: Path, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.nn.Module]:
    """Write the SD 1.5 architecture with seeded random weights as a diffusers folder (in ``dtype``,
    like the hub's fp16 variant) and return its UNet and text encoder (for LoRA shapes)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tiny_sd import TOKENIZER_FILES, _prefix_text_model_keys
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER))
        vae = AutoencoderKL(**VAE)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR)),
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(dtype=dtype)
    pipe.save_pretrained(folder)
    _prefix_text_model_keys(folder / "text_encoder" / "model.safetensors")  # as in the hub's checkpoint
    shutil.rmtree(folder / "tokenizer")  # the real tokenizer files, verbatim
    (folder / "tokenizer").mkdir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_DIR / name, folder / "tokenizer" / name)
    return {"unet": unet, "text_encoder": text_encoder}


def write_random_kohya_lora(
    components: dict[str, Any], path: Path, seed: int, rank: int = 32, alpha: float = 16.0
) -> Path:
    """A seeded random kohya-format LoRA (fp16) for ``LORA_TARGETS``, proj_in/proj_out and the text
    encoder's attention projections."""
    from lora_files import LoraLayer, make_lora_weights, write_kohya_lora

    weights = make_lora_weights(components, targets=LORA_TARGETS, rank=rank, alpha=alpha, seed=seed)
    generator = torch.Generator().manual_seed(10_000 + seed)
    for name, module in components["unet"].named_modules():
        if isinstance(module, torch.nn.Conv2d) and name.endswith((".proj_in", ".proj_out")):
            down = torch.randn(rank, module.in_channels, 1, 1, generator=generator) / module.in_channels**0.5
            up = torch.randn(module.out_channels, rank, 1, 1, generator=generator) / rank**0.5
            weights[f"unet.{name}"] = LoraLayer(down=down, up=up, alpha=alpha)
    half = {key: LoraLayer(layer.down.half(), layer.up.half(), layer.alpha) for key, layer in weights.items()}
    return write_kohya_lora(half, path)
