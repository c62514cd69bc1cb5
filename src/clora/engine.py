"""The replaceable step of the denoising loop: run every prompt branch on the images' latents.

A branch is one of CLoRA's N+1 prompts with its adapters (prompt 0: styles only; prompt i:
concept LoRA i plus the styles) and its text embeddings. A runner takes the current latents of
the K images of one call and returns every (image, branch) pair's noise predictions and
text-attention maps. The denoiser (a UNet, a Flux transformer) is called through the pipeline's
``denoise``, with the rows' text embeddings and extra conditioning.

- ``BatchedBranchRunner`` (the default) runs all of them in one denoiser call per pass, each sample
  routed through its own LoRAs (``routing``), split into chunks by the memory plan (``memory``);
- ``SequentialBranchRunner`` runs the denoiser once per branch (all images at once), switching adapters
  in between (the authors' computation, which ``parity`` keeps).

Everything a call needs that does not depend on the latent (the batch's text embeddings, extra
conditioning, LoRA row groups, which image each row reads) is built once, when the runner is made.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.utils.checkpoint import checkpoint

from .attention import AttentionRecorder, StopForward, maps_from_probs
from .lora import activate_adapters
from .memory import MemoryPlan
from .routing import LoraRouter, RowGroups, row_groups


@dataclass
class Branch:
    adapters: tuple[str, ...]  # each adapter once
    adapter_weights: tuple[float, ...]
    text_embeds: torch.Tensor  # (1, tokens, dim)
    negative_embeds: torch.Tensor | None  # (1, tokens, dim); None for a model without a negative half
    # the denoiser's extra conditioning of each half (SDXL: pooled text embedding and size ids; Flux:
    # pooled CLIP embedding and distilled guidance), batch 1
    added_cond: dict[str, torch.Tensor] = field(default_factory=dict)
    negative_added_cond: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def adapter_weights_by_name(self) -> dict[str, float]:
        return dict(zip(self.adapters, self.adapter_weights, strict=True))


@dataclass(eq=False)
class BranchOutputs:
    maps: torch.Tensor  # (images, branches, h, w, tokens), float32; (images, branches, w, h, tokens) when transposed
    noise_uncond: torch.Tensor | None  # (images, branches, C, H, W), float32
    noise_text: torch.Tensor | None


def batched_added_cond(halves: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
    """The per-sample extra conditioning of a batch, row by row; None for families without any."""
    if not halves[0]:
        return None
    return {key: torch.cat([half[key] for half in halves]) for key in halves[0]}


class BranchRunner(Protocol):
    def __call__(self, model_input: torch.Tensor, timestep: Any, *, grad: bool, cfg: bool) -> BranchOutputs:
        """``model_input`` is the scheduler-scaled latents (images, C, H, W) in float32; ``timestep``
        the UNet's timestep (a tensor on the device).

        ``grad``: keep the graph from ``model_input`` to the maps. ``cfg``: the noise pass: run
        [negative, prompt] (or the prompt alone for a model without a negative half) and return
        noise predictions; without it only the prompt half runs and the denoiser may stop after the
        last recorded layer (no noise predictions returned).
        """
        ...


@dataclass(eq=False)
class _RunnerBase:
    pipe: Any
    branches: Sequence[Branch]
    recorder: AttentionRecorder
    map_size: tuple[int, int]
    parity: bool = False
    images: int = 1
    negative: bool = True  # whether the noise pass has a negative half (classifier-free guidance)

    def __post_init__(self) -> None:
        self.dtype = self.pipe.denoiser.dtype

    def _halves(self, cfg: bool) -> int:
        return 2 if cfg and self.negative else 1

    def _maps(self, probs: torch.Tensor) -> torch.Tensor:
        """Maps (..., h, w, tokens) from recorded probabilities (..., halves, pixels, tokens); parity
        keeps the authors' reading."""
        return maps_from_probs(
            probs, *self.map_size, cfg_halves="mean" if self.parity else "cond", transposed=self.parity
        )


@dataclass(eq=False)
class SequentialBranchRunner(_RunnerBase):
    """One denoiser call per branch (the K images together), adapters switched in between."""

    def __post_init__(self) -> None:
        super().__post_init__()
        k = self.images
        # per branch: the CFG batch's rows [negative, prompt] for each image, and the prompt rows alone
        self._prompt = [
            (b.text_embeds.repeat(k, 1, 1), _repeat(batched_added_cond([b.added_cond]), k)) for b in self.branches
        ]
        self._cfg = (  # without a negative half the noise pass runs the prompt rows alone
            [
                (
                    torch.cat([b.negative_embeds, b.text_embeds]).repeat(k, 1, 1),
                    _repeat(batched_added_cond([b.negative_added_cond, b.added_cond]), k),
                )
                for b in self.branches
            ]
            if self.negative
            else self._prompt
        )

    def __call__(self, model_input: torch.Tensor, timestep: Any, *, grad: bool, cfg: bool) -> BranchOutputs:
        k, halves = self.images, self._halves(cfg)
        latent = (model_input.repeat_interleave(halves, dim=0) if halves > 1 else model_input).to(self.dtype)
        maps, uncond, text = [], [], []
        with torch.set_grad_enabled(grad):
            for index, branch in enumerate(self.branches):
                activate_adapters(self.pipe, branch.adapters, branch.adapter_weights)
                context, added = (self._cfg if cfg else self._prompt)[index]
                self.recorder.clear()
                self.recorder.stop_after_last = not cfg
                try:
                    noise = self.pipe.denoise(latent, timestep, context, added)
                except StopForward:
                    noise = None
                probs = self.recorder.pop().float()
                maps.append(self._maps(probs.view(k, halves, *probs.shape[1:])))
                if cfg:
                    noise = noise.float().view(k, halves, *noise.shape[1:])
                    uncond.append(noise[:, 0])
                    text.append(noise[:, -1])
        return BranchOutputs(
            maps=torch.stack(maps, dim=1),
            noise_uncond=torch.stack(uncond, dim=1) if cfg and halves == 2 else None,
            noise_text=torch.stack(text, dim=1) if cfg else None,
        )


def _repeat(added: dict[str, torch.Tensor] | None, times: int) -> dict[str, torch.Tensor] | None:
    return (
        None if added is None else {key: value.repeat(times, *[1] * (value.ndim - 1)) for key, value in added.items()}
    )


@dataclass(eq=False)
class _Chunk:
    """One denoiser call of a pass: its rows' text embeddings, extra conditioning, LoRA row groups, and
    which image's latent each row reads (None: every row reads the single image's)."""

    rows: int
    image_index: torch.Tensor | None
    context: torch.Tensor
    added: dict[str, torch.Tensor] | None
    groups: RowGroups


@dataclass(eq=False)
class BatchedBranchRunner(_RunnerBase):
    """Every branch of every image in one denoiser call per pass: the guidance pass as a batch of
    branches x images x [negative, prompt], the gradient pass as the prompt halves, rows ordered
    branch by branch so each adapter covers one contiguous range of rows. Each sample gets its
    branch's adapters through per-sample routing, so no adapter is switched in the loop.

    ``plan`` (``memory.MemoryPlan``) caps the samples of one denoiser call, separately for the two
    passes; a pass with more samples runs in chunks. A chunked gradient pass recomputes each chunk's
    forward during the backward pass (activation checkpointing), so only one chunk's activations are
    held at a time. ``router`` is the composition's ``LoraRouter``, installed by the caller.
    """

    plan: MemoryPlan | None = None
    router: LoraRouter | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.router is None:
            raise ValueError("BatchedBranchRunner needs the composition's LoraRouter")
        plan = self.plan
        self._passes = {
            True: self._chunks(cfg=True, batch=plan.guidance_batch if plan else None),
            False: self._chunks(cfg=False, batch=plan.gradient_batch if plan else None),
        }

    def _chunks(self, cfg: bool, batch: int | None) -> list[_Chunk]:
        rows = []  # (image, text embeddings, extra conditioning, adapters) per batch row
        for branch in self.branches:
            halves = [(branch.negative_embeds, branch.negative_added_cond)] if self._halves(cfg) == 2 else []
            halves.append((branch.text_embeds, branch.added_cond))
            rows += [(k, *half, branch.adapter_weights_by_name) for k in range(self.images) for half in halves]
        batch = batch or len(rows)
        device = self.branches[0].text_embeds.device
        chunks = []
        for start in range(0, len(rows), batch):
            part = rows[start : start + batch]
            images = [k for k, _, _, _ in part]
            chunks.append(
                _Chunk(
                    rows=len(part),
                    image_index=None if self.images == 1 else torch.tensor(images, device=device),
                    context=torch.cat([context for _, context, _, _ in part]),
                    added=batched_added_cond([added for _, _, added, _ in part]),
                    groups=row_groups([adapters for _, _, _, adapters in part]),
                )
            )
        return chunks

    def __call__(self, model_input: torch.Tensor, timestep: Any, *, grad: bool, cfg: bool) -> BranchOutputs:
        chunks = self._passes[cfg]
        activate_adapters(self.pipe, [], [])  # the adapters' own computation off: the router adds them
        with torch.set_grad_enabled(grad):
            outputs = []
            for chunk in chunks:
                if grad and len(chunks) > 1:
                    outputs.append(
                        checkpoint(self._forward, model_input, timestep, chunk, not cfg, use_reentrant=False)
                    )
                else:
                    outputs.append(self._forward(model_input, timestep, chunk, not cfg))
        halves, shape = self._halves(cfg), (len(self.branches), self.images)
        probs = torch.cat([p for p, _ in outputs])
        maps = self._maps(probs.view(*shape, halves, *probs.shape[1:]))  # (branches, images, h, w, tokens)
        if not cfg:
            return BranchOutputs(maps=maps.transpose(0, 1), noise_uncond=None, noise_text=None)
        noise = torch.cat([n for _, n in outputs])
        noise = noise.view(*shape, halves, *noise.shape[1:]).transpose(0, 1)  # (images, branches, halves, C, H, W)
        uncond = noise[:, :, 0] if halves == 2 else None
        return BranchOutputs(maps=maps.transpose(0, 1), noise_uncond=uncond, noise_text=noise[:, :, -1])

    def _forward(
        self, model_input: torch.Tensor, timestep: Any, chunk: _Chunk, stop: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One denoiser call on a chunk: recorded maps (rows, pixels, tokens) and noise (rows, C, H, W).

        Self-contained (its routing included), so a checkpointed chunk recomputes the same way
        during the backward pass."""
        if chunk.image_index is None:
            latent = model_input.to(self.dtype).expand(chunk.rows, *model_input.shape[1:])
        else:
            latent = model_input.index_select(0, chunk.image_index).to(self.dtype)
        self.recorder.clear()
        self.recorder.stop_after_last = stop
        with self.router.routing(chunk.groups):
            try:
                noise = self.pipe.denoise(latent, timestep, chunk.context, chunk.added).float()
            except StopForward:
                noise = None
        return self.recorder.pop().float(), noise


@contextlib.contextmanager
def reproducible_gradients(device: torch.device) -> Iterator[None]:
    """Gradient passes on the CPU run on one intra-op thread.

    With two threads, identical runs differed by 3-5/255 on about a third of the pixels, and only
    when the contrastive update ran: the no-grad passes were reproducible, and so were the common
    backward kernels tested alone (SDPA, conv, group/layer norm), so the op was not pinned down.
    One thread for the update makes the same seed give the same pixels; GPUs are unaffected.
    """
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
