import json
import re

import pytest

from clora import CLoRAError, CompositionSpec, load_spec, spec_from_dict
from clora.families import FLUX, SD
from clora.spec import fill_defaults

SPEC_YAML = """\
model: ./model
prompt: a cat and a dog in a garden
negative_prompt: lowres, blurry
concepts:
  - lora: loras/cat.safetensors
    phrase: cat
    trigger: sks cat
    weight: 1.0
    name: cat
  - lora: loras/dog.safetensors
    phrase: dog
    trigger: sks dog
styles:
  - lora: loras/watercolor.safetensors
    weight: 0.8
seed: 53
steps: 30
scheduler: euler_a
mask_morphology: [open, dilate]
"""


def test_yaml_spec_resolves_paths_next_to_the_file_and_fills_defaults(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC_YAML)
    spec = load_spec(path)
    assert spec.model == str((tmp_path / "model").resolve())
    assert spec.concepts[0].lora == str(tmp_path / "loras" / "cat.safetensors")
    assert spec.concepts[1].trigger == "sks dog" and spec.concepts[1].weight == 1.0
    assert spec.styles[0].weight == 0.8
    assert (spec.seed, spec.steps, spec.scheduler) == (53, 30, "euler_a")
    assert spec.mask_morphology == ("open", "dilate")
    # unset family-dependent fields stay unset until the model's family fills them
    assert spec.guidance is None and spec.iterative_steps is None
    sd, flux = fill_defaults(spec, SD.spec_defaults), fill_defaults(spec, FLUX.spec_defaults)
    assert (sd.steps, sd.scheduler, sd.guidance, sd.iterative_steps) == (30, "euler_a", 7.5, (0, 10, 20))
    assert (flux.steps, flux.guidance, flux.iterative_steps) == (30, 3.5, (0, 5, 10))
    assert CompositionSpec(prompt="x", concepts=()).steps is None


def test_json_is_accepted_and_round_trips_through_to_dict(tmp_path):
    data = {
        "model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "prompt": "a cat",
        "concepts": [{"lora": "/abs/cat.safetensors", "phrase": "cat"}],
        "height": 640,
        "width": 512,
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(data))
    spec = load_spec(path)
    assert spec.model == data["model"]  # a hub id stays a hub id
    again = spec_from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec


@pytest.mark.parametrize(
    "change, message",
    [
        ({"colour": "red"}, "unknown key 'colour'"),
        (
            {"concepts": [{"lora": "a.safetensors", "phrase": "cat", "strength": 1}]},
            r"unknown key 'concepts\[0\]\.strength'",
        ),
        ({"steps": -5}, "steps: expected an integer >= 1, got -5"),
        ({"steps": "many"}, "steps: expected an integer"),
        ({"guidance": True}, "guidance: expected a number"),
        ({"scheduler": "turbo"}, "unknown scheduler 'turbo'"),
        ({"mask_morphology": ["blur"]}, r"mask_morphology\[0\]: expected one of erode, dilate, open, close"),
        ({"mask_threshold": 1.5}, "mask_threshold: expected a number <= 1.0"),
        ({"temperature": 0}, "temperature: expected a number > 0.0"),
        ({"concepts": []}, "concepts: expected a non-empty list"),
        ({"concepts": [{"phrase": "cat"}]}, r"concepts\[0\]: missing required key 'lora'"),
        ({"prompts": ["only one"]}, "prompts: expected 2 prompts"),
        ({"concept_tokens": [[[2]]]}, "concept_tokens: expected 1 lists"),
        ({"seed": 2**64}, "seed: expected an integer <= 18446744073709551615, got 18446744073709551616"),
        ({"seed": -1}, "seed: expected an integer >= 0"),
    ],
)
def test_bad_fields_name_the_field_and_what_is_expected(change, message):
    data = {"prompt": "a cat", "concepts": [{"lora": "a.safetensors", "phrase": "cat"}], **change}
    with pytest.raises(CLoRAError, match=message):
        spec_from_dict(data, source="s.yaml")


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("prompt: a cat\nconcepts: [\n  - lora: x\n")
    with pytest.raises(CLoRAError, match=r"broken.yaml: invalid YAML at line \d+"):
        load_spec(path)


def test_the_largest_seed_torch_takes_is_accepted():
    import torch

    spec = spec_from_dict(
        {"prompt": "a cat", "concepts": [{"lora": "a.safetensors", "phrase": "cat"}], "seed": 2**64 - 1}
    )
    assert torch.Generator("cpu").manual_seed(spec.seed).initial_seed() == 2**64 - 1  # what the pipeline does


@pytest.mark.parametrize("name, content", [("empty.yaml", ""), ("blank.json", "\n  \n"), ("notes.yml", "# todo\n")])
def test_an_empty_spec_file_says_so(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(CLoRAError, match=rf"^{re.escape(str(path))}: the file is empty") as caught:
        load_spec(path)
    assert "NoneType" not in str(caught.value)


def test_missing_spec_file(tmp_path):
    with pytest.raises(CLoRAError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_replace_validates_like_a_file():
    spec = spec_from_dict({"prompt": "a cat", "concepts": [{"lora": "a.safetensors", "phrase": "cat"}]})
    assert spec.replace(seed=7).seed == 7
    with pytest.raises(CLoRAError, match="seed"):
        spec.replace(seed=-1)


def test_num_images_is_at_least_one_and_its_seeds_stay_in_range():
    base = {"prompt": "a cat", "concepts": [{"lora": "cat.safetensors", "phrase": "cat"}]}
    assert spec_from_dict(base).num_images == 1
    assert spec_from_dict(dict(base, num_images=4, seed=2**64 - 4)).num_images == 4  # seeds up to 2**64-1
    with pytest.raises(CLoRAError, match=r"^spec: num_images: expected an integer >= 1, got 0$"):
        spec_from_dict(dict(base, num_images=0))
    with pytest.raises(
        CLoRAError,
        match=r"^spec: num_images: 4 images from seed 18446744073709551613 need seeds up to 18446744073709551616",
    ):
        spec_from_dict(dict(base, num_images=4, seed=2**64 - 3))
