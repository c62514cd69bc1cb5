"""CLoRA on a quantized FLUX.1 transformer: GGUF files (``gguf``) and bitsandbytes NF4, on the tiny Flux model.

The GGUF files are written here with the ``gguf`` package's own writer and quantizer, under the original BFL
key names as the published FLUX.1 GGUFs (city96's) have them, and read back through clora's loading path
(``runtime.load_pipeline`` / ``clora generate`` with ``model: x.gguf`` and ``model_config:``), which is
diffusers' ``FluxTransformer2DModel.from_single_file`` with a ``GGUFQuantizationConfig``: every linear keeps
its quantized blocks and dequantizes them when it runs. A quantization block is 32 values wide (Q8_0, Q4_0),
so these tests use the tiny model with 2 x 16-wide heads (inner width 32, :data:`WIDE_TRANSFORMER_CONFIG`);
as in llama.cpp, a weight whose rows are not whole blocks (the tiny ``img_in`` and ``txt_in``) stays F32.

What must hold: the LoRAs sit on the quantized layers, the contrastive gradient reaches the latent through
them, batched = sequential, and the image is close to the unquantized model's (closer for Q8_0 than Q4_0).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import FluxTransformer2DModel
from flux_lora_files import make_flux_lora_weights, write_flux_diffusers_lora
from PIL import Image
from safetensors.torch import load_file
from tiny_flux import TINY_TRANSFORMER_CONFIG, TorchWithFluxWidth, build_tiny_flux, diffusers_to_bfl_transformer

from clora.cli import main
from clora.family_pipelines import CLoRAFluxPipeline
from clora.routing import LoraRouter, lora_layers, row_groups
from clora.runtime import load_pipeline

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")

WIDE_TRANSFORMER_CONFIG = {**TINY_TRANSFORMER_CONFIG, "attention_head_dim": 16, "axes_dims_rope": (4, 6, 6)}
"""The tiny transformer with 16-wide heads: inner width 32, one Q8_0/Q4_0 block."""
INNER = WIDE_TRANSFORMER_CONFIG["num_attention_heads"] * WIDE_TRANSFORMER_CONFIG["attention_head_dim"]

SIZE = 64
RUN = {"steps": 2, "max_iter_to_alter": 1, "iterative_steps": [], "iterative_iters": 0}  # one gradient step
CPU = torch.device("cpu")


def write_gguf_transformer(folder: Path, path: Path, quant: str) -> Path:
    """The transformer of the diffusers folder ``folder`` as one GGUF file with BFL key names; every 2-D weight
    whose rows are whole blocks of ``quant`` (``"Q8_0"``, ``"Q4_0"``, ...) is quantized, the rest is F32."""
    qtype = gguf.GGMLQuantizationType[quant]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    state_dict = load_file(Path(folder) / "transformer" / "diffusion_pytorch_model.safetensors")
    writer = gguf.GGUFWriter(str(path), arch="flux")
    for name, tensor in diffusers_to_bfl_transformer(state_dict).items():
        array = tensor.float().numpy()
        if array.ndim == 2 and array.shape[-1] % block == 0:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module", autouse=True)
def _flux_width():
    """diffusers' BFL converter splits ``single_blocks.N.linear1`` with FLUX.1's widths hard-coded."""
    from diffusers.loaders import single_file_utils

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(single_file_utils, "torch", TorchWithFluxWidth(INNER))
        yield


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory) -> Path:
    folder = build_tiny_flux(tmp_path_factory.mktemp("tiny-flux-32"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        FluxTransformer2DModel(**WIDE_TRANSFORMER_CONFIG).save_pretrained(folder / "transformer")
    return folder


@pytest.fixture(scope="module")
def reference(wide_dir):
    pipe = CLoRAFluxPipeline.from_pretrained(str(wide_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def loras(reference, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("flux-32-loras")
    return {
        name: write_flux_diffusers_lora(make_flux_lora_weights(reference, seed=seed), folder / f"{name}.safetensors")
        for name, seed in (("cat", 1), ("dog", 2))
    }


@pytest.fixture(scope="module")
def gguf_files(wide_dir, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gguf")
    return {quant: write_gguf_transformer(wide_dir, folder / f"flux1-tiny-{quant}.gguf", quant) for quant in ("Q8_0",)}


@pytest.fixture(scope="module")
def q8_pipe(gguf_files, wide_dir, _loaded_pipelines):
    """Loaded as ``clora generate`` loads ``model: flux1-tiny-Q8_0.gguf`` with ``model_config:`` (and shared with
    the CLI test through ``reuse_loaded_pipelines``)."""
    model, config = str(gguf_files["Q8_0"].resolve()), str(wide_dir.resolve())
    pipe = load_pipeline(model, CPU, torch.float32, config=config)
    pipe.set_progress_bar_config(disable=True)
    _loaded_pipelines[(model, "cpu", torch.float32, config)] = pipe
    return pipe


def _spec(loras: dict[str, Path], **extra) -> dict:
    return {
        "prompt": "a cat and a dog in the garden",
        "concepts": [
            {"lora": str(loras["cat"]), "phrase": "cat", "trigger": "sks cat"},
            {"lora": str(loras["dog"]), "phrase": "dog", "trigger": "zwx dog"},
        ],
        "height": SIZE,
        "width": SIZE,
        "seed": 5,
        **RUN,
        **extra,
    }


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def _diff(a: Image.Image, b: Image.Image) -> np.ndarray:
    return np.abs(_pixels(a) - _pixels(b))


def test_gguf_q8_0_clora_gradient_reaches_the_latent_and_stays_close_to_the_unquantized_model(
    q8_pipe, reference, loras
):
    from diffusers.quantizers.gguf.utils import GGUFLinear

    spec = _spec(loras)
    batched = q8_pipe(**spec)
    # the LoRAs sit on the quantized linears, whose weights stay Q8_0 blocks
    to_q = q8_pipe.transformer.transformer_blocks[1].attn.to_q
    assert isinstance(to_q.base_layer, GGUFLinear) and len(to_q.lora_A) == 2  # cat, dog
    assert to_q.base_layer.weight.quant_type == gguf.GGMLQuantizationType.Q8_0
    sequential = q8_pipe(**spec, engine="sequential")
    assert _diff(batched.images[0], sequential.images[0]).max() <= 1
    no_step = q8_pipe(**spec, step_size=0.0)  # the same run with the contrastive update scaled to nothing
    assert batched.losses[0][0] and _diff(batched.images[0], no_step.images[0]).max() > 10
    unquantized = reference(**spec)
    difference = _diff(batched.images[0], unquantized.images[0])
    assert difference.mean() < 1.5 and difference.max() <= 32  # measured: mean 0.5, max 8 of 255
    np.testing.assert_allclose(batched.losses[0][0], unquantized.losses[0][0], rtol=0.02)


def test_gguf_merge_is_close_to_the_unquantized_model(q8_pipe, reference, loras):
    spec = _spec(loras, method="merge")
    assert _diff(q8_pipe(**spec).images[0], reference(**spec).images[0]).max() <= 3  # measured: 1 of 255


def test_q4_0_transformer_is_further_from_the_unquantized_one_than_q8_0(gguf_files, wide_dir, reference, tmp_path):
    from diffusers import GGUFQuantizationConfig

    files = {**gguf_files, "Q4_0": write_gguf_transformer(wide_dir, tmp_path / "flux1-tiny-Q4_0.gguf", "Q4_0")}
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, 16, generator=generator),
        "encoder_hidden_states": torch.randn(1, 8, WIDE_TRANSFORMER_CONFIG["joint_attention_dim"], generator=generator),
        "pooled_projections": torch.randn(1, WIDE_TRANSFORMER_CONFIG["pooled_projection_dim"], generator=generator),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "txt_ids": torch.zeros(8, 3),
        "img_ids": reference._prepare_latent_image_ids(1, 4, 4, CPU, torch.float32),
        "return_dict": False,
    }
    with torch.no_grad():
        unquantized = reference.transformer(**inputs)[0]
        errors = {}
        for quant, path in files.items():
            transformer = FluxTransformer2DModel.from_single_file(
                str(path),
                config=str(wide_dir),
                subfolder="transformer",
                quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
            )
            errors[quant] = float((transformer(**inputs)[0] - unquantized).abs().mean() / unquantized.abs().mean())
    assert 0 < errors["Q8_0"] < 0.02 and errors["Q4_0"] > 3 * errors["Q8_0"]


@pytest.mark.usefixtures("reuse_loaded_pipelines")
def test_cli_generates_from_a_gguf_transformer_with_model_config(
    gguf_files, wide_dir, q8_pipe, loras, tmp_path, capsys
):
    spec = _spec(loras, method="merge", model=str(gguf_files["Q8_0"]))
    path = tmp_path / "gguf.yaml"
    path.write_text(yaml.safe_dump(dict(spec, model_config=str(wide_dir))))
    out = tmp_path / "gguf.png"
    assert main(["generate", str(path), "-o", str(out), "--quiet", "--device", "cpu", "--dtype", "fp32"]) == 0
    expected = q8_pipe(**{k: v for k, v in spec.items() if k != "model"}).images[0]
    assert _diff(Image.open(out), expected).max() <= 1
    capsys.readouterr()
    # --quantize nf4: refused in one line before anything loads, on a .gguf and on the CPU
    args = ["generate", str(path), "-o", str(tmp_path / "nf4.png"), "--quiet", "--device", "cpu", "--quantize", "nf4"]
    assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "quantized already" in line
    path.write_text(yaml.safe_dump(dict(spec, model=str(wide_dir))))
    assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--quantize nf4" in line and "GPU only" in line and ".gguf" in line
    # without model_config: the file holds only the transformer
    path.write_text(yaml.safe_dump(spec))
    assert main(["generate", str(path), "-o", str(tmp_path / "none.png"), "--quiet", "--device", "cpu"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "model_config" in line and ".gguf" in line


class _Product(torch.autograd.Function):
    """``x @ weight.T`` as a custom autograd Function returning a view, as bitsandbytes' 4-bit matmul does."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(weight)
        return (x.reshape(-1, x.shape[-1]) @ weight.t()).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight, None


class _FunctionLinear(torch.nn.Linear):
    def forward(self, x):
        return _Product.apply(x, self.weight)


def test_routing_adds_lora_rows_to_a_custom_function_output_with_a_gradient():
    """The batched engine adds each sample's LoRA to the layer's output in place; the output of a custom autograd
    Function (bitsandbytes' ``Linear4bit``) refuses that, so the router adds to a copy of it."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(_FunctionLinear(8, 6, bias=False))
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False), model)
    layer = model[0]
    layer.enable_adapters(False)  # the router adds the adapters, as with diffusers' disable_lora
    x = torch.randn(2, 3, 8, requires_grad=True)
    router = LoraRouter(lora_layers(model, ["default"]))
    with router.installed(), router.routing(row_groups([{"default": 0.5}, {}])):
        out = model(x)
    out.square().sum().backward()
    lora = layer.lora_B["default"](layer.lora_A["default"](x.detach())) * (4 / 2) * 0.5
    plain = x.detach() @ layer.base_layer.weight.detach().t()
    expected = torch.cat([plain[:1] + lora[:1], plain[1:]])
    torch.testing.assert_close(out.detach(), expected)
    x_ref = x.detach().clone().requires_grad_(True)
    lora_ref = layer.lora_B["default"](layer.lora_A["default"](x_ref[:1])) * (4 / 2) * 0.5
    base_ref = x_ref @ layer.base_layer.weight.detach().t()
    torch.cat([base_ref[:1] + lora_ref, base_ref[1:]]).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes is not installed (pip install bitsandbytes; a large package, not in the test extra)",
)
def test_bitsandbytes_nf4_clora_gradient_reaches_the_latent(wide_dir, loras, monkeypatch):
    """bitsandbytes >= 0.48 runs NF4 on the CPU, but diffusers 0.42.1 refuses to quantize without a GPU
    ("No GPU found. A GPU is needed for quantization."): on the CPU this test lifts that check and loads
    through the same ``runtime._load`` that ``--quantize nf4`` uses on a GPU."""
    from diffusers import BitsAndBytesConfig
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    from clora import runtime

    if torch.cuda.is_available():
        pipe = load_pipeline(str(wide_dir), torch.device("cuda"), torch.float32, quantize="nf4")
    else:
        monkeypatch.setattr(BnB4BitDiffusersQuantizer, "validate_environment", lambda self, *a, **k: None)
        monkeypatch.setattr(BnB4BitDiffusersQuantizer, "update_device_map", lambda self, device_map: {"": "cpu"})
        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        pipe = runtime._load(CLoRAFluxPipeline, str(wide_dir), wide_dir, torch.float32, None, nf4)
    pipe.set_progress_bar_config(disable=True)
    spec = _spec(loras)
    batched = pipe(**spec)
    assert type(pipe.transformer.transformer_blocks[1].attn.to_q.base_layer).__name__ == "Linear4bit"
    assert _diff(batched.images[0], pipe(**spec, engine="sequential").images[0]).max() <= 1
    assert _diff(batched.images[0], pipe(**spec, step_size=0.0).images[0]).max() > 10


def test_lycoris_layers_add_to_a_custom_function_output_with_a_gradient():
    """A LyCORIS layer's hook adds in place too (``lycoris_adapters.addable``), active set and routed rows alike."""
    from clora.lycoris import LayerUpdate
    from clora.lycoris_adapters import LycorisLayer

    torch.manual_seed(0)
    layer = _FunctionLinear(8, 6, bias=False)
    diff = torch.randn(6, 8)
    lycoris = LycorisLayer(layer, {"full": 0.5})
    lycoris.updates["full"] = LayerUpdate("full", {"diff": diff})
    x = torch.randn(2, 3, 8, requires_grad=True)
    out = layer(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    x_ref = x.detach().clone().requires_grad_(True)
    expected = x_ref @ (layer.weight.detach() + 0.5 * diff).t()
    (grad_ref,) = torch.autograd.grad(expected.square().sum(), x_ref)
    torch.testing.assert_close(out.detach(), expected.detach())
    torch.testing.assert_close(grad, grad_ref)
