"""The committed Flux demo model and LoRAs: a diffusers FluxPipeline folder, offline loading as
CLoRAFluxPipeline, ``clora demo --family flux`` and its benchmark."""

import csv
import json

import pytest
import torch

from clora.demo import flux_model as FM

pytestmark = pytest.mark.skipif(
    not (FM.FLUX_MODEL_DIR / "model_index.json").exists(), reason="Flux demo model not trained"
)

CONCEPTS = ("sks_circle", "zwx_square", "pqr_triangle")
QUICK = {"steps": 4, "max_iter_to_alter": 2, "iterative_steps": [0], "iterative_iters": 1}


def test_layout_is_a_flux_folder_with_fp16_weights_under_5_mb():
    from safetensors.torch import load_file

    index = json.loads((FM.FLUX_MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    config = json.loads((FM.FLUX_MODEL_DIR / "transformer" / "config.json").read_text())
    assert config["num_layers"] >= 2 and config["num_single_layers"] >= 2 and config["guidance_embeds"]
    vae = json.loads((FM.FLUX_MODEL_DIR / "vae" / "config.json").read_text())
    assert config["in_channels"] == 4 * vae["latent_channels"] and vae["shift_factor"] == 0.0
    weights = list(FM.FLUX_DIR.rglob("*.safetensors"))
    assert len(weights) >= 4 + 3  # transformer, VAE, two text encoders, the concept LoRAs
    assert all(t.dtype == torch.float16 for f in weights for t in load_file(f).values())
    total = sum(f.stat().st_size for f in FM.FLUX_DIR.rglob("*") if f.is_file())
    assert total < 5 * 2**20, f"Flux demo assets are {total / 2**20:.1f} MB"


def test_t5_tokenizer_spells_every_grammar_word_as_one_piece():
    from transformers import AutoTokenizer

    from clora.demo import world

    tokenizer = AutoTokenizer.from_pretrained(FM.FLUX_MODEL_DIR / "tokenizer_2")
    assert tokenizer.model_max_length == FM.T5_LENGTH
    for word in world.WORDS:
        assert tokenizer.convert_ids_to_tokens(tokenizer(word).input_ids) == [f"▁{word}", "</s>"]


def test_loads_offline_as_clora_flux_pipeline_with_the_token_grid_as_map_grid():
    from clora import CLoRAFluxPipeline
    from clora.demo.bench import load_clora_pipe

    pipe = load_clora_pipe(FM.FLUX_MODEL_DIR)
    assert isinstance(pipe, CLoRAFluxPipeline)
    assert pipe.vae_scale_factor == 2 and pipe.map_downsampling() == 2  # 32 px -> 16 latent -> 8x8 tokens and maps
    assert pipe.text_sequence_length == FM.T5_LENGTH


def test_cli_demo_family_flux_writes_its_picture(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from clora import cli
    from clora.demo import bench

    for name in ("sks_circle", "zwx_square"):
        assert bench.DEMO_MODELS["flux"].lora_path(name).exists()
    for key, value in QUICK.items():  # the demo's own settings, with fewer steps
        monkeypatch.setitem(bench.DEMO_MODELS["flux"].settings, key, value)
    assert cli.main(["demo", "--family", "flux", "--output-dir", str(tmp_path)]) == 0
    path = tmp_path / "clora-demo-flux.png"  # beside the SD demo's clora-demo.png, not over it
    assert capsys.readouterr().out.strip().endswith(str(path.resolve()))
    with Image.open(path) as im:
        assert im.width > 3 * 192 and im.height > 192


def test_flux_benchmark_writes_the_sd_benchmark_layout(tmp_path):
    from clora.demo import run_benchmark

    out = tmp_path / "flux.csv"
    table = run_benchmark(out, seeds=2, comps=[CONCEPTS[:2]], progress=False, family="flux", **QUICK)
    methods = ["clora", "merge", "switch", "composite"]
    assert [row["method"] for row in table] == methods
    assert all(row["images"] == 2 and 0.0 <= row["pass_rate"] <= 1.0 for row in table)
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [row["method"] for row in rows] == methods
    assert set(rows[0]) == {
        "composition",
        "concepts",
        "method",
        "images",
        "pass_rate",
        "all_present",
        "any_leak",
        "extra_objects",
    }
    with open(tmp_path / "flux-images.csv") as f:
        images = [(row["method"], row["seed"]) for row in csv.DictReader(f)]
    assert images == [(m, s) for m in methods for s in ("0", "1")]
