"""Activation memory of CLoRA's gradient pass per sample, on the real SD 1.5 or SDXL UNet (random weights).

    python benchmarks/activation_memory.py [--arch sd15|sdxl] [--sizes 128,256] [--dtype fp32]

Counts the bytes of every distinct tensor autograd keeps for the backward pass (the prompt half of
one branch, explicit attention in the recorded layers, stopping after the last one), which is
what a gradient pass holds per sample on any device. Prints it per latent pixel and per channel of
the UNet's first level, the unit each model family's ``grad_bytes_per_unit`` (``clora.families``)
is written in.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import UNet2DConditionModel
from sd15_random import UNET as SD15_UNET
from sdxl_random import POOLED_DIM
from sdxl_random import UNET as SDXL_UNET

from clora.attention import StopForward, recording_cross_attention


def saved_bytes(unet: torch.nn.Module, latent: int, dtype: torch.dtype) -> int:
    """Bytes of the distinct storages autograd saves during one gradient pass of one sample."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.randn(1, 4, latent, latent, dtype=dtype, requires_grad=True)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, dtype=dtype)
    extra = {}
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embedding and size/crop ids
        ids = torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]], dtype=dtype)
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, POOLED_DIM, dtype=dtype), "time_ids": ids}}
    with recording_cross_attention(unet) as recorder, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        recorder.stop_after_last = True
        try:
            unet(x, 500, encoder_hidden_states=context, **extra)
        except StopForward:
            pass
        recorder.pop()
    parameters = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    return sum(size for ptr, size in storages.items() if ptr not in parameters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15", choices=("sd15", "sdxl"))
    parser.add_argument("--sizes", default="128,256", help="image sizes in pixels (latent = size / 8)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    config = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}[args.arch]
    from accelerate import init_empty_weights

    with init_empty_weights():  # what is saved does not depend on the values: skip diffusers' slow init
        unet = UNet2DConditionModel(**config)
    unet = unet.to_empty(device="cpu").to(dtype).requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    for parameter in unet.parameters():
        parameter.normal_(0, 0.02, generator=generator)
    element = torch.finfo(dtype).bits // 8
    print(f"{'image':>6} {'latent':>7} {'saved MB/sample':>16} {'bytes/unit':>11}")
    for size in (int(s) for s in args.sizes.split(",")):
        latent = size // 8
        total = saved_bytes(unet, latent, dtype)
        unit = total / (latent * latent * config["block_out_channels"][0] * element)
        print(f"{size:>6} {latent:>7} {total / 2**20:>16.1f} {unit:>11.1f}")


if __name__ == "__main__":
    main()
