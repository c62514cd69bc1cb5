"""Activation memory per sample of CLoRA's gradient pass or guidance pass, on the real SD 1.5 or SDXL UNet
or the FLUX.1-dev transformer (random weights).

    python benchmarks/activation_memory.py [--arch sd15|sdxl|flux] [--pass gradient|gradient-peak|guidance]
                                           [--sizes 128,256] [--dtype fp32|bf16] [--fake]

gradient: the bytes of every distinct tensor autograd keeps for the backward pass (the prompt half of
one branch, explicit attention in the recorded layers, stopping after the last one).

gradient-peak: the most that the tensors alive at one time take during that forward and the backward
pass of a loss on the recorded maps down to the latent (what the saved tensors and the backward's own
gradients take together): what the memory plan (``clora.memory``) budgets per gradient sample.

guidance: the most that the tensors alive at one time take during a full no-grad forward (recorded
layers as in a real run), weights and inputs not counted. Measured at batch 1 and 2; the difference
is the figure per sample (costs that do not grow with the batch drop out). ``--fake`` runs it on fake
tensors (shapes and dtypes, no arithmetic): the same bytes in seconds, for sizes or dtypes too slow
on the CPU (bf16 there).

Both count the tensors ops return, not the scratch a kernel uses inside one op, so the figures hold
on any device. Printed per latent pixel, per channel of the UNet's first level (Flux: per channel of
the transformer's width, 3072) and per dtype byte: the unit of the model families' activation figures
(``grad_bytes_per_unit`` in ``clora.families``). Flux runs as CLoRAFluxPipeline runs it: T5's 512
positions, the image-to-text attention of the second half of the double-stream blocks recorded (and
the gradient pass stopping after it), guidance embedding on; ``--fake`` is the way to run its real
3072-wide configuration on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import weakref
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel, UNet2DConditionModel
from sd15_random import UNET as SD15_UNET
from sdxl_random import POOLED_DIM
from sdxl_random import UNET as SDXL_UNET
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tiny_flux import FLUX_DEV_TRANSFORMER_CONFIG

from clora.attention import StopForward, recording_cross_attention
from clora.joint_attention import recording_joint_attention

FLUX_TEXT_TOKENS = 512  # FluxPipeline's max_sequence_length


class LiveStorages(TorchDispatchMode):
    """Counts the bytes of each storage an op returns until the storage is freed; ``peak`` is the
    largest total. Storages whose ``id`` is in ``excluded`` (weights, inputs) are not counted."""

    def __init__(self, excluded: set[int]) -> None:
        super().__init__()
        self.excluded = excluded
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor.untyped_storage())
        self.peak = max(self.peak, self.live)
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        # One Python object per storage, kept as long as the storage lives: its id is a key until then.
        key = id(storage)
        if key in self._sizes or key in self.excluded:
            return
        self._sizes[key] = storage.nbytes()
        self.live += self._sizes[key]
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key)


def unet_inputs(unet: torch.nn.Module, batch: int, latent: int, dtype: torch.dtype) -> dict[str, Any]:
    """Random arguments of one UNet call: latent, prompt embedding and, for SDXL, pooled embedding and
    size/crop ids; for Flux's transformer, the packed latent, T5 and pooled CLIP embeddings, guidance and
    position ids."""
    if not hasattr(unet.config, "cross_attention_dim"):
        config, tokens = unet.config, (latent // 2) ** 2
        return {
            "hidden_states": torch.randn(batch, tokens, config.in_channels, dtype=dtype),
            "encoder_hidden_states": torch.randn(batch, FLUX_TEXT_TOKENS, config.joint_attention_dim, dtype=dtype),
            "pooled_projections": torch.randn(batch, config.pooled_projection_dim, dtype=dtype),
            "timestep": torch.full((batch,), 0.5, dtype=dtype),
            "guidance": torch.full((batch,), 3.5, dtype=dtype),
            "img_ids": torch.zeros(tokens, 3, dtype=dtype),
            "txt_ids": torch.zeros(FLUX_TEXT_TOKENS, 3, dtype=dtype),
        }
    inputs: dict[str, Any] = {
        "sample": torch.randn(batch, 4, latent, latent, dtype=dtype),
        "timestep": 500,
        "encoder_hidden_states": torch.randn(batch, 77, unet.config.cross_attention_dim, dtype=dtype),
    }
    if unet.config.addition_embed_type == "text_time":
        ids = torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]] * batch, dtype=dtype)
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, POOLED_DIM, dtype=dtype), "time_ids": ids}
    return inputs


def recording(model: torch.nn.Module, latent: int) -> Any:
    """The recorder CLoRA installs on this model: the UNet's cross-attention at H/32, or Flux's
    image-to-text attention of the second half of its double-stream blocks, pooled 2x2."""
    if hasattr(model.config, "cross_attention_dim"):
        return recording_cross_attention(model)
    count = len(model.transformer_blocks)
    blocks = [f"transformer_blocks.{i}" for i in range(count // 2, count)]
    return recording_joint_attention(model, blocks, FLUX_TEXT_TOKENS, (latent // 2, latent // 2), pool=2)


def latent_input(inputs: dict[str, Any]) -> torch.Tensor:
    return inputs["sample"] if "sample" in inputs else inputs["hidden_states"]


def saved_bytes(unet: torch.nn.Module, latent: int, dtype: torch.dtype) -> int:
    """Bytes of the distinct storages autograd saves during one gradient pass of one sample."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    inputs = unet_inputs(unet, 1, latent, dtype)
    latent_input(inputs).requires_grad_(True)
    with recording(unet, latent) as recorder, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        recorder.stop_after_last = True
        try:
            unet(**inputs)
        except StopForward:
            pass
        recorder.pop()
    parameters = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    return sum(size for ptr, size in storages.items() if ptr not in parameters)


def guidance_peak(unet: torch.nn.Module, batch: int, latent: int, dtype: torch.dtype) -> int:
    """Peak bytes of the tensors alive during one no-grad forward of ``batch`` samples, weights and
    inputs excluded."""
    inputs = unet_inputs(unet, batch, latent, dtype)
    held = (*unet.parameters(), *unet.buffers(), *tree_leaves(inputs))
    tracker = LiveStorages({id(t.untyped_storage()) for t in held if isinstance(t, torch.Tensor)})
    with torch.no_grad(), recording(unet, latent) as recorder, tracker:
        unet(**inputs)
        recorder.pop()
    return tracker.peak


def gradient_peak(unet: torch.nn.Module, batch: int, latent: int, dtype: torch.dtype) -> int:
    """Peak bytes of the tensors alive during one gradient pass of ``batch`` samples, forward (stopping
    after the last recorded layer) and backward to the latent, weights and inputs excluded."""
    inputs = unet_inputs(unet, batch, latent, dtype)
    latent_input(inputs).requires_grad_(True)
    held = (*unet.parameters(), *unet.buffers(), *tree_leaves(inputs))
    tracker = LiveStorages({id(t.untyped_storage()) for t in held if isinstance(t, torch.Tensor)})
    with recording(unet, latent) as recorder, tracker:
        recorder.stop_after_last = True
        try:
            unet(**inputs)
        except StopForward:
            pass
        maps = recorder.pop()
        loss = maps.float().square().sum()  # any loss on the maps: its own size is tiny
        torch.autograd.grad(loss, latent_input(inputs))
    return tracker.peak


def build_unet(config: dict[str, Any], dtype: torch.dtype, fake: bool, model_class: type = UNet2DConditionModel) -> Any:
    """The UNet (or ``model_class``) in ``dtype`` with seeded random weights, or with fake ones (call it
    inside the ``FakeTensorMode``). What is measured does not depend on the values."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters made in dtype: no float32 copy on the way
    try:
        if fake:  # diffusers' init of fake tensors does no arithmetic
            return model_class(**config).requires_grad_(False)
        with init_empty_weights():  # skip diffusers' slow init
            unet = model_class(**config)
    finally:
        torch.set_default_dtype(default)
    unet = unet.to_empty(device="cpu").requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    for parameter in unet.parameters():
        parameter.normal_(0, 0.02, generator=generator)
    return unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15", choices=("sd15", "sdxl", "flux"))
    parser.add_argument("--pass", dest="pass_", default="gradient", choices=("gradient", "gradient-peak", "guidance"))
    parser.add_argument("--sizes", default="128,256", help="image sizes in pixels (latent = size / 8)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--fake", action="store_true", help="peaks only: fake tensors, no arithmetic")
    args = parser.parse_args()
    if args.fake and args.pass_ == "gradient":
        parser.error("--fake measures the peaks (gradient-peak, guidance) only")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    config = {"sd15": SD15_UNET, "sdxl": SDXL_UNET, "flux": FLUX_DEV_TRANSFORMER_CONFIG}[args.arch]
    model_class = FluxTransformer2DModel if args.arch == "flux" else UNet2DConditionModel
    width = (
        config["num_attention_heads"] * config["attention_head_dim"]
        if args.arch == "flux"
        else config["block_out_channels"][0]
    )
    element = torch.finfo(dtype).bits // 8
    if args.pass_ == "gradient":
        print(f"{'image':>6} {'latent':>7} {'saved MB/sample':>16} {'bytes/unit':>11}")
    else:
        peaks = f"{'peak MB b=1':>12} {'peak MB b=2':>12} {'MB/sample':>10}"
        print(f"{'image':>6} {'latent':>7} {peaks} {'bytes/unit':>11}")
    with FakeTensorMode() if args.fake else contextlib.nullcontext():
        unet = build_unet(config, dtype, args.fake, model_class)
        for size in (int(s) for s in args.sizes.split(",")):
            latent = size // 8
            unit = latent * latent * width * element
            if args.pass_ == "gradient":
                total = saved_bytes(unet, latent, dtype)
                print(f"{size:>6} {latent:>7} {total / 2**20:>16.1f} {total / unit:>11.1f}")
            else:
                peak = gradient_peak if args.pass_ == "gradient-peak" else guidance_peak
                one, two = (peak(unet, batch, latent, dtype) for batch in (1, 2))
                print(
                    f"{size:>6} {latent:>7} {one / 2**20:>12.1f} {two / 2**20:>12.1f} "
                    f"{(two - one) / 2**20:>10.1f} {(two - one) / unit:>11.1f}"
                )


if __name__ == "__main__":
    main()
