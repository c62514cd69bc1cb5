"""Train the demo LoRAs on top of the embedded base model.

    python -m clora.demo.train_lora --name sks_circle      # concept LoRA, trigger "sks"
    python -m clora.demo.train_lora --name zwx_square
    python -m clora.demo.train_lora --name pqr_triangle
    python -m clora.demo.train_lora --name dark_style      # style LoRA (no trigger word)

UNet-only rank-8 LoRAs (peft, diffusers key format) on the attention, projection and
feed-forward layers of the UNet's transformer blocks, trained like a DreamBooth LoRA: concept
LoRAs see only images of their subject alone ("a sks circle"), the style LoRA sees ordinary
scenes with a dark navy background and ordinary captions.  The same localisation loss as in
base training keeps the trigger/shape tokens' cross-attention on the subject.  Saved in fp16
as ``assets/loras/<name>.safetensors``, loadable with ``pipe.load_lora_weights``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from . import models, world
from .train_base import encode_all, log, make_dataset, soft_masks

ASSETS = Path(__file__).parent / "assets"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def load_base(model_dir, dtype=torch.float32):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(model_dir), safety_checker=None, requires_safety_checker=False, torch_dtype=dtype
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True, help="sks_circle | zwx_square | pqr_triangle | dark_style")
    ap.add_argument("--model", type=Path, default=ASSETS / "model")
    ap.add_argument("--out-dir", type=Path, default=ASSETS / "loras")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--loc-weight", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()
    pipe = load_base(args.model)
    tokenizer, te, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet

    if args.name == "dark_style":
        kw = {"background": world.STYLE_BACKGROUND}
    else:
        c = world.CONCEPTS[args.name]
        kw = {"n_objects": 1, "shapes": [c.shape], "concepts": [args.name]}
    data = make_dataset(args.n_train, args.seed + 1000, tokenizer, scene_kwargs=kw)
    log(f"{args.name}: {len(data['caps'])} images, e.g. {data['caps'][:3]}")
    with torch.no_grad():
        z_all = encode_all(vae, data["imgs"]) * vae.config.scaling_factor
        ids = torch.from_numpy(data["ids"])
        uniq, inv = torch.unique(ids, dim=0, return_inverse=True)
        enc_u = torch.cat([te(uniq[i : i + 256])[0] for i in range(0, len(uniq), 256)])
    masks8 = soft_masks(data["masks"], 8)
    tok_all = torch.from_numpy(data["tok"])

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    )
    store = models.install_recorder(unet, models.AttnStore())
    params = [p for p in unet.parameters() if p.requires_grad]
    log(f"LoRA params: {sum(p.numel() for p in params)}")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    alphas = pipe.scheduler.alphas_cumprod.float()
    g = torch.Generator().manual_seed(args.seed + 7)
    unet.train()
    for step in range(args.steps):
        idx = torch.randint(0, len(z_all), (args.bs,), generator=g)
        z0 = z_all[idx]
        B = z0.shape[0]
        t = torch.randint(0, 1000, (B,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        ab = alphas[t].view(B, 1, 1, 1)
        zt = ab.sqrt() * z0 + (1 - ab).sqrt() * noise
        store.reset()
        pred = unet(zt, t, encoder_hidden_states=enc_u[inv[idx]]).sample
        snr = ab.view(B) / (1 - ab.view(B))
        w = torch.clamp(snr, max=5.0) / snr
        diff = (w * ((pred - noise) ** 2).mean((1, 2, 3))).mean()
        tok = tok_all[idx]
        loc = (
            models.localisation_loss(store.level(models.RECORDED_PREFIXES), masks8[idx], tok, tok >= 0)
            * torch.clamp(ab.view(B) * 4, max=1.0)
        ).mean()
        loss = diff + args.loc_weight * loc
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for pg in opt.param_groups:
            pg["lr"] = args.lr * min(1.0, (step + 1) / 50)
        if step % 50 == 0 or step == args.steps - 1:
            log(f"step {step} diff {diff.item():.4f} loc {loc.item():.3f}")
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        args.out_dir, unet_lora_layers=sd, weight_name=f"{args.name}.safetensors", safe_serialization=True
    )
    log(f"saved {args.out_dir / (args.name + '.safetensors')} in {(time.time() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main()
