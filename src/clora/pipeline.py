"""``CLoRAPipeline``: Stable Diffusion that composes several LoRAs with CLoRA.

The denoising loop in ``__call__`` follows ALGORITHM.md step by step:

1. every prompt branch runs on the latent with its own LoRA, recording cross-attention maps at H/32
   (``engine.BatchedBranchRunner``: all branches in one UNet call; ``engine.SequentialBranchRunner``:
   one call per branch, as the authors do);
2. while ``step < max_iter_to_alter``: contrastive loss over the concepts' maps (``loss``),
3. latent update ``z -= step_size * dL/dz``,
4. repeated ``iterative_iters`` more times at ``iterative_steps``;
5. masks from each concept prompt's own-token maps (``masks.concept_masks``);
6. masked fusion of the branches' predictions + classifier-free guidance, scheduler step;
7. VAE decode.

The spec's ``method`` (``methods``) picks the branches and which of them run at a step, whether steps
2-4 run and whether step 6 fuses by masks or by a plain average; CLoRA is the default, the others
are the baselines it is compared with (merge, LoRA Switch, LoRA Composite).

Default mode fixes the authors' quirks (see ``parity``): maps from the prompt half of the CFG batch,
noise predicted from the updated latent, an epsilon in the min-max, (H/32, W/32) maps, and the
gradient passes stop after the last recorded layer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .attention import recorded_downsampling, recording_cross_attention
from .engine import BatchedBranchRunner, Branch, BranchOutputs, BranchRunner, SequentialBranchRunner, auto_max_batch
from .errors import CLoRAError
from .families import SD, SDXL, ModelFamily
from .lora import activate_adapters, file_sha256, load_adapter
from .loss import contrastive_loss
from .masks import concept_masks, fuse_noise
from .methods import METHODS
from .schedulers import accepts_generator, make_scheduler
from .spec import CompositionSpec, spec_from_dict
from .tokens import TokenPlan, plan_tokens, trigger_prompt


@contextlib.contextmanager
def reproducible_gradients(device: torch.device) -> Iterator[None]:
    """Gradient passes on the CPU run on one intra-op thread.

    With two threads, identical runs differed by 3-5/255 on about a third of the pixels, and only
    when the contrastive update ran: the no-grad passes were reproducible, and so were the common
    backward kernels tested alone (SDPA, conv, group/layer norm), so the op was not pinned down.
    One thread for the update makes the same seed give the same pixels; GPUs are unaffected.
    """
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class CLoRAOutput:
    """What one composition produced, with everything needed to inspect or redo it."""

    images: list[Image.Image]
    spec: CompositionSpec  # fully resolved: sizes, prompts, token positions, LoRA hashes
    plan: TokenPlan
    attention_maps: list[torch.Tensor] = field(default_factory=list)  # per step: (prompts, h, w, tokens)
    masks: list[torch.Tensor] = field(default_factory=list)  # per step: (prompts, H/8, W/8)
    losses: list[list[float]] = field(default_factory=list)  # per step: the loss before each update


class CLoRAMixin:
    r"""CLoRA's denoising loop over a diffusers Stable Diffusion pipeline of any family.

    The concrete pipelines (``CLoRAPipeline`` for SD 1.x/2.x, ``CLoRAXLPipeline`` for SDXL) inherit
    loading, LoRA loaders and components from diffusers' own pipeline and add the family as data
    (``family``) plus the one thing that differs, ``encode_branch_prompt``. The safety checker is not
    loaded.
    """

    family: ModelFamily
    load_defaults: dict[str, Any] = {}  # keyword defaults for from_pretrained / from_single_file
    vae_upcast: bool = False  # decode in float32 when the VAE is fp16 and its config asks (SDXL's overflows)

    # The replaceable "run every branch on this latent" step: None picks by the spec (``engine``,
    # ``parity``); else any class built as (pipe, branches, recorder, map_size, parity) whose
    # instances honour ``engine.BranchRunner``.
    branch_runner_class: type | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> Any:
        for key, value in cls.load_defaults.items():
            kwargs.setdefault(key, value)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path: Any, **kwargs: Any) -> Any:
        for key, value in cls.load_defaults.items():  # (load_safety_checker=False would still fetch it)
            kwargs.setdefault(key, value)
        return super().from_single_file(pretrained_model_link_or_path, **kwargs)

    def encode_branch_prompt(
        self, prompt: str, spec: CompositionSpec, size: tuple[int, int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``prompt`` and the spec's negative prompt as the UNet's conditioning, with whatever LoRAs
        are active in the text encoders: (prompt embeddings, negative embeddings, the prompt's extra
        conditioning, the negative's), batch 1 each."""
        raise NotImplementedError

    # -- LoRAs -------------------------------------------------------------------------------

    def add_lora(self, path: str, expected_sha256: str | None = None, allow_pickle: bool = False) -> str:
        """Load a LoRA file once (keyed by content hash) and return its adapter name."""
        digest = self.lora_sha256(path)
        if expected_sha256 and digest != expected_sha256:
            raise CLoRAError(f"{path}: sha256 is {digest[:12]}..., the spec expects {expected_sha256[:12]}...")
        name = f"lora_{digest[:16]}"
        loaded = {a for adapters in self.get_list_adapters().values() for a in adapters}
        if name not in loaded:
            load_adapter(self, path, name, allow_pickle=allow_pickle)
        return name

    def lora_sha256(self, path: str) -> str:
        """The file's sha256, remembered while its size and modification time stay the same."""
        try:
            stat = os.stat(path)
        except OSError:
            raise CLoRAError(f"{path}: LoRA file not found") from None
        key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
        cache = self.__dict__.setdefault("_clora_sha256", {})
        if key not in cache:
            cache[key] = file_sha256(path)
        return cache[key]

    # -- the composition ---------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        spec: CompositionSpec | None = None,
        *,
        allow_pickle: bool = False,
        callback_on_step_end: Callable[[Any, int, Any, dict[str, Any]], Any] | None = None,
        **fields: Any,
    ) -> CLoRAOutput:
        """Generate one image. Pass a ``CompositionSpec`` and/or spec fields as keywords
        (``prompt=``, ``concepts=[{"lora": ..., "phrase": ...}]``, ``seed=`` ...).

        ``callback_on_step_end(pipe, step_index, timestep, {"latents": latents})`` runs after every
        scheduler step, as in diffusers: a dict it returns may replace ``latents``, and an exception
        it raises stops the run (the web UI's cancel button does that)."""
        spec = (
            spec_from_dict(fields, source="arguments") if spec is None else (spec.replace(**fields) if fields else spec)
        )
        if spec.parity and not self.family.parity:
            raise CLoRAError(
                f"parity: reproduces the authors' SD 1.5 code, which has no {self.family.title} version; "
                "use parity: false on this model"
            )
        height, width = self._checked_size(spec)
        self._clora_lora_disabled = None  # the user may have enabled/disabled LoRAs since the last call
        plan = plan_tokens(self.tokenizer, spec)
        concept_names = [self.add_lora(c.lora, c.sha256, allow_pickle) for c in spec.concepts]
        style_names = [self.add_lora(s.lora, s.sha256, allow_pickle) for s in spec.styles]
        spec = self._resolved(spec, height, width, plan)
        method = METHODS[spec.method]
        device = self._execution_device  # (a walk over every module: asked once)
        layout = method.branch_layout(plan.prompts, trigger_prompt(spec), len(spec.concepts))
        branches = self._encode_branches(spec, layout, concept_names, style_names, (height, width), device)

        scheduler = make_scheduler(spec.scheduler, self.scheduler.config)
        scheduler.set_timesteps(spec.steps, device=device)
        generator = torch.Generator("cpu").manual_seed(spec.seed)
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        shape = (1, self.unet.config.in_channels, *latent_size)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents * scheduler.init_noise_sigma
        step_kwargs = {"generator": generator} if accepts_generator(scheduler) else {}
        factor = recorded_downsampling(self.unet)
        map_size = (latent_size[0] // factor, latent_size[1] // factor)
        loss_eps = 0.0 if spec.parity else 1e-8
        contrast = method.contrastive_update and len(spec.concepts) >= 2 and spec.step_size > 0
        out = CLoRAOutput(images=[], spec=spec, plan=plan)
        runners: dict[tuple[int, ...], BranchRunner] = {}  # by the branches that run (switch: one at a time)

        with recording_cross_attention(self.unet, explicit_everywhere=spec.parity) as recorder:
            with self.progress_bar(total=len(scheduler.timesteps)) as progress:
                for index, t in enumerate(scheduler.timesteps):
                    # second-order schedulers (Heun) evaluate twice per step; the latent is only
                    # moved before a step's first evaluation (the second corrects from the stored one)
                    step, later_evaluation = divmod(index, scheduler.order)
                    running = method.running(step, len(branches), spec.switch_every)
                    if running not in runners:
                        selected = [branches[i] for i in running]
                        runners[running] = self._branch_runner(spec, selected, recorder, map_size, latent_size, device)
                    run = runners[running]
                    updates = 1 + (spec.iterative_iters if step in spec.iterative_steps else 0)
                    alter = contrast and not later_evaluation and step < spec.max_iter_to_alter
                    if spec.parity:
                        with reproducible_gradients(latents.device):
                            latents, branch_out, losses = self._parity_step(
                                run, scheduler, latents, t, plan, spec, alter, updates, loss_eps
                            )
                    else:
                        losses = []
                        if alter:
                            with reproducible_gradients(latents.device):
                                latents, losses = self._contrastive_updates(
                                    run, scheduler, latents, t, plan, spec, updates, loss_eps
                                )
                        branch_out = run(scheduler.scale_model_input(latents, t), t, grad=False, cfg=True)
                    if method.masked_fusion and step >= spec.apply_mask_after:
                        masks = concept_masks(
                            branch_out.maps, plan.mask_tokens, spec.mask_threshold, spec.mask_morphology, latent_size
                        )
                    else:  # a uniform average of the running branches
                        masks = torch.ones(len(running), *latent_size, device=latents.device)
                    noise = fuse_noise(
                        branch_out.noise_uncond, branch_out.noise_text, masks, spec.guidance, spec.guidance_rescale
                    )
                    latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
                    out.attention_maps.append(branch_out.maps.detach().to("cpu", torch.float16))
                    out.masks.append(masks.detach().to("cpu", torch.bool))
                    out.losses.append(losses)
                    progress.update()
                    if callback_on_step_end is not None:
                        changed = callback_on_step_end(self, index, t, {"latents": latents})
                        latents = (changed or {}).get("latents", latents)

        activate_adapters(self, [], [])
        out.images = self._decode(latents)
        return out

    def _branch_runner(
        self,
        spec: CompositionSpec,
        branches: list[Branch],
        recorder: Any,
        map_size: tuple[int, int],
        latent_size: tuple[int, int],
        device: torch.device,
    ) -> BranchRunner:
        if self.branch_runner_class is not None:
            return self.branch_runner_class(self, branches, recorder, map_size, spec.parity)
        if spec.parity or spec.engine == "sequential":  # parity: the authors' one call per prompt
            return SequentialBranchRunner(self, branches, recorder, map_size, spec.parity)
        max_batch = spec.max_batch or auto_max_batch(
            self.unet, device, latent_size, 2 * len(branches), self.family.grad_bytes_per_unit
        )
        return BatchedBranchRunner(self, branches, recorder, map_size, spec.parity, max_batch)

    def _contrastive_updates(
        self,
        run: BranchRunner,
        scheduler: Any,
        latents: torch.Tensor,
        t: Any,
        plan: TokenPlan,
        spec: CompositionSpec,
        updates: int,
        eps: float,
    ) -> tuple[torch.Tensor, list[float]]:
        """Steps 2-4: ``updates`` rounds of forward (prompt half only), loss, gradient step."""
        losses = []
        for _ in range(updates):
            latents = latents.detach().requires_grad_(True)
            _, loss = self._loss_pass(run, scheduler, latents, t, plan, spec, eps, cfg=False)
            latents = self._descend(latents, loss, spec.step_size)
            losses.append(loss.item())
        return latents, losses

    def _parity_step(
        self,
        run: BranchRunner,
        scheduler: Any,
        latents: torch.Tensor,
        t: Any,
        plan: TokenPlan,
        spec: CompositionSpec,
        alter: bool,
        updates: int,
        eps: float,
    ) -> tuple[torch.Tensor, BranchOutputs, list[float]]:
        """The authors' order: one CFG forward with grad gives the noise and maps used for this
        step; the latent is then updated (``updates`` times) but the noise is not recomputed."""
        if not alter:
            return latents, run(scheduler.scale_model_input(latents, t), t, grad=False, cfg=True), []
        latents = latents.detach().requires_grad_(True)
        first, loss = self._loss_pass(run, scheduler, latents, t, plan, spec, eps, cfg=True)
        losses = [loss.item()]
        for _ in range(updates - 1):
            latents = self._descend(latents, loss, spec.step_size).requires_grad_(True)
            _, loss = self._loss_pass(run, scheduler, latents, t, plan, spec, eps, cfg=True)
            losses.append(loss.item())
        latents = self._descend(latents, loss, spec.step_size)
        stale = BranchOutputs(first.maps.detach(), first.noise_uncond.detach(), first.noise_text.detach())
        return latents, stale, losses

    @staticmethod
    def _loss_pass(
        run: BranchRunner,
        scheduler: Any,
        latents: torch.Tensor,
        t: Any,
        plan: TokenPlan,
        spec: CompositionSpec,
        eps: float,
        cfg: bool,
    ) -> tuple[BranchOutputs, torch.Tensor]:
        """Step 1 with gradients from ``latents`` (which must require grad), then step 2's loss."""
        with torch.enable_grad():
            outputs = run(scheduler.scale_model_input(latents, t), t, grad=True, cfg=cfg)
            return outputs, contrastive_loss(outputs.maps, plan.concept_tokens, spec.temperature, eps)

    @staticmethod
    def _descend(latents: torch.Tensor, loss: torch.Tensor, step_size: float) -> torch.Tensor:
        (grad,) = torch.autograd.grad(loss, latents)
        return (latents - step_size * grad).detach()

    # -- helpers ------------------------------------------------------------------------------

    def _checked_size(self, spec: CompositionSpec) -> tuple[int, int]:
        native = self.unet.config.sample_size * self.vae_scale_factor
        multiple = self.vae_scale_factor * recorded_downsampling(self.unet)
        sizes = []
        for name, value in (("height", spec.height), ("width", spec.width)):
            value = native if value is None else value
            if value % multiple:
                raise CLoRAError(
                    f"{name}: {value} is not a multiple of {multiple} (this model's VAE factor "
                    f"{self.vae_scale_factor} x attention-map factor {multiple // self.vae_scale_factor}); "
                    f"try {max(multiple, round(value / multiple) * multiple)}"
                )
            sizes.append(value)
        return sizes[0], sizes[1]

    def _resolved(self, spec: CompositionSpec, height: int, width: int, plan: TokenPlan) -> CompositionSpec:
        data = spec.to_dict()
        data.update(height=height, width=width, **{k: v for k, v in plan.to_json().items() if k != "tokens"})
        for item in data["concepts"] + data["styles"]:
            item["sha256"] = self.lora_sha256(item["lora"])
        return spec_from_dict(data, source="spec")

    def _encode_branches(
        self,
        spec: CompositionSpec,
        layout: list[tuple[str, tuple[int, ...]]],
        concept_names: list[str],
        style_names: list[str],
        size: tuple[int, int],
        device: torch.device,
    ) -> list[Branch]:
        """Every branch of ``layout`` (prompt, concept indices): its adapters (those concepts' LoRAs
        and the styles) and its prompt's conditioning, encoded with those LoRAs in the text encoders."""
        branches, dtype = [], self.unet.dtype
        for prompt, concepts in layout:
            names = tuple(concept_names[c] for c in concepts) + tuple(style_names)
            weights = tuple(spec.concepts[c].weight * spec.lora_scale for c in concepts)
            weights += tuple(s.weight * spec.lora_scale for s in spec.styles)
            if spec.text_encoder_lora:
                activate_adapters(self, names, weights)
            else:
                activate_adapters(self, [], [])
            text, negative, added, negative_added = self.encode_branch_prompt(prompt, spec, size, device)
            added, negative_added = ({k: v.to(device, dtype) for k, v in c.items()} for c in (added, negative_added))
            branches.append(Branch(names, weights, text.to(dtype), negative.to(dtype), added, negative_added))
        return branches

    def _decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.vae
        upcast = self.vae_upcast and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        try:
            image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(torch.float16)
        return self.image_processor.postprocess(image.float(), output_type="pil", do_denormalize=[True])


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
