"""Several images per call (one batch through every pass) and a loop that never waits for the device."""

import contextlib

import numpy as np
import pytest
import torch
from conftest import spec_dict

from clora import spec_from_dict


@pytest.fixture(scope="module")
def spec(tiny_model_dir, lora_dir):
    return spec_from_dict(spec_dict(tiny_model_dir, lora_dir, seed=11, iterative_iters=2))


def _pixels(image):
    return np.asarray(image).astype(int)


@pytest.mark.parametrize(
    "engine, scheduler, max_batch",
    [("batched", "ddim", None), ("batched", "euler_a", 4), ("sequential", "ddim", None)],
    ids=["batched", "stochastic-scheduler-in-chunks", "sequential"],
)
def test_each_image_of_a_batch_is_its_own_single_run(tiny_pipe, spec, engine, scheduler, max_batch):
    """K=3 images in one call == three calls of one image (seeds 11, 12, 13): pixels within 1/255 and the
    same contrastive losses, so no image's update followed another's loss. euler_a draws noise at every
    step: each image keeps its own seed's stream."""
    batch_spec = spec.replace(engine=engine, scheduler=scheduler, max_batch=max_batch, num_images=3)
    batch = tiny_pipe(batch_spec)
    assert len(batch.images) == len(batch.losses) == 3
    for k in range(3):
        alone = tiny_pipe(batch.image_spec(k))
        assert alone.spec.seed == 11 + k and alone.spec.num_images == 1
        assert np.abs(_pixels(batch.images[k]) - _pixels(alone.images[0])).max() <= 1
        for ours, theirs in zip(batch.losses[k], alone.losses[0], strict=True):
            assert np.allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    assert not np.array_equal(_pixels(batch.images[0]), _pixels(batch.images[1]))
    assert batch.losses[0][0] != batch.losses[1][0]


def test_a_guidance_pass_is_one_unet_call_for_all_images_and_branches(tiny_pipe, spec):
    calls = []
    hook = tiny_pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        result = tiny_pipe(spec.replace(num_images=4, steps=2, max_iter_to_alter=1, iterative_iters=0))
    finally:
        hook.remove()
    # 4 images x 3 branches: the gradient pass 12 prompt halves, the guidance pass 24 samples
    assert calls == [12, 24, 24]
    assert (result.memory_plan.gradient_batch, result.memory_plan.guidance_batch) == (12, 24)
    assert not result.memory_plan.recompute


HOST_CONVERSIONS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def counting_host_conversions(counts: list):
    """Every tensor-to-host conversion made inside the block, as a list of method names."""
    original = {name: getattr(torch.Tensor, name) for name in HOST_CONVERSIONS}

    def counting(name):
        def method(self, *args, **kwargs):
            counts.append(name)
            return original[name](self, *args, **kwargs)

        return method

    for name in HOST_CONVERSIONS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield
    finally:
        for name, method in original.items():
            setattr(torch.Tensor, name, method)


def _around_the_loop(pipe, monkeypatch, guard):
    """Run ``guard`` from the first to the last step: the progress bar opens right before the loop's
    first step and closes right after its last."""
    real = pipe.progress_bar

    @contextlib.contextmanager
    def progress_bar(*args, **kwargs):
        with real(*args, **kwargs) as bar, guard():
            yield bar

    monkeypatch.setattr(pipe, "progress_bar", progress_bar)


@pytest.mark.parametrize("keep_maps", [False, True], ids=["default", "keep-maps"])
def test_no_tensor_reaches_the_host_inside_the_loop(tiny_pipe, spec, monkeypatch, keep_maps):
    """Contrastive updates (1 + 2 at step 0, 1 at step 1), masks, fusion and the scheduler (DDIM, the
    default) on two images: no .item(), .cpu(), .tolist(), .numpy() or bool(tensor) between the first
    and the last step. The losses are read once, after the loop."""
    counts = []
    _around_the_loop(tiny_pipe, monkeypatch, lambda: counting_host_conversions(counts))
    result = tiny_pipe(spec.replace(num_images=2), keep_maps=keep_maps)
    assert counts == []
    assert [len(step) for step in result.losses[1]] == [3, 1, 0]  # the losses still arrive, per image and step
    assert len(result.attention_maps) == (2 if keep_maps else 0)


def test_a_run_without_keep_maps_keeps_no_maps(tiny_pipe, spec):
    result = tiny_pipe(spec)
    assert result.attention_maps == [] and result.masks == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_inside_the_loop_on_cuda(tiny_model_dir, spec, monkeypatch):
    from clora import CLoRAPipeline

    pipe = CLoRAPipeline.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float16).to("cuda")
    pipe.set_progress_bar_config(disable=True)

    @contextlib.contextmanager
    def sync_is_an_error():
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    _around_the_loop(pipe, monkeypatch, sync_is_an_error)
    result = pipe(spec.replace(num_images=2))
    assert len(result.images) == 2
