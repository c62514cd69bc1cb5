"""Shared fixtures: the real SD 1.5 tokenizer, a tiny random SD 1.5-layout model, LoRA files."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
SD15_TOKENIZER = TESTS / "fixtures" / "sd15_tokenizer"


@pytest.fixture(scope="session")
def sd15_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(SD15_TOKENIZER))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tiny_sd import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("tiny-sd15"), SD15_TOKENIZER)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_dir):
    from clora import CLoRAPipeline

    pipe = CLoRAPipeline.from_pretrained(str(tiny_model_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory) -> Path:
    """The tiny FLUX.1-dev look-alike of ``tiny_flux``, built once per session (tests only read it)."""
    from tiny_flux import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def lora_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """Real LoRA files for the tiny model: cat/dog/style in diffusers and kohya formats, UNet-only too."""
    from diffusers import StableDiffusionPipeline
    from lora_files import (
        make_lora_weights,
        with_wrong_shapes,
        write_diffusers_lora,
        write_kohya_lora,
        write_legacy_diffusers_lora,
    )

    folder = tmp_path_factory.mktemp("loras")
    base = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
    cat = make_lora_weights(base, seed=1)
    dog = make_lora_weights(base, seed=2)
    write_diffusers_lora(cat, folder / "cat.safetensors")
    write_kohya_lora(cat, folder / "cat_kohya.safetensors")
    write_legacy_diffusers_lora(cat, folder / "cat_legacy.safetensors")
    write_diffusers_lora(dog, folder / "dog.safetensors")
    write_kohya_lora(dog, folder / "dog_kohya.safetensors")
    unet_only = make_lora_weights(base, seed=3, text_encoder=False)
    write_diffusers_lora(unet_only, folder / "style_unet_only.safetensors")
    write_kohya_lora(unet_only, folder / "style_unet_only_kohya.safetensors")
    write_kohya_lora(with_wrong_shapes(cat), folder / "sd2_shaped.safetensors")
    return folder


def spec_dict(model_dir: Path, loras: Path, **extra) -> dict:
    """A small, fast two-concept spec for the tiny model."""
    data = {
        "model": str(model_dir),
        "prompt": "a cat and a dog in a garden",
        "concepts": [
            {"lora": str(loras / "cat.safetensors"), "phrase": "cat", "trigger": "sks cat"},
            {"lora": str(loras / "dog.safetensors"), "phrase": "dog", "trigger": "sks dog"},
        ],
        "seed": 3,
        "steps": 3,
        "height": 64,
        "width": 64,
        "max_iter_to_alter": 2,
        "iterative_steps": [0],
        "iterative_iters": 1,
    }
    data.update(extra)
    return data


@pytest.fixture(scope="session")
def _loaded_pipelines() -> dict:
    return {}


@pytest.fixture()
def reuse_loaded_pipelines(monkeypatch, _loaded_pipelines):
    """In-process ``clora`` runs get the pipeline an earlier run loaded for the same model, device,
    dtype and config: loading a model and injecting its LoRAs costs more than a tiny model's image.
    Loading itself is covered by the CLI's subprocess tests and by the single-file tests."""
    import torch

    from clora import runtime

    real = runtime.load_pipeline

    def load_once(model, device, dtype, config=None, quantize=None):
        key = (str(Path(model).resolve()), torch.device(device).type, dtype, config) + ((quantize,) if quantize else ())
        if key not in _loaded_pipelines:
            _loaded_pipelines[key] = real(model, device, dtype, config, quantize=quantize)
        return _loaded_pipelines[key]

    monkeypatch.setattr(runtime, "load_pipeline", load_once)


@pytest.fixture()
def offline(monkeypatch):
    """No network at all: any socket connection attempt fails the test (huggingface_hub reads
    HF_HUB_OFFLINE once at import, so the variable alone would not stop a hub call here)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
