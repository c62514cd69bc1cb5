"""Region masks cut from attention maps, and the masked fusion of noise predictions."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def threshold_mask(token_maps: torch.Tensor, alpha: float) -> torch.Tensor:
    """Union over tokens of ``map > alpha * max(map)``. ``token_maps`` is (tokens, h, w)."""
    peak = token_maps.flatten(1).max(dim=1).values[:, None, None]
    return (token_maps > alpha * peak).any(dim=0).float()


def dilate(mask: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(mask[None, None], kernel_size=3, stride=1, padding=1)[0, 0]


def erode(mask: torch.Tensor) -> torch.Tensor:
    return 1.0 - dilate(1.0 - mask)


MORPHOLOGY = {
    "erode": erode,
    "dilate": dilate,
    "open": lambda m: dilate(erode(m)),
    "close": lambda m: erode(dilate(m)),
}


def concept_masks(
    maps: torch.Tensor,
    mask_tokens: Sequence[Sequence[int]],
    alpha: float,
    morphology: Sequence[str] = (),
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Masks for all prompts, (prompts, H, W), resized (nearest) to ``size``.

    ``maps`` is (prompts, h, w, tokens). Prompt i >= 1 gets the thresholded union of its mask
    tokens' maps, then each morphology op with a 3x3 kernel; prompt 0 (the background) covers
    every pixel no concept mask covers.
    """
    masks = [torch.zeros(maps.shape[1:3], device=maps.device)]
    for i in range(1, maps.shape[0]):
        mask = threshold_mask(maps[i].permute(2, 0, 1)[list(mask_tokens[i])], alpha)
        for op in morphology:
            mask = MORPHOLOGY[op](mask)
        masks.append(mask)
    stacked = torch.stack(masks)
    stacked[0] = 1.0 - stacked[1:].amax(dim=0) if len(masks) > 1 else 1.0
    if size is not None and tuple(stacked.shape[1:]) != tuple(size):
        stacked = F.interpolate(stacked[None], size=size, mode="nearest")[0]
    return stacked


def fusion_weights(masks: torch.Tensor) -> torch.Tensor:
    """Per-pixel weights M_i / sum_i M_i; they sum to one wherever any mask is on."""
    return masks / masks.sum(dim=0, keepdim=True).clamp_min(1e-8)


def fuse_noise(
    noise_uncond: torch.Tensor,
    noise_text: torch.Tensor,
    masks: torch.Tensor,
    guidance: float,
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """Masked average of every branch's predictions, then classifier-free guidance.

    ``noise_*`` are (prompts, C, H, W); ``masks`` (prompts, H, W). Returns (1, C, H, W).
    """
    w = fusion_weights(masks.to(noise_text.dtype))[:, None]
    uncond = (w * noise_uncond).sum(dim=0, keepdim=True)
    text = (w * noise_text).sum(dim=0, keepdim=True)
    guided = uncond + guidance * (text - uncond)
    if guidance_rescale > 0:
        std_text = text.std(dim=list(range(1, text.ndim)), keepdim=True)
        std_guided = guided.std(dim=list(range(1, guided.ndim)), keepdim=True)
        rescaled = guided * (std_text / std_guided)
        guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
    return guided
