"""Stable Diffusion XL's UNet architecture as plain data (the hub's SDXL base 1.0 ``unet/config.json``),
for measurements on random weights: 2.6B parameters, the real model's compute; nothing is downloaded."""

from __future__ import annotations

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
