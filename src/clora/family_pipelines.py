"""The model families' CLoRA pipelines: diffusers' own pipeline class plus the family as data.

Each class inherits loading, LoRA loaders and components from diffusers' pipeline for its family and
CLoRA's denoising loop from ``pipeline.CLoRAMixin``; what it adds is its family (``families``) and
what differs in computation: ``encode_branch_prompt`` (one branch's prompt as the denoiser's
conditioning) and, for Flux's transformer, how the denoiser is called and what it records.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from .attention import recorded_downsampling, recording_cross_attention
from .errors import CLoRAError
from .families import FLUX, SD, SDXL
from .joint_attention import recording_joint_attention
from .pipeline import CLoRAMixin
from .spec import CompositionSpec


class UNetDenoising:
    """The loop's questions (``pipeline.CLoRAMixin``) answered for a UNet: cross-attention maps at H/32,
    classifier-free guidance with a negative half, the scheduler's own timesteps."""

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network the loop runs once per branch and step."""
        return self.unet

    @property
    def phrase_tokenizer(self) -> Any:
        """The tokenizer whose positions index the recorded attention maps."""
        return self.tokenizer

    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    def native_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    def map_downsampling(self) -> int:
        """How much smaller than the latent the recorded maps are."""
        return recorded_downsampling(self.unet)

    def memory_width(self) -> int:
        """The width the family's activation figures are per (``families``, ``memory``)."""
        return self.unet.config.block_out_channels[0]

    def memory_text_tokens(self) -> int:
        """The text sequence length the family's per-token activation figures multiply (none for a UNet)."""
        return 0

    def negative_half(self, spec: CompositionSpec) -> bool:
        """Whether a step's noise pass runs each branch on the negative prompt too (classifier-free
        guidance)."""
        return True

    def cfg_scale(self, spec: CompositionSpec) -> float:
        """The classifier-free guidance scale between the negative and the prompt halves."""
        return spec.guidance

    def set_timesteps(self, scheduler: Any, steps: int, latent_size: tuple[int, int]) -> None:
        scheduler.set_timesteps(steps, device="cpu")

    def recording(self, spec: CompositionSpec, latent_size: tuple[int, int]) -> Any:
        """A context manager that records the attention maps CLoRA reads, yielding the recorder."""
        return recording_cross_attention(self.unet, explicit_everywhere=spec.parity)

    def denoise(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text_embeds: torch.Tensor,
        added_cond: dict[str, torch.Tensor] | None,
    ) -> torch.Tensor:
        """One denoiser call on a batch: latents (rows, C, h, w), the step's timestep, each row's text
        embeddings and extra conditioning; returns the prediction (rows, C, h, w)."""
        return self.unet(
            latents, timestep, encoder_hidden_states=text_embeds, added_cond_kwargs=added_cond, return_dict=False
        )[0]


class CLoRAPipeline(UNetDenoising, CLoRAMixin, StableDiffusionPipeline):
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


class CLoRAXLPipeline(UNetDenoising, CLoRAMixin, StableDiffusionXLPipeline):
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


class CLoRAFluxPipeline(CLoRAMixin, FluxPipeline):
    r"""CLoRA on FLUX.1 [dev], [schnell] and their fine-tunes, with Flux LoRAs.

    The same loop as on Stable Diffusion, over Flux's transformer:

    - each branch's prompt goes through CLIP-L (pooled) and T5 (the sequence, ``max_sequence_length``
      512 as ``FluxPipeline``) with that branch's CLIP LoRA layers active; concept phrases are found
      among T5's sentencepiece tokens (a phrase may be several);
    - the maps are the image-query x text-key attention of the second half of the double-stream blocks
      (``recorded_blocks``; ``joint_attention``), softmax over the text keys (``attention_softmax``),
      pooled from the token grid (H/16) to H/32; the gradient pass stops after the last of them;
    - [dev] is guidance-distilled: every branch runs once per step with the guidance embedding (spec
      ``guidance``, 3.5) and no negative half; ``true_cfg`` > 1 with a negative prompt adds one
      (diffusers' ``true_cfg_scale``); [schnell] has no guidance embedding;
    - the timesteps are the flow-matching Euler schedule shifted by the image size, as FluxPipeline
      sets them; the latent is packed into 2x2 tokens inside ``denoise`` only.

    Example:
        >>> import torch
        >>> from clora import CLoRAFluxPipeline
        >>> pipe = CLoRAFluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev",
        ...                                          torch_dtype=torch.bfloat16).to("cuda")
        >>> out = pipe(prompt="a cat and a dog in a garden",
        ...            concepts=[{"lora": "cat_flux.safetensors", "phrase": "cat", "trigger": "sks cat"},
        ...                      {"lora": "dog_flux.safetensors", "phrase": "dog", "trigger": "sks dog"}],
        ...            seed=53)
        >>> out.images[0].save("cat_and_dog_flux.png")
    """

    family = FLUX
    attention_softmax = "text"  # over the text keys; "joint": over all keys, as the model normalises

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path: Any, **kwargs: Any) -> Any:
        """A single-file Flux *transformer* (BFL's ``double_blocks.*`` keys, as FLUX.1 and its fine-tunes
        are shared) with every other component from ``config`` (a diffusers Flux folder or hub id).

        A ``.gguf`` file (city96's FLUX.1 GGUFs: Q8_0, Q4_0, Q4_K, ...; needs ``pip install gguf``) stays
        quantized: each linear dequantizes its weight when it runs, in ``torch_dtype``. ``quantization_config``
        (a diffusers ``BitsAndBytesConfig``, CUDA only) quantizes a ``.safetensors`` transformer as it loads.
        The contrastive gradient reaches the latent through either (the weights get no gradient).

        Example:
            >>> import torch
            >>> from clora import CLoRAFluxPipeline
            >>> pipe = CLoRAFluxPipeline.from_single_file("flux1-dev-Q8_0.gguf", config="black-forest-labs/FLUX.1-dev",
            ...                                           torch_dtype=torch.bfloat16).to("cuda")
        """
        from diffusers import FluxTransformer2DModel

        config = kwargs.pop("config", None)
        if config is None:
            raise CLoRAError(
                "model_config: a single-file Flux checkpoint holds only the transformer; set model_config: to a "
                "diffusers Flux folder or hub id (black-forest-labs/FLUX.1-dev) for the text encoders and VAE"
            )
        dtype = kwargs.get("torch_dtype")
        quantization = kwargs.pop("quantization_config", None)
        if str(pretrained_model_link_or_path).lower().endswith(".gguf"):
            import importlib.util

            from diffusers import GGUFQuantizationConfig

            if importlib.util.find_spec("gguf") is None:
                raise CLoRAError("model: reading a .gguf Flux transformer needs the gguf package: pip install gguf")

            quantization = GGUFQuantizationConfig(compute_dtype=dtype or torch.float32)
        transformer = FluxTransformer2DModel.from_single_file(
            str(pretrained_model_link_or_path),
            config=config,
            subfolder="transformer",
            torch_dtype=dtype,
            **({} if quantization is None else {"quantization_config": quantization}),
        )
        return cls.from_pretrained(config, transformer=transformer, **kwargs)

    # -- the denoiser ------------------------------------------------------------------------

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    @property
    def phrase_tokenizer(self) -> Any:
        return self.tokenizer_2

    @property
    def text_sequence_length(self) -> int:
        return min(512, self.tokenizer_2.model_max_length)

    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4  # a token packs 2x2 latent pixels

    def native_size(self) -> int:
        return self.default_sample_size * self.vae_scale_factor

    def _map_pool(self) -> int:
        """Tokens per map pixel along each side: 2 with Flux's 8x VAE (tokens at H/16, maps at H/32);
        a model with a smaller VAE factor (the demo's) keeps its token grid."""
        return max(1, self.vae_scale_factor // 4)

    def map_downsampling(self) -> int:
        return 2 * self._map_pool()

    def memory_width(self) -> int:
        config = self.transformer.config
        return config.num_attention_heads * config.attention_head_dim

    def memory_text_tokens(self) -> int:
        return self.text_sequence_length

    def negative_half(self, spec: CompositionSpec) -> bool:
        return spec.true_cfg > 1 and bool(spec.negative_prompt)

    def cfg_scale(self, spec: CompositionSpec) -> float:
        return spec.true_cfg

    def set_timesteps(self, scheduler: Any, steps: int, latent_size: tuple[int, int]) -> None:
        config = scheduler.config
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        tokens = (latent_size[0] // 2) * (latent_size[1] // 2)
        mu = calculate_shift(
            tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        scheduler.set_timesteps(steps if sigmas is None else None, device="cpu", sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)  # steps by index, never by looking the timestep up

    def recorded_blocks(self) -> list[str]:
        """The second half of the double-stream blocks (FLUX.1-dev: 10-18 of 19)."""
        count = len(self.transformer.transformer_blocks)
        return [f"transformer_blocks.{i}" for i in range(count // 2, count)]

    def recording(self, spec: CompositionSpec, latent_size: tuple[int, int]) -> Any:
        grid = (latent_size[0] // 2, latent_size[1] // 2)
        return recording_joint_attention(
            self.transformer,
            self.recorded_blocks(),
            self.text_sequence_length,
            grid,
            self._map_pool(),
            self.attention_softmax,
        )

    def denoise(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text_embeds: torch.Tensor,
        added_cond: dict[str, torch.Tensor] | None,
    ) -> torch.Tensor:
        rows, channels, height, width = latents.shape
        packed = self._pack_latents(latents, rows, channels, height, width)
        image_ids, text_ids = self._position_ids(height, width, text_embeds.shape[1], latents.device, latents.dtype)
        added_cond = added_cond or {}
        velocity = self.transformer(
            hidden_states=packed,
            timestep=timestep.expand(rows).to(latents.dtype) / 1000,
            guidance=added_cond.get("guidance"),
            pooled_projections=added_cond["pooled_projections"],
            encoder_hidden_states=text_embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        scale = self.vae_scale_factor
        return self._unpack_latents(velocity, height * scale, width * scale, scale)

    def _position_ids(
        self, height: int, width: int, text_tokens: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary position ids of the image tokens and the text tokens, made once per size (they are
        built on the host: remade per call they were a host-to-device copy on every denoiser call)."""
        cache = self.__dict__.setdefault("_clora_position_ids", {})
        key = (height, width, text_tokens, device, dtype)
        if key not in cache:
            image_ids = self._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype)
            cache[key] = (image_ids, torch.zeros(text_tokens, 3, device=device, dtype=dtype))
        return cache[key]

    def encode_branch_prompt(
        self, prompt: str, spec: CompositionSpec, size: tuple[int, int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        self.family.diffusers_clip_skip(spec.clip_skip)  # Flux has no layer choice: refuse one

        def encoded(text: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            embeds, pooled, _ = self.encode_prompt(text, device=device, max_sequence_length=self.text_sequence_length)
            added = {"pooled_projections": pooled}
            if self.transformer.config.guidance_embeds:
                added["guidance"] = torch.full([1], spec.guidance, dtype=torch.float32)
            return embeds, added

        text, added = encoded(prompt)
        if not self.negative_half(spec):
            return text, None, added, {}
        negative, negative_added = encoded(spec.negative_prompt)
        return text, negative, added, negative_added
