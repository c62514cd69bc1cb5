"""The model families' CLoRA pipelines: diffusers' own pipeline class plus the family as data.

Each class inherits loading, LoRA loaders and components from diffusers' pipeline for its family and
CLoRA's denoising loop from ``pipeline.CLoRAMixin``; what it adds is its family (``families``) and the
one computation that differs, ``encode_branch_prompt``: one branch's prompt as the UNet's conditioning.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from .families import SD, SDXL
from .pipeline import CLoRAMixin
from .spec import CompositionSpec


class CLoRAPipeline(CLoRAMixin, StableDiffusionPipeline):
    r"""Compose N concept LoRAs (and optional style LoRAs) into one image with CLoRA, on Stable
    Diffusion 1.x/2.x and their fine-tunes.

    Loads like diffusers' ``StableDiffusionPipeline`` (``from_pretrained`` with a hub id or a local
    diffusers folder, ``from_single_file`` for one checkpoint); the safety checker is not loaded.

    Example:
        >>> import torch
        >>> from clora import CLoRAPipeline
        >>> pipe = CLoRAPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5",
        ...                                      torch_dtype=torch.float16).to("cuda")
        >>> out = pipe(prompt="a cat and a dog in a garden",
        ...            concepts=[{"lora": "cat.safetensors", "phrase": "cat", "trigger": "sks cat"},
        ...                      {"lora": "dog.safetensors", "phrase": "dog", "trigger": "sks dog"}],
        ...            seed=53)
        >>> out.images[0].save("cat_and_dog.png")
    """

    family = SD
    load_defaults = {"safety_checker": None, "requires_safety_checker": False}

    def encode_branch_prompt(
        self, prompt: str, spec: CompositionSpec, size: tuple[int, int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        clip_skip = self.family.diffusers_clip_skip(spec.clip_skip)
        text, negative = self.encode_prompt(prompt, device, 1, True, spec.negative_prompt, clip_skip=clip_skip)
        return text, negative, {}, {}


class CLoRAXLPipeline(CLoRAMixin, StableDiffusionXLPipeline):
    r"""CLoRA on Stable Diffusion XL and its fine-tunes (Pony, Illustrious, ...), with SDXL LoRAs.

    Each branch's prompt goes through both text encoders with that branch's LoRA active (kohya's
    ``te1``/``te2`` parts), giving the UNet the two encoders' joined hidden states plus the second's
    pooled embedding and the size/crop ids (``add_time_ids``: the image's size, no crop) it was
    trained with. Maps are read at H/32 (``attention``): 32x32 at 1024x1024, the default size.

    Example:
        >>> import torch
        >>> from clora import CLoRAXLPipeline
        >>> pipe = CLoRAXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0",
        ...                                        torch_dtype=torch.float16).to("cuda")
        >>> out = pipe(prompt="a cat and a dog in a garden",
        ...            concepts=[{"lora": "cat_xl.safetensors", "phrase": "cat", "trigger": "sks cat"},
        ...                      {"lora": "dog_xl.safetensors", "phrase": "dog", "trigger": "sks dog"}],
        ...            seed=53)
        >>> out.images[0].save("cat_and_dog_xl.png")
    """

    family = SDXL
    vae_upcast = True

    def encode_branch_prompt(
        self, prompt: str, spec: CompositionSpec, size: tuple[int, int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        text, negative, pooled, negative_pooled = self.encode_prompt(
            prompt,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=spec.negative_prompt or None,  # none: zeros where the model asks (SDXL base)
            clip_skip=self.family.diffusers_clip_skip(spec.clip_skip),
        )
        time_ids = self._get_add_time_ids(
            size, (0, 0), size, dtype=text.dtype, text_encoder_projection_dim=self.text_encoder_2.config.projection_dim
        )
        return (
            text,
            negative,
            {"text_embeds": pooled, "time_ids": time_ids},
            {"text_embeds": negative_pooled, "time_ids": time_ids},
        )
