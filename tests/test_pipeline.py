"""The pipeline on a tiny random SD 1.5-layout model with real LoRA files on disk."""

import numpy as np
import pytest
import torch
from conftest import spec_dict
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from clora import CLoRAError, spec_from_dict
from clora.attention import RecordingAttnProcessor, recorded_layer_names, recording_cross_attention
from clora.loss import contrastive_loss
from clora.methods import METHODS
from clora.families import FLUX, SD, SDXL
from clora.schedulers import SCHEDULERS


def pixels(result):
    return np.asarray(result.images[0]).astype(int)


@pytest.fixture(scope="module")
def spec(tiny_model_dir, lora_dir):
    return spec_from_dict(spec_dict(tiny_model_dir, lora_dir))


@pytest.fixture(scope="module")
def default_result(tiny_pipe, spec):
    """The image of ``spec``, made once for the tests that compare against it."""
    return tiny_pipe(spec, keep_maps=True)


def test_loads_through_from_pretrained_with_sd15_layout(tiny_pipe):
    assert recorded_layer_names(tiny_pipe.unet) == [
        "down_blocks.2.attentions.0.transformer_blocks.0.attn2.processor",
        "down_blocks.2.attentions.1.transformer_blocks.0.attn2.processor",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor",
        "up_blocks.1.attentions.2.transformer_blocks.0.attn2.processor",
    ]


def test_result_holds_image_maps_masks_prompts_and_losses(default_result):
    result = default_result
    assert result.images[0].size == (64, 64) and len(result.images) == 1
    assert len(result.attention_maps[0]) == len(result.masks[0]) == 3  # image 0, per step
    assert result.attention_maps[0][0].shape == (3, 2, 2, 77)  # (prompts, H/32, W/32, tokens)
    assert result.masks[0][0].shape == (3, 8, 8)  # latent size
    assert [len(step) for step in result.losses[0]] == [2, 1, 0]  # 1 + 1 iterative update at step 0
    assert result.plan.prompts[1] == "a sks cat and a dog in a garden"
    assert result.spec.height == 64 and len(result.spec.concepts[0].sha256) == 64
    assert result.spec.concept_tokens == (((2,), (2, 3), (2,)), ((5,), (6,), (5, 6)))
    assert result.spec.mask_tokens == ((), (2, 3), (5, 6))


def test_same_seed_same_pixels_other_seed_other_pixels(tiny_pipe, spec, default_result):
    """With two threads, where the contrastive update's gradient used to vary from run to run. The
    fix (``reproducible_gradients``) wraps the loop's update, whichever engine runs the branches."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first, again = tiny_pipe(spec), tiny_pipe(spec)
    finally:
        torch.set_num_threads(previous)
    assert np.array_equal(pixels(first), pixels(again)) and first.losses == again.losses
    assert not np.array_equal(pixels(default_result), pixels(tiny_pipe(spec, seed=4)))


def test_kohya_and_diffusers_files_of_the_same_weights_give_the_same_image(tiny_pipe, spec, lora_dir, default_result):
    kohya = spec.replace(
        concepts=[
            {"lora": str(lora_dir / "cat_kohya.safetensors"), "phrase": "cat", "trigger": "sks cat"},
            {"lora": str(lora_dir / "dog_kohya.safetensors"), "phrase": "dog", "trigger": "sks dog"},
        ],
        styles=[{"lora": str(lora_dir / "style_unet_only_kohya.safetensors"), "weight": 0.8}],
    )
    diffusers_format = spec.replace(styles=[{"lora": str(lora_dir / "style_unet_only.safetensors"), "weight": 0.8}])
    a, b = pixels(tiny_pipe(diffusers_format)), pixels(tiny_pipe(kohya))
    assert np.abs(a - b).max() <= 1  # float rounding (UNet outputs agree to ~1e-6)
    without_style = pixels(default_result)
    assert np.abs(a - without_style).mean() > 1  # the UNet-only style LoRA takes effect


def test_legacy_diffusers_attention_processor_format_gives_the_same_image(tiny_pipe, spec, lora_dir, default_result):
    legacy = spec.replace(
        concepts=[
            {"lora": str(lora_dir / "cat_legacy.safetensors"), "phrase": "cat", "trigger": "sks cat"},
            spec.to_dict()["concepts"][1],
        ]
    )
    assert np.abs(pixels(tiny_pipe(legacy)) - pixels(default_result)).max() <= 1


def test_lora_changes_the_image_and_its_text_encoder_part_counts(tiny_pipe, spec, default_result):
    with_te = pixels(default_result)
    without_te = pixels(tiny_pipe(spec, text_encoder_lora=False))
    zero_weight = pixels(tiny_pipe(spec.replace(lora_scale=0.0)))
    assert np.abs(with_te - without_te).mean() > 1
    assert np.abs(with_te - zero_weight).mean() > 1


def test_non_square_maps_are_h_by_w(tiny_pipe, spec):
    result = tiny_pipe(spec, height=128, width=64, keep_maps=True)
    assert result.images[0].size == (64, 128)
    assert result.attention_maps[0][0].shape == (3, 4, 2, 77)
    assert result.masks[0][0].shape == (3, 16, 8)
    parity = tiny_pipe(spec, height=128, width=64, parity=True, keep_maps=True)
    assert parity.attention_maps[0][0].shape == (3, 2, 4, 77)  # the authors' transposed reshape


def test_contrastive_updates_lower_the_loss_on_the_tiny_model(tiny_pipe, spec):
    result = tiny_pipe(spec, height=128, width=128, steps=2, max_iter_to_alter=1, iterative_iters=6)
    losses = result.losses[0][0]
    assert len(losses) == 7 and losses[-1] < losses[0] - 0.1


def test_size_must_fit_the_attention_resolution(tiny_pipe, spec):
    with pytest.raises(CLoRAError, match="height: 72 is not a multiple of 32"):
        tiny_pipe(spec, height=72)


def test_only_recorded_layers_use_explicit_attention_unless_parity(tiny_pipe):
    names = set(recorded_layer_names(tiny_pipe.unet))
    with recording_cross_attention(tiny_pipe.unet) as _:
        processors = tiny_pipe.unet.attn_processors
        assert all(isinstance(p, RecordingAttnProcessor) == (n in names) for n, p in processors.items())
        assert all(isinstance(p, AttnProcessor2_0) for n, p in processors.items() if n not in names)
    with recording_cross_attention(tiny_pipe.unet, explicit_everywhere=True):
        processors = tiny_pipe.unet.attn_processors
        assert all(isinstance(p, AttnProcessor) for n, p in processors.items() if n not in names)
    assert all(isinstance(p, AttnProcessor2_0) for p in tiny_pipe.unet.attn_processors.values())  # restored


class SpyRunner:
    """Wraps the pipeline's runner and logs every call."""

    def __init__(self, pipe):
        self.pipe, self.calls, self.inner = pipe, [], None

    def __call__(self, model_input, t, *, grad, cfg):
        out = self.inner(model_input, t, grad=grad, cfg=cfg)
        self.calls.append(dict(input=model_input.detach().clone(), grad=grad, cfg=cfg, out=out))
        return out


def _run_with_spy(pipe, spec, monkeypatch):
    spy = SpyRunner(pipe)
    original = pipe._branch_runner

    def factory(*args, **kwargs):
        spy.inner = original(*args, **kwargs)
        return spy

    monkeypatch.setattr(pipe, "_branch_runner", factory)
    return pipe(spec, keep_maps=True), spy.calls


def test_default_mode_predicts_noise_from_the_updated_latent(tiny_pipe, spec, monkeypatch):
    _, calls = _run_with_spy(tiny_pipe, spec.replace(steps=1, max_iter_to_alter=1, iterative_iters=2), monkeypatch)
    assert [(c["grad"], c["cfg"]) for c in calls] == [(True, False)] * 3 + [(False, True)]
    assert calls[-1]["out"].noise_text is not None and calls[0]["out"].noise_text is None
    assert not torch.equal(calls[-1]["input"], calls[0]["input"])  # the latent moved before the noise pass


def test_parity_mode_reuses_the_noise_from_before_the_update(tiny_pipe, spec, monkeypatch):
    result, calls = _run_with_spy(
        tiny_pipe, spec.replace(steps=1, max_iter_to_alter=1, iterative_iters=2, parity=True), monkeypatch
    )
    assert [(c["grad"], c["cfg"]) for c in calls] == [(True, True)] * 3
    assert torch.equal(result.attention_maps[0][0], calls[0]["out"].maps[0].to(torch.float16))


def test_default_maps_are_the_prompt_half_parity_maps_average_both_halves(tiny_pipe, spec):
    from dataclasses import replace

    from clora.engine import SequentialBranchRunner

    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    branches = _branches(tiny_pipe, spec)
    negative_only = [replace(b, text_embeds=b.negative_embeds) for b in branches]
    with recording_cross_attention(tiny_pipe.unet) as recorder:

        def maps(branch_list, parity, cfg):
            runner = SequentialBranchRunner(tiny_pipe, branch_list, recorder, (2, 2), parity)
            return runner(latent, 981, grad=False, cfg=cfg).maps

        prompt_half, negative_half = maps(branches, False, False), maps(negative_only, False, False)
        default_cfg, parity_cfg = maps(branches, False, True), maps(branches, True, True)
    assert torch.allclose(default_cfg, prompt_half, atol=1e-5)
    assert torch.allclose(parity_cfg, (prompt_half + negative_half) / 2, atol=1e-5)  # square: reshape is the same
    assert not torch.allclose(parity_cfg, prompt_half, atol=1e-4)


def _branches(pipe, spec):
    from clora.tokens import plan_tokens

    plan = plan_tokens(pipe.tokenizer, spec)
    names = [pipe.add_lora(c.lora) for c in spec.concepts]
    layout = METHODS["clora"].branch_layout(plan.prompts, spec.prompt, len(names))
    return pipe._encode_branches(spec, layout, names, [], (spec.height, spec.width), pipe.device)


@pytest.mark.parametrize("engine, noise_passes", [("batched", 1), ("sequential", 3)])
def test_gradient_passes_stop_after_the_last_recorded_layer(tiny_pipe, spec, engine, noise_passes):
    seen = []
    hook = tiny_pipe.unet.up_blocks[2].register_forward_hook(lambda *a: seen.append(torch.is_grad_enabled()))
    try:
        tiny_pipe(spec.replace(steps=1, max_iter_to_alter=1, iterative_iters=0, engine=engine))
    finally:
        hook.remove()
    assert seen == [False] * noise_passes  # only the no-grad noise passes reach up_blocks.2


def test_loss_on_recorded_maps_reaches_the_latent(tiny_pipe, spec):
    from clora.engine import SequentialBranchRunner
    from clora.tokens import plan_tokens

    plan = plan_tokens(tiny_pipe.tokenizer, spec)
    latent = torch.randn(1, 4, 8, 8, requires_grad=True)
    with recording_cross_attention(tiny_pipe.unet) as recorder:
        runner = SequentialBranchRunner(tiny_pipe, _branches(tiny_pipe, spec), recorder, (2, 2))
        with torch.enable_grad():
            loss = contrastive_loss(runner(latent, 500, grad=True, cfg=False).maps, plan.concept_tokens)
            (grad,) = torch.autograd.grad(loss, latent)
    assert grad.abs().sum() > 0


# v-prediction is the scheduler's own arithmetic; the pipeline's part (guidance rescale) is checked with one
# scheduler of each kind: deterministic, stochastic with a generator, sigma-based, multistep with noise
V_PREDICTION_SCHEDULERS = ("ddim", "euler_a", "dpm++_sde", "unipc")


def test_every_scheduler_name_fits_a_family():
    assert SD.schedulers == SDXL.schedulers
    assert set(SD.schedulers) | set(FLUX.schedulers) == set(SCHEDULERS)
    assert not set(SD.schedulers) & set(FLUX.schedulers)


@pytest.mark.parametrize(
    "name, prediction",
    [(name, "epsilon") for name in sorted(SD.schedulers)]
    + [(name, "v_prediction") for name in V_PREDICTION_SCHEDULERS],
)
def test_every_documented_scheduler_runs_with_the_contrastive_update(tiny_pipe, spec, monkeypatch, name, prediction):
    """SD 1.5 (epsilon) models with every scheduler, SD 2.x-style (v-prediction, guidance rescale) with four."""
    base = tiny_pipe.scheduler
    monkeypatch.setattr(tiny_pipe, "scheduler", type(base).from_config(base.config, prediction_type=prediction))
    rescale = 0.7 if prediction == "v_prediction" else 0.0
    result = tiny_pipe(spec, scheduler=name, steps=2, max_iter_to_alter=1, iterative_iters=1, guidance_rescale=rescale)
    assert pixels(result).std() > 1  # a picture: NaN latents decode to a flat image
    assert len(result.losses[0][0]) == 2  # the contrastive update (1 + 1 iterative) ran at step 0
