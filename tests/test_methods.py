"""The methods CLoRA is compared with (merge, switch, composite), checked against diffusers' own pipeline."""

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import spec_dict
from PIL import Image

from clora import CLoRAError, spec_from_dict
from clora.cli import main
from clora.families import SD
from clora.methods import METHODS
from clora.schedulers import make_scheduler
from clora.spec import fill_defaults

pytestmark = pytest.mark.usefixtures("reuse_loaded_pipelines")


def pixels(image):
    return np.asarray(image).astype(int)


@pytest.fixture(scope="module")
def spec(tiny_model_dir, lora_dir):
    return spec_from_dict(spec_dict(tiny_model_dir, lora_dir, steps=2))


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_model_dir, lora_dir):
    """diffusers' StableDiffusionPipeline with the cat and dog LoRAs loaded."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora_dir / "cat.safetensors"), adapter_name="cat")
    pipe.load_lora_weights(str(lora_dir / "dog.safetensors"), adapter_name="dog")
    return pipe


def diffusers_image(pipe, spec, prompt, adapters):
    """What diffusers alone makes with ``adapters`` (name -> weight) active, from the spec's seed."""
    pipe.set_adapters(list(adapters), adapter_weights=list(adapters.values()))
    spec = fill_defaults(spec, SD.spec_defaults)
    pipe.scheduler = make_scheduler(spec.scheduler, pipe.scheduler.config)
    generator = torch.Generator("cpu").manual_seed(spec.seed)
    size = {"height": spec.height, "width": spec.width}
    out = pipe(prompt, num_inference_steps=spec.steps, guidance_scale=spec.guidance, generator=generator, **size)
    return out.images[0]


def test_merge_is_diffusers_with_every_concept_lora_set_at_once(tiny_pipe, spec, diffusers_pipe):
    cat, dog = spec.to_dict()["concepts"]
    spec = spec.replace(method="merge", concepts=[dict(cat, weight=0.7), dog])
    result = tiny_pipe(spec)
    expected = diffusers_image(diffusers_pipe, spec, "a sks cat and a sks dog in a garden", {"cat": 0.7, "dog": 1.0})
    assert np.abs(pixels(result.images[0]) - pixels(expected)).max() <= 2  # float rounding only
    assert result.losses == [[[], []]]  # one image, two steps, no contrastive update


def test_composite_with_one_lora_is_plain_generation_with_it(tiny_pipe, spec, diffusers_pipe):
    one = spec.replace(method="composite", concepts=spec.to_dict()["concepts"][:1])
    expected = diffusers_image(diffusers_pipe, one, "a sks cat and a dog in a garden", {"cat": 1.0})
    assert np.abs(pixels(tiny_pipe(one).images[0]) - pixels(expected)).max() <= 2


def test_switch_runs_the_first_lora_alone_until_its_turn_is_over(tiny_pipe, spec, diffusers_pipe):
    switch = spec.replace(method="switch", switch_every=fill_defaults(spec, SD.spec_defaults).steps)
    expected = diffusers_image(diffusers_pipe, switch, "a sks cat and a sks dog in a garden", {"cat": 1.0})
    assert np.abs(pixels(tiny_pipe(switch).images[0]) - pixels(expected)).max() <= 2


def test_switch_hands_over_to_the_next_lora_every_switch_every_steps(tiny_pipe, spec, monkeypatch):
    assert [METHODS["switch"].running(step, 3, 2) for step in range(8)] == [
        (0,),
        (0,),
        (1,),
        (1,),
        (2,),
        (2,),
        (0,),
        (0,),
    ]
    ran = []  # the adapters of every branch each UNet pass runs
    factory = tiny_pipe._branch_runner

    def spying_factory(spec, branches, *args):
        runner = factory(spec, branches, *args)

        def run(*a, **k):
            ran.append([branch.adapters for branch in branches])
            return runner(*a, **k)

        return run

    monkeypatch.setattr(tiny_pipe, "_branch_runner", spying_factory)
    cat, dog = (tiny_pipe.add_lora(c.lora) for c in spec.concepts)
    tiny_pipe(spec.replace(method="switch", switch_every=1, steps=3))
    assert ran == [[(cat,)], [(dog,)], [(cat,)]]
    ran.clear()  # unset: Zhong et al.'s rate, 5 steps per 100, here 2 steps per LoRA for 40 steps
    result = tiny_pipe(spec.replace(method="switch", steps=40, num_images=2))
    assert ran == [[(cat,)] if step // 2 % 2 == 0 else [(dog,)] for step in range(40)]
    assert result.spec.switch_every is None  # the spec says "derived", as the user left it


def test_switch_every_unset_follows_the_papers_rate_of_5_steps_per_100():
    from clora.methods import switch_interval

    assert [switch_interval(steps) for steps in (1, 19, 20, 39, 40, 50, 100, 200)] == [1, 1, 1, 1, 2, 2, 5, 10]
    assert switch_interval(20, switch_every=5) == 5  # an explicit value wins


def test_every_method_through_the_cli_with_its_name_in_the_png(tiny_model_dir, lora_dir, tmp_path, capsys):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec_dict(tiny_model_dir, lora_dir, steps=1)))
    for method in ("merge", "switch", "composite"):
        out = tmp_path / f"{method}.png"
        assert main(["generate", str(spec_file), "-o", str(out), "--method", method, "--quiet"]) == 0
        assert json.loads(Image.open(out).text["clora"])["method"] == method
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(tmp_path / "switch.png"), "-o", str(again), "--quiet"]) == 0
    assert np.array_equal(pixels(Image.open(again)), pixels(Image.open(tmp_path / "switch.png")))
    capsys.readouterr()

    assert main(["generate", str(spec_file), "--dry-run", "--method", "composite"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["method"] == "composite" and shown["trigger_prompt"] == "a sks cat and a sks dog in a garden"

    maps = tmp_path / "maps.png"
    args = ["generate", str(spec_file), "-o", str(tmp_path / "x.png"), "--method", "merge", "--save-maps", str(maps)]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --save-maps: the picture shows CLoRA's attention masks; method 'merge' cuts none"
    )
    assert main(["generate", str(spec_file), "-o", str(tmp_path / "x.png"), "--method", "blend"]) == 2
    assert "--method: expected one of clora, merge, switch, composite, got 'blend'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not maps.exists()


def test_parity_is_for_clora_only(spec):
    with pytest.raises(CLoRAError, match="parity: reproduces the authors' CLoRA code; method 'merge' has no parity"):
        spec.replace(method="merge", parity=True)
