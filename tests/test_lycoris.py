"""LyCORIS files (LoCon, LoHa, LoKr, full, norm diffs, DoRA) written by the lycoris-lora library itself,
checked against that library's own merge of the same weights and through both engines and the CLI.

Each file is written when a test first asks for it and then kept for the module; one plain diffusers
pipeline is both the base the networks are built on and the reference the images are compared with."""

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import SD15_TOKENIZER, spec_dict
from PIL import Image
from safetensors.torch import load_file, save_file

from clora import spec_from_dict
from clora.cli import main
from clora.families import SD, SDXL
from clora.lycoris import dora_delta, loha_delta, lokr_delta, read_layer
from clora.lycoris_adapters import LycorisLayer, lycoris_layer
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

COMPONENTS = ("unet", "text_encoder")
PROMPT = "a sks cat and a sks dog in a garden"  # the trigger prompt of ``two_concepts``


def pixels(image):
    return np.asarray(image).astype(int)


class LycorisFiles:
    """Per format, made on first use: its file, and the weight changes of lycoris-lora's own merge of it
    into ``pipe`` (the entries it changes; the weights are put back after each merge). ``folder`` may be
    shared by pytest-xdist's workers: a file is then made by the first worker that asks for it."""

    def __init__(self, pipe, folder: Path) -> None:
        self.pipe, self.folder = pipe, folder
        self.base = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in COMPONENTS}
        self._changes: dict[str, dict[str, dict[str, torch.Tensor]]] = {}

    def path(self, name: str) -> Path:
        self.changes(name)
        return self.folder / f"{name}.safetensors"

    def changes(self, name: str) -> dict[str, dict[str, torch.Tensor]]:
        if name not in self._changes:
            from filelock import FileLock

            saved = self.folder / f"{name}.changes.safetensors"
            with FileLock(str(self.folder / f"{name}.lock")):
                if not saved.exists():
                    save_file(self._make(name), str(saved))
            changes = {c: {} for c in COMPONENTS}
            for key, change in load_file(str(saved)).items():
                component, key = key.split(".", 1)
                changes[component][key] = change
            self._changes[name] = changes
        return self._changes[name]

    def _make(self, name: str) -> dict[str, torch.Tensor]:
        from lycoris_files import make_network, merge, save_kohya

        algo, options = FORMATS[name]
        network = make_network(self.pipe, algo, seed=list(FORMATS).index(name), **options)
        save_kohya(network, self.pipe, self.folder / f"{name}.safetensors")
        merge(network, 1.0)
        changes = {}
        for c in COMPONENTS:
            merged, base = getattr(self.pipe, c).state_dict(), self.base[c]
            changes.update({f"{c}.{k}": v - base[k] for k, v in merged.items() if not torch.equal(v, base[k])})
        self.restore()
        return changes

    def restore(self) -> None:
        for c in COMPONENTS:
            getattr(self.pipe, c).load_state_dict(self.base[c])


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def lyco(reference, tmp_path_factory):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the run's folder, which every worker of this run sees
        folder = tmp_path_factory.getbasetemp().parent / "lycoris-files"
        folder.mkdir(exist_ok=True)
    else:
        folder = tmp_path_factory.mktemp("lycoris-files")
    return LycorisFiles(reference, folder)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir, _loaded_pipelines):
    """The tiny SD 1.5 as the CLI loads it, shared with this module's CLI runs (``reuse_loaded_pipelines``)."""
    from clora.runtime import load_pipeline

    key = (str(tiny_model_dir.resolve()), "cpu", torch.float32, None)
    if key not in _loaded_pipelines:
        _loaded_pipelines[key] = load_pipeline(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    _loaded_pipelines[key].set_progress_bar_config(disable=True)
    return _loaded_pipelines[key]


def reference_image(lyco, weights, spec):
    """Plain diffusers with lycoris-lora's merged changes added to the base weights, ``weights[name]`` each."""
    changes = {name: lyco.changes(name) for name in weights}  # before the weights change
    for component in COMPONENTS:
        state = {k: v.clone() for k, v in lyco.base[component].items()}
        for name, weight in weights.items():
            for key, change in changes[name][component].items():
                state[key] += weight * change
        getattr(lyco.pipe, component).load_state_dict(state)
    spec = fill_defaults(spec, SD.spec_defaults)
    lyco.pipe.scheduler = make_scheduler(spec.scheduler, lyco.pipe.scheduler.config)
    generator = torch.Generator("cpu").manual_seed(spec.seed)
    try:
        return lyco.pipe(
            PROMPT,
            num_inference_steps=spec.steps,
            guidance_scale=spec.guidance,
            generator=generator,
            height=spec.height,
            width=spec.width,
        ).images[0]
    finally:
        lyco.restore()


def two_concepts(model_dir, lyco, cat, dog, **extra):
    """Two concepts, 64 px, 2 steps and one contrastive update."""
    data = spec_dict(model_dir, lyco.folder, steps=2, max_iter_to_alter=1, iterative_steps=[], **extra)
    data["concepts"][0]["lora"] = str(lyco.path(cat))
    data["concepts"][1]["lora"] = str(lyco.path(dog))
    return data


def test_sdxl_loha_with_sgm_names_and_both_text_encoders_is_lycoris_loras_merge(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline
    from lycoris_files import make_network, merge, save_kohya
    from tiny_sd import build_tiny_sdxl

    from clora.runtime import load_pipeline

    folder = build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl-lycoris"), SD15_TOKENIZER)
    pipe = load_pipeline(str(folder), torch.device("cpu"), torch.float32)
    assert pipe.family is SDXL
    pipe.set_progress_bar_config(disable=True)
    # plain diffusers on a copy of the loaded weights (copied before any LoRA touches them)
    copied = {k: copy.deepcopy(v) if isinstance(v, torch.nn.Module) else v for k, v in pipe.components.items()}
    reference = StableDiffusionXLPipeline(**copied)
    reference.set_progress_bar_config(disable=True)
    network = make_network(reference, "loha", seed=7, attention_only=True, dora_wd=True)
    path = save_kohya(network, reference, tmp_path_factory.mktemp("xl-files") / "loha_xl.safetensors", sgm=True)
    keys = load_file(str(path)).keys()
    assert any(key.startswith("lora_unet_input_blocks_4_1_") for key in keys)
    assert {key.split("_text_model_")[0] for key in keys if "_te" in key} == {"lora_te1", "lora_te2"}
    merge(network, 1.0)

    data = spec_dict(folder, path.parent, steps=2, method="merge")
    data["concepts"] = [{"lora": str(path), "phrase": "cat", "trigger": "sks cat"}]
    spec = spec_from_dict(data)
    image = pixels(pipe(spec).images[0])
    counts = pipe.__dict__["_clora_lycoris"].counts
    assert all(next(iter(counts.values())).get(c) for c in ("unet", "text_encoder", "text_encoder_2"))
    spec = fill_defaults(spec, SDXL.spec_defaults)
    reference.scheduler = make_scheduler(spec.scheduler, reference.scheduler.config)
    generator = torch.Generator("cpu").manual_seed(spec.seed)
    expected = reference(
        "a sks cat and a dog in a garden",
        num_inference_steps=spec.steps,
        guidance_scale=spec.guidance,
        generator=generator,
        height=spec.height,
        width=spec.width,
    ).images[0]
    assert np.abs(image - pixels(expected)).max() <= 2


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_layer_gets_lycoris_loras_own_merged_weight(pipe, lyco, name):
    """Every key of the file is applied, on the layer lycoris-lora merges it into, with its update."""
    adapter = pipe.add_lora(str(lyco.path(name)))
    changes = lyco.changes(name)
    checked = 0
    for component in COMPONENTS:
        for path, module in getattr(pipe, component).named_modules():
            layer = lycoris_layer(module)
            if layer is None or adapter not in layer.updates:
                continue
            delta, bias = layer.weights(adapter)
            path = path.removesuffix(".base_layer")
            for got, key in ((delta, f"{path}.weight"), (bias, f"{path}.bias")):
                expected = changes[component].get(key)
                if got is None:
                    assert expected is None, key
                else:
                    expected = torch.zeros_like(got) if expected is None else expected
                    assert torch.allclose(got, expected, atol=1e-5 * module.weight.abs().max().item()), key
            checked += 1
    changed = sum(1 for c in changes.values() for key in c if key.endswith(".weight"))
    assert checked == changed > 50


def test_lycoris_files_merged_are_diffusers_with_lycoris_merged_weights(tiny_model_dir, lyco, tmp_path):
    """``method: merge`` through the CLI: a LoHa and a LoKr concept with a full+norm-diff style and a DoRA
    style, ``weight`` and ``lora_scale`` scaling each file as A1111 does. Every layer kind the files touch
    (linear, 3x3 and 1x1 conv, GroupNorm, LayerNorm, biases) is applied by the hooks here."""
    data = two_concepts(tiny_model_dir, lyco, "loha_tucker", "lokr_both", method="merge", lora_scale=0.8)
    data["concepts"][0]["weight"] = 0.5
    data["styles"] = [
        {"lora": str(lyco.path("full_norms")), "weight": 0.6},
        {"lora": str(lyco.path("dora")), "weight": 1.0},
    ]
    spec_file, out = tmp_path / "spec.yaml", tmp_path / "merge.png"
    spec_file.write_text(yaml.safe_dump(data))
    assert main(["generate", str(spec_file), "-o", str(out), "--quiet", "--device", "cpu"]) == 0
    spec = spec_from_dict(data)
    weights = {"loha_tucker": 0.4, "lokr_both": 0.8, "full_norms": 0.48, "dora": 0.8}
    expected = pixels(reference_image(lyco, weights, spec))
    assert np.abs(pixels(Image.open(out)) - expected).max() <= 2
    assert np.abs(pixels(reference_image(lyco, {}, spec)) - expected).max() > 10  # the files change the image


def test_batched_and_sequential_engines_agree_on_lycoris_files(pipe, tiny_model_dir, lyco, monkeypatch):
    """A LoHa and a LoKr concept composed by CLoRA with a DoRA-LoHa and a LoCon style: per-sample routing
    (the batched engine) == one adapter set per UNet call (sequential). Every file's layers add their
    update in both, through the router's row ranges in the batched engine only."""
    data = two_concepts(tiny_model_dir, lyco, "loha_tucker", "lokr_tucker", lora_scale=0.9)
    data["concepts"][0]["weight"] = 0.7
    data["styles"] = [
        {"lora": str(lyco.path("doha_input_norm")), "weight": 0.6},
        {"lora": str(lyco.path("locon_tucker")), "weight": 0.5},
    ]
    spec = spec_from_dict(data)
    files = ("loha_tucker", "lokr_tucker", "doha_input_norm", "locon_tucker")
    adapters = {pipe.add_lora(str(lyco.path(name))) for name in files}
    added, output = set(), LycorisLayer.output

    def spy(layer, name, x, like):
        added.add((name, layer.router is not None and bool(layer.router.groups)))
        return output(layer, name, x, like)

    monkeypatch.setattr(LycorisLayer, "output", spy)
    batched = pipe(spec, keep_maps=True)
    assert {name for name, routed in added if routed} == adapters
    added.clear()
    sequential = pipe(spec.replace(engine="sequential"), keep_maps=True)
    assert {name for name, routed in added if not routed} == adapters
    assert np.abs(pixels(batched.images[0]) - pixels(sequential.images[0])).max() <= 1
    for a, b in zip(batched.attention_maps[0], sequential.attention_maps[0], strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-3)
    assert len(batched.losses[0][0]) == 1  # the contrastive update ran


def _plain_kohya(lyco, target):
    """The linear layers of lycoris-lora's LoCon file: a plain kohya LoRA, which diffusers' loader reads."""
    tensors = load_file(str(lyco.path("locon_tucker")))
    conv = {key.split(".")[0] for key, tensor in tensors.items() if tensor.ndim == 4}
    save_file({k: v for k, v in tensors.items() if k.split(".")[0] not in conv}, str(target))
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
            "plain_kohya",
            "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight",
            "could not load this LoRA ('lora_unet_down_blocks_9",
        ),
    ],
)
def test_a_key_that_cannot_be_applied_fails_the_file_in_one_line_without_output(
    tiny_model_dir, lyco, tmp_path, capsys, source, key, message
):
    """LyCORIS files, and a plain kohya LoRA (read by diffusers) with one layer more than the model has."""
    tensors = load_file(
        str(_plain_kohya(lyco, tmp_path / "plain.safetensors") if source == "plain_kohya" else lyco.path(source))
    )
    tensors[key] = torch.zeros(4, 4)
    if source == "plain_kohya":  # the plain layer's other half, so only the layer is unknown
        tensors[key.replace("down", "up")] = torch.zeros(4, 4)
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken))
    data = two_concepts(tiny_model_dir, lyco, "loha_tucker", "loha_tucker")
    data["concepts"][1]["lora"] = str(broken)
    spec_file, out = tmp_path / "spec.yaml", tmp_path / "out.png"
    spec_file.write_text(yaml.safe_dump(data))
    assert main(["generate", str(spec_file), "-o", str(out), "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(broken) in err and message in err, err
    assert not out.exists() and ("1 of" in err or source == "plain_kohya")


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
