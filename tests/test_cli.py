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

pytestmark = pytest.mark.usefixtures("reuse_loaded_pipelines")


def clora(*args, cwd=None, env=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "clora.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        check=False,
    )


@pytest.fixture()
def spec_file(tmp_path, tiny_model_dir, lora_dir):
    """A YAML spec with relative LoRA paths, as a user would write it next to their files."""
    shutil.copytree(lora_dir, tmp_path / "loras")
    data = spec_dict(tiny_model_dir, Path("loras"), steps=2)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory, tiny_model_dir, lora_dir):
    """Three ``clora generate`` commands in one fresh Python process (each process imports torch and
    diffusers, which takes minutes on a slow CI machine): an image with its maps from a spec with
    relative LoRA paths, then a dry run and a generation of a hub id that is not cached, offline.
    The libraries read ``HF_HUB_OFFLINE`` when they are imported, hence a process of their own."""
    folder = tmp_path_factory.mktemp("fresh-process")
    shutil.copytree(lora_dir, folder / "loras")
    data = spec_dict(tiny_model_dir, Path("loras"), steps=2)
    (folder / "spec.yaml").write_text(yaml.safe_dump(data))
    (folder / "hub.yaml").write_text(yaml.safe_dump({**data, "model": "nobody/not-a-model"}))
    commands = [
        ["generate", "spec.yaml", "-o", "out.png", "--save-maps", "maps.png", "--quiet"],
        ["generate", "hub.yaml", "--dry-run"],
        ["generate", "hub.yaml", "-o", "x.png"],
    ]
    script = (
        "import sys\nfrom clora.cli import main\n"
        f"for args in {commands!r}:\n    code = main(args)\n    print('exit', code, flush=True)\n"
        "    print('--', file=sys.stderr, flush=True)"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(folder / "hf"), "HF_HUB_CACHE": str(folder / "hf" / "hub")}
    run = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=folder,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **env},
        check=False,
    )
    return folder, run.stdout.split("\n"), run.stderr.split("--\n")


def test_generate_writes_png_with_its_spec_and_regenerates_from_it(fresh_process, tmp_path):
    folder, stdout, stderr = fresh_process
    out = folder / "out.png"
    assert stdout[:3] == ["out.png", "maps.png", "exit 0"], stderr[0]
    image = Image.open(out)
    assert image.size == (64, 64)
    stored = json.loads(image.text["clora"])
    assert stored["seed"] == 3 and stored["steps"] == 2 and stored["height"] == 64
    assert stored["concepts"][0]["lora"] == str(folder / "loras" / "cat.safetensors")
    assert len(stored["concepts"][0]["sha256"]) == 64 and stored["mask_tokens"] == [[], [2, 3], [5, 6]]
    maps = Image.open(folder / "maps.png")
    assert maps.size[0] > image.size[0] * 2  # image + one column per concept

    again = tmp_path / "again.png"  # in this process: the same pixels as the other process's
    assert main(["generate", "--from-png", str(out), "-o", str(again), "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    assert json.loads(Image.open(again).text["clora"]) == stored


def test_a_hub_model_that_is_not_downloaded_says_so_offline(fresh_process):
    folder, stdout, stderr = fresh_process
    assert stdout[3:5] == ["exit 2", "exit 2"], stderr
    for err in stderr[1:3]:
        line = err.strip()
        assert "\n" not in line, err
        assert line.startswith("error: model: 'nobody/not-a-model' is not in the local Hugging Face cache"), line
        assert "offline mode is on" in line and "local diffusers folder" in line and ".safetensors" in line
        assert line.endswith("file")  # the whole advice, not a message cut at 200 characters
    assert not (folder / "x.png").exists()


def test_dry_run_prints_prompts_tokens_and_positions(spec_file, capsys):
    assert main(["generate", str(spec_file), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
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
                "--steps",
                "1",
            ]
        )
        == 0
    )
    first, second = tmp_path / "many-0.png", tmp_path / "many-1.png"
    assert capsys.readouterr().out.split() == [str(first), str(second)]
    specs = [json.loads(Image.open(p).text["clora"]) for p in (first, second)]
    assert [s["seed"] for s in specs] == [10, 11] and Image.open(first).size == (64, 128)
    assert [s["num_images"] for s in specs] == [1, 1]  # each PNG redoes its own image alone
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
                "--steps",
                "1",
            ]
        )
        == 0
    )
    # the second image of the batch is the single run of its seed (within 1/255: other batch shapes)
    difference = np.asarray(Image.open(single)).astype(int) - np.asarray(Image.open(second)).astype(int)
    assert np.abs(difference).max() <= 1


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
    assert run.stderr.strip().splitlines() == ["error: --steps: expected an integer >= 1, got 0"]
    assert not (tmp_path / "x.png").exists()


def test_from_png_of_a_file_that_is_no_png_is_one_error_line(spec_file, tmp_path, capsys):
    assert main(["generate", "--from-png", str(spec_file), "-o", str(tmp_path / "y.png")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "not a readable PNG" in line


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
    assert (
        main(["generate", str(path), "-o", str(tmp_path / "p.png"), "--quiet", "--allow-pickle", "--steps", "1"]) == 0
    )
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


def _run(*args):
    """``clora generate ...`` in this process, on the CPU, quick: (exit code, stderr lines)."""
    return main(["generate", *map(str, args), "--quiet", "--device", "cpu", "--steps", "1"])


def _err_lines(capsys):
    return capsys.readouterr().err.strip().splitlines()


def test_from_png_reruns_in_the_dtype_the_image_was_made_in(spec_file, tmp_path, capsys):
    out, again, fp32 = tmp_path / "bf16.png", tmp_path / "again.png", tmp_path / "fp32.png"
    assert main(["generate", str(spec_file), "-o", str(out), "--quiet", "--dtype", "bf16", "--steps", "1"]) == 0
    assert json.loads(Image.open(out).text["clora-runtime"])["dtype"] == "bfloat16"
    assert main(["generate", "--from-png", str(out), "-o", str(again), "--quiet"]) == 0
    assert json.loads(Image.open(again).text["clora-runtime"])["dtype"] == "bfloat16"
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    assert main(["generate", "--from-png", str(out), "-o", str(fp32), "--quiet", "--dtype", "fp32"]) == 0
    assert json.loads(Image.open(fp32).text["clora-runtime"])["dtype"] == "float32"  # the flag wins
    assert capsys.readouterr().err == ""


def test_from_png_made_on_a_device_not_here_warns_in_one_line(spec_file, tmp_path, capsys):
    import torch

    from clora.pngmeta import read_png_spec, save_png

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    made = tmp_path / "made.png"
    assert _run(spec_file, "-o", made) == 0
    on_gpu = tmp_path / "on_gpu.png"  # the same image, as a CUDA machine would have written it
    save_png(Image.open(made), on_gpu, read_png_spec(made), {"device": "cuda:0", "dtype": "float32"})
    capsys.readouterr()
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(on_gpu), "-o", str(again), "--quiet"]) == 0
    (line,) = _err_lines(capsys)
    assert line.startswith("warning: ") and "cuda:0" in line and "cpu" in line and "pixels may differ" in line
    assert json.loads(Image.open(again).text["clora-runtime"])["device"] == "cpu"


def _unwritable_folder(tmp_path):
    """A folder that exists but takes no new files, for whoever runs the tests (root included)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except OSError:
        return folder
    (folder / "probe").unlink()  # root ignores permission bits; /proc/self takes no files even from root
    proc = Path("/proc/self")
    try:
        (proc / "probe.png").touch()
    except OSError:
        return proc
    pytest.skip("no folder here refuses new files")


def test_output_folders_are_checked_before_the_model_loads(spec_file, tmp_path, capsys):
    locked = _unwritable_folder(tmp_path)
    data = yaml.safe_load(spec_file.read_text())
    data["model"] = str(tmp_path / "no-such-model")  # loading a model would fail with another message
    no_model = tmp_path / "no-model.yaml"
    no_model.write_text(yaml.safe_dump(data))
    cases = [
        (["-o", locked / "out.png"], f"error: -o/--output: cannot write into folder {locked}"),
        (["-o", tmp_path / "ok.png", "--save-maps", locked / "maps.png"], "error: --save-maps: cannot write"),
        (["-o", tmp_path / "ok.png", "--save-maps", tmp_path / "missing" / "maps.png"], "error: --save-maps: folder"),
        (["-o", tmp_path / "ok.png", "--save-maps", tmp_path / "maps.jpg"], "error: --save-maps: "),
    ]
    for args, message in cases:
        assert _run(no_model, *args) == 2, args
        (line,) = _err_lines(capsys)
        assert line.startswith(message), (args, line)
    assert not list(tmp_path.glob("*.png")) and not (locked / "out.png").exists()
    try:
        locked.chmod(0o755)
    except OSError:
        pass


def test_the_maps_picture_may_not_replace_an_image(spec_file, tmp_path, capsys):
    same = tmp_path / "same.png"
    spelled_otherwise = tmp_path / "sub" / ".." / "same.png"
    (tmp_path / "sub").mkdir()
    for extra in ([], ["--num-images", "2"]):
        assert _run(spec_file, "-o", same, "--save-maps", spelled_otherwise, *extra) == 2
        (line,) = _err_lines(capsys)
        assert line.startswith("error: --save-maps: ") and "-o" in line
    # with --num-images, OUT-1.png is an image name too
    assert _run(spec_file, "-o", tmp_path / "a.png", "--num-images", "2", "--save-maps", tmp_path / "a-1.png") == 0
    capsys.readouterr()
    images = [tmp_path / f"a-{k}.png" for k in range(2)]
    assert all("clora" in Image.open(p).text for p in images)  # neither was replaced by a maps picture
    assert not same.exists()


def test_seeds_past_the_generator_range_are_refused_up_front(spec_file, tmp_path, capsys):
    top = str(2**64 - 1)
    assert _run(spec_file, "-o", tmp_path / "x.png", "--seed", top, "--num-images", "2") == 2
    (line,) = _err_lines(capsys)
    assert line.startswith("error: --num-images: ") and str(2**64) in line
    assert _run(spec_file, "-o", tmp_path / "x.png", "--seed", str(2**64)) == 2
    assert _err_lines(capsys) == [f"error: --seed: expected an integer <= {top}, got {2**64}"]
    assert not list(tmp_path.glob("x*.png"))
    assert _run(spec_file, "-o", tmp_path / "top.png", "--seed", top) == 0  # the largest seed itself works
    assert json.loads(Image.open(tmp_path / "top.png").text["clora"])["seed"] == 2**64 - 1


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_written_files_get_the_permissions_of_a_plain_write(spec_file, tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        assert _run(spec_file, "-o", tmp_path / "out.png", "--save-maps", tmp_path / "maps.png") == 0
    finally:
        os.umask(previous)
    for name in ("out.png", "maps.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


def test_a_bad_flag_value_is_blamed_on_the_flag(spec_file, tmp_path, capsys):
    for flag, value, message in [
        ("--guidance", "-3", "error: --guidance: expected a number >= 0.0, got -3.0"),
        ("--seed", "-5", "error: --seed: expected an integer >= 0, got -5"),
        ("--scheduler", "warp", "error: --scheduler: unknown scheduler 'warp'"),
    ]:
        assert main(["generate", str(spec_file), "-o", str(tmp_path / "x.png"), flag, value]) == 2
        (line,) = _err_lines(capsys)
        assert line.startswith(message) and str(spec_file) not in line, line
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert main(["generate", str(empty), "-o", str(tmp_path / "x.png")]) == 2
    assert _err_lines(capsys)[0].startswith(f"error: {empty}: the file is empty")


LONG_PROMPT = "a cat and a dog in a garden, " + "very " * 70 + "detailed oil painting"


def test_cut_prompts_are_named_in_dry_run_and_in_a_run(spec_file, tmp_path, capsys):
    data = yaml.safe_load(spec_file.read_text())
    data["prompt"] = LONG_PROMPT
    long_spec = tmp_path / "long.yaml"
    long_spec.write_text(yaml.safe_dump(data))
    assert main(["generate", str(long_spec), "--dry-run"]) == 0
    captured = capsys.readouterr()
    plan = json.loads(captured.out)
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == 3  # the base prompt and each LoRA's prompt
    for prompt, line in zip(plan["prompts"], warnings):
        assert line.startswith("warning: ") and "77 tokens" in line and "oil painting" in line
        dropped = line.split("dropped: ", 1)[1].strip("'")
        assert prompt.endswith(dropped)
    assert "concepts[0] ('cat')" in warnings[1] and "concepts[1] ('dog')" in warnings[2]
    assert _run(long_spec, "-o", tmp_path / "long.png") == 0
    assert capsys.readouterr().err.strip().splitlines() == warnings  # once each, no Python warning on top


def test_a_lora_for_another_base_model_prints_one_line(spec_file, tmp_path, lora_dir, capfd):
    data = yaml.safe_load(spec_file.read_text())
    data["concepts"][0]["lora"] = str(lora_dir / "sd2_shaped.safetensors")
    path = tmp_path / "sd2.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["generate", str(path), "-o", str(tmp_path / "x.png"), "--steps", "1", "--quiet"]) == 2
    expected = f"error: {lora_dir / 'sd2_shaped.safetensors'}: the LoRA's layer shapes do not fit this model"
    assert capfd.readouterr().err.strip().splitlines() == [expected + "; was it trained for another base model?"]
    assert not (tmp_path / "x.png").exists()
