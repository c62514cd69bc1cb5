"""A single-file (original LDM/CompVis) SD 1.5 checkpoint loads offline through diffusers' ``from_single_file``."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import spec_dict
from ldm_checkpoint import write_ldm_checkpoint
from PIL import Image
from safetensors.torch import load_file

from clora import CLoRAPipeline
from clora.cli import main
from clora.spec import spec_from_dict

SD15_KEYS = (  # names as in the real v1-5-pruned-emaonly.safetensors
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.input_blocks.3.0.op.weight",
    "model.diffusion_model.middle_block.1.proj_in.weight",
    "model.diffusion_model.output_blocks.2.1.conv.weight",
    "model.diffusion_model.output_blocks.5.2.conv.weight",
    "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
    "model.diffusion_model.out.2.weight",
    "first_stage_model.encoder.down.0.block.0.conv1.weight",
    "first_stage_model.decoder.up.3.upsample.conv.weight",
    "first_stage_model.decoder.mid.attn_1.proj_out.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight",
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
)


def _public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory) -> Path:
    return write_ldm_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("single-file") / "tiny.safetensors")


def test_checkpoint_has_the_sd15_layout(checkpoint):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    state_dict = load_file(checkpoint)
    assert set(SD15_KEYS) <= state_dict.keys()
    assert {k.split(".")[0] for k in state_dict} == {"model", "first_stage_model", "cond_stage_model"}
    assert state_dict["first_stage_model.decoder.mid.attn_1.q.weight"].shape[2:] == (1, 1)  # 1x1 conv in LDM
    assert infer_diffusers_model_type(state_dict) == "v1"


def test_from_single_file_loads_offline_and_equals_the_folder(checkpoint, tiny_model_dir, offline):
    pipe = CLoRAPipeline.from_single_file(str(checkpoint), config=str(tiny_model_dir))
    tiny_pipe = CLoRAPipeline.from_pretrained(str(tiny_model_dir))  # fresh: the shared one carries LoRAs
    assert pipe.safety_checker is None
    for name in ("unet", "vae", "text_encoder"):
        ours, ref = getattr(pipe, name).state_dict(), getattr(tiny_pipe, name).state_dict()
        assert ours.keys() == ref.keys(), name
        for key, value in ref.items():
            assert torch.equal(ours[key], value), f"{name}.{key}"
    for name in ("unet", "vae"):
        assert _public(getattr(pipe, name).config) == _public(getattr(tiny_pipe, name).config), name
    assert type(pipe.scheduler) is type(tiny_pipe.scheduler)
    assert pipe.tokenizer("a cat").input_ids == tiny_pipe.tokenizer("a cat").input_ids


def test_cli_generates_from_a_single_file(checkpoint, tiny_model_dir, tiny_pipe, lora_dir, tmp_path, offline, capsys):
    shutil.copyfile(checkpoint, tmp_path / "tiny.safetensors")
    data = spec_dict(tiny_model_dir, lora_dir, steps=2, max_iter_to_alter=1)
    data.update(model="tiny.safetensors", model_config=str(tiny_model_dir))  # model relative to the spec
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "out.png"
    assert main(["generate", str(tmp_path / "spec.yaml"), "-o", str(out), "--quiet", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.split() == [str(out)]
    reference = tiny_pipe(spec_from_dict(spec_dict(tiny_model_dir, lora_dir, steps=2, max_iter_to_alter=1))).images[0]
    # The weights are bit-identical (test above), but from_single_file keeps them as views into the
    # memory-mapped checkpoint at other byte alignments than from_pretrained, and CPU kernels then round
    # differently (~1e-6 in the UNet output); so allow an off-by-one in a few pixel values.
    diff = np.abs(np.asarray(Image.open(out), dtype=int) - np.asarray(reference, dtype=int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert main(["generate", str(tmp_path / "spec.yaml"), "--dry-run"]) == 0  # tokenizer from model_config
    assert json.loads(capsys.readouterr().out)["mask_tokens"] == [[], [2, 3], [5, 6]]


def test_missing_single_file_is_one_error_line_and_exit_2(tiny_model_dir, lora_dir, tmp_path, capsys):
    data = spec_dict(tiny_model_dir, lora_dir, model=str(tmp_path / "missing.safetensors"))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "out.png"
    assert main(["generate", str(tmp_path / "spec.yaml"), "-o", str(out), "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: model: ")
    assert "missing.safetensors" in err and not out.exists()
