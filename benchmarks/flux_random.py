"""FLUX.1-dev's architecture with seeded random weights, a scaled-down variant for the CPU, and random
rank-r Flux LoRAs for them.

``flux``: the real sizes (transformer 11.9B: 19 double-stream and 38 single-stream blocks, 3072 wide;
T5-XXL encoder 4.8B; CLIP-L 123M; the 16-channel VAE 84M), so the compute is the real model's; 24 GB of
transformer weights in bf16 alone, which a GPU holds and this project's CPU machines do not.
``flux-small``: the same layout at a width and depth a CPU runs (transformer 2 + 4 blocks, 1024 wide;
T5 4 layers, 1024 wide), for memory figures that scale. Nothing is downloaded; the tokenizers are the
tests' (CLIP's real one, an offline T5 sentencepiece-style one).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from clora.demo.flux_model import FLUX_DEV_SCHEDULER_CONFIG, t5_encoder_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tiny_flux import (  # the tests folder is on the path only now
    CLIP_TOKENIZER_DIR,
    FLUX_DEV_TRANSFORMER_CONFIG,
    FLUX_VAE_SCALING_FACTOR,
    FLUX_VAE_SHIFT_FACTOR,
    build_t5_tokenizer,
)

T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
"""google/t5-v1_1-xxl's encoder, FLUX.1's ``text_encoder_2`` (``t5_encoder_config``'s sizes)."""

CLIP_L = dict(
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
"""CLIP ViT-L/14's text model, FLUX.1's ``text_encoder`` (its pooled output conditions the transformer)."""

VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    sample_size=1024,
    scaling_factor=FLUX_VAE_SCALING_FACTOR,
    shift_factor=FLUX_VAE_SHIFT_FACTOR,
    use_quant_conv=False,
    use_post_quant_conv=False,
    force_upcast=True,
)
"""FLUX.1's ``vae``."""

SMALL = {
    "transformer": {**FLUX_DEV_TRANSFORMER_CONFIG, "num_layers": 2, "num_single_layers": 4, "num_attention_heads": 8},
    "t5": {**T5_XXL, "d_model": 1024, "d_ff": 2816, "num_layers": 4, "num_heads": 16},
    "vae": VAE,
}
"""``flux-small``: FLUX.1-dev's layout, 1024 wide (8 heads of 128), 2 double- and 4 single-stream blocks."""

SMALL["transformer"]["joint_attention_dim"] = SMALL["t5"]["d_model"]

LORA_TARGETS = tuple(
    f"transformer_blocks.*.attn.{proj}"
    for proj in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
) + tuple(f"single_transformer_blocks.*.{proj}" for proj in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))
"""Transformer linears a typical Flux LoRA (ai-toolkit, kohya) adapts: every attention projection, both streams."""


def _randomized(model_class: Any, config: Any, dtype: torch.dtype, generator: torch.Generator) -> Any:
    """``model_class(config)`` in ``dtype`` with seeded normal weights, built without diffusers' and
    transformers' slow initialisation (12B parameters)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = model_class(config) if not isinstance(config, dict) else model_class(**config)
    model = model.to_empty(device="cpu").to(dtype).requires_grad_(False)
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            tensor.normal_(0, 0.02, generator=generator)
    return model


def build_flux(folder: Path, dtype: torch.dtype, small: bool = False, seed: int = 0) -> dict[str, torch.nn.Module]:
    """Write FLUX.1-dev's architecture (or ``flux-small``) with seeded random weights as a diffusers
    folder in ``dtype``; return its transformer and CLIP text encoder (for LoRA shapes)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    generator = torch.Generator().manual_seed(seed)
    configs = SMALL if small else {"transformer": FLUX_DEV_TRANSFORMER_CONFIG, "t5": T5_XXL, "vae": VAE}
    transformer = _randomized(FluxTransformer2DModel, configs["transformer"], dtype, generator)
    text_encoder = _randomized(CLIPTextModel, CLIPTextConfig(**CLIP_L), dtype, generator)
    text_encoder_2 = _randomized(T5EncoderModel, t5_encoder_config(**configs["t5"]), dtype, generator)
    vae = _randomized(AutoencoderKL, configs["vae"], dtype, generator)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR)),
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_t5_tokenizer(),
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return {"transformer": transformer, "text_encoder": text_encoder}


def write_random_flux_lora(components: dict[str, Any], path: Path, seed: int, rank: int = 32) -> Path:
    """A seeded random Flux LoRA in diffusers' format (bf16) on ``LORA_TARGETS`` and CLIP-L's attention."""
    from flux_lora_files import LoraLayer, make_flux_lora_weights, write_flux_diffusers_lora

    weights = make_flux_lora_weights(components, rank=rank, seed=seed, targets=LORA_TARGETS, alpha=float(rank))
    half = {key: LoraLayer(layer.down.bfloat16(), layer.up.bfloat16(), layer.alpha) for key, layer in weights.items()}
    return write_flux_diffusers_lora(half, path)
