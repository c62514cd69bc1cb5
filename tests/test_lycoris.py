"""LyCORIS files (LoCon, LoHa, LoKr, full, norm diffs, DoRA) written by the lycoris-lora library itself,
checked against that library's own merge of the same weights and through both engines and the CLI."""

import numpy as np
import pytest
import torch
import yaml
from conftest import SD15_TOKENIZER, spec_dict
from safetensors.torch import load_file, save_file

from clora import spec_from_dict
from clora.cli import main
from clora.families import SD, SDXL
from clora.lycoris import dora_delta, loha_delta, lokr_delta, read_layer
from clora.lycoris_adapters import lycoris_layer
from clora.schedulers import make_scheduler
from clora.spec import fill_defaults

pytest.importorskip("lycoris")
pytestmark = pytest.mark.usefixtures("reuse_loaded_pipelines")

FORMATS = {
    "locon_tucker": ("locon", {"use_tucker": True}),
    "loha_tucker": ("loha", {"use_tucker": True}),
    "lokr_both": ("lokr", {"decompose_both": True, "factor": 4}),
    "lokr_tucker": ("lokr", {"use_tucker": True}),
    "full_norms": ("full", {"train_norm": True}),
    "dora": ("locon", {"dora_wd": True}),
    "doha_input_norm": ("loha", {"dora_wd": True, "wd_on_output": False}),
}
"""name -> (lycoris-lora algo, create_network options): every key kind of issue 18 between them."""


def pixels(image):
    return np.asarray(image).astype(int)


def _sd_pipe(model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def lyco(tiny_model_dir, tmp_path_factory):
    """Per format: its file and the UNet/text-encoder weight changes of lycoris-lora's own merge."""
    from lycoris_files import make_network, merge, save_kohya

    folder = tmp_path_factory.mktemp("lycoris")
    files, changes = {}, {}
    pipe = _sd_pipe(tiny_model_dir)
    components = ("unet", "text_encoder")
    before = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in components}
    for seed, (name, (algo, options)) in enumerate(FORMATS.items()):
        network = make_network(pipe, algo, seed=seed, **options)
        files[name] = save_kohya(network, pipe, folder / f"{name}.safetensors")
        merge(network, 1.0)
        changes[name] = {c: {k: v - before[c][k] for k, v in getattr(pipe, c).state_dict().items()} for c in components}
        for c in components:  # back to the base weights for the next format
            getattr(pipe, c).load_state_dict(before[c])
    return folder, files, changes


def reference_image(model_dir, changes, weights, spec, prompt):
    """Plain diffusers with lycoris-lora's merged changes added to the weights, ``weights[name]`` each."""
    pipe = _sd_pipe(model_dir)
    for component in ("unet", "text_encoder"):
        state = getattr(pipe, component).state_dict()
        for name, weight in weights.items():
            for key, change in changes[name][component].items():
                state[key] = state[key] + weight * change
        getattr(pipe, component).load_state_dict(state)
    spec = fill_defaults(spec, SD.spec_defaults)
    pipe.scheduler = make_scheduler(spec.scheduler, pipe.scheduler.config)
    generator = torch.Generator("cpu").manual_seed(spec.seed)
    size = {"height": spec.height, "width": spec.width}
    return pipe(
        prompt, num_inference_steps=spec.steps, guidance_scale=spec.guidance, generator=generator, **size
    ).images[0]


def two_concepts(model_dir, folder, cat, dog, **extra):
    data = spec_dict(model_dir, folder, steps=2, max_iter_to_alter=1, **extra)
    data["concepts"][0]["lora"] = str(folder / f"{cat}.safetensors")
    data["concepts"][1]["lora"] = str(folder / f"{dog}.safetensors")
    return data


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_layer_gets_lycoris_loras_own_merged_weight(tiny_pipe, lyco, name):
    """Every key of the file is applied, on the layer lycoris-lora merges it into, with its update."""
    _, files, changes = lyco
    adapter = tiny_pipe.add_lora(str(files[name]))
    checked = 0
    for component in ("unet", "text_encoder"):
        model = getattr(tiny_pipe, component)
        for path, module in model.named_modules():
            layer = lycoris_layer(module)
            if layer is None or adapter not in layer.updates:
                continue
            delta, bias = layer.weights(adapter)
            path = path.removesuffix(".base_layer")
            for got, key in ((delta, f"{path}.weight"), (bias, f"{path}.bias")):
                expected = changes[name][component].get(key)
                if got is None:
                    assert expected is None or not expected.any(), key
                else:
                    assert torch.allclose(got, expected, atol=1e-5 * module.weight.abs().max().item()), key
            checked += 1
    changed = sum(
        1 for c in changes[name].values() for key, change in c.items() if key.endswith(".weight") and change.any()
    )
    assert checked == changed > 50


def test_a_loha_and_a_lokr_concept_merged_are_diffusers_with_lycoris_merged_weights(
    tiny_model_dir, lyco, tmp_path, capsys
):
    """``method: merge`` through the CLI, with ``weight`` and ``lora_scale`` scaling each file as A1111 does."""
    folder, _, changes = lyco
    data = two_concepts(tiny_model_dir, folder, "loha_tucker", "lokr_both", method="merge", lora_scale=0.8)
    data["concepts"][0]["weight"] = 0.5
    spec_file, out = tmp_path / "spec.yaml", tmp_path / "merge.png"
    spec_file.write_text(yaml.safe_dump(data))
    assert main(["generate", str(spec_file), "-o", str(out), "--quiet"]) == 0
    from PIL import Image

    image = pixels(Image.open(out))
    spec = spec_from_dict(data)
    prompt = "a sks cat and a sks dog in a garden"
    expected = reference_image(tiny_model_dir, changes, {"loha_tucker": 0.4, "lokr_both": 0.8}, spec, prompt)
    assert np.abs(image - pixels(expected)).max() <= 2
    plain = reference_image(tiny_model_dir, changes, {}, spec, prompt)
    assert np.abs(pixels(plain) - pixels(expected)).max() > 10  # the files change the image


@pytest.mark.parametrize("pair", [("full_norms", "dora"), ("locon_tucker", "doha_input_norm")])
def test_full_norm_and_dora_files_merged_are_diffusers_with_lycoris_merged_weights(
    tiny_pipe, tiny_model_dir, lyco, pair
):
    folder, _, changes = lyco
    spec = spec_from_dict(two_concepts(tiny_model_dir, folder, *pair, method="merge"))
    expected = reference_image(
        tiny_model_dir, changes, dict.fromkeys(pair, 1.0), spec, "a sks cat and a sks dog in a garden"
    )
    assert np.abs(pixels(tiny_pipe(spec).images[0]) - pixels(expected)).max() <= 2


@pytest.mark.parametrize(
    "method, cat, dog",
    [
        ("clora", "loha_tucker", "lokr_tucker"),
        ("composite", "dora", "full_norms"),
        ("switch", "lokr_both", "locon_tucker"),
    ],
)
def test_batched_and_sequential_engines_agree_on_lycoris_files(tiny_pipe, tiny_model_dir, lyco, method, cat, dog):
    """Per-sample routing (the batched engine) == one adapter set per UNet call (sequential), DoRA
    included, with a DoRA style at weight 0.6 on every branch."""
    folder = lyco[0]
    data = two_concepts(tiny_model_dir, folder, cat, dog, method=method, lora_scale=0.9)
    data["concepts"][0]["weight"] = 0.7
    data["styles"] = [{"lora": str(folder / "doha_input_norm.safetensors"), "weight": 0.6}]
    spec = spec_from_dict(data)
    batched = tiny_pipe(spec, keep_maps=True)
    sequential = tiny_pipe(spec.replace(engine="sequential"), keep_maps=True)
    assert np.abs(pixels(batched.images[0]) - pixels(sequential.images[0])).max() <= 1
    for a, b in zip(batched.attention_maps[0], sequential.attention_maps[0], strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-3)
    without_style = tiny_pipe(spec.replace(styles=[]))
    assert np.abs(pixels(without_style.images[0]) - pixels(batched.images[0])).max() > 10


def test_sdxl_loha_with_sgm_names_and_both_text_encoders_is_lycoris_loras_merge(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline
    from lycoris_files import make_network, merge, save_kohya
    from tiny_sd import build_tiny_sdxl

    from clora.runtime import load_pipeline

    folder = build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl-lycoris"), SD15_TOKENIZER)
    reference = StableDiffusionXLPipeline.from_pretrained(str(folder))
    reference.set_progress_bar_config(disable=True)
    network = make_network(reference, "loha", seed=7, attention_only=True, dora_wd=True)
    path = save_kohya(network, reference, tmp_path_factory.mktemp("xl-files") / "loha_xl.safetensors", sgm=True)
    assert any(key.startswith("lora_unet_input_blocks_4_1_") for key in load_file(str(path)))
    assert {key.split("_text_model_")[0] for key in load_file(str(path)) if "_te" in key} == {"lora_te1", "lora_te2"}
    merge(network, 1.0)

    pipe = load_pipeline(str(folder), torch.device("cpu"), torch.float32)
    assert pipe.family is SDXL
    pipe.set_progress_bar_config(disable=True)
    data = spec_dict(folder, path.parent, steps=2, method="merge")
    data["concepts"] = [{"lora": str(path), "phrase": "cat", "trigger": "sks cat"}]
    spec = spec_from_dict(data)
    image = pixels(pipe(spec).images[0])
    counts = pipe.__dict__["_clora_lycoris"].counts
    assert all(next(iter(counts.values())).get(c) for c in ("unet", "text_encoder", "text_encoder_2"))
    spec = fill_defaults(spec, SDXL.spec_defaults)
    reference.scheduler = make_scheduler(spec.scheduler, reference.scheduler.config)
    generator = torch.Generator("cpu").manual_seed(spec.seed)
    size = {"height": spec.height, "width": spec.width}
    prompt = "a sks cat and a dog in a garden"
    expected = reference(
        prompt, num_inference_steps=spec.steps, guidance_scale=spec.guidance, generator=generator, **size
    )
    expected = expected.images[0]
    assert np.abs(image - pixels(expected)).max() <= 2


def _broken_copy(source, target, key, tensor):
    tensors = load_file(str(source))
    tensors[key] = tensor
    save_file(tensors, str(target))
    return target


@pytest.mark.parametrize(
    "source, key, message",
    [
        (
            "loha_tucker",
            "lora_unet_down_blocks_0_attentions_0_proj_in.oft_blocks",
            "of kinds clora does not read (oft_blocks",
        ),
        (
            "loha_tucker",
            "lora_unet_down_blocks_9_attentions_0_proj_in.hada_w1_a",
            "layers this model does not have (hada_w1_a",
        ),
        (
            "cat_kohya",
            "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight",
            "could not load this LoRA ('lora_unet_down_blocks_9",
        ),
    ],
)
def test_a_key_that_cannot_be_applied_fails_the_file_in_one_line_without_output(
    tiny_model_dir, lyco, lora_dir, tmp_path, capsys, source, key, message
):
    """LyCORIS files, and a plain kohya LoRA (read by diffusers) with one layer more than the model has."""
    folder, files, _ = lyco
    if source == "cat_kohya":
        up = tmp_path / "up.safetensors"  # the plain layer's other half, so only the layer is unknown
        source_file = _broken_copy(lora_dir / "cat_kohya.safetensors", up, key.replace("down", "up"), torch.zeros(4, 4))
    else:
        source_file = files[source]
    broken = _broken_copy(source_file, tmp_path / "broken.safetensors", key, torch.zeros(4, 4))
    data = two_concepts(tiny_model_dir, folder, "loha_tucker", "lokr_both")
    data["concepts"][1]["lora"] = str(broken)
    spec_file, out = tmp_path / "spec.yaml", tmp_path / "out.png"
    spec_file.write_text(yaml.safe_dump(data))
    assert main(["generate", str(spec_file), "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(broken) in err and message in err, err
    assert not out.exists() and ("1 of" in err or source == "cat_kohya")


def test_alpha_over_rank_scales_loha_and_lokr_once_as_a1111_does():
    generator = torch.Generator().manual_seed(0)
    w = {
        k: torch.randn(6, 3, generator=generator) if k.endswith("_a") else torch.randn(3, 5, generator=generator)
        for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    }
    loha, _ = read_layer({**w, "alpha": torch.tensor(1.5)})
    assert torch.allclose(loha.delta(torch.Size([6, 5])), 0.5 * loha_delta(*w.values()))  # alpha 1.5 / rank 3
    kron = {"lokr_w1": torch.randn(2, 2, generator=generator), "lokr_w2": torch.randn(3, 5, generator=generator)}
    whole, _ = read_layer({**kron, "alpha": torch.tensor(7.0)})  # two whole halves: no rank, scale 1
    assert torch.allclose(whole.delta(torch.Size([6, 10])), lokr_delta(*kron.values()))


def test_dora_is_linear_in_the_weight_so_samples_add_up():
    """DoRA's change at weight w is w times its change at 1 (A1111, ComfyUI): what lets per-sample
    routing add it row by row; at weight 1 the layer's weight gets the stored magnitude."""
    generator = torch.Generator().manual_seed(0)
    weight, delta = torch.randn(8, 5, generator=generator), torch.randn(8, 5, generator=generator)
    magnitude = torch.rand(8, 1, generator=generator) + 0.5
    merged = weight + dora_delta(weight, delta, magnitude)
    assert torch.allclose(merged.norm(dim=1, keepdim=True), magnitude, atol=1e-5)
