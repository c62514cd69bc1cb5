"""Model families as data: what tells Stable Diffusion 1.x/2.x, SDXL and FLUX.1 apart for CLoRA.

A family says how its models are recognised (a diffusers folder's ``model_index.json``, the keys of a
single-file checkpoint), where the configs and tokenizer of a bare checkpoint live, which text
encoders it has, which CLIP layer its prompts are read from, and the spec defaults that suit it.
What differs in computation (turning a prompt into the denoiser's conditioning, calling the denoiser,
which attention is recorded, the timestep schedule) lives in each family's pipeline class
(``family_pipelines``); the denoising loop is the same for every family.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import CLoRAError, one_line


@dataclass(frozen=True)
class ModelFamily:
    name: str
    title: str  # for messages
    pipeline_class: str  # the CLoRA pipeline class in ``clora.family_pipelines``
    index_class_names: tuple[str, ...]  # ``_class_name`` values of model_index.json
    checkpoint_key_prefixes: tuple[str, ...]  # state-dict keys only this family's single files have
    default_config: str  # hub id whose configs describe a bare single-file checkpoint
    text_encoders: tuple[str, ...]  # pipeline components that take text-encoder LoRA layers
    default_clip_skip: int  # the CLIP layer the family was trained on, A1111's count: 1 last, 2 penultimate
    lora_key_markers: tuple[str, ...]  # LoRA key fragments only this family's files have
    lora_base_versions: tuple[str, ...]  # prefixes of kohya's ss_base_model_version / modelspec.architecture
    parity: bool  # whether the authors' code (SD 1.5) exists for it to reproduce
    # activation bytes per sample, latent pixel, first-level UNet channel and dtype byte: the peak of a
    # gradient pass (its forward's saved tensors and its backward together) and of a no-grad guidance
    # pass, the largest measured by ``benchmarks/activation_memory.py``; the memory plan (``memory``)
    # divides the device's free memory by them
    grad_bytes_per_unit: int
    guidance_bytes_per_unit: int
    spec_defaults: Mapping[str, Any]  # values of the spec's family-defaulted fields (``spec.FAMILY_DEFAULTED``)
    schedulers: tuple[str, ...]  # the spec's scheduler names that fit the family's prediction type
    # a transformer's activations also grow with its text sequence: bytes per sample, text token, width
    # channel and dtype byte, on top of the per-pixel figure (a UNet's 77 tokens are inside its figure)
    text_grad_bytes_per_unit: int = 0
    text_guidance_bytes_per_unit: int = 0

    def __hash__(self) -> int:
        return hash(self.name)

    def check_scheduler(self, name: str) -> None:
        if name not in self.schedulers:
            raise CLoRAError(
                f"scheduler: {name!r} does not fit {self.title} models; use one of {', '.join(self.schedulers)}"
            )

    def diffusers_clip_skip(self, clip_skip: int | None) -> int | None:
        """``clip_skip`` as diffusers' ``encode_prompt`` counts it: layers skipped past the family's own."""
        if clip_skip is None or clip_skip == self.default_clip_skip:
            return None
        if not self.default_clip_skip:
            raise CLoRAError(f"clip_skip: {self.title} models have no CLIP layer choice; remove clip_skip")
        if clip_skip < self.default_clip_skip:
            raise CLoRAError(
                f"clip_skip: {self.name} models read prompts from CLIP's layer {self.default_clip_skip} from the end "
                f"(clip_skip {self.default_clip_skip}); an earlier skip ({clip_skip}) is not available, use "
                f"{self.default_clip_skip} or more"
            )
        return clip_skip - self.default_clip_skip


UNET_SCHEDULERS = (
    "ddim",
    "ddpm",
    "pndm",
    "euler",
    "euler_a",
    "heun",
    "lms",
    "dpm++",
    "dpm++_karras",
    "dpm++_sde",
    "unipc",
)

SD_SPEC_DEFAULTS = MappingProxyType(
    {
        "steps": 50,
        "guidance": 7.5,
        "scheduler": "ddim",
        "step_size": 20.0,
        "max_iter_to_alter": 25,
        "iterative_steps": (0, 10, 20),
        "iterative_iters": 20,
    }
)
"""SD 1.5 practice and the authors' notebook, scaled to 50 steps (``spec.CompositionSpec``)."""

SD = ModelFamily(
    name="sd",
    title="SD 1.x/2.x",
    pipeline_class="CLoRAPipeline",
    index_class_names=("StableDiffusionPipeline",),
    checkpoint_key_prefixes=(),
    default_config="stable-diffusion-v1-5/stable-diffusion-v1-5",
    text_encoders=("text_encoder",),
    default_clip_skip=1,
    # one text encoder (kohya: lora_te_), attention in SD's first level (SDXL's has none)
    lora_key_markers=("lora_te_", "down_blocks_0_attentions", "down_blocks.0.attentions", "input_blocks_1_1_"),
    lora_base_versions=("sd_v1", "sd_v2", "stable-diffusion-v1", "stable-diffusion-v2"),
    parity=True,
    grad_bytes_per_unit=151,  # SD 1.5's UNet, gradient-peak: 150.9 at 128 px, 135.6 at 256, 132.0 at 512 (132.2 bf16)
    guidance_bytes_per_unit=27,  # guidance: 26.1 at 128-1024 px, fp32 and bf16
    spec_defaults=SD_SPEC_DEFAULTS,
    schedulers=UNET_SCHEDULERS,
)
"""Stable Diffusion 1.x and 2.x (one CLIP text encoder, its last layer)."""

SDXL = ModelFamily(
    name="sdxl",
    title="SDXL",
    pipeline_class="CLoRAXLPipeline",
    index_class_names=("StableDiffusionXLPipeline",),
    checkpoint_key_prefixes=("conditioner.embedders.1.",),  # the second (OpenCLIP bigG) text encoder
    default_config="stabilityai/stable-diffusion-xl-base-1.0",
    text_encoders=("text_encoder", "text_encoder_2"),
    default_clip_skip=2,  # SDXL was trained on the penultimate layer, so Pony's "clip skip 2" is its default
    lora_key_markers=("lora_te1_", "lora_te2_", "text_encoder_2."),  # its two text encoders
    lora_base_versions=("sdxl", "stable-diffusion-xl"),
    parity=False,
    grad_bytes_per_unit=415,  # SDXL 1.0's UNet, gradient-peak: 414.9 at 256 px, 387.0 at 512, 380.4 at 1024 bf16
    guidance_bytes_per_unit=17,  # guidance: 16.7 at 256-1024 px, fp32 and bf16
    spec_defaults=SD_SPEC_DEFAULTS,
    schedulers=UNET_SCHEDULERS,
)
"""Stable Diffusion XL and its fine-tunes (two text encoders, pooled embedding, size conditioning)."""

FLUX = ModelFamily(
    name="flux",
    title="FLUX.1",
    pipeline_class="CLoRAFluxPipeline",
    index_class_names=("FluxPipeline",),
    checkpoint_key_prefixes=("double_blocks.", "model.diffusion_model.double_blocks."),  # BFL's transformer keys
    default_config="black-forest-labs/FLUX.1-dev",
    text_encoders=("text_encoder",),  # CLIP-L: diffusers' Flux loader puts no LoRA layers in T5
    default_clip_skip=0,  # no layer choice: CLIP-L's pooled output and T5's last layer
    # the transformer's blocks in diffusers', kohya's, BFL's and XLabs' names
    lora_key_markers=(
        "transformer.transformer_blocks.",
        "single_transformer_blocks.",
        "double_blocks",
        "single_blocks",
        "lora_transformer_",  # kohya-style names of diffusers' modules (OneTrainer)
        "lycoris_transformer_blocks_",  # lycoris-lora's own prefix on diffusers' modules (SimpleTuner)
        "lycoris_single_transformer_blocks_",
    ),
    lora_base_versions=("flux", "flux-1"),
    parity=False,
    # per sample, latent pixel, transformer width (3072) and dtype byte, plus per T5 token: FLUX.1-dev's
    # own configuration in bf16 under fake tensors (``benchmarks/activation_memory.py --arch flux --fake``);
    # gradient-peak 1407.8 / 3103.4 / 9887.9 MB per sample at 256 / 512 / 1024 px = 94.2 per pixel unit
    # + 841.9 MB for the 512 T5 tokens (280.6 per text unit), exact at all three sizes; guidance
    # 77.8 / 166.6 / 594.1 MB: 5.94 per pixel unit + at most 42.2 MB (14.1 per text unit)
    grad_bytes_per_unit=95,
    guidance_bytes_per_unit=6,
    text_grad_bytes_per_unit=281,
    text_guidance_bytes_per_unit=15,
    spec_defaults=MappingProxyType(
        {
            "steps": 28,
            "guidance": 3.5,
            "scheduler": "flow_euler",
            "step_size": 20.0,
            "max_iter_to_alter": 14,
            "iterative_steps": (0, 5, 10),
            "iterative_iters": 10,
        }
    ),
    schedulers=("flow_euler",),
)
"""FLUX.1 [dev], [schnell] and their fine-tunes: a rectified-flow transformer conditioned on T5 and CLIP-L."""

FAMILIES = (SD, SDXL, FLUX)


def family_of_index(index: dict) -> ModelFamily:
    """The family of a diffusers folder's ``model_index.json`` contents."""
    transformer = index.get("transformer") or [None, None]
    if index.get("_class_name") in FLUX.index_class_names or "FluxTransformer2DModel" in transformer:
        return FLUX
    if index.get("text_encoder_2") is not None or index.get("_class_name") in SDXL.index_class_names:
        if index.get("text_encoder") in (None, [None, None]):
            raise CLoRAError("model: an SDXL refiner (no first text encoder) cannot compose LoRAs; use a base model")
        return SDXL
    return SD


def family_of_folder(folder: Path) -> ModelFamily:
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CLoRAError(f"model: cannot read {folder}/model_index.json ({one_line(exc)})") from None
    return family_of_index(index)


def family_of_checkpoint(path: Path) -> ModelFamily:
    """The family of a single-file ``.safetensors`` checkpoint, from its key names (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as exc:  # noqa: BLE001 - SafetensorsError, OSError, ...
        raise CLoRAError(f"model: {path} is not a readable .safetensors checkpoint ({one_line(exc)})") from None
    for family in FAMILIES:
        if family.checkpoint_key_prefixes and any(k.startswith(family.checkpoint_key_prefixes) for k in keys):
            return family
    return SD


def family_of_lora(keys: Iterable[str], metadata: dict[str, str] | None = None) -> ModelFamily | None:
    """The family a LoRA file was made for, from kohya's or modelspec's metadata, else from key names
    that only one family's files have; None when neither tells (a UNet-only file of shared layers)."""
    metadata = metadata or {}
    version = (metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture") or "").lower()
    for family in FAMILIES:
        if version.startswith(family.lora_base_versions):
            return family
    keys = list(keys)
    for family in (FLUX, SD, SDXL):  # Flux first: kohya's Flux files name CLIP-L lora_te1_, as SDXL's do
        if any(marker in key for key in keys for marker in family.lora_key_markers):
            return family
    return None


def lora_family_error(path: object, made_for: ModelFamily, family: ModelFamily) -> CLoRAError:
    """The one line for a LoRA file made for another family than the model's."""
    return CLoRAError(
        f"{path}: a LoRA made for {made_for.title} models; this model is {family.title}, "
        f"use a LoRA made for {family.title}"
    )
