"""Train the embedded demo base model (VAE, text encoder, UNet) on the synthetic world.

    python -m clora.demo.train_base --out src/clora/demo/assets/model --work /tmp/clora_base

Seeded and single-threaded (``torch.set_num_threads(1)``) so the run is reproducible on one
CPU core.  Stages: (1) draw the data set, (2) train the VAE, (3) cache latents, (4) train the
text encoder and UNet jointly with the DDPM epsilon loss (min-SNR-5 weighting), an EMA of the
weights, 10% caption dropout, and an auxiliary *localisation loss*: for every object word
(colour and shape) the cross-entropy between its cross-attention map and its object's mask
(both normalised over pixels), at the 8x8 level (the only down/up level with cross-attention, the one CLoRA
records), weighted down where the latent is nearly pure noise.  Real Stable
Diffusion has object-localised cross-attention without being told; this tiny model would not
learn it in minutes, so we emulate that property of SD with the auxiliary loss.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import models, world
from .tokenizer import write_tokenizer


def log(msg):
    print(time.strftime("%H:%M:%S"), msg, flush=True)


# ----------------------------------------------------------------------------- data


def token_positions(tokenizer, caption: str, phrases):
    """Token positions of each phrase (list of words) inside the tokenised caption."""
    ids = tokenizer(caption, padding="max_length", max_length=77, truncation=True).input_ids
    toks = tokenizer.convert_ids_to_tokens(ids)
    words = [t.removesuffix("</w>") for t in toks]
    out = []
    for ph in phrases:
        n = len(ph)
        found = None
        for i in range(1, len(words) - n + 1):
            if words[i : i + n] == ph:
                found = list(range(i, i + n))
                break
        if found is None:
            raise ValueError(f"{ph} not in {caption}")
        out.append(found)
    return ids, out


def make_dataset(n: int, seed: int, tokenizer, scene_kwargs=None, caption_fn=None, K=3, J=2):
    """Render n scenes. Returns dict of numpy arrays."""
    rng = np.random.default_rng(seed)
    imgs = np.zeros((n, world.IMG, world.IMG, 3), np.uint8)
    masks = np.zeros((n, K, world.IMG, world.IMG), np.bool_)
    ids = np.zeros((n, 77), np.int64)
    tok = np.full((n, K, J), -1, np.int64)
    caps = []
    for i in range(n):
        sc = world.sample_scene(rng, **(scene_kwargs or {}))
        img, ms = world.render(sc)
        cap = caption_fn(sc) if caption_fn else sc.caption()
        phr = world.phrase_token_words(sc)
        ii, pos = token_positions(tokenizer, cap, phr)
        imgs[i] = img
        ids[i] = ii
        for k, (m, p) in enumerate(zip(ms, pos)):
            masks[i, k] = m
            tok[i, k, : len(p)] = p
        caps.append(cap)
    return {"imgs": imgs, "masks": masks, "ids": ids, "tok": tok, "caps": caps}


def soft_masks(masks: np.ndarray, side: int) -> torch.Tensor:
    m = torch.from_numpy(masks).float()
    B, K = m.shape[:2]
    return F.adaptive_avg_pool2d(m.reshape(B * K, 1, world.IMG, world.IMG), side).reshape(B, K, side * side)


def to_tensor_img(imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------- VAE


def train_vae(data, steps: int, seed: int, bs: int = 16, lr: float = 1e-3, n_generic: int = 20000):
    """The VAE sees the world's scenes and as many generic random-colour/pattern images
    (:func:`world.render_generic`), so that it can encode what the LoRAs will teach."""
    torch.manual_seed(seed)
    vae = models.make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed + 99)
    generic = np.stack([world.render_generic(rng) for _ in range(n_generic)])
    x_all = to_tensor_img(np.concatenate([data["imgs"], generic]))
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(x_all), (bs,), generator=g)
        x = x_all[idx]
        post = vae.encode(x).latent_dist
        z = post.sample(generator=g)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for pg in opt.param_groups:
            pg["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    vae.eval()
    return vae


@torch.no_grad()
def encode_all(vae, imgs: np.ndarray, bs: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(imgs), bs):
        out.append(vae.encode(to_tensor_img(imgs[i : i + bs])).latent_dist.mean)
    return torch.cat(out)


# ----------------------------------------------------------------------------- UNet + text


class EMA:
    def __init__(self, modules, decay):
        self.decay = decay
        self.shadow = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
        self.modules = modules

    @torch.no_grad()
    def update(self, decay=None):
        d = self.decay if decay is None else decay
        for s, m in zip(self.shadow, self.modules):
            for ps, pm in zip(s.parameters(), m.parameters()):
                ps.mul_(d).add_(pm.detach(), alpha=1 - d)


def diffusion_losses(
    unet,
    text_encoder,
    store,
    sched_alphas,
    z0,
    ids,
    masks8,
    masks16,
    tok,
    g,
    p_uncond=0.1,
    uncond_ids=None,
    loc_weight=1.0,
    snr_gamma=5.0,
):
    B = z0.shape[0]
    t = torch.randint(0, 1000, (B,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    ab = sched_alphas[t].view(B, 1, 1, 1)
    zt = ab.sqrt() * z0 + (1 - ab).sqrt() * noise
    drop = torch.rand(B, generator=g) < p_uncond
    ids = ids.clone()
    if uncond_ids is not None:
        ids[drop] = uncond_ids
    enc = text_encoder(ids)[0]
    store.reset()
    pred = unet(zt, t, encoder_hidden_states=enc).sample
    snr = ab.view(B) / (1 - ab.view(B))
    w = torch.clamp(snr, max=snr_gamma) / snr
    mse = ((pred - noise) ** 2).mean((1, 2, 3))
    diff = (w * mse).mean()
    valid = (tok >= 0) & (~drop)[:, None, None]
    wt = torch.clamp(ab.view(B) * 4, max=1.0)  # little weight where the latent is pure noise
    A8 = store.level(models.RECORDED_PREFIXES)
    A16 = store.level(models.FINE_PREFIXES)
    l = models.localisation_loss(A8, masks8, tok, valid)
    if A16 is not None:  # only if the UNet has cross-attention at 16x16
        l = l + 0.5 * models.localisation_loss(A16, masks16, tok, valid)
    loc = (l * wt).mean()
    return diff, loc, diff + loc_weight * loc


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "assets" / "model")
    ap.add_argument("--work", type=Path, default=Path("/tmp/clora_base"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--vae-steps", type=int, default=1400)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--bs", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--loc-weight", type=float, default=0.2)
    ap.add_argument("--text-layers", type=int, default=1)
    ap.add_argument("--max-minutes", type=float, default=1e9, help="stop early after this wall time")
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    from transformers import CLIPTokenizer

    tok_dir = args.work / "tokenizer"
    write_tokenizer(tok_dir, world.WORDS)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)

    log("drawing data")
    data = make_dataset(args.n_train, args.seed, tokenizer, scene_kwargs={"allow_heldout": False})
    log(f"{len(data['caps'])} scenes, e.g. {data['caps'][:3]}")

    vae_dir = args.work / "vae"
    if (vae_dir / "config.json").exists():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(vae_dir).eval()
        log("loaded cached VAE")
    else:
        vae = train_vae(data, args.vae_steps, args.seed)
        vae.save_pretrained(vae_dir)
    lat = encode_all(vae, data["imgs"])
    scale = float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=scale)
    z_all = lat * scale
    with torch.no_grad():
        rec = vae.decode(lat[:256]).sample
        vae_mse = F.mse_loss(rec, to_tensor_img(data["imgs"][:256])).item()
    log(f"latents {tuple(z_all.shape)} scaling_factor {scale:.4f} vae rec mse {vae_mse:.5f}")

    masks8 = soft_masks(data["masks"], 8)
    masks16 = soft_masks(data["masks"], 16)
    ids_all = torch.from_numpy(data["ids"])
    tok_all = torch.from_numpy(data["tok"])
    uncond_ids = torch.tensor(tokenizer("", padding="max_length", max_length=77).input_ids)

    unet = models.make_unet()
    text_encoder = models.make_text_encoder(
        len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, layers=args.text_layers
    )
    store = models.install_recorder(unet, models.AttnStore())
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ema = EMA([unet, text_encoder], 0.999)
    from diffusers import DDIMScheduler, DDPMScheduler

    sched_cfg = models.make_scheduler_config()
    ddpm = DDPMScheduler(**{k: v for k, v in sched_cfg.items() if k not in ("set_alpha_to_one", "steps_offset")})
    alphas = ddpm.alphas_cumprod.float()
    g = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.time()
    hist = []

    def save(final=False):
        from diffusers import StableDiffusionPipeline
        from diffusers.models.attention_processor import AttnProcessor2_0

        u = copy.deepcopy(ema.shadow[0])
        u.set_attn_processor(AttnProcessor2_0())
        te = copy.deepcopy(ema.shadow[1])
        pipe = StableDiffusionPipeline(
            vae=copy.deepcopy(vae),
            text_encoder=te,
            tokenizer=tokenizer,
            unet=u,
            scheduler=DDIMScheduler(**sched_cfg),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.to(torch.float16)
        dst = args.out if final else args.work / "ckpt"
        pipe.save_pretrained(dst, safe_serialization=True)
        # the slow CLIPTokenizer layout (vocab.json + merges.txt), like SD 1.5's tokenizer/ folder
        for f in (dst / "tokenizer").iterdir():
            f.unlink()
        write_tokenizer(dst / "tokenizer", world.WORDS)
        (dst / "training_log.json").write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "step": step + 1,
                    "minutes": (time.time() - t_start) / 60,
                    "vae_rec_mse": vae_mse,
                    "final": final,
                    "hist": hist[-50:],
                },
                indent=1,
            )
        )
        log(f"saved {dst}")

    step = -1
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 300)
        for pg in opt.param_groups:
            pg["lr"] = lr
        idx = torch.randint(0, len(z_all), (args.bs,), generator=g)
        diff, loc, loss = diffusion_losses(
            unet,
            text_encoder,
            store,
            alphas,
            z_all[idx],
            ids_all[idx],
            masks8[idx],
            masks16[idx],
            tok_all[idx],
            g,
            uncond_ids=uncond_ids,
            loc_weight=args.loc_weight,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(decay=min(0.999, (1 + step) / (10 + step)))
        if step % 100 == 0:
            el = time.time() - t0
            hist.append({"step": step, "diff": round(diff.item(), 4), "loc": round(loc.item(), 4), "s": round(el)})
            log(f"step {step} diff {diff.item():.4f} loc {loc.item():.3f} ({el:.0f}s, {el / (step + 1):.3f}s/it)")
        if (step + 1) % args.save_every == 0:
            save()
        if (time.time() - t_start) / 60 > args.max_minutes:
            log("time budget reached")
            break
    save(final=True)
    log(f"done in {(time.time() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main()
