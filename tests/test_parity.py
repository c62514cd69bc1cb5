"""``parity: true`` against an independent, literal re-implementation of the authors' loop.

The reference below is written the way the authors' SD 1.5 code works (ALGORITHM.md, "Reference
behaviour"): every attention layer explicit, an attention store that keeps the cross-attention maps
whose pixel count is (H/32)*(W/32) and averages them over layers, heads and both CFG halves, a
(W/32, H/32) reshape, pytorch_metric_learning's NTXentLoss on min-max maps without epsilon, one CFG
forward with gradients per prompt whose noise prediction is used after the latent update, and the
refinement updates at the iterative steps. It shares nothing with clora's loop but the text
embeddings and LoRA files.
"""

import numpy as np
import torch
import torch.nn.functional as F
from conftest import spec_dict
from diffusers import DDIMScheduler
from pytorch_metric_learning.losses import NTXentLoss

from clora import spec_from_dict
from clora.families import SD
from clora.spec import fill_defaults
from clora.tokens import plan_tokens

PROMPTS = ["a cat and a dog in a garden", "a sks cat and a dog in a garden", "a cat and a sks dog in a garden"]
CONCEPT_TOKENS = [[[2], [2, 3], [2]], [[5], [6], [5, 6]]]
MASK_TOKENS = [[], [2, 3], [5, 6]]


class ReferenceStore:
    def __init__(self, pixels):
        self.pixels, self.maps = pixels, []


class ReferenceProcessor:
    def __init__(self, store):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(q, k, None)
        if is_cross and probs.shape[1] == self.store.pixels:
            self.store.maps.append(probs)
        return attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, v))))


def reference_generate(pipe, spec, adapters):
    height, width = spec.height, spec.width
    latent_hw, map_hw = (height // 8, width // 8), (height // 32, width // 32)
    store = ReferenceStore(map_hw[0] * map_hw[1])
    original = pipe.unet.attn_processors
    pipe.unet.set_attn_processor(ReferenceProcessor(store))
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(spec.steps)
    embeds = []
    for names in adapters:
        pipe.enable_lora()
        pipe.set_adapters(names) if names else pipe.disable_lora()
        embeds.append(pipe.encode_prompt(PROMPTS[len(embeds)], "cpu", 1, True, spec.negative_prompt))
    generator = torch.Generator("cpu").manual_seed(spec.seed)
    latents = torch.randn((1, 4, *latent_hw), generator=generator) * scheduler.init_noise_sigma
    all_losses, all_masks = [], []

    def forward_all(z, t):
        maps, noise = [], []
        for names, (cond, uncond) in zip(adapters, embeds):
            pipe.enable_lora()
            pipe.set_adapters(names) if names else pipe.disable_lora()
            store.maps = []
            model_input = scheduler.scale_model_input(torch.cat([z, z]), t)
            noise.append(pipe.unet(model_input, t, encoder_hidden_states=torch.cat([uncond, cond])).sample)
            averaged = torch.cat(store.maps).mean(0)  # layers x heads x both halves
            maps.append(averaged.reshape(map_hw[1], map_hw[0], -1))  # the authors' (W, H) reshape
        return maps, noise

    def loss_of(maps):
        vectors, labels = [], []
        for c, per_prompt in enumerate(CONCEPT_TOKENS):
            for i, positions in enumerate(per_prompt):
                for k in positions:
                    v = maps[i][:, :, k].flatten()
                    vectors.append((v - v.min()) / (v.max() - v.min()))
                    labels.append(c)
        return NTXentLoss(temperature=spec.temperature)(torch.stack(vectors), torch.tensor(labels))

    for step, t in enumerate(scheduler.timesteps):
        with torch.enable_grad():
            z = latents.detach().requires_grad_(True)
            maps, noise = forward_all(z, t)
            losses = []
            if step < spec.max_iter_to_alter:
                loss = loss_of(maps)
                losses.append(loss.item())
                if step in spec.iterative_steps:
                    for _ in range(spec.iterative_iters):
                        z = (z - spec.step_size * torch.autograd.grad(loss, z)[0]).detach().requires_grad_(True)
                        loss = loss_of(forward_all(z, t)[0])
                        losses.append(loss.item())
                z = z - spec.step_size * torch.autograd.grad(loss, z)[0]
            latents = z.detach()
        all_losses.append(losses)
        masks = [torch.zeros(maps[0].shape[:2])]
        for i in range(1, len(PROMPTS)):
            token_maps = maps[i].detach()[:, :, MASK_TOKENS[i]]
            peaks = token_maps.flatten(0, 1).max(0).values
            masks.append((token_maps > spec.mask_threshold * peaks).any(-1).float())
        masks[0] = 1 - torch.stack(masks[1:]).amax(0)
        masks = F.interpolate(torch.stack(masks)[None], size=latent_hw, mode="nearest")[0]
        all_masks.append(masks.bool())
        weights = masks / masks.sum(0, keepdim=True)
        fused = sum(weights[i] * noise[i].detach() for i in range(len(PROMPTS)))  # (2, C, H, W)
        guided = fused[:1] + spec.guidance * (fused[1:] - fused[:1])
        latents = scheduler.step(guided, t, latents).prev_sample
    pipe.unet.set_attn_processor(original)
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(image.detach(), output_type="np")[0], all_losses, all_masks


def test_parity_reproduces_the_reference_loop_step_for_step(tiny_pipe, tiny_model_dir, lora_dir):
    spec = spec_from_dict(
        spec_dict(
            tiny_model_dir,
            lora_dir,
            parity=True,
            height=128,
            width=64,
            steps=4,
            max_iter_to_alter=2,
            iterative_iters=2,
            scheduler="ddim",
            prompts=PROMPTS,
            concept_tokens=CONCEPT_TOKENS,
            mask_tokens=MASK_TOKENS,
            negative_prompt="blurry",
            mask_threshold=0.97,  # the tiny model's maps vary by ~5%
        )
    )
    spec = fill_defaults(spec, SD.spec_defaults)
    assert plan_tokens(tiny_pipe.tokenizer, spec).concept_tokens == tuple(
        tuple(tuple(p) for p in c) for c in CONCEPT_TOKENS
    )
    ours = tiny_pipe(spec, keep_maps=True)
    names = [tiny_pipe.add_lora(c.lora) for c in spec.concepts]
    with torch.no_grad():
        reference_image, reference_losses, reference_masks = reference_generate(
            tiny_pipe, spec, [[], [names[0]], [names[1]]]
        )
    assert [len(step) for step in ours.losses[0]] == [3, 1, 0, 0]
    np.testing.assert_allclose(np.concatenate(ours.losses[0]), np.concatenate(reference_losses), rtol=1e-4)
    for step, (mine, theirs) in enumerate(zip(ours.masks[0], reference_masks, strict=True)):
        assert torch.equal(mine, theirs), f"masks differ at step {step}"
    assert not all(m.all() for m in reference_masks[0][1:])  # the masks really cut regions
    ours_image = np.asarray(ours.images[0]).astype(float) / 255
    assert np.abs(ours_image - reference_image).max() <= 1.5 / 255
    default = np.asarray(tiny_pipe(spec, parity=False).images[0]).astype(float) / 255
    assert np.abs(default - reference_image).max() > 5 / 255  # the default fixes change the result
