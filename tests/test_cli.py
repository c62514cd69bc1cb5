"""The ``clora`` command end to end: real files, real subprocesses for the main flows."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import spec_dict
from PIL import Image

from clora.cli import main


def clora(*args, cwd=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "clora.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env
    )


@pytest.fixture()
def spec_file(tmp_path, tiny_model_dir, lora_dir):
    """A YAML spec with relative LoRA paths, as a user would write it next to their files."""
    shutil.copytree(lora_dir, tmp_path / "loras")
    data = spec_dict(tiny_model_dir, Path("loras"), steps=3)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_generate_writes_png_with_its_spec_and_regenerates_from_it(spec_file, tmp_path):
    out = tmp_path / "out.png"
    run = clora("generate", spec_file, "-o", out, "--save-maps", tmp_path / "maps.png", "--quiet")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(out), str(tmp_path / "maps.png")]
    image = Image.open(out)
    assert image.size == (64, 64)
    stored = json.loads(image.text["clora"])
    assert stored["seed"] == 3 and stored["steps"] == 3 and stored["height"] == 64
    assert stored["concepts"][0]["lora"] == str(tmp_path / "loras" / "cat.safetensors")
    assert len(stored["concepts"][0]["sha256"]) == 64 and stored["mask_tokens"] == [[], [2, 3], [5, 6]]
    maps = Image.open(tmp_path / "maps.png")
    assert maps.size[0] > image.size[0] * 2  # image + one column per concept

    again = tmp_path / "again.png"
    run = clora("generate", "--from-png", out, "-o", again, "--quiet")
    assert run.returncode == 0, run.stderr
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    assert json.loads(Image.open(again).text["clora"]) == stored


def test_dry_run_prints_prompts_tokens_and_positions(spec_file):
    run = clora("generate", spec_file, "--dry-run")
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)
    assert plan["prompts"][2] == "a cat and a sks dog in a garden"
    assert plan["tokens"][1][:4] == ["<|startoftext|>", "a</w>", "sks</w>", "cat</w>"]
    assert plan["concept_tokens"] == [[[2], [2, 3], [2]], [[5], [6], [5, 6]]]
    assert plan["mask_tokens"] == [[], [2, 3], [5, 6]]


def test_flags_override_the_spec_and_num_images_steps_the_seed(spec_file, tmp_path, capsys):
    out = tmp_path / "many.png"
    assert (
        main(
            [
                "generate",
                str(spec_file),
                "-o",
                str(out),
                "--num-images",
                "2",
                "--seed",
                "10",
                "--height",
                "128",
                "--width",
                "64",
                "--quiet",
                "--device",
                "cpu",
                "--dtype",
                "fp32",
            ]
        )
        == 0
    )
    first, second = tmp_path / "many-0.png", tmp_path / "many-1.png"
    assert capsys.readouterr().out.split() == [str(first), str(second)]
    seeds = [json.loads(Image.open(p).text["clora"])["seed"] for p in (first, second)]
    assert seeds == [10, 11] and Image.open(first).size == (64, 128)
    assert not out.exists()
    single = tmp_path / "single.png"
    assert (
        main(
            [
                "generate",
                str(spec_file),
                "-o",
                str(single),
                "--seed",
                "11",
                "--height",
                "128",
                "--width",
                "64",
                "--quiet",
            ]
        )
        == 0
    )
    assert np.array_equal(np.asarray(Image.open(single)), np.asarray(Image.open(second)))


def _bad_input_cases(tmp_path, spec_file, lora_dir):
    data = yaml.safe_load(spec_file.read_text())

    def write(name, content):
        path = tmp_path / name
        path.write_text(content) if isinstance(content, str) else path.write_bytes(content)
        return path

    def spec_with(**changes):
        return write(f"bad-{len(list(tmp_path.glob('bad-*')))}.yaml", yaml.safe_dump({**data, **changes}))

    def concept_lora(path):
        concepts = [dict(data["concepts"][0], lora=str(path)), data["concepts"][1]]
        return spec_with(concepts=concepts)

    real = (lora_dir / "cat.safetensors").read_bytes()
    return {
        "missing lora": (concept_lora(tmp_path / "nope.safetensors"), "nope.safetensors: LoRA file not found"),
        "text as safetensors": (
            concept_lora(write("notes.safetensors", "just some notes\n" * 20)),
            "notes.safetensors: not a valid .safetensors file",
        ),
        "truncated": (
            concept_lora(write("cut.safetensors", real[: len(real) // 2])),
            "cut.safetensors: not a valid .safetensors file",
        ),
        "pickle": (concept_lora(write("old.ckpt", b"\x80\x04K.")), "old.ckpt: pickled weights can run code"),
        "other base": (
            concept_lora(lora_dir / "sd2_shaped.safetensors"),
            "sd2_shaped.safetensors: the LoRA's layer shapes do not fit this model",
        ),
        "scheduler": (spec_with(scheduler="warp"), "unknown scheduler 'warp'"),
        "height": (spec_with(height=100), "height: 100 is not a multiple of 32"),
        "steps": (spec_with(steps=-3), "steps: expected an integer >= 1, got -3"),
        "model folder": (spec_with(model=str(tmp_path / "no-model")), "model: "),
        "unknown key": (spec_with(cfg_scale=7), "unknown key 'cfg_scale'"),
        "phrase": (spec_with(prompt="a bird and a dog"), "concepts[0].phrase: 'cat' is not a whole word"),
        "shared words": (
            spec_with(concepts=[dict(data["concepts"][0], phrase="cat"), dict(data["concepts"][1], phrase="a cat")]),
            "overlaps the words",
        ),
        "yaml": (write("broken.yaml", "prompt: [a cat\nconcepts: {"), "broken.yaml: invalid YAML"),
    }


def test_every_bad_input_is_one_line_exit_2_and_no_output(spec_file, tmp_path, lora_dir, capsys):
    for name, (path, message) in _bad_input_cases(tmp_path, spec_file, lora_dir).items():
        out = tmp_path / f"{name.replace(' ', '_')}.png"
        code = main(["generate", str(path), "-o", str(out), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2, name
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, (name, err)
        assert not out.exists(), name
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_bad_input_from_a_real_subprocess_has_no_traceback(spec_file, tmp_path):
    run = clora("generate", spec_file, "-o", tmp_path / "x.png", "--steps", "0")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"error: {spec_file}: steps: expected an integer >= 1, got 0"]
    assert not (tmp_path / "x.png").exists()
    run = clora("generate", "--from-png", spec_file, "-o", tmp_path / "y.png")
    assert run.returncode == 2 and "not a readable PNG" in run.stderr and "Traceback" not in run.stderr


def test_pickled_lora_loads_only_when_allowed(spec_file, tmp_path, lora_dir):
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "cat.pt"
    torch.save(load_file(str(lora_dir / "cat.safetensors")), pickled)
    data = yaml.safe_load(spec_file.read_text())
    data["concepts"][0]["lora"] = str(pickled)
    path = tmp_path / "pickled.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["generate", str(path), "-o", str(tmp_path / "p.png"), "--quiet"]) == 2
    assert main(["generate", str(path), "-o", str(tmp_path / "p.png"), "--quiet", "--allow-pickle"]) == 0
    assert (tmp_path / "p.png").exists()


def test_from_png_refuses_a_lora_file_that_changed(spec_file, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(["generate", str(spec_file), "-o", str(out), "--quiet", "--steps", "1"]) == 0
    cat = tmp_path / "loras" / "cat.safetensors"
    cat.write_bytes((tmp_path / "loras" / "dog.safetensors").read_bytes())
    capsys.readouterr()
    assert main(["generate", "--from-png", str(out), "-o", str(tmp_path / "again.png"), "--quiet"]) == 2
    assert "cat.safetensors: sha256 is" in capsys.readouterr().err
    assert not (tmp_path / "again.png").exists()


def test_dry_run_needs_only_the_tokenizer(spec_file, tiny_model_dir, tmp_path, capsys):
    tokenizer_only = tmp_path / "tokenizer-only"
    shutil.copytree(tiny_model_dir / "tokenizer", tokenizer_only / "tokenizer")
    data = yaml.safe_load(spec_file.read_text())
    data["model"] = str(tokenizer_only)  # no unet/, text_encoder/ or vae/ at all
    path = tmp_path / "dry.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["generate", str(path), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["concept_tokens"] == [[[2], [2, 3], [2]], [[5], [6], [5, 6]]]
