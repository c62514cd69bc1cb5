"""Pictures of what CLoRA saw: per-concept attention maps and the masks cut from them."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .pipeline import CLoRAOutput

LABEL_HEIGHT = 14
GAP = 6  # white space between tiles, so neighbouring maps do not read as one picture


def heatmap(values: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """A (h, w) tensor as a dark-blue -> yellow picture of ``size`` (width, height), min-max scaled."""
    x = values.float()
    x = (x - x.min()) / (x.max() - x.min() + 1e-8)
    x = x.numpy()
    rgb = np.stack([np.clip(1.5 * x, 0, 1), np.clip(1.5 * x - 0.5, 0, 1) ** 0.8, 0.45 * (1 - x)], axis=-1)
    picture = Image.fromarray((rgb * 255).astype(np.uint8), "RGB")
    return picture.resize(size, Image.NEAREST)


def concept_attention(output: CLoRAOutput, prompt_index: int, step: int = -1) -> torch.Tensor:
    """A concept prompt's own-token maps at one denoising step (default: the last), averaged, (h, w).

    The last step is where the objects are where the image shows them (and where the final masks
    were cut); early steps' maps follow a layout that is still moving.
    """
    tokens = list(output.plan.mask_tokens[prompt_index])
    return output.attention_maps[step][prompt_index][..., tokens].float().mean(-1)


def render_maps(output: CLoRAOutput, labels: Sequence[str] | None = None, tile: int = 192) -> Image.Image:
    """One picture: the image, then per concept its last-step attention map (top) and mask
    (bottom); the background mask sits under the image."""
    image = output.images[0]
    scale = tile / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    n = len(output.plan.prompts)
    labels = list(labels) if labels else [c.label for c in output.spec.concepts]
    last_masks = output.masks[-1].float()
    canvas = Image.new("RGB", ((size[0] + GAP) * n - GAP, 2 * (size[1] + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(canvas)

    def put(picture: Image.Image, column: int, row: int, label: str) -> None:
        x, y = column * (size[0] + GAP), row * (size[1] + LABEL_HEIGHT)
        draw.text((x + 3, y + 1), label, fill="black")
        canvas.paste(picture, (x, y + LABEL_HEIGHT))

    put(image.resize(size), 0, 0, "image")
    put(heatmap(last_masks[0], size), 0, 1, "background mask")
    for i in range(1, n):
        put(heatmap(concept_attention(output, i), size), i, 0, f"{labels[i - 1]}: attention")
        put(heatmap(last_masks[i], size), i, 1, f"{labels[i - 1]}: mask")
    return canvas
