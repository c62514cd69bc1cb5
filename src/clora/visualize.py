"""Pictures of what CLoRA saw: per-concept attention maps and the masks cut from them.

Colours run from dark blue (0) to yellow (the top of the tile's scale). Masks use a fixed 0..1
scale, so a mask that covers everything is all yellow and an empty one all blue. An attention map
is drawn from 0 to its own maximum, which its label prints (``cat: attention 0..0.042``): attention
values are small and vary from map to map, and the label keeps two maps comparable.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .output import CLoRAOutput

LABEL_HEIGHT = 14
GAP = 6  # white space between tiles, so neighbouring maps do not read as one picture


def heatmap(values: torch.Tensor, size: tuple[int, int], top: float = 1.0) -> Image.Image:
    """A (h, w) tensor as a dark-blue (0) -> yellow (``top``) picture of ``size`` (width, height)."""
    x = (values.detach().float().cpu() / top if top > 0 else torch.zeros_like(values.float().cpu())).clamp(0, 1)
    x = x.numpy()
    rgb = np.stack([np.clip(1.5 * x, 0, 1), np.clip(1.5 * x - 0.5, 0, 1) ** 0.8, 0.45 * (1 - x)], axis=-1)
    picture = Image.fromarray((rgb * 255).astype(np.uint8), "RGB")
    return picture.resize(size, Image.NEAREST)


def concept_attention(output: CLoRAOutput, prompt_index: int, step: int = -1, image: int = 0) -> torch.Tensor:
    """A concept prompt's own-token maps of one image at one denoising step (default: the last),
    averaged, (h, w).

    The last step is where the objects are where the image shows them (and where the final masks
    were cut); early steps' maps follow a layout that is still moving.
    """
    tokens = list(output.plan.mask_tokens[prompt_index])
    return output.attention_maps[image][step][prompt_index][..., tokens].float().mean(-1)


def render_maps(
    output: CLoRAOutput, labels: Sequence[str] | None = None, tile: int = 192, step: int = -1, image: int = 0
) -> Image.Image:
    """One picture of image ``image`` of the output (made with ``keep_maps=True``): the image, then per
    concept its attention map (top) and mask (bottom) at one denoising step (default: the last); the
    background mask sits under the image."""
    if not output.attention_maps:
        raise ValueError("the output kept no attention maps; generate with keep_maps=True")
    k = image
    image = output.images[k]
    scale = tile / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    n = len(output.plan.prompts)
    labels = list(labels) if labels else [c.label for c in output.spec.concepts]
    masks = output.masks[k][step].float()
    canvas = Image.new("RGB", ((size[0] + GAP) * n - GAP, 2 * (size[1] + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(canvas)

    def put(picture: Image.Image, column: int, row: int, label: str) -> None:
        x, y = column * (size[0] + GAP), row * (size[1] + LABEL_HEIGHT)
        draw.text((x + 3, y + 1), label, fill="black")
        canvas.paste(picture, (x, y + LABEL_HEIGHT))

    put(image.resize(size), 0, 0, "image")
    put(heatmap(masks[0], size), 0, 1, "background mask")
    for i in range(1, n):
        attention = concept_attention(output, i, step, k)
        top = float(attention.max())
        put(heatmap(attention, size, top), i, 0, attention_label(labels[i - 1], top))
        put(heatmap(masks[i], size), i, 1, f"{labels[i - 1]}: mask")
    return canvas


def attention_label(label: str, top: float) -> str:
    """A map tile's label with its scale: colours run from 0 to ``top``."""
    return f"{label}: attention 0..{top:.3g}"
