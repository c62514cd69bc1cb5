"""How many samples one UNet call takes: a memory plan from the device's own memory.

A CLoRA step runs two kinds of pass over the same samples (images x prompt branches):

- the **gradient pass** (the prompt halves, for the contrastive update): autograd keeps every
  activation up to the last recorded layer for the backward pass;
- the **guidance pass** (both classifier-free-guidance halves, no gradient): only the activations
  alive at one moment of the forward (the UNet's skip connections and one block's intermediates).

Each has its own size per sample, written per latent pixel, first-level UNet channel and dtype byte
in the model family (``families``, measured with ``benchmarks/activation_memory.py``). The budget is
what the device has free once the weights, LoRAs and prompt embeddings are in place, less a margin
(``margin_bytes``: 8% of the card, at least 2 GiB) for the CUDA context's workspaces, the allocator's
fragmentation, the backward pass's own buffers and the VAE decode. A pass with more samples than fit
runs in chunks; a chunked gradient pass recomputes each chunk's forward during the backward pass, so
recomputation happens only when a gradient pass is actually split. The spec's ``max_batch`` overrides
the plan. On the CPU the budget is the memory the system has available.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MARGIN_FRACTION = 0.08
MARGIN_MIN_BYTES = 2 * 2**30


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes the device has free now (after the weights and LoRAs) and in all."""

    free: int
    total: int


def margin_bytes(total: int) -> int:
    """What the plan leaves unplanned on a device of ``total`` bytes."""
    return max(MARGIN_MIN_BYTES, int(MARGIN_FRACTION * total))


def device_memory(device: torch.device) -> DeviceMemory | None:
    """Free and total memory of ``device``; None where it cannot be read.

    CUDA: the driver's free memory plus what PyTorch's caching allocator holds without using it.
    Apple MPS: the recommended working set less what the driver has allocated. CPU: Linux's
    ``MemAvailable`` and ``MemTotal``.
    """
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return DeviceMemory(free + cached, total)
    if device.type == "mps":
        total = torch.mps.recommended_max_memory()
        return DeviceMemory(max(0, total - torch.mps.driver_allocated_memory()), total)
    if device.type == "cpu":
        try:
            fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
            return DeviceMemory(
                int(fields["MemAvailable"].split()[0]) * 1024, int(fields["MemTotal"].split()[0]) * 1024
            )
        except (OSError, KeyError, ValueError):
            return None
    return None


def process_memory_bytes(field: str = "VmHWM") -> int:
    """A memory size of this process from Linux's ``/proc/self/status``: ``VmHWM`` (peak resident) or
    ``VmRSS`` (resident now)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def sample_bytes(
    bytes_per_unit: float,
    latent_size: tuple[int, int],
    first_channels: int,
    dtype: torch.dtype,
    text_bytes_per_unit: float = 0,
    text_tokens: int = 0,
) -> int:
    """Memory of one sample from a family's per-unit figures (per latent pixel, or per text token, per
    channel and dtype byte)."""
    element = torch.finfo(dtype).bits // 8
    units = bytes_per_unit * latent_size[0] * latent_size[1] + text_bytes_per_unit * text_tokens
    return int(units * first_channels * element)


@dataclass(frozen=True)
class MemoryPlan:
    """Samples per UNet call for each pass of one step, and what they are expected to take."""

    gradient_samples: int  # samples of a whole gradient pass (images x branches)
    guidance_samples: int  # samples of a whole guidance pass (images x branches x 2 CFG halves)
    gradient_batch: int
    guidance_batch: int
    gradient_bytes_per_sample: int
    guidance_bytes_per_sample: int
    budget_bytes: int | None = None  # None: no device budget was used (max_batch, or unknown memory)

    @property
    def recompute(self) -> bool:
        """Whether the gradient pass is split, so its chunks recompute their forward on the way back."""
        return self.gradient_batch < self.gradient_samples

    @property
    def peak_bytes(self) -> int:
        """The larger of one gradient chunk's and one guidance chunk's expected activation memory."""
        return max(
            self.gradient_batch * self.gradient_bytes_per_sample, self.guidance_batch * self.guidance_bytes_per_sample
        )


def plan_memory(
    gradient_samples: int,
    guidance_samples: int,
    gradient_bytes_per_sample: int,
    guidance_bytes_per_sample: int,
    memory: DeviceMemory | None,
    max_batch: int | None = None,
) -> MemoryPlan:
    """The plan for passes of these sizes: ``max_batch`` when given; else as many samples per call as
    fit the device's free memory less the margin (at least one); every sample when the memory is
    unknown."""
    sizes = dict(
        gradient_samples=gradient_samples,
        guidance_samples=guidance_samples,
        gradient_bytes_per_sample=gradient_bytes_per_sample,
        guidance_bytes_per_sample=guidance_bytes_per_sample,
    )
    if max_batch is not None:
        return MemoryPlan(
            **sizes, gradient_batch=min(max_batch, gradient_samples), guidance_batch=min(max_batch, guidance_samples)
        )
    if memory is None:
        return MemoryPlan(**sizes, gradient_batch=gradient_samples, guidance_batch=guidance_samples)
    budget = max(0, memory.free - margin_bytes(memory.total))

    def fitting(samples: int, per_sample: int) -> int:
        return max(1, min(samples, budget // max(1, per_sample)))

    return MemoryPlan(
        **sizes,
        gradient_batch=fitting(gradient_samples, gradient_bytes_per_sample),
        guidance_batch=fitting(guidance_samples, guidance_bytes_per_sample),
        budget_bytes=budget,
    )


def plan_for_denoiser(
    width: int,
    dtype: torch.dtype,
    family: Any,
    samples: int,
    latent_size: tuple[int, int],
    device: torch.device,
    max_batch: int | None = None,
    halves: int = 2,
    text_tokens: int = 0,
) -> MemoryPlan:
    """The plan for a step over ``samples`` prompt samples (images x branches; the guidance pass has
    ``halves`` times as many: 2 with a negative half, 1 for guidance-distilled Flux), from the
    ``family``'s per-sample figures, the denoiser's ``width`` (a UNet's first-level channels, a
    transformer's hidden size), the text sequence's length where the family counts it, and the memory
    ``device`` has now (call it once the weights, LoRAs and prompt embeddings are in place)."""
    grad_text, guidance_text = family.text_grad_bytes_per_unit, family.text_guidance_bytes_per_unit
    return plan_memory(
        gradient_samples=samples,
        guidance_samples=halves * samples,
        gradient_bytes_per_sample=sample_bytes(
            family.grad_bytes_per_unit, latent_size, width, dtype, grad_text, text_tokens
        ),
        guidance_bytes_per_sample=sample_bytes(
            family.guidance_bytes_per_unit, latent_size, width, dtype, guidance_text, text_tokens
        ),
        memory=None if max_batch else device_memory(device),
        max_batch=max_batch,
    )
