"""The replaceable step of the denoising loop: run every prompt branch on one latent.

A branch is one of CLoRA's N+1 prompts with its adapters (prompt 0: styles only; prompt i:
concept LoRA i plus the styles) and its text embeddings. A runner takes the current latent and
returns every branch's noise predictions and cross-attention maps. ``SequentialBranchRunner`` runs
the UNet once per branch, switching adapters in between; a batched engine can replace it as long as
it honours the same call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch

from .attention import AttentionRecorder, StopForward, maps_from_probs
from .lora import activate_adapters


@dataclass
class Branch:
    adapters: tuple[str, ...]
    adapter_weights: tuple[float, ...]
    text_embeds: torch.Tensor  # (1, tokens, dim)
    negative_embeds: torch.Tensor  # (1, tokens, dim)


@dataclass
class BranchOutputs:
    maps: torch.Tensor  # (branches, h, w, tokens), float32; (branches, w, h, tokens) when transposed
    noise_uncond: torch.Tensor | None  # (branches, C, H, W), float32
    noise_text: torch.Tensor | None


class BranchRunner(Protocol):
    def __call__(self, model_input: torch.Tensor, timestep: Any, *, grad: bool, cfg: bool) -> BranchOutputs:
        """``model_input`` is the scheduler-scaled latent (1, C, H, W) in float32.

        ``grad``: keep the graph from ``model_input`` to the maps. ``cfg``: run [negative, prompt]
        and return noise predictions; without it only the prompt half runs and the UNet may stop
        after the last recorded layer (no noise predictions returned).
        """
        ...


class SequentialBranchRunner:
    """One UNet call per branch, adapters switched in between."""

    def __init__(
        self,
        pipe: Any,
        branches: Sequence[Branch],
        recorder: AttentionRecorder,
        map_size: tuple[int, int],
        parity: bool = False,
    ) -> None:
        self.pipe = pipe
        self.branches = list(branches)
        self.recorder = recorder
        self.map_size = map_size
        self.parity = parity

    def __call__(self, model_input: torch.Tensor, timestep: Any, *, grad: bool, cfg: bool) -> BranchOutputs:
        unet = self.pipe.unet
        maps, uncond, text = [], [], []
        with torch.set_grad_enabled(grad):
            for branch in self.branches:
                activate_adapters(self.pipe, branch.adapters, branch.adapter_weights)
                if cfg:
                    latent = torch.cat([model_input, model_input]).to(unet.dtype)
                    context = torch.cat([branch.negative_embeds, branch.text_embeds])
                else:
                    latent, context = model_input.to(unet.dtype), branch.text_embeds
                self.recorder.clear()
                self.recorder.stop_after_last = not cfg
                try:
                    noise = unet(latent, timestep, encoder_hidden_states=context, return_dict=False)[0]
                except StopForward:
                    noise = None
                maps.append(
                    maps_from_probs(
                        self.recorder.pop().float(),
                        *self.map_size,
                        cfg_halves="mean" if self.parity else "cond",
                        transposed=self.parity,
                    )
                )
                if cfg:
                    uncond.append(noise[0].float())
                    text.append(noise[1].float())
        return BranchOutputs(
            maps=torch.stack(maps),
            noise_uncond=torch.stack(uncond) if cfg else None,
            noise_text=torch.stack(text) if cfg else None,
        )
