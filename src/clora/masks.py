"""Region masks cut from attention maps, and the masked fusion of noise predictions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def threshold_mask(token_maps: torch.Tensor, alpha: float) -> torch.Tensor:
    """Union over tokens of ``map > alpha * max(map)``. ``token_maps`` is (..., tokens, h, w)."""
    peak = token_maps.amax(dim=(-2, -1), keepdim=True)
    return (token_maps > alpha * peak).any(dim=-3).float()


def dilate(mask: torch.Tensor) -> torch.Tensor:
    """3x3 dilation of (..., h, w) masks."""
    flat = mask.reshape(-1, 1, *mask.shape[-2:])
    return F.max_pool2d(flat, kernel_size=3, stride=1, padding=1).reshape(mask.shape)


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
    mask_tokens: Sequence[Sequence[int] | torch.Tensor],
    alpha: float,
    morphology: Sequence[str] = (),
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Masks for all prompts, (..., prompts, H, W), resized (nearest) to ``size``.

    ``maps`` is (..., prompts, h, w, tokens): any leading dimensions (several images) are kept.
    Prompt i >= 1 gets the thresholded union of its mask tokens' maps (``mask_tokens[i]``: positions,
    or a long tensor of them already on the maps' device), then each morphology op with a 3x3
    kernel; prompt 0 (the background) covers every pixel no concept mask covers.
    """
    masks = [torch.zeros(maps.shape[:-4] + maps.shape[-3:-1], device=maps.device)]
    for i in range(1, maps.shape[-4]):
        tokens = torch.as_tensor(mask_tokens[i], dtype=torch.long, device=maps.device)
        token_maps = maps[..., i, :, :, :].index_select(-1, tokens).movedim(-1, -3)  # (..., tokens, h, w)
        mask = threshold_mask(token_maps, alpha)
        for op in morphology:
            mask = MORPHOLOGY[op](mask)
        masks.append(mask)
    if len(masks) > 1:
        masks[0] = 1.0 - torch.stack(masks[1:]).amax(dim=0)
    else:
        masks[0] = torch.ones_like(masks[0])
    stacked = torch.stack(masks, dim=-3)
    if size is not None and tuple(stacked.shape[-2:]) != tuple(size):
        flat = stacked.reshape(-1, *stacked.shape[-3:])
        stacked = F.interpolate(flat, size=size, mode="nearest").reshape(*stacked.shape[:-2], *size)
    return stacked


def fusion_weights(masks: torch.Tensor) -> torch.Tensor:
    """Per-pixel weights M_i / sum_i M_i over the prompts (dimension -3 of (..., prompts, H, W)); they
    sum to one wherever any mask is on."""
    return masks / masks.sum(dim=-3, keepdim=True).clamp_min(1e-8)


def fuse_noise(
    noise_uncond: torch.Tensor | None,
    noise_text: torch.Tensor,
    masks: torch.Tensor,
    guidance: float,
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """Masked average of every branch's predictions, then classifier-free guidance.

    ``noise_*`` are (..., prompts, C, H, W), ``masks`` (..., prompts, H, W); the leading dimensions
    (several images) are kept: (images, prompts, C, H, W) gives (images, C, H, W). Without a negative
    half (``noise_uncond`` None: a guidance-distilled model) the fused prompt predictions are the result.
    """
    w = fusion_weights(masks.to(noise_text.dtype)).unsqueeze(-3)  # (..., prompts, 1, H, W)
    text = (w * noise_text).sum(dim=-4)
    if noise_uncond is None:
        return text
    uncond = (w * noise_uncond).sum(dim=-4)
    guided = uncond + guidance * (text - uncond)
    if guidance_rescale > 0:  # per image, over its channels and pixels
        std_text = text.std(dim=(-3, -2, -1), keepdim=True)
        std_guided = guided.std(dim=(-3, -2, -1), keepdim=True)
        rescaled = guided * (std_text / std_guided)
        guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
    return guided
