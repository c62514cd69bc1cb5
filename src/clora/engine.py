"""The replaceable step of the denoising loop: run every prompt branch on one latent.

A branch is one of CLoRA's N+1 prompts with its adapters (prompt 0: styles only; prompt i:
concept LoRA i plus the styles) and its text embeddings. A runner takes the current latent and
returns every branch's noise predictions and cross-attention maps.

- ``BatchedBranchRunner`` (the default) runs all branches in one UNet call, each sample routed
  through its own LoRAs (``routing``), split into chunks of at most ``max_batch`` samples;
- ``SequentialBranchRunner`` runs the UNet once per branch, switching adapters in between (the
  authors' computation, which ``parity`` keeps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from .attention import AttentionRecorder, StopForward, maps_from_probs
from .lora import activate_adapters
from .routing import LoraRouter, lora_layers


@dataclass
class Branch:
    adapters: tuple[str, ...]
    adapter_weights: tuple[float, ...]
    text_embeds: torch.Tensor  # (1, tokens, dim)
    negative_embeds: torch.Tensor  # (1, tokens, dim)
    # the UNet's extra conditioning of each half (SDXL: pooled text embedding and size ids), batch 1
    added_cond: dict[str, torch.Tensor] = field(default_factory=dict)
    negative_added_cond: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def adapter_weights_by_name(self) -> dict[str, float]:
        return dict(zip(self.adapters, self.adapter_weights, strict=True))


@dataclass(eq=False)
class BranchOutputs:
    maps: torch.Tensor  # (branches, h, w, tokens), float32; (branches, w, h, tokens) when transposed
    noise_uncond: torch.Tensor | None  # (branches, C, H, W), float32
    noise_text: torch.Tensor | None


def batched_added_cond(halves: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
    """The per-sample extra conditioning of a batch, row by row; None for families without any."""
    if not halves[0]:
        return None
    return {key: torch.cat([half[key] for half in halves]) for key in halves[0]}


class BranchRunner(Protocol):
    def __call__(self, model_input: torch.Tensor, timestep: Any, *, grad: bool, cfg: bool) -> BranchOutputs:
        """``model_input`` is the scheduler-scaled latent (1, C, H, W) in float32.

        ``grad``: keep the graph from ``model_input`` to the maps. ``cfg``: run [negative, prompt]
        and return noise predictions; without it only the prompt half runs and the UNet may stop
        after the last recorded layer (no noise predictions returned).
        """
        ...


@dataclass(eq=False)
class _RunnerBase:
    pipe: Any
    branches: Sequence[Branch]
    recorder: AttentionRecorder
    map_size: tuple[int, int]
    parity: bool = False

    def __post_init__(self) -> None:
        self.dtype = self.pipe.unet.dtype

    def _maps(self, probs: torch.Tensor) -> torch.Tensor:
        """One branch's maps from its recorded probabilities; parity keeps the authors' reading."""
        return maps_from_probs(
            probs, *self.map_size, cfg_halves="mean" if self.parity else "cond", transposed=self.parity
        )


@dataclass(eq=False)
class SequentialBranchRunner(_RunnerBase):
    """One UNet call per branch, adapters switched in between."""

    def __call__(self, model_input: torch.Tensor, timestep: Any, *, grad: bool, cfg: bool) -> BranchOutputs:
        unet = self.pipe.unet
        maps, uncond, text = [], [], []
        with torch.set_grad_enabled(grad):
            for branch in self.branches:
                activate_adapters(self.pipe, branch.adapters, branch.adapter_weights)
                if cfg:
                    latent = torch.cat([model_input, model_input]).to(self.dtype)
                    context = torch.cat([branch.negative_embeds, branch.text_embeds])
                    added = batched_added_cond([branch.negative_added_cond, branch.added_cond])
                else:
                    latent, context = model_input.to(self.dtype), branch.text_embeds
                    added = batched_added_cond([branch.added_cond])
                self.recorder.clear()
                self.recorder.stop_after_last = not cfg
                try:
                    noise = unet(
                        latent, timestep, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False
                    )[0]
                except StopForward:
                    noise = None
                maps.append(self._maps(self.recorder.pop().float()))
                if cfg:
                    uncond.append(noise[0].float())
                    text.append(noise[1].float())
        return BranchOutputs(
            maps=torch.stack(maps),
            noise_uncond=torch.stack(uncond) if cfg else None,
            noise_text=torch.stack(text) if cfg else None,
        )


@dataclass(eq=False)
class BatchedBranchRunner(_RunnerBase):
    """Every branch in one UNet call: the CFG pass as a batch of 2 x branches ([negative, prompt]
    per branch, side by side), the gradient pass as the branches' prompt halves. Each sample gets
    its branch's adapters through per-sample routing, so no adapter is switched in the loop.

    ``max_batch`` caps the samples of one UNet call; a pass with more samples runs in chunks. A
    chunked gradient pass recomputes each chunk's forward during the backward pass (activation
    checkpointing), so only one chunk's activations are held at a time.
    """

    max_batch: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.max_batch = self.max_batch or 2 * len(self.branches)
        names = sorted({name for branch in self.branches for name in branch.adapters})
        self.router = LoraRouter(lora_layers(self.pipe.unet, names))

    def __call__(self, model_input: torch.Tensor, timestep: Any, *, grad: bool, cfg: bool) -> BranchOutputs:
        samples = []  # (text embeddings, extra conditioning, adapters) per batch row
        for branch in self.branches:
            halves = [(branch.negative_embeds, branch.negative_added_cond)] if cfg else []
            halves.append((branch.text_embeds, branch.added_cond))
            samples += [(context, added, branch.adapter_weights_by_name) for context, added in halves]
        chunks = [samples[i : i + self.max_batch] for i in range(0, len(samples), self.max_batch)]
        activate_adapters(self.pipe, [], [])  # the adapters' own computation off: the router adds them
        with torch.set_grad_enabled(grad):
            outputs = []
            for chunk in chunks:
                run = lambda latent, chunk=chunk: self._forward(latent, timestep, chunk, stop=not cfg)
                if grad and len(chunks) > 1:
                    outputs.append(checkpoint(run, model_input, use_reentrant=False))
                else:
                    outputs.append(run(model_input))
        probs = torch.cat([p for p, _ in outputs])
        per_branch = 2 if cfg else 1
        maps = [self._maps(probs[i * per_branch : (i + 1) * per_branch]) for i in range(len(self.branches))]
        noise = torch.cat([n for _, n in outputs]) if cfg else None
        return BranchOutputs(
            maps=torch.stack(maps),
            noise_uncond=noise[0::2] if cfg else None,
            noise_text=noise[1::2] if cfg else None,
        )

    def _forward(
        self, model_input: torch.Tensor, timestep: Any, samples: list, stop: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One UNet call on ``samples``: recorded maps (rows, pixels, tokens) and noise (rows, C, H, W).

        Self-contained (routing hooks included), so a checkpointed chunk recomputes the same way
        during the backward pass."""
        latent = model_input.to(self.dtype).expand(len(samples), *model_input.shape[1:])
        context = torch.cat([embeds for embeds, _, _ in samples])
        added = batched_added_cond([added for _, added, _ in samples])
        self.recorder.clear()
        self.recorder.stop_after_last = stop
        with self.router.routing([adapters for _, _, adapters in samples]):
            try:
                noise = self.pipe.unet(
                    latent, timestep, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False
                )[0].float()
            except StopForward:
                noise = None
        return self.recorder.pop().float(), noise


ACTIVATION_BUDGET_BYTES = 6 * 2**30
"""What one pass's activations may take on a GPU by default: with SD 1.5's weights (~2.5 GB in
fp16) and eight LoRAs this keeps a 512x512 composition within a 12 GB card."""

def activation_bytes_per_sample(unet: torch.nn.Module, latent_size: tuple[int, int], bytes_per_unit: int) -> int:
    """Estimated activation memory of one sample in a gradient pass (the heavier of the two passes), from
    the model family's ``grad_bytes_per_unit`` (per latent pixel, first-level channel and dtype byte)."""
    element = torch.finfo(unet.dtype).bits // 8
    return bytes_per_unit * latent_size[0] * latent_size[1] * unet.config.block_out_channels[0] * element


def auto_max_batch(
    unet: torch.nn.Module, device: torch.device, latent_size: tuple[int, int], samples: int, bytes_per_unit: int
) -> int:
    """Samples per UNet call when the spec leaves ``max_batch`` unset: every sample on the CPU
    (memory is plentiful there); on a GPU as many as fit the activation budget and the free memory."""
    if device.type != "cuda":
        return samples
    free, _ = torch.cuda.mem_get_info(device)
    budget = min(ACTIVATION_BUDGET_BYTES, free // 2)
    return max(1, min(samples, budget // activation_bytes_per_sample(unet, latent_size, bytes_per_unit)))
