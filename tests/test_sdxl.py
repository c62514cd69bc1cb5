"""SDXL: the family found by itself, both text encoders with their LoRAs, pooled and size conditioning,
maps at H/32 with the mid block, checked against diffusers' own StableDiffusionXLPipeline."""

import json

import numpy as np
import pytest
import torch
from conftest import SD15_TOKENIZER, spec_dict
from PIL import Image
from safetensors.torch import save_file

from clora import CLoRAError, spec_from_dict
from clora.attention import recorded_layer_names
from clora.cli import main
from clora.families import SD, SDXL, family_of_checkpoint
from clora.runtime import model_family
from clora.schedulers import make_scheduler
from clora.spec import fill_defaults

pytestmark = pytest.mark.usefixtures("reuse_loaded_pipelines")


def pixels(image):
    return np.asarray(image).astype(int)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    from tiny_sd import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"), SD15_TOKENIZER)


@pytest.fixture(scope="module")
def sdxl_loras(sdxl_dir, tmp_path_factory):
    """SDXL LoRA files: cat and dog in kohya form as sd-scripts writes them (SGM UNet names, te1 and te2
    layers, ``.alpha``) and the same weights in diffusers form; a UNet-only style in diffusers form."""
    from diffusers import StableDiffusionXLPipeline
    from lora_files import make_lora_weights, write_diffusers_lora, write_kohya_lora

    folder = tmp_path_factory.mktemp("sdxl-loras")
    base = StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir))
    for seed, name in ((1, "cat"), (2, "dog")):
        weights = make_lora_weights(base, seed=seed)
        write_kohya_lora(weights, folder / f"{name}_xl.safetensors", sdxl=True)
        write_diffusers_lora(weights, folder / f"{name}_xl_diffusers.safetensors")
    write_diffusers_lora(make_lora_weights(base, seed=3, text_encoder=False), folder / "style_xl.safetensors")
    return folder


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_dir, _loaded_pipelines):
    """Loaded as the CLI loads it (and shared with the CLI test through ``reuse_loaded_pipelines``)."""
    from clora.runtime import load_pipeline

    pipe = load_pipeline(str(sdxl_dir), torch.device("cpu"), torch.float32)
    pipe.set_progress_bar_config(disable=True)
    _loaded_pipelines[(str(sdxl_dir.resolve()), "cpu", torch.float32, None)] = pipe
    return pipe


def xl_spec(sdxl_dir, sdxl_loras, **extra):
    data = spec_dict(sdxl_dir, sdxl_loras, steps=2, **extra)
    data["concepts"][0]["lora"] = str(sdxl_loras / "cat_xl.safetensors")
    data["concepts"][1]["lora"] = str(sdxl_loras / "dog_xl.safetensors")
    return spec_from_dict(data)


def test_the_family_comes_from_the_folder_or_the_checkpoint_keys(sdxl_dir, tiny_model_dir, tmp_path):
    assert model_family(str(sdxl_dir)) is SDXL
    assert model_family(str(tiny_model_dir)) is SD
    xl_keys = {
        "conditioner.embedders.1.model.ln_final.weight": torch.zeros(1),
        "model.diffusion_model.x": torch.zeros(1),
    }
    sd_keys = {"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(1)}
    save_file(xl_keys, tmp_path / "xl.safetensors")
    save_file(sd_keys, tmp_path / "sd.safetensors")
    assert family_of_checkpoint(tmp_path / "xl.safetensors") is SDXL
    assert family_of_checkpoint(tmp_path / "sd.safetensors") is SD
    assert model_family(str(tmp_path / "sd.safetensors"), config=str(sdxl_dir)) is SDXL  # model_config decides


SDXL_KEYS = (  # names as in the real sd_xl_base_1.0.safetensors
    "model.diffusion_model.label_emb.0.0.weight",
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.output_blocks.2.2.conv.weight",
    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight",
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
    "conditioner.embedders.1.model.positional_embedding",
    "conditioner.embedders.1.model.text_projection",
    "first_stage_model.decoder.mid.attn_1.proj_out.weight",
)


def test_a_single_file_sdxl_checkpoint_is_told_by_its_keys_and_loads_offline(sdxl_dir, tmp_path, offline):
    from diffusers import StableDiffusionXLPipeline
    from ldm_checkpoint import write_ldm_checkpoint
    from safetensors import safe_open

    from clora.runtime import load_pipeline

    checkpoint = write_ldm_checkpoint(sdxl_dir, tmp_path / "tiny_xl.safetensors")
    with safe_open(str(checkpoint), framework="pt") as handle:
        assert set(SDXL_KEYS) <= set(handle.keys())
    assert model_family(str(checkpoint)) is SDXL
    pipe = load_pipeline(str(checkpoint), torch.device("cpu"), torch.float32, config=str(sdxl_dir))
    assert type(pipe).__name__ == "CLoRAXLPipeline"
    folder = StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, ref = getattr(pipe, name).state_dict(), getattr(folder, name).state_dict()
        assert ours.keys() == ref.keys(), name
        assert all(torch.equal(ours[key], value) for key, value in ref.items()), name


def test_sdxl_records_down_blocks_2_the_mid_block_and_up_blocks_0(sdxl_pipe, tiny_pipe):
    names = recorded_layer_names(sdxl_pipe.unet)
    blocks = sorted({".".join(name.split(".")[:2]) for name in names})
    assert blocks == ["down_blocks.2", "mid_block.attentions", "up_blocks.0"]
    assert len(names) == 2 * 2 + 1 * 2 + 3 * 2  # attentions x transformer blocks at latent/4
    sd_blocks = {".".join(name.split(".")[:2]) for name in recorded_layer_names(tiny_pipe.unet)}
    assert sd_blocks == {"down_blocks.2", "up_blocks.1"}  # SD 1.5's mid block sits at latent/8: not read


def test_sdxl_merge_is_diffusers_sdxl_with_te1_te2_kohya_loras(sdxl_pipe, sdxl_dir, sdxl_loras):
    """Same pixels as diffusers' StableDiffusionXLPipeline: both encoders with the LoRAs, the pooled
    embedding, the size ids and zeroed negative embeddings (SDXL's empty negative prompt)."""
    from diffusers import StableDiffusionXLPipeline

    spec = xl_spec(sdxl_dir, sdxl_loras, method="merge")
    cat, dog = spec.to_dict()["concepts"]
    spec = fill_defaults(spec.replace(concepts=[dict(cat, weight=0.7), dog]), SDXL.spec_defaults)
    result = sdxl_pipe(spec)

    reference = StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir))
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(sdxl_loras / "cat_xl.safetensors"), adapter_name="cat")
    reference.load_lora_weights(str(sdxl_loras / "dog_xl.safetensors"), adapter_name="dog")
    assert all(
        any("cat" in getattr(m, "lora_A", {}) for m in getattr(reference, c).modules())
        for c in ("unet", "text_encoder", "text_encoder_2")
    )  # the kohya file reached all three models
    reference.set_adapters(["cat", "dog"], adapter_weights=[0.7, 1.0])
    reference.scheduler = make_scheduler(spec.scheduler, reference.scheduler.config)

    def diffusers_image():
        generator = torch.Generator("cpu").manual_seed(spec.seed)
        size = {"height": spec.height, "width": spec.width}
        prompt = "a sks cat and a sks dog in a garden"
        return reference(
            prompt, num_inference_steps=spec.steps, guidance_scale=spec.guidance, generator=generator, **size
        ).images[0]

    expected = diffusers_image()
    assert np.abs(pixels(result.images[0]) - pixels(expected)).max() <= 2
    reference.disable_lora()
    plain = diffusers_image()
    assert np.abs(pixels(plain) - pixels(expected)).max() > 10  # the LoRAs change the image


@pytest.fixture(scope="module")
def kohya_result(sdxl_pipe, sdxl_dir, sdxl_loras):
    return sdxl_pipe(xl_spec(sdxl_dir, sdxl_loras), keep_maps=True)


def test_kohya_and_diffusers_sdxl_files_of_the_same_weights_give_the_same_image(
    kohya_result, sdxl_pipe, sdxl_dir, sdxl_loras
):
    cat, dog = kohya_result.spec.to_dict()["concepts"]
    diffusers_files = [
        {k: v for k, v in dict(c, lora=c["lora"].replace("_xl.", "_xl_diffusers.")).items() if k != "sha256"}
        for c in (cat, dog)
    ]
    other = sdxl_pipe(kohya_result.spec.replace(concepts=diffusers_files))
    assert np.abs(pixels(other.images[0]) - pixels(kohya_result.images[0])).max() <= 1


def test_sdxl_batched_and_sequential_engines_agree(kohya_result, sdxl_pipe):
    batched = kohya_result
    spec = batched.spec
    sequential = sdxl_pipe(spec.replace(engine="sequential"), keep_maps=True)
    assert batched.attention_maps[0][0].shape == (3, 2, 2, 77)  # 64x64 image: H/32 = 2
    assert len(batched.losses[0][0]) == 2 and all(np.isfinite(batched.losses[0][0]))
    for a, b in zip(batched.attention_maps[0], sequential.attention_maps[0], strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-3)
    assert np.abs(pixels(batched.images[0]) - pixels(sequential.images[0])).max() <= 1


def test_clip_skip_reads_an_earlier_layer_and_refuses_one_sdxl_lacks(sdxl_pipe, sdxl_dir, sdxl_loras):
    spec = xl_spec(sdxl_dir, sdxl_loras)
    size, cpu = (64, 64), torch.device("cpu")
    default = sdxl_pipe.encode_branch_prompt("a cat", spec, size, cpu)
    same = sdxl_pipe.encode_branch_prompt("a cat", spec.replace(clip_skip=2), size, cpu)  # SDXL's own layer
    earlier = sdxl_pipe.encode_branch_prompt("a cat", spec.replace(clip_skip=3), size, cpu)
    assert torch.equal(default[0], same[0]) and not torch.allclose(default[0], earlier[0])
    assert default[2]["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]]  # original size, crop, target size
    assert default[2]["text_embeds"].shape == (1, 48)  # the second encoder's pooled, projected embedding
    assert not default[1].any()  # empty negative prompt: zeros, as SDXL base asks (force_zeros_for_empty_prompt)
    with pytest.raises(CLoRAError, match="clip_skip: sdxl models read prompts from CLIP's layer 2"):
        sdxl_pipe.encode_branch_prompt("a cat", spec.replace(clip_skip=1), size, cpu)


def test_sdxl_through_the_cli_with_maps_and_its_spec_in_the_png(sdxl_pipe, sdxl_dir, sdxl_loras, tmp_path):
    spec_file = tmp_path / "xl.json"
    style = {"lora": str(sdxl_loras / "style_xl.safetensors"), "weight": 0.8}  # UNet-only
    data = xl_spec(sdxl_dir, sdxl_loras, height=None, width=None, styles=[style]).to_dict()
    spec_file.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    out, maps = tmp_path / "xl.png", tmp_path / "xl-maps.png"
    assert main(["generate", str(spec_file), "-o", str(out), "--save-maps", str(maps)]) == 0
    image = Image.open(out)
    assert image.size == (64, 64)  # the model's own size: sample_size 8 x VAE factor 8
    assert json.loads(image.text["clora"])["concepts"][0]["lora"].endswith("cat_xl.safetensors")
    assert Image.open(maps).size[0] > 0
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "-o", str(again), "--num-images", "2"]) == 0
    assert np.abs(pixels(Image.open(tmp_path / "again-0.png")) - pixels(image)).max() <= 1  # one batch of 2
    assert json.loads(Image.open(tmp_path / "again-1.png").text["clora"])["seed"] == data["seed"] + 1


def test_a_lora_of_the_other_family_is_one_line_naming_both(sdxl_pipe, tiny_pipe, sdxl_loras, lora_dir):
    with pytest.raises(
        CLoRAError, match=r"cat_kohya.safetensors: a LoRA made for SD 1.x/2.x models; this model is SDXL"
    ):
        sdxl_pipe.add_lora(str(lora_dir / "cat_kohya.safetensors"))
    with pytest.raises(CLoRAError, match=r"cat.safetensors: a LoRA made for SD 1.x/2.x models"):
        sdxl_pipe.add_lora(str(lora_dir / "cat.safetensors"))  # diffusers form: told by its key names
    with pytest.raises(CLoRAError, match=r"dog_xl_diffusers.safetensors: a LoRA made for SDXL models; this model is"):
        tiny_pipe.add_lora(str(sdxl_loras / "dog_xl_diffusers.safetensors"))


def test_cli_refuses_a_wrong_family_lora_and_parity_on_sdxl_without_writing(
    sdxl_pipe, sdxl_dir, sdxl_loras, lora_dir, tmp_path, capsys
):
    spec = xl_spec(sdxl_dir, sdxl_loras).to_dict()
    spec["concepts"][1]["lora"] = str(lora_dir / "dog_kohya.safetensors")
    (tmp_path / "wrong.json").write_text(json.dumps(spec))
    (tmp_path / "parity.json").write_text(json.dumps(xl_spec(sdxl_dir, sdxl_loras, parity=True).to_dict()))
    for name, message in (("wrong", "a LoRA made for SD 1.x/2.x models"), ("parity", "parity: reproduces the authors")):
        out = tmp_path / f"{name}.png"
        assert main(["generate", str(tmp_path / f"{name}.json"), "-o", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not out.exists()


def test_dry_run_shows_sdxl_token_positions(sdxl_dir, sdxl_loras, tmp_path, capsys):
    (tmp_path / "xl.json").write_text(json.dumps(xl_spec(sdxl_dir, sdxl_loras).to_dict()))
    assert main(["generate", str(tmp_path / "xl.json"), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["prompts"][1] == "a sks cat and a dog in a garden"
    assert plan["mask_tokens"] == [[], [2, 3], [5, 6]]
