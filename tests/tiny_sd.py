"""Tiny random Stable Diffusion 1.5 and SDXL look-alikes, saved in the hub's diffusers folder layouts.

The UNet keeps SD 1.5's block layout (three cross-attention down blocks, a plain down block, a plain up
block, three cross-attention up blocks, two layers per block, ``attention_head_dim`` 8), so module
names such as ``down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_q`` and ``up_blocks.1...``
exist as in the real model and cross-attention runs at latent/4 = H/32 in ``down_blocks.2`` and
``up_blocks.1``. Only the widths are tiny. The text encoder checkpoint is rewritten with the
``text_model.`` key prefix of the real ``text_encoder/model.safetensors``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TEXT_HIDDEN_SIZE = 32
"""Hidden size of the tiny text encoder, and so the UNet's ``cross_attention_dim``."""

UNET_BLOCK_OUT_CHANNELS = (32, 32, 64, 64)
"""UNet widths; SD 1.5 uses (320, 640, 1280, 1280). 8 heads of 4-8 channels each."""

TOKENIZER_FILES = ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")
"""The files of SD 1.5's ``tokenizer/`` folder."""


def _tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=UNET_BLOCK_OUT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def _tiny_clip_config(hidden_size: int = TEXT_HIDDEN_SIZE, layers: int = 2, act: str = "quick_gelu") -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=37,
        projection_dim=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=49406,
        eos_token_id=49407,
    )


def _tiny_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(_tiny_clip_config())


def _tiny_vae(scaling_factor: float = 0.18215) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
        force_upcast=True,
    )


def _sd15_scheduler() -> PNDMScheduler:
    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )


def _prefix_text_model_keys(checkpoint: Path) -> None:
    """Rename ``embeddings.*`` to ``text_model.embeddings.*`` etc., as in SD 1.5's checkpoint.

    Transformers 5 flattened ``CLIPTextModel`` (no ``.text_model`` attribute) and saves unprefixed keys;
    it still loads the prefixed keys of older checkpoints.
    """
    state_dict = load_file(checkpoint)
    renamed = {f"text_model.{key.removeprefix('text_model.')}": value for key, value in state_dict.items()}
    save_file(renamed, checkpoint, metadata={"format": "pt"})


def build_tiny_sd15(folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write a seeded random tiny SD 1.5 pipeline to ``folder`` and return ``folder``.

    ``StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)`` loads it offline;
    ``model_index.json`` names no safety checker or feature extractor. The tokenizer files are copied
    verbatim from ``tokenizer_dir`` (the real SD 1.5 CLIP tokenizer). The global torch RNG is left
    untouched.
    """
    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet()
        text_encoder = _tiny_text_encoder()
        vae = _tiny_vae()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        unet=unet,
        scheduler=_sd15_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    _prefix_text_model_keys(folder / "text_encoder" / "model.safetensors")
    shutil.rmtree(folder / "tokenizer")
    (folder / "tokenizer").mkdir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(Path(tokenizer_dir) / name, folder / "tokenizer" / name)
    return folder


# -- SDXL ------------------------------------------------------------------------------------------

SDXL_TIME_EMBED_DIM = 8
"""``addition_time_embed_dim``: the width of each of the six size/crop ids' embeddings (SDXL: 256)."""

SDXL_TEXT_2_HIDDEN_SIZE = 48
"""Hidden and projection size of the second text encoder (SDXL: 1280 vs the first's 768). It must differ
from the first's: diffusers' single-file loader tells the two encoders apart by their width."""


SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
)
"""SDXL base 1.0's scheduler settings (an ``EulerDiscreteScheduler``)."""


def _tiny_sdxl_unet() -> UNet2DConditionModel:
    """SDXL's block layout (a plain level, then two cross-attention levels; the mid block at latent/4;
    ``text_time`` added conditioning), with 1-2 transformer blocks per attention instead of 2 and 10."""
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        cross_attention_dim=TEXT_HIDDEN_SIZE + SDXL_TEXT_2_HIDDEN_SIZE,  # both encoders' hidden states, joined
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + SDXL_TEXT_2_HIDDEN_SIZE,  # ids + pooled
        norm_num_groups=8,
    )


def build_tiny_sdxl(folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write a seeded random tiny SDXL pipeline (diffusers folder layout) to ``folder``; return it.

    Two text encoders (``CLIPTextModel`` and ``CLIPTextModelWithProjection``, 32 and 48 wide, 3 layers
    each, so the penultimate layer and a ``clip_skip`` exist), both with the SD 1.5 CLIP tokenizer files (SDXL's two
    tokenizers split text the same way), SDXL's Euler scheduler settings and VAE scaling factor.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_sdxl_unet()
        text_encoder = CLIPTextModel(_tiny_clip_config(TEXT_HIDDEN_SIZE, layers=3, act="gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config(SDXL_TEXT_2_HIDDEN_SIZE, layers=3, act="gelu"))
        vae = _tiny_vae(scaling_factor=0.13025)  # SDXL's
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(folder)
    return folder
