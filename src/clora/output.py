"""What one CLoRA call returns: the images and everything needed to inspect or redo each of them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from .memory import MemoryPlan
from .spec import CompositionSpec
from .tokens import TokenPlan


@dataclass
class CLoRAOutput:
    """What one call produced, with everything needed to inspect or redo each image.

    Per-image data is indexed by the image first: ``attention_maps[k][step]``, ``masks[k][step]``,
    ``losses[k][step]``. Maps and masks are kept only when the call asks (``keep_maps=True``).
    """

    images: list[Image.Image]  # one per image, seeds spec.seed, spec.seed + 1, ...
    spec: CompositionSpec  # the call's, fully resolved: sizes, prompts, token positions, LoRA hashes
    plan: TokenPlan
    attention_maps: list[list[torch.Tensor]] = field(default_factory=list)  # (prompts, h, w, tokens) per step
    masks: list[list[torch.Tensor]] = field(default_factory=list)  # (prompts, H/8, W/8) per step
    losses: list[list[list[float]]] = field(default_factory=list)  # per step: the loss before each update
    memory_plan: MemoryPlan | None = None  # samples per UNet call of the batched engine's passes

    def image_spec(self, k: int) -> CompositionSpec:
        """The spec that regenerates image ``k`` alone: its own seed, ``num_images: 1``."""
        return self.spec.replace(seed=self.spec.seed + k, num_images=1)


def per_image_losses(step_losses: list[torch.Tensor | None], images: int) -> list[list[list[float]]]:
    """``[image][step]``: the loss before each update, from per-step (updates, images) device tensors
    (None where a step made no update), read from the device in one transfer."""
    present = [losses for losses in step_losses if losses is not None]
    rows = torch.cat(present).tolist() if present else []  # (all updates, images)
    per_step, start = [], 0
    for losses in step_losses:
        count = 0 if losses is None else len(losses)
        per_step.append(rows[start : start + count])
        start += count
    return [[[row[k] for row in step] for step in per_step] for k in range(images)]
