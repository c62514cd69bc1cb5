"""Architecture of the embedded Flux demo model: a FLUX.1-dev layout at the demo world's size.

A diffusers ``FluxPipeline`` folder (``assets/flux/model``):

* ``transformer``: ``FluxTransformer2DModel``, 4 double-stream + 2 single-stream blocks, 4 heads x 16
  (64 wide), guidance embedding on (FLUX.1-dev), ``in_channels`` 16 (4 latent channels x 2 x 2 packing).
* ``vae``: the SD demo's trained VAE (2x down-sampling, 4 latent channels) with ``shift_factor`` 0, so a
  32x32 image is a 16x16 latent and an 8x8 grid of packed tokens.
* ``text_encoder`` / ``tokenizer``: the SD demo's CLIP text encoder and BPE tokenizer (its pooled output
  feeds ``pooled_projection_dim``), frozen.
* ``text_encoder_2`` / ``tokenizer_2``: a tiny T5 v1.1 encoder (2 layers, 64 wide) and a sentencepiece-style
  ``T5TokenizerFast`` (``▁`` metaspace) whose pieces spell every word of the grammar, 16 positions.
* ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` with FLUX.1-dev's configuration (dynamic shifting:
  at 64 image tokens mu = 0.47, a shift of 1.6).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import world

ASSETS = Path(__file__).parent / "assets"
FLUX_DIR = ASSETS / "flux"
FLUX_MODEL_DIR = FLUX_DIR / "model"
FLUX_LORA_DIR = FLUX_DIR / "loras"
SD_MODEL_DIR = ASSETS / "model"

T5_LENGTH = 16  # the longest caption ("a sks circle, a zwx square and a pqr triangle") is 12 pieces + </s>
TRAIN_GUIDANCE = 3.5  # constant guidance-embedding input in training and sampling (FLUX.1-dev's default)
RECORDABLE_BLOCKS = tuple(f"transformer_blocks.{i}" for i in range(4)) + tuple(
    f"single_transformer_blocks.{i}" for i in range(2)
)
"""Every block; the localisation loss acts on each of them, so the tuning can choose among them."""

TRANSFORMER_CONFIG = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 4,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 64,
    "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),
}

FLUX_DEV_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
"""FLUX.1-dev's ``scheduler/scheduler_config.json`` (a ``FlowMatchEulerDiscreteScheduler``); the demo's, the
tests' tiny Flux's and the benchmarks' random FLUX.1-dev's."""


def t5_encoder_config(vocab_size: int, d_model: int, d_kv: int, d_ff: int, num_layers: int, num_heads: int, **extra):
    """A T5 v1.1 encoder's config (gated GELU, no dropout, untied embeddings), as FLUX.1's t5-v1_1-xxl at
    other sizes."""
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        **extra,
    )


def build_t5_tokenizer():
    """A Unigram tokenizer with a ``▁`` metaspace, as T5's: every grammar word (and trigger) is one piece
    ``▁word``, anything else falls back to single characters; ``</s>`` appended, ``<pad>`` (id 0) pads."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [(f"▁{word}", -4.0) for word in dict.fromkeys(world.WORDS)]
    for char in "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'-":
        vocab += [(char, -10.0), (f"▁{char}", -10.5)]
    seen: dict[str, float] = {}
    for piece, score in vocab:
        seen.setdefault(piece, score)
    return T5TokenizerFast(vocab=list(seen.items()), extra_ids=0, model_max_length=T5_LENGTH)


def make_t5_encoder(vocab_size: int):
    from transformers import T5EncoderModel

    # 16 positions: fewer relative-position buckets than T5's 32 over 128
    config = t5_encoder_config(
        vocab_size, 64, 16, 128, 2, 4, relative_attention_num_buckets=8, relative_attention_max_distance=16
    )
    return T5EncoderModel(config)


def make_transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**TRANSFORMER_CONFIG)


def load_sd_parts(dtype: torch.dtype = torch.float32):
    """The SD demo's VAE (``shift_factor`` 0 added), CLIP text encoder and tokenizer."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(SD_MODEL_DIR / "vae", torch_dtype=dtype).eval()
    vae.register_to_config(shift_factor=0.0)
    clip = CLIPTextModel.from_pretrained(SD_MODEL_DIR / "text_encoder", torch_dtype=dtype).eval()
    return vae, clip, CLIPTokenizer.from_pretrained(SD_MODEL_DIR / "tokenizer")


def make_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER_CONFIG)


FLUX_CLORA_SETTINGS = {
    "steps": 20,
    "guidance": TRAIN_GUIDANCE,
    "step_size": 40.0,  # 20 (the SD demo's) passed 0 of 33 tuning images, 40 passed 1 and separated the concepts in 5
    "max_iter_to_alter": 10,
    "iterative_steps": [0, 2, 4],
    "iterative_iters": 4,
    "mask_threshold": 0.4,
}
"""CLoRA settings of the Flux demo (``flux_tune``): 20 flow-matching Euler steps, guidance input 3.5."""
FLUX_DEMO_SEED = 0
