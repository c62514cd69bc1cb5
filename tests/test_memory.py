"""The memory plan: samples per UNet call of each pass, from the device's memory (faked here)."""

import numpy as np
import pytest
import torch
from conftest import spec_dict

from clora import spec_from_dict
from clora.families import FLUX, SD, SDXL
from clora.memory import DeviceMemory, device_memory, margin_bytes, plan_for_denoiser, plan_memory

GiB = 2**30
CUDA_CONTEXT = GiB // 2  # what the CUDA context itself takes on a card before any tensor

# SD 1.5 / SDXL 1.0 in fp16 with rank-32 kohya LoRAs (benchmarks/speed.py's files): UNet, text encoders, VAE
SD15_WEIGHTS, SD15_LORA = int(2.13e9), int(75e6)
SDXL_WEIGHTS, SDXL_LORA = int(6.94e9), int(196e6)


def _plan(monkeypatch, family, total, weights, samples, latent):
    """The plan on a card of ``total`` bytes holding ``weights`` bytes, as ``pipe(...)`` makes it."""
    free = total - CUDA_CONTEXT - weights
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
    return plan_for_denoiser(320, torch.float16, family, samples, latent, torch.device("cuda"))  # SD's first level: 320


def _expected_peak(plan, weights):
    return CUDA_CONTEXT + weights + plan.peak_bytes


SD15_8_LORAS = (SD, SD15_WEIGHTS + 8 * SD15_LORA, 9, (64, 64))  # 9 prompt samples per image, 512x512
SDXL_2_LORAS = (SDXL, SDXL_WEIGHTS + 2 * SDXL_LORA, 3, (128, 128))  # 3 prompt samples per image, 1024x1024


@pytest.mark.parametrize(
    "model, card, images, gradient_batch, guidance_batch",
    [
        (SD15_8_LORAS, 24, 1, 9, 18),  # every pass in one call, on every card
        (SD15_8_LORAS, 24, 4, 36, 72),
        (SD15_8_LORAS, 80, 1, 9, 18),
        (SD15_8_LORAS, 80, 4, 36, 72),
        (SD15_8_LORAS, 141, 4, 36, 72),
        (SDXL_2_LORAS, 24, 1, 3, 6),
        (SDXL_2_LORAS, 24, 4, 3, 24),  # 12 gradient samples in chunks of 3, recomputed on the way back
        (SDXL_2_LORAS, 80, 1, 3, 6),
        (SDXL_2_LORAS, 80, 4, 12, 24),
        (SDXL_2_LORAS, 141, 4, 12, 24),
    ],
    ids=lambda value: value[0].name if isinstance(value, tuple) else str(value),
)
def test_the_plan_of_each_card(monkeypatch, model, card, images, gradient_batch, guidance_batch):
    family, weights, per_image, latent = model
    plan = _plan(monkeypatch, family, card * GiB, weights, images * per_image, latent)
    assert (plan.gradient_batch, plan.guidance_batch) == (gradient_batch, guidance_batch)
    assert plan.recompute == (gradient_batch < images * per_image)  # recomputation only where the pass is split
    assert _expected_peak(plan, weights) + margin_bytes(card * GiB) <= card * GiB  # the plan fits the card
    if family is SD and images == 1:  # the target: 8 LoRAs within 12 GB
        assert _expected_peak(plan, weights) < 12e9


# FLUX.1-dev in bf16: transformer 23.8 GB, T5-XXL 9.5 GB, CLIP-L 0.25 GB, VAE 0.17 GB; rank-32 LoRAs ~0.3 GB
FLUX_WEIGHTS, FLUX_LORA = int(33.7e9), int(0.3e9)


@pytest.mark.parametrize("card, images, gradient_batch", [(80, 1, 3), (80, 2, 4), (141, 4, 9)])
def test_flux_plans_count_the_t5_sequence_and_no_negative_half(monkeypatch, card, images, gradient_batch):
    """FLUX.1-dev with 2 LoRAs at 1024 px: 3 branches per image, one sample each (no negative half)."""
    weights = FLUX_WEIGHTS + 2 * FLUX_LORA
    free = card * GiB - CUDA_CONTEXT - weights
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, card * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
    samples = 3 * images
    plan = plan_for_denoiser(
        3072, torch.bfloat16, FLUX, samples, (128, 128), torch.device("cuda"), halves=1, text_tokens=512
    )
    # the measured bf16 figures (activation_memory.py --arch flux --fake): 9887.9 MB per gradient sample
    assert plan.gradient_bytes_per_sample == pytest.approx(9887.9 * 2**20, rel=0.01)
    assert plan.guidance_samples == samples  # guidance-distilled: no negative half
    assert (plan.gradient_batch, plan.guidance_batch) == (gradient_batch, samples)
    assert _expected_peak(plan, weights) + margin_bytes(card * GiB) <= card * GiB
    if images == 1:  # the target: 2 LoRAs within 80 GB, every pass in one call
        assert not plan.recompute and _expected_peak(plan, weights) < 80e9


def test_the_margin_is_8_percent_of_the_card_and_at_least_2_gib():
    assert margin_bytes(24 * GiB) == 2 * GiB
    assert margin_bytes(80 * GiB) == int(0.08 * 80 * GiB)


def test_max_batch_overrides_and_unknown_memory_runs_everything_at_once():
    plan = plan_memory(9, 18, 10**9, 10**8, DeviceMemory(free=10**12, total=10**12), max_batch=4)
    assert (plan.gradient_batch, plan.guidance_batch, plan.recompute) == (4, 4, True)
    plan = plan_memory(9, 18, 10**9, 10**8, None)
    assert (plan.gradient_batch, plan.guidance_batch, plan.recompute) == (9, 18, False)
    tiny = plan_memory(9, 18, 10**9, 10**8, DeviceMemory(free=GiB, total=8 * GiB))  # less than the margin free
    assert (tiny.gradient_batch, tiny.guidance_batch) == (1, 1)  # still runs, one sample at a time


def test_cuda_memory_counts_what_the_allocator_holds_unused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * GiB, 24 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 5 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 3 * GiB)
    assert device_memory(torch.device("cuda")) == DeviceMemory(free=12 * GiB, total=24 * GiB)
    cpu = device_memory(torch.device("cpu"))
    assert cpu is not None and 0 < cpu.free <= cpu.total


def test_the_pipeline_splits_its_passes_as_the_plan_says(tiny_pipe, tiny_model_dir, lora_dir, monkeypatch):
    """A device with room for 2 gradient samples: the gradient pass of 3 runs as 2 + 1 (recomputed on the way
    back) and the guidance pass in chunks of its own, larger size; the image is the unsplit run's."""
    import clora.memory

    spec = spec_from_dict(spec_dict(tiny_model_dir, lora_dir, steps=1, max_iter_to_alter=1, iterative_iters=0))
    whole = tiny_pipe(spec)
    unit = 8 * 8 * tiny_pipe.unet.config.block_out_channels[0] * 4  # latent pixels x channels x fp32 bytes
    room = 2 * SD.grad_bytes_per_unit * unit + 1
    fake = DeviceMemory(free=margin_bytes(8 * GiB) + room, total=8 * GiB)
    monkeypatch.setattr(clora.memory, "device_memory", lambda device: fake)
    calls = []
    hook = tiny_pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        split = tiny_pipe(spec)
    finally:
        hook.remove()
    guidance = min(6, room // (SD.guidance_bytes_per_unit * unit))
    assert split.memory_plan.gradient_batch == 2 and split.memory_plan.guidance_batch == guidance > 2
    # the gradient pass: both chunks forward, then each again in the backward pass (in autograd's order)
    assert calls[:2] == [2, 1] and sorted(calls[2:4]) == [1, 2]
    assert calls[4:] == [guidance] * (6 // guidance) + ([6 % guidance] if 6 % guidance else [])
    assert np.abs(np.asarray(split.images[0]).astype(int) - np.asarray(whole.images[0]).astype(int)).max() <= 1
