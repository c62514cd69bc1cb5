"""CLoRA on FLUX.1: the tiny Flux-layout model of ``tiny_flux`` through ``CLoRAFluxPipeline`` and the CLI.

Every test that compares pixels compares with plain diffusers (``FluxPipeline``) or with another path of
ours that must give the same image; nothing here is a stored expected output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import spec_dict
from diffusers import FluxPipeline
from flux_lora_files import FLUX_FORMATS, make_flux_lora_weights, write_flux_diffusers_lora
from PIL import Image
from tiny_flux import TINY_TRANSFORMER_CONFIG, TorchWithFluxWidth, build_tiny_flux, write_bfl_single_file

from clora import CLoRAError
from clora.cli import main
from clora.families import FLUX, SD, SDXL, family_of_lora
from clora.family_pipelines import CLoRAFluxPipeline

SIZE, STEPS = 64, 3
PROMPT = "a cat and a dog in the garden"


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def _max_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(_pixels(a) - _pixels(b)).max())


@pytest.fixture(scope="module")
def flux_pipe(flux_dir):
    pipe = CLoRAFluxPipeline.from_pretrained(str(flux_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux_loras(flux_pipe, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("flux-loras")
    return {
        name: write_flux_diffusers_lora(make_flux_lora_weights(flux_pipe, seed=seed), folder / f"{name}.safetensors")
        for name, seed in (("cat", 1), ("dog", 2))
    }


def _spec(flux_dir: Path, loras: dict[str, Path], **extra) -> dict:
    return {
        "model": str(flux_dir),
        "prompt": PROMPT,
        "concepts": [
            {"lora": str(loras["cat"]), "phrase": "cat", "trigger": "sks cat"},
            {"lora": str(loras["dog"]), "phrase": "dog", "trigger": "zwx dog"},
        ],
        "steps": STEPS,
        "height": SIZE,
        "width": SIZE,
        "seed": 5,
        **extra,
    }


def _diffusers_image(folder: Path, loras: dict[str, Path], weights: dict[str, float], **call) -> Image.Image:
    reference = FluxPipeline.from_pretrained(str(folder))
    reference.set_progress_bar_config(disable=True)
    for name in weights:
        reference.load_lora_weights(str(loras[name]), adapter_name=name)
    reference.set_adapters(list(weights), adapter_weights=list(weights.values()))
    generator = torch.Generator("cpu").manual_seed(5)
    return reference(
        "a sks cat and a zwx dog in the garden",
        num_inference_steps=STEPS,
        height=SIZE,
        width=SIZE,
        generator=generator,
        **call,
    ).images[0]


@pytest.mark.parametrize(
    "call",
    [{}, {"true_cfg": 2.0, "negative_prompt": "a blurry photo"}],
    ids=["distilled-guidance", "true-cfg"],
)
def test_merge_is_diffusers_flux_with_the_same_loras_and_seed(flux_dir, flux_pipe, flux_loras, call):
    spec = _spec(flux_dir, flux_loras, method="merge")
    spec["concepts"][0]["weight"] = 0.7
    ours = flux_pipe(**spec, **call)
    diffusers_call = {"guidance_scale": 3.5}
    if call:
        diffusers_call.update(true_cfg_scale=call["true_cfg"], negative_prompt=call["negative_prompt"])
    reference = _diffusers_image(flux_dir, flux_loras, {"cat": 0.7, "dog": 1.0}, **diffusers_call)
    assert _max_diff(ours.images[0], reference) <= 2
    # a step is one sample per branch (guidance-distilled), two with true CFG
    plan = ours.memory_plan
    assert plan.guidance_samples == plan.gradient_samples * (2 if call else 1)
    assert ours.spec.steps == STEPS and ours.spec.guidance == 3.5 and ours.spec.scheduler == "flow_euler"


def test_schnell_layout_without_guidance_embedding_is_diffusers_flux(tmp_path, flux_loras):
    folder = build_tiny_flux(tmp_path / "schnell", guidance_embeds=False)
    pipe = CLoRAFluxPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    ours = pipe(**_spec(folder, flux_loras, method="merge"))
    reference = _diffusers_image(folder, flux_loras, {"cat": 1.0, "dog": 1.0})
    assert _max_diff(ours.images[0], reference) <= 2


def test_clora_batched_equals_sequential_and_differs_from_merge(flux_dir, flux_pipe, flux_loras):
    spec = _spec(flux_dir, flux_loras, max_iter_to_alter=2, iterative_steps=[0], iterative_iters=2)
    batched = flux_pipe(**spec, keep_maps=True)
    sequential = flux_pipe(**spec, engine="sequential")
    assert _max_diff(batched.images[0], sequential.images[0]) <= 1
    np.testing.assert_allclose(batched.losses[0][0], sequential.losses[0][0], rtol=1e-3)
    merged = flux_pipe(**spec, method="merge")
    assert _max_diff(batched.images[0], merged.images[0]) > 10
    # the maps are on the packed token grid (64 px -> 8x8 latent -> 4x4 tokens), over T5's positions
    maps = batched.attention_maps[0][0]
    assert maps.shape == (3, 2, 2, flux_pipe.text_sequence_length)  # Flux's 8x VAE: 2x2 tokens per map pixel
    assert len(batched.losses[0][0]) == 3  # the update and its two refinements at step 0


def test_contrastive_gradient_reaches_the_latent_through_the_recorded_blocks_only(flux_dir, flux_pipe, flux_loras):
    """The gradient pass stops after the last recorded (double-stream) block: the single-stream blocks never run."""
    ran = []
    hooks = [
        block.register_forward_hook(lambda *args, i=i: ran.append(i))
        for i, block in enumerate(flux_pipe.transformer.single_transformer_blocks)
    ]
    try:
        spec = _spec(flux_dir, flux_loras, steps=1, max_iter_to_alter=1, iterative_steps=[], iterative_iters=0)
        out = flux_pipe(**spec)
    finally:
        for hook in hooks:
            hook.remove()
    assert out.losses[0][0]  # one contrastive update ran
    # the noise pass runs every single-stream block once; the gradient pass, none
    assert len(ran) == TINY_TRANSFORMER_CONFIG["num_single_layers"]


@pytest.mark.parametrize("fmt", ["kohya", "comfyui", "xlabs", "ai_toolkit", "kohya_diffusers_names"])
def test_every_flux_lora_format_composes_like_the_diffusers_file(fmt, flux_dir, flux_pipe, tmp_path):
    writer, kwargs, targets, text_encoder, _ = FLUX_FORMATS[fmt]
    files = {}
    for name, seed in (("cat", 11), ("dog", 12)):
        weights = make_flux_lora_weights(flux_pipe, seed=seed, targets=targets, text_encoder=text_encoder)
        files[name] = writer(weights, tmp_path / f"{name}-{fmt}.safetensors", **kwargs)
        files[f"{name}-ref"] = write_flux_diffusers_lora(weights, tmp_path / f"{name}-ref.safetensors")
    spec = _spec(flux_dir, files, max_iter_to_alter=1, iterative_steps=[], steps=2)
    reference = _spec(flux_dir, {"cat": files["cat-ref"], "dog": files["dog-ref"]}, **{k: spec[k] for k in ("steps",)})
    reference.update(max_iter_to_alter=1, iterative_steps=[])
    expected = flux_pipe(**reference).images[0]
    assert _max_diff(flux_pipe(**spec).images[0], expected) <= 1
    assert _max_diff(flux_pipe(**dict(reference, lora_scale=0.0)).images[0], expected) > 10  # the LoRAs count


def test_switch_and_composite_run_and_parity_is_refused(flux_dir, flux_pipe, flux_loras):
    switch = flux_pipe(**_spec(flux_dir, flux_loras, method="switch", steps=2))
    composite = flux_pipe(**_spec(flux_dir, flux_loras, method="composite", steps=2))
    assert _max_diff(switch.images[0], composite.images[0]) > 0
    with pytest.raises(CLoRAError, match="parity"):
        flux_pipe(**_spec(flux_dir, flux_loras, parity=True))
    with pytest.raises(CLoRAError, match="scheduler: 'ddim' does not fit FLUX.1"):
        flux_pipe(**_spec(flux_dir, flux_loras, scheduler="ddim"))


def test_dry_run_prints_t5_positions(flux_dir, flux_loras, tmp_path, capsys):
    path = tmp_path / "flux.yaml"
    data = _spec(flux_dir, flux_loras)
    data["prompt"] = "a cat and a clora dog in the garden"  # "clora" is three sentencepiece pieces here
    data["concepts"][1]["phrase"] = "clora dog"
    path.write_text(yaml.safe_dump(data))
    assert main(["generate", str(path), "--dry-run"]) == 0
    shown = json.loads(capsys.readouterr().out)
    tokens = shown["tokens"][0]
    assert tokens[:2] == ["▁a", "▁cat"] and tokens[-1] == "</s>"  # no BOS: the words start at 0
    cat, dog = shown["concept_tokens"][0][0], shown["concept_tokens"][1][0]
    assert cat == [1] and [tokens[p] for p in dog] == ["▁cl", "or", "a", "▁dog"]
    assert shown["concept_tokens"][1][2] == [4, 5]  # prompt 2 says "zwx dog" there


def test_wrong_family_loras_are_refused_before_the_model_loads(
    flux_dir, flux_loras, tiny_model_dir, lora_dir, tmp_path, capsys, monkeypatch
):
    import clora.runtime

    monkeypatch.setattr(clora.runtime, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    assert family_of_lora(_keys(flux_loras["cat"])) is FLUX
    sd_on_flux = _spec(flux_dir, {"cat": lora_dir / "cat.safetensors", "dog": flux_loras["dog"]})
    flux_on_sd = spec_dict(tiny_model_dir, lora_dir)
    flux_on_sd["concepts"][1]["lora"] = str(flux_loras["dog"])
    for name, data, wrong, family in (
        ("sd_on_flux", sd_on_flux, "cat.safetensors", SD),
        ("flux_on_sd", flux_on_sd, "dog.safetensors", FLUX),
    ):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        out = tmp_path / f"{name}.png"
        assert main(["generate", str(path), "-o", str(out), "--quiet"]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert wrong in line and f"a LoRA made for {family.title} models" in line
        assert not out.exists()


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def test_single_file_flux_transformer_with_model_config(flux_dir, flux_pipe, flux_loras, tmp_path, monkeypatch):
    from diffusers.loaders import single_file_utils

    inner = TINY_TRANSFORMER_CONFIG["num_attention_heads"] * TINY_TRANSFORMER_CONFIG["attention_head_dim"]
    monkeypatch.setattr(single_file_utils, "torch", TorchWithFluxWidth(inner))  # diffusers hard-codes FLUX.1's width
    checkpoint = write_bfl_single_file(flux_dir, tmp_path / "flux1-tiny.safetensors")
    spec = _spec(checkpoint, flux_loras, method="merge", steps=2)
    path = tmp_path / "single.yaml"
    path.write_text(yaml.safe_dump(dict(spec, model_config=str(flux_dir))))
    out = tmp_path / "single.png"
    assert main(["generate", str(path), "-o", str(out), "--quiet", "--device", "cpu"]) == 0
    folder = flux_pipe(**_spec(flux_dir, flux_loras, method="merge", steps=2))
    assert _max_diff(Image.open(out).convert("RGB"), folder.images[0]) <= 1
    path.write_text(yaml.safe_dump(spec))  # no model_config: the transformer alone cannot make an image
    assert main(["generate", str(path), "-o", str(tmp_path / "none.png"), "--quiet", "--device", "cpu"]) == 2


@pytest.mark.parametrize("stream", ["double", "single"])
def test_recording_processor_is_flux_attention_plus_the_image_to_text_probabilities(flux_pipe, stream):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    from clora.attention import AttentionRecorder
    from clora.joint_attention import JointRecordingProcessor

    transformer = flux_pipe.transformer
    block = transformer.transformer_blocks[0] if stream == "double" else transformer.single_transformer_blocks[0]
    attn, width, text, image = block.attn, 16, 5, 4
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, image if stream == "double" else text + image, width, generator=generator)
    context = torch.randn(2, text, width, generator=generator) if stream == "double" else None
    grid = torch.arange(image)
    image_ids = torch.stack([torch.zeros(image), grid // 2, grid % 2], dim=1).float()  # a 2x2 token grid
    rotary = transformer.pos_embed(torch.cat([torch.zeros(text, 3), image_ids]))
    expected = FluxAttnProcessor()(attn, hidden, context, image_rotary_emb=rotary)
    probs = {}
    for softmax in ("text", "joint"):
        recorder = AttentionRecorder(num_layers=1)
        got = JointRecordingProcessor(recorder, text, softmax)(attn, hidden, context, image_rotary_emb=rotary)
        for ours, theirs in zip(*((x,) if stream == "single" else x for x in (got, expected)), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)  # the block computes what Flux does
        probs[softmax] = recorder.pop()  # (batch, image tokens, text tokens), averaged over heads
    assert probs["text"].shape == (2, image, text)
    torch.testing.assert_close(probs["text"].sum(-1), torch.ones(2, image))
    share = probs["joint"].sum(-1)  # each image token's attention on the text, out of all its keys
    assert bool(((share > 0) & (share < 1)).all())


def test_recorded_maps_are_pooled_from_the_token_grid_to_the_map_grid():
    from clora.attention import AttentionRecorder

    probs = torch.rand(1, 3, 4 * 6, 5)  # (batch, heads, a 4x6 token grid, text tokens)
    recorder = AttentionRecorder(num_layers=1, pool=(4, 6, 2))
    recorder.record(probs)
    pooled = recorder.pop().view(1, 2, 3, 5)  # a 2x3 map grid
    grid = probs.mean(dim=1).view(1, 4, 6, 5)
    torch.testing.assert_close(pooled[0, 1, 2], grid[0, 2:4, 4:6].mean(dim=(0, 1)))


@pytest.mark.parametrize(
    "keys, family",
    [
        (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "lora_te1_text_model_x.lora_down.weight"], FLUX),
        (["lycoris_transformer_blocks_0_attn_to_q.hada_w1_a", "lora_te1_text_model_x.lora_down.weight"], FLUX),
        (["diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight"], FLUX),
        (["double_blocks.0.processor.qkv_lora1.down.weight"], FLUX),
        (["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"], SD),
        (["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha", "lora_te1_x.alpha"], SDXL),
    ],
    ids=["kohya-flux", "lycoris-flux", "comfyui-flux", "xlabs-flux", "kohya-sd", "kohya-sdxl"],
)
def test_a_lora_files_family_is_told_by_its_key_names(keys, family):
    assert family_of_lora(keys) is family  # kohya's Flux files name CLIP-L lora_te1_, as SDXL's do
