"""The committed demo model and LoRAs: standard diffusers layout, offline loading, generation."""

import json

import numpy as np
import pytest
import torch

from clora.demo import ASSETS, LORA_DIR, MODEL_DIR

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "model_index.json").exists(), reason="demo model not trained")

LORAS = ["sks_circle", "zwx_square", "pqr_triangle", "dark_style"]


@pytest.fixture(scope="module")
def base_pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL_DIR), safety_checker=None, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_layout_is_a_standard_sd_folder():
    index = json.loads((MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert (MODEL_DIR / "tokenizer" / "vocab.json").exists() and (MODEL_DIR / "tokenizer" / "merges.txt").exists()
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total < 12 * 2**20, f"demo assets are {total / 2**20:.1f} MB"


def test_model_loads_offline_and_draws_what_is_asked(base_pipe):
    from clora.demo import judge as J

    g = [torch.Generator().manual_seed(s) for s in range(4)]
    out = base_pipe(
        prompt=["a red circle", "a blue square", "a green triangle", "a yellow circle"],
        generator=g,
        num_inference_steps=20,
        guidance_scale=5.0,
        height=32,
        width=32,
        output_type="np",
    ).images
    assert out.shape == (4, 32, 32, 3)
    imgs = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
    exp = [
        [J.Expect("circle", "red")],
        [J.Expect("square", "blue")],
        [J.Expect("triangle", "green")],
        [J.Expect("circle", "yellow")],
    ]
    assert sum(J.judge(im, e).passed for im, e in zip(imgs, exp)) >= 3


@pytest.mark.parametrize("name", LORAS)
def test_lora_files_load_with_diffusers(base_pipe, name):
    from safetensors.torch import load_file

    path = LORA_DIR / f"{name}.safetensors"
    if not path.exists():
        pytest.skip(f"{name} not trained")
    sd = load_file(str(path))
    assert all(v.dtype == torch.float16 for v in sd.values())
    base_pipe.load_lora_weights(str(path), adapter_name=name)
    try:
        assert name in base_pipe.get_list_adapters()["unet"]
    finally:
        base_pipe.delete_adapters(name)


def test_run_demo_writes_one_picture(tmp_path):
    if not all((LORA_DIR / f"{n}.safetensors").exists() for n in ("sks_circle", "zwx_square")):
        pytest.skip("demo LoRAs not trained")
    from PIL import Image

    from clora.demo import run_demo

    path = run_demo(tmp_path, steps=4, max_iter_to_alter=2, iterative_steps=[0], iterative_iters=1)
    assert path.parent == tmp_path.resolve() and path.suffix == ".png"
    with Image.open(path) as im:
        assert im.width > 3 * 192 and im.height > 192


def test_judge_calibration_file_is_committed():
    from clora.demo import judge as J

    assert J.PROTO_FILE.exists()
    classes = {cls for cls, source, _ in J.prototypes() if source == "vae"}
    assert classes == set(J.appearance_classes())


def test_benchmark_judges_every_method_on_the_same_seeds(tmp_path):
    if not all((LORA_DIR / f"{n}.safetensors").exists() for n in ("sks_circle", "zwx_square")):
        pytest.skip("demo LoRAs not trained")
    import csv

    from clora.demo import run_benchmark

    out = tmp_path / "bench.csv"
    quick = {"steps": 2, "max_iter_to_alter": 1, "iterative_steps": [0], "iterative_iters": 1}
    table = run_benchmark(out, seeds=1, comps=[("sks_circle", "zwx_square")], progress=False, **quick)
    assert [row["method"] for row in table] == ["clora", "merge", "switch", "composite"]
    assert all(row["images"] == 1 and row["composition"] == "sks_circle+zwx_square" for row in table)
    with open(out) as f:
        assert [row["method"] for row in csv.DictReader(f)] == ["clora", "merge", "switch", "composite"]
    with open(tmp_path / "bench-images.csv") as f:
        assert [(row["method"], row["seed"]) for row in csv.DictReader(f)] == [
            (m, "0") for m in ("clora", "merge", "switch", "composite")
        ]
