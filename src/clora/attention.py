"""Recording cross-attention probabilities with a pluggable diffusers attention processor.

CLoRA reads the cross-attention maps of the UNet level at latent/4, the image's H/32, where the
layers still see whole objects but each map pixel is small enough to separate them:

- SD 1.x/2.x (four levels): down_blocks.2 and up_blocks.1, 16x16 at 512x512 (the authors' layers);
  the mid block sits one level lower (H/64) and is not read;
- SDXL (three levels): down_blocks.2, the mid block and up_blocks.0, 32x32 at 1024x1024 (10
  transformer blocks each); SDXL's mid block sits at that same level, so it is read too.

A UNet without a latent/4 level (the demo's two-level model) is read at its coarsest down/up level.
Only the recorded layers get the explicit softmax processor below; every other layer keeps
diffusers' fused attention, unless the authors' behaviour (explicit attention everywhere) is asked for.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor


class StopForward(Exception):
    """Raised after the last recorded layer when the rest of the UNet is not needed."""


class AttentionRecorder:
    """Collects head-averaged attention probabilities from the recorded layers of one forward.

    ``pool``: (grid height, grid width, factor) to average the maps' pixels over factor x factor
    blocks of a (height, width) grid as they are recorded (Flux's image tokens, ``joint_attention``)."""

    def __init__(self, num_layers: int, pool: tuple[int, int, int] | None = None) -> None:
        self.num_layers = num_layers
        self.stop_after_last = False
        self.pool = pool if pool and pool[2] > 1 else None
        self._maps: list[torch.Tensor] = []

    def record(self, probs: torch.Tensor) -> None:
        """``probs`` is (batch, heads, pixels, tokens)."""
        maps = probs.mean(dim=1)
        if self.pool is not None:
            height, width, factor = self.pool
            grid = maps.unflatten(1, (height, width)).movedim(-1, 1)  # (batch, tokens, height, width)
            maps = torch.nn.functional.avg_pool2d(grid, factor).flatten(2).transpose(1, 2)
        self._maps.append(maps)
        if self.stop_after_last and len(self._maps) == self.num_layers:
            raise StopForward

    def pop(self) -> torch.Tensor:
        """Mean over the recorded layers, (batch, pixels, tokens); clears the recorder."""
        if len(self._maps) != self.num_layers:
            raise RuntimeError(f"recorded {len(self._maps)} cross-attention layers, expected {self.num_layers}")
        maps = torch.stack(self._maps).mean(dim=0)
        self._maps = []
        return maps

    def clear(self) -> None:
        self._maps = []


class RecordingAttnProcessor:
    """Cross-attention with explicit softmax probabilities, which it hands to a recorder.

    Same arithmetic as diffusers' ``AttnProcessor`` (LoRA layers on to_q/to_k/to_v/to_out apply as
    usual, since they live inside those modules).
    """

    def __init__(self, recorder: AttentionRecorder) -> None:
        self.recorder = recorder

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)

        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (batch*heads, pixels, tokens)
        self.recorder.record(probs.view(batch, attn.heads, *probs.shape[1:]))

        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


_ATTENTION_MODULES: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, Attention]] = weakref.WeakKeyDictionary()


def _attention_modules(unet: torch.nn.Module) -> dict[str, Attention]:
    """Every attention module, keyed by its processor name as in ``unet.attn_processors``.

    Remembered per UNet: a walk over its modules costs more than a small UNet's forward, and loading
    LoRAs wraps the linear layers inside these modules without replacing the modules themselves.
    """
    if unet not in _ATTENTION_MODULES:
        _ATTENTION_MODULES[unet] = {
            f"{name}.processor": module for name, module in unet.named_modules() if isinstance(module, Attention)
        }
    return _ATTENTION_MODULES[unet]


RECORDED_FACTOR = 4
"""The level CLoRA reads: latent/4, i.e. the image's H/32."""


def _cross_attention_downsampling(unet: torch.nn.Module, mid_block: bool = False) -> dict[str, int]:
    """Down-sampling factor relative to the latent of every down/up (and, if asked, mid block)
    cross-attention layer."""
    levels = len(unet.config.block_out_channels)
    factors: dict[str, int] = {}
    for name in _attention_modules(unet):
        parts = name.split(".")
        if not name.endswith("attn2.processor"):
            continue
        if parts[0] in ("down_blocks", "up_blocks"):
            index = int(parts[1])
            factors[name] = 2 ** (index if parts[0] == "down_blocks" else levels - 1 - index)
        elif parts[0] == "mid_block" and mid_block:
            factors[name] = 2 ** (levels - 1)
    if not factors:
        raise ValueError("this UNet has no cross-attention layers outside its mid block; CLoRA cannot record maps")
    return factors


def recorded_downsampling(unet: torch.nn.Module) -> int:
    """How much smaller than the latent the recorded maps are: 4 (H/32) where the UNet has
    cross-attention at latent/4, else its coarsest down/up level with cross-attention."""
    factors = set(_cross_attention_downsampling(unet).values())
    return RECORDED_FACTOR if RECORDED_FACTOR in factors else max(factors)


def recorded_layer_names(unet: torch.nn.Module) -> list[str]:
    """Processor names of the cross-attention layers CLoRA records: every one at
    latent/4, the mid block's included when it sits there (SDXL); otherwise the coarsest down/up level."""
    target = recorded_downsampling(unet)
    factors = _cross_attention_downsampling(unet, mid_block=target == RECORDED_FACTOR)
    return [name for name, factor in factors.items() if factor == target]


@contextlib.contextmanager
def recording_cross_attention(unet: torch.nn.Module, explicit_everywhere: bool = False) -> Iterator[AttentionRecorder]:
    """Install recording processors on the recorded layers for the duration of the block.

    ``explicit_everywhere`` also swaps every other layer to explicit softmax attention, as the
    authors' code does (numerically the same, much more memory). Processors are set on the layers
    themselves rather than through ``unet.set_attn_processor``, which walks the whole model twice.
    """
    modules = _attention_modules(unet)
    names = set(recorded_layer_names(unet))
    recorder = AttentionRecorder(len(names))
    swapped = {name: modules[name] for name in modules if name in names or explicit_everywhere}
    original = {name: module.processor for name, module in swapped.items()}
    for name, module in swapped.items():
        module.set_processor(RecordingAttnProcessor(recorder) if name in names else AttnProcessor())
    try:
        yield recorder
    finally:
        for name, module in swapped.items():
            module.set_processor(original[name])


def maps_from_probs(
    probs: torch.Tensor, height: int, width: int, cfg_halves: str = "cond", transposed: bool = False
) -> torch.Tensor:
    """Token maps (..., height, width, tokens) from recorded probabilities (..., halves, pixels, tokens).

    With a CFG batch [uncond, cond] in the halves dimension, ``cfg_halves="cond"`` keeps the prompt's
    half and ``"mean"`` averages both (the authors' behaviour). ``transposed`` reproduces the
    authors' (width, height) reshape, which scrambles non-square maps.
    """
    selected = probs.mean(dim=-3) if cfg_halves == "mean" else probs[..., -1, :, :]
    grid = (width, height) if transposed else (height, width)
    return selected.reshape(*selected.shape[:-2], *grid, selected.shape[-1])
