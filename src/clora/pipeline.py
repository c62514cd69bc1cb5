"""``CLoRAMixin``: the denoising loop that composes several LoRAs with CLoRA, for every model family.

The denoising loop in ``__call__`` follows ALGORITHM.md step by step, for the ``num_images`` images of
a call at once (each image with its own seed, loss and masks):

1. every prompt branch runs on the latents with its own LoRA, recording text-attention maps at H/32
   (``engine.BatchedBranchRunner``: all branches of all images in one denoiser call per pass, chunked by
   the memory plan, ``memory``; ``engine.SequentialBranchRunner``: one call per branch, as the authors do);
2. while ``step < max_iter_to_alter``: contrastive loss over the concepts' maps (``loss``), one per image,
3. latent update ``z -= step_size * dL/dz`` (each image by its own loss's gradient),
4. repeated ``iterative_iters`` more times at ``iterative_steps``;
5. masks from each concept prompt's own-token maps (``masks.concept_masks``);
6. masked fusion of the branches' predictions + classifier-free guidance, scheduler step;
7. VAE decode.

What differs between model families (the denoiser and how it is called, which attention is recorded,
prompt encoding, the timestep schedule, whether a step has a negative half) is a small set of methods
each family's pipeline class provides (``family_pipelines``); this module's defaults are the UNet's.
The latent stays (images, C, h, w) in the loop; a transformer that works on packed tokens (Flux)
packs and unpacks inside its ``denoise``, a permutation that leaves the update and the fusion unchanged.

The spec's ``method`` (``methods``) picks the branches and which of them run at a step, whether steps
2-4 run and whether step 6 fuses by masks or by a plain average; CLoRA is the default, the others
are the baselines it is compared with (merge, LoRA Switch, LoRA Composite).

Default mode fixes the authors' quirks (see ``parity``): maps from the prompt half of the CFG batch,
noise predicted from the updated latent, an epsilon in the min-max, (H/32, W/32) maps, and the
gradient passes stop after the last recorded layer.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .engine import (
    BatchedBranchRunner,
    Branch,
    BranchOutputs,
    BranchRunner,
    SequentialBranchRunner,
    reproducible_gradients,
)
from .errors import CLoRAError
from .families import ModelFamily
from .lora import activate_adapters, file_sha256, load_adapter
from .loss import ConceptIndex, contrastive_loss
from .masks import concept_masks, fuse_noise
from .memory import MemoryPlan, plan_for_denoiser
from .methods import METHODS, switch_interval
from .output import CLoRAOutput, per_image_losses
from .routing import LoraRouter, lora_layers
from .schedulers import accepts_generator, make_scheduler
from .spec import CompositionSpec, fill_defaults, spec_from_dict
from .tokens import TokenPlan, plan_tokens, trigger_prompt


class CLoRAMixin:
    r"""CLoRA's denoising loop over a diffusers text-to-image pipeline of any family.

    The concrete pipelines (``CLoRAPipeline`` for SD 1.x/2.x, ``CLoRAXLPipeline`` for SDXL,
    ``CLoRAFluxPipeline`` for FLUX.1, in ``family_pipelines``) inherit loading, LoRA loaders and
    components from diffusers' own pipeline and add the family as data (``family``) plus what differs
    in computation, which the loop asks of them:

    - ``encode_branch_prompt(prompt, spec, size, device)``: a branch's prompt (and the negative one) as
      the denoiser's conditioning, with whatever LoRAs are active in the text encoders;
    - ``denoiser``, ``denoise(latents, timestep, text_embeds, added_cond)``: the network and one call
      of it on a batch of (rows, C, h, w) latents;
    - ``recording(spec, latent_size)``: the context that records the attention maps CLoRA reads;
    - ``phrase_tokenizer``, ``latent_channels()``, ``native_size()``, ``map_downsampling()``,
      ``set_timesteps(scheduler, steps, latent_size)``, ``negative_half(spec)``, ``cfg_scale(spec)``,
      ``memory_width()``, ``memory_text_tokens()``.

    ``family_pipelines.UNetDenoising`` implements them for the UNet families. The safety checker is
    not loaded.
    """

    family: ModelFamily
    load_defaults: dict[str, Any] = {}  # keyword defaults for from_pretrained / from_single_file
    vae_upcast: bool = False  # decode in float32 when the VAE is fp16 and its config asks (SDXL's overflows)

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
        keep_maps: bool = False,
        callback_on_step_end: Callable[[Any, int, Any, dict[str, Any]], Any] | None = None,
        **fields: Any,
    ) -> CLoRAOutput:
        """Generate the spec's ``num_images`` images (seeds ``seed``, ``seed + 1``, ...) as one batch
        through every pass. Pass a ``CompositionSpec`` and/or spec fields as keywords (``prompt=``,
        ``concepts=[{"lora": ..., "phrase": ...}]``, ``seed=``, ``num_images=`` ...).

        ``keep_maps``: keep every step's attention maps and masks in the output (for pictures of
        them); without it they are not kept, and nothing in the loop waits for the device.
        ``callback_on_step_end(pipe, step_index, timestep, {"latents": latents})`` runs after every
        scheduler step, as in diffusers: a dict it returns may replace ``latents`` ((images, C, h, w)),
        and an exception it raises stops the run (the web UI's cancel button does that)."""
        spec = (
            spec_from_dict(fields, source="arguments") if spec is None else (spec.replace(**fields) if fields else spec)
        )
        spec = fill_defaults(spec, self.family.spec_defaults)
        self.family.check_scheduler(spec.scheduler)
        if spec.parity and not self.family.parity:
            raise CLoRAError(
                f"parity: reproduces the authors' SD 1.5 code, which has no {self.family.title} version; "
                "use parity: false on this model"
            )
        height, width = self._checked_size(spec)
        self._clora_lora_disabled = None  # the user may have enabled/disabled LoRAs since the last call
        plan = plan_tokens(self.phrase_tokenizer, spec)
        concept_names = [self.add_lora(c.lora, c.sha256, allow_pickle) for c in spec.concepts]
        style_names = [self.add_lora(s.lora, s.sha256, allow_pickle) for s in spec.styles]
        spec = self._resolved(spec, height, width, plan)
        method = METHODS[spec.method]
        device = self._execution_device  # (a walk over every module: asked once)
        layout = method.branch_layout(plan.prompts, trigger_prompt(spec), len(spec.concepts))
        branches = self._encode_branches(spec, layout, concept_names, style_names, (height, width), device)
        images = spec.num_images

        # the scheduler's clock stays on the host (Python numbers), the UNet's timesteps on the device
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        scheduler = make_scheduler(spec.scheduler, self.scheduler.config)
        self.set_timesteps(scheduler, spec.steps, latent_size)
        clock, unet_timesteps = scheduler.timesteps.tolist(), scheduler.timesteps.to(device)
        generators = [torch.Generator("cpu").manual_seed(spec.seed + k) for k in range(images)]  # one per image
        shape = (images, self.latent_channels(), *latent_size)
        latents = randn_tensor(shape, generator=generators, device=device, dtype=torch.float32)
        latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
        step_kwargs = {"generator": generators} if accepts_generator(scheduler) else {}
        factor = self.map_downsampling()
        map_size = (latent_size[0] // factor, latent_size[1] // factor)
        loss_eps = 0.0 if spec.parity else 1e-8
        contrast = method.contrastive_update and len(spec.concepts) >= 2 and spec.step_size > 0
        concepts = ConceptIndex.build(plan.concept_tokens, device) if contrast else None
        mask_tokens = [torch.tensor(tokens, dtype=torch.long, device=device) for tokens in plan.mask_tokens]
        switch_every = switch_interval(spec.steps, spec.switch_every)
        running_at = [method.running(i // scheduler.order, len(branches), switch_every) for i in range(len(clock))]
        samples = images * len(running_at[0])  # prompt halves of one pass
        memory_plan = plan_for_denoiser(
            self.memory_width(),
            self.denoiser.dtype,
            self.family,
            samples,
            latent_size,
            device,
            spec.max_batch,
            halves=2 if self.negative_half(spec) else 1,
            text_tokens=self.memory_text_tokens(),
        )
        uniform = {r: torch.ones(images, len(r), *latent_size, device=device) for r in set(running_at)}
        cfg_scale = self.cfg_scale(spec)
        router = LoraRouter(lora_layers(self.denoiser, sorted({a for b in branches for a in b.adapters})))
        out = CLoRAOutput(images=[], spec=spec, plan=plan, memory_plan=memory_plan)
        kept, step_losses = [], []  # maps and masks per step (only with keep_maps), losses per step

        with self.recording(spec, latent_size) as recorder, router.installed():
            runners = {
                r: self._branch_runner(spec, [branches[i] for i in r], recorder, map_size, memory_plan, router)
                for r in dict.fromkeys(running_at)
            }
            with self.progress_bar(total=len(clock)) as progress:
                for index, t in enumerate(clock):
                    # second-order schedulers (Heun) evaluate twice per step; the latent is only
                    # moved before a step's first evaluation (the second corrects from the stored one)
                    step, later_evaluation = divmod(index, scheduler.order)
                    run, unet_t = runners[running_at[index]], unet_timesteps[index]
                    updates = 1 + (spec.iterative_iters if step in spec.iterative_steps else 0)
                    alter = contrast and not later_evaluation and step < spec.max_iter_to_alter
                    losses = None
                    if spec.parity:
                        with reproducible_gradients(latents.device):
                            latents, branch_out, losses = self._parity_step(
                                run, scheduler, latents, t, unet_t, concepts, spec, alter, updates, loss_eps
                            )
                    else:
                        if alter:
                            with reproducible_gradients(latents.device):
                                latents, losses = self._contrastive_updates(
                                    run, scheduler, latents, t, unet_t, concepts, spec, updates, loss_eps
                                )
                        branch_out = run(model_input(scheduler, latents, t), unet_t, grad=False, cfg=True)
                    if method.masked_fusion and step >= spec.apply_mask_after:
                        masks = concept_masks(
                            branch_out.maps, mask_tokens, spec.mask_threshold, spec.mask_morphology, latent_size
                        )
                    else:  # a uniform average of the running branches
                        masks = uniform[running_at[index]]
                    noise = fuse_noise(
                        branch_out.noise_uncond, branch_out.noise_text, masks, cfg_scale, spec.guidance_rescale
                    )
                    latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
                    if keep_maps:  # kept on the device; copied to the host once, after the loop
                        kept.append((branch_out.maps.detach().to(torch.float16), masks.detach().to(torch.bool)))
                    step_losses.append(losses)
                    progress.update()
                    if callback_on_step_end is not None:
                        changed = callback_on_step_end(self, index, unet_t, {"latents": latents})
                        latents = (changed or {}).get("latents", latents)

        activate_adapters(self, [], [])
        out.losses = per_image_losses(step_losses, images)
        if kept:
            maps, masks = (torch.stack(series).cpu() for series in zip(*kept))  # (steps, images, ...)
            out.attention_maps = [list(maps[:, k].unbind(0)) for k in range(images)]
            out.masks = [list(masks[:, k].unbind(0)) for k in range(images)]
        out.images = self._decode(latents)
        return out

    def _branch_runner(
        self,
        spec: CompositionSpec,
        branches: list[Branch],
        recorder: Any,
        map_size: tuple[int, int],
        memory_plan: MemoryPlan,
        router: LoraRouter,
    ) -> BranchRunner:
        images = spec.num_images
        if spec.parity or spec.engine == "sequential":  # parity: the authors' one call per prompt
            return SequentialBranchRunner(
                self, branches, recorder, map_size, spec.parity, images, negative=self.negative_half(spec)
            )
        return BatchedBranchRunner(
            self,
            branches,
            recorder,
            map_size,
            spec.parity,
            images,
            negative=self.negative_half(spec),
            plan=memory_plan,
            router=router,
        )

    def _contrastive_updates(
        self,
        run: BranchRunner,
        scheduler: Any,
        latents: torch.Tensor,
        t: Any,
        unet_t: torch.Tensor,
        concepts: ConceptIndex,
        spec: CompositionSpec,
        updates: int,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 2-4: ``updates`` rounds of forward (prompt half only), loss, gradient step. Each
        image moves by the gradient of its own loss. Returns the losses, (updates, images), on the
        device."""
        losses = []
        for _ in range(updates):
            latents = latents.detach().requires_grad_(True)
            _, loss = self._loss_pass(run, scheduler, latents, t, unet_t, concepts, spec, eps, cfg=False)
            latents = self._descend(latents, loss, spec.step_size)
            losses.append(loss.detach())
        return latents, torch.stack(losses)

    def _parity_step(
        self,
        run: BranchRunner,
        scheduler: Any,
        latents: torch.Tensor,
        t: Any,
        unet_t: torch.Tensor,
        concepts: ConceptIndex | None,
        spec: CompositionSpec,
        alter: bool,
        updates: int,
        eps: float,
    ) -> tuple[torch.Tensor, BranchOutputs, torch.Tensor | None]:
        """The authors' order: one CFG forward with grad gives the noise and maps used for this
        step; the latent is then updated (``updates`` times) but the noise is not recomputed."""
        if not alter:
            return latents, run(model_input(scheduler, latents, t), unet_t, grad=False, cfg=True), None
        latents = latents.detach().requires_grad_(True)
        first, loss = self._loss_pass(run, scheduler, latents, t, unet_t, concepts, spec, eps, cfg=True)
        losses = [loss.detach()]
        for _ in range(updates - 1):
            latents = self._descend(latents, loss, spec.step_size).requires_grad_(True)
            _, loss = self._loss_pass(run, scheduler, latents, t, unet_t, concepts, spec, eps, cfg=True)
            losses.append(loss.detach())
        latents = self._descend(latents, loss, spec.step_size)
        stale = BranchOutputs(first.maps.detach(), first.noise_uncond.detach(), first.noise_text.detach())
        return latents, stale, torch.stack(losses)

    @staticmethod
    def _loss_pass(
        run: BranchRunner,
        scheduler: Any,
        latents: torch.Tensor,
        t: Any,
        unet_t: torch.Tensor,
        concepts: ConceptIndex,
        spec: CompositionSpec,
        eps: float,
        cfg: bool,
    ) -> tuple[BranchOutputs, torch.Tensor]:
        """Step 1 with gradients from ``latents`` (which must require grad), then step 2's loss: one
        per image, (images,)."""
        with torch.enable_grad():
            outputs = run(model_input(scheduler, latents, t), unet_t, grad=True, cfg=cfg)
            return outputs, contrastive_loss(outputs.maps, concepts, spec.temperature, eps)

    @staticmethod
    def _descend(latents: torch.Tensor, loss: torch.Tensor, step_size: float) -> torch.Tensor:
        """One gradient step. The images' losses are summed: image k's loss depends on its own
        latent only, so each image follows the gradient of its own loss."""
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(loss.sum(), latents)
        return (latents - step_size * grad).detach()

    # -- helpers ------------------------------------------------------------------------------

    def _checked_size(self, spec: CompositionSpec) -> tuple[int, int]:
        native = self.native_size()
        multiple = self.vae_scale_factor * self.map_downsampling()
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
        branches, dtype = [], self.denoiser.dtype
        for prompt, concepts in layout:
            # one file used by several concepts (or as a concept and a style) is one adapter: its weights add up
            weights: dict[str, float] = {}
            for c in concepts:
                weights[concept_names[c]] = (
                    weights.get(concept_names[c], 0.0) + spec.concepts[c].weight * spec.lora_scale
                )
            for name, style in zip(style_names, spec.styles, strict=True):
                weights[name] = weights.get(name, 0.0) + style.weight * spec.lora_scale
            names = tuple(weights)
            if spec.text_encoder_lora:
                activate_adapters(self, names, tuple(weights.values()))
            else:
                activate_adapters(self, [], [])
            text, negative, added, negative_added = self.encode_branch_prompt(prompt, spec, size, device)
            added, negative_added = ({k: v.to(device, dtype) for k, v in c.items()} for c in (added, negative_added))
            negative = None if negative is None else negative.to(dtype)
            branches.append(Branch(names, tuple(weights.values()), text.to(dtype), negative, added, negative_added))
        return branches

    def _decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """One image at a time: the VAE's peak memory stays that of one image however many there are."""
        vae = self.vae
        upcast = self.vae_upcast and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        shift = getattr(vae.config, "shift_factor", None) or 0.0  # Flux's VAE has one, SD's none
        try:
            decoded = [
                vae.decode(latent[None].to(vae.dtype) / vae.config.scaling_factor + shift, return_dict=False)[0]
                for latent in latents
            ]
        finally:
            if upcast:
                vae.to(torch.float16)
        return self.image_processor.postprocess(
            torch.cat(decoded).float(), output_type="pil", do_denormalize=[True] * len(decoded)
        )


def model_input(scheduler: Any, latents: torch.Tensor, t: Any) -> torch.Tensor:
    """The denoiser's input at time ``t``: scaled where the scheduler scales it (sigma schedulers);
    flow-matching schedulers have no scaling."""
    scale = getattr(scheduler, "scale_model_input", None)
    return latents if scale is None else scale(latents, t)
