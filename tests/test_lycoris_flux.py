"""LyCORIS files on FLUX.1, written by the lycoris-lora library itself for the tiny Flux of ``tiny_flux``.

Three files, in the three naming schemes Flux LyCORIS files come in: a LoHa on diffusers' modules named
as lycoris-lora's ``create_lycoris`` names them (``lycoris_transformer_blocks_0_attn_to_q``, SimpleTuner's
files), a LoKr on diffusers' modules with OneTrainer's prefix (``lora_transformer_...``), and a LoHa with
DoRA (input-channel norms) on BFL's layout (``lora_unet_double_blocks_0_img_attn_qkv``, sd-scripts' files),
whose fused q/k/v and q/k/v/mlp layers are several diffusers modules. Each is compared with lycoris-lora's
own merge: in diffusers' layout for the first two, and for the BFL file merged in BFL's layout and
converted by diffusers' own ``convert_flux_transformer_checkpoint_to_diffusers``.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from clora import spec_from_dict
from clora.cli import main
from clora.lycoris_adapters import LycorisLayer, lycoris_layer

pytest.importorskip("lycoris")
pytestmark = pytest.mark.usefixtures("reuse_loaded_pipelines")

BLOCKS = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
BFL_OUTSIDE_BLOCKS = ["img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer"]
TRIGGER_PROMPT = "a sks cat and a zwx dog in the garden"


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


class FluxFiles:
    """The three files and, per file, the transformer weight changes of lycoris-lora's merge of it."""

    def __init__(self, reference, folder: Path) -> None:
        from lycoris_files import bfl_flux, make_lycoris, merge, save_lycoris
        from tiny_flux import diffusers_to_bfl_transformer

        self.reference, self.folder = reference, folder
        transformer = reference.transformer
        self.base = {k: v.clone() for k, v in transformer.state_dict().items()}
        self.changes: dict[str, dict[str, torch.Tensor]] = {}
        for name, seed, algo, prefix, options in (
            ("loha", 1, "loha", "lycoris", {}),
            ("lokr", 2, "lokr", "lora_transformer", {"decompose_both": True, "factor": 4}),
            ("plain", 4, "lora", "lycoris", {}),  # lora_down/lora_up only, under lycoris-lora's own prefix
        ):
            network = make_lycoris(transformer, algo, seed, prefix, BLOCKS, **options)
            save_lycoris(network, self.path(name))
            merge(network)
            self.changes[name] = self._changed(transformer.state_dict())
            transformer.load_state_dict(self.base)
        bfl = diffusers_to_bfl_transformer(self.base)
        twin = bfl_flux(bfl)
        network = make_lycoris(
            twin,
            "loha",
            3,
            "lora_unet",
            ["DoubleStreamBlock", "SingleStreamBlock"],
            BFL_OUTSIDE_BLOCKS,
            dora_wd=True,
            wd_on_output=False,
        )
        save_lycoris(network, self.path("bfl_doha"))
        merge(network)
        self.changes["bfl_doha"] = self._changed(_to_diffusers({**bfl, **twin.state_dict()}))

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"

    def _changed(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v - self.base[k] for k, v in state.items() if not torch.equal(v, self.base[k])}

    def image(self, weights: dict[str, float], spec) -> Image.Image:
        """Plain diffusers ``FluxPipeline`` with the merged changes added to the base weights, ``weights[name]``
        each."""
        state = {k: v.clone() for k, v in self.base.items()}
        for name, weight in weights.items():
            for key, change in self.changes[name].items():
                state[key] += weight * change
        self.reference.transformer.load_state_dict(state)
        try:
            return self.reference(
                TRIGGER_PROMPT,
                num_inference_steps=spec.steps,
                height=spec.height,
                width=spec.width,
                generator=torch.Generator("cpu").manual_seed(spec.seed),
            ).images[0]
        finally:
            self.reference.transformer.load_state_dict(self.base)


def _to_diffusers(bfl: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' own conversion of a BFL-layout Flux transformer, with the tiny model's widths (diffusers
    0.42.1 hard-codes FLUX.1's in the ``linear1`` split)."""
    from diffusers.loaders import single_file_utils
    from tiny_flux import TINY_TRANSFORMER_CONFIG, TorchWithFluxWidth

    inner = TINY_TRANSFORMER_CONFIG["num_attention_heads"] * TINY_TRANSFORMER_CONFIG["attention_head_dim"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(single_file_utils, "torch", TorchWithFluxWidth(inner))
        return single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))


@pytest.fixture(scope="module")
def files(flux_dir, tmp_path_factory) -> FluxFiles:
    from diffusers import FluxPipeline

    reference = FluxPipeline.from_pretrained(str(flux_dir))
    reference.set_progress_bar_config(disable=True)
    return FluxFiles(reference, tmp_path_factory.mktemp("flux-lycoris-files"))


@pytest.fixture(scope="module")
def pipe(flux_dir, _loaded_pipelines):
    """The tiny Flux as the CLI loads it, shared with this module's CLI run (``reuse_loaded_pipelines``)."""
    from clora.runtime import load_pipeline

    key = (str(flux_dir.resolve()), "cpu", torch.float32, None)
    if key not in _loaded_pipelines:
        _loaded_pipelines[key] = load_pipeline(str(flux_dir), torch.device("cpu"), torch.float32)
    _loaded_pipelines[key].set_progress_bar_config(disable=True)
    return _loaded_pipelines[key]


def spec_data(flux_dir: Path, files: FluxFiles, **extra) -> dict:
    """A LoHa and a LoKr concept, 64 px, 2 steps, one contrastive update."""
    return {
        "model": str(flux_dir),
        "prompt": "a cat and a dog in the garden",
        "concepts": [
            {"lora": str(files.path("loha")), "phrase": "cat", "trigger": "sks cat"},
            {"lora": str(files.path("lokr")), "phrase": "dog", "trigger": "zwx dog"},
        ],
        "seed": 5,
        "steps": 2,
        "height": 64,
        "width": 64,
        "max_iter_to_alter": 1,
        "iterative_steps": [],
        **extra,
    }


@pytest.mark.parametrize("name", ["loha", "lokr", "bfl_doha", "plain"])
def test_each_module_gets_lycoris_loras_own_merged_weight(pipe, files, name):
    """Every layer of the file lands on the diffusers modules lycoris-lora's merge changes (for the BFL
    file: its merge in BFL's layout as diffusers converts it), with that change."""
    keys = load_file(str(files.path(name))).keys()
    if name == "bfl_doha":  # fused layers, and the final modulation whose halves diffusers swaps
        layers = {key.split(".")[0] for key in keys}
        fused = ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1")
        assert {*fused, "lora_unet_final_layer_adaLN_modulation_1"} <= layers
    adapter = pipe.add_lora(str(files.path(name)))
    changes, checked = files.changes[name], 0
    for path, module in pipe.transformer.named_modules():
        layer = lycoris_layer(module)
        if layer is None or adapter not in layer.updates:
            continue
        delta, bias = layer.weights(adapter)
        expected = changes[f"{path.removesuffix('.base_layer')}.weight"]
        assert torch.allclose(delta, expected, atol=1e-5 * module.weight.abs().max().item()), path
        assert bias is None
        checked += 1
    assert checked == len(changes) >= 40


def test_lycoris_files_merged_are_diffusers_flux_with_lycoris_merged_weights(pipe, flux_dir, files):
    """``method: merge``: the LoHa and LoKr concepts at ``weight`` 0.5 / 1 and ``lora_scale`` 0.8, the
    BFL-named DoRA-LoHa as a style."""
    data = spec_data(flux_dir, files, method="merge", lora_scale=0.8)
    data["concepts"][0]["weight"] = 0.5
    data["styles"] = [{"lora": str(files.path("bfl_doha")), "weight": 1.0}]
    spec = spec_from_dict(data)
    image = pixels(pipe(spec).images[0])
    expected = pixels(files.image({"loha": 0.4, "lokr": 0.8, "bfl_doha": 0.8}, spec))
    assert np.abs(image - expected).max() <= 2
    assert np.abs(pixels(files.image({}, spec)) - expected).max() > 10  # the files change the image


def test_batched_and_sequential_engines_agree_on_flux_lycoris_files(pipe, flux_dir, files, monkeypatch):
    """CLoRA with the LoHa and LoKr concepts and the BFL-named DoRA-LoHa style: per-sample routing ==
    one adapter set per transformer call, every file adding its update in both."""
    data = spec_data(flux_dir, files, lora_scale=0.9)
    data["concepts"][0]["weight"] = 0.7
    data["styles"] = [{"lora": str(files.path("bfl_doha")), "weight": 0.6}]
    spec = spec_from_dict(data)
    adapters = {pipe.add_lora(str(files.path(name))) for name in ("loha", "lokr", "bfl_doha")}
    added, output = set(), LycorisLayer.output

    def spy(layer, name, x, like):
        added.add((name, layer.router is not None and bool(layer.router.groups)))
        return output(layer, name, x, like)

    monkeypatch.setattr(LycorisLayer, "output", spy)
    batched = pipe(spec)
    assert {name for name, routed in added if routed} == adapters
    added.clear()
    sequential = pipe(spec.replace(engine="sequential"))
    assert {name for name, routed in added if not routed} == adapters
    assert np.abs(pixels(batched.images[0]) - pixels(sequential.images[0])).max() <= 1
    assert len(batched.losses[0][0]) == 1  # the contrastive update ran


@pytest.mark.parametrize(
    "source, key",
    [
        ("bfl_doha", "lora_unet_double_blocks_9_img_attn_qkv.hada_w1_a"),
        ("bfl_doha", "lora_unet_single_blocks_0_linear3.hada_w1_a"),
        ("loha", "lycoris_transformer_blocks_0_attn_to_qq.hada_w1_a"),
    ],
)
def test_a_layer_the_model_lacks_fails_the_file_in_one_line_without_output(
    pipe, flux_dir, files, tmp_path, capsys, source, key
):
    tensors = load_file(str(files.path(source)))
    tensors[key] = torch.zeros(4, 4)
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken))
    data = spec_data(flux_dir, files)
    data["concepts"][1]["lora"] = str(broken)
    spec_file, out = tmp_path / "spec.yaml", tmp_path / "out.png"
    spec_file.write_text(yaml.safe_dump(data))
    assert main(["generate", str(spec_file), "-o", str(out), "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(broken) in err, err
    assert f"1 of {len(tensors)} keys name layers this model does not have" in err, err
    assert not out.exists()
