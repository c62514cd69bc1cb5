"""Train the Flux demo model (transformer + T5) and its LoRAs on the synthetic world.

    python -m clora.demo.train_flux base --max-minutes 38
    python -m clora.demo.train_flux lora --name sks_circle      # also zwx_square, pqr_triangle, dark_style

Seeded and single-threaded. The VAE and the CLIP text encoder are the SD demo's, frozen; the
transformer and the T5 encoder train jointly with the rectified-flow loss (x_t = (1-t) x0 + t eps,
target eps - x0, t logit-normal, the transformer's timestep input t as FluxPipeline passes it) at a
constant guidance input of 3.5, 10% caption dropout, EMA 0.999, and the SD demo's localisation loss
(cross-entropy between each object word's map and its object's mask) on the image->text attention
of every block, read by the pipeline's own recorder (``recording_joint_attention``, joint softmax as
the model computes it). LoRAs: transformer-only, rank 8, trained like the SD demo's.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
from pathlib import Path

import torch
from diffusers import FluxPipeline

from ..joint_attention import recording_joint_attention
from . import flux_model as FM
from . import models, world
from .train_base import EMA, encode_all, log, make_dataset, soft_masks

GRID = 8  # packed token grid side
LORA_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
]


def t5_data(tokenizer_2, data: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 ids of the captions and each object word's T5 position: the CLIP position - 1 (no BOS), checked."""
    ids = torch.tensor(
        tokenizer_2(data["caps"], padding="max_length", max_length=FM.T5_LENGTH, truncation=True).input_ids
    )
    tok = torch.from_numpy(data["tok"]) - 1
    tok[torch.from_numpy(data["tok"]) < 0] = -1
    for i in range(0, len(ids), 97):  # a sample of captions: the words sit where the CLIP positions say
        words = data["caps"][i].replace(",", " ,").split()
        pieces = tokenizer_2.convert_ids_to_tokens(ids[i].tolist())
        if pieces[: len(words)] != [w if w == "," else f"▁{w}" for w in words]:
            raise ValueError(f"T5 pieces {pieces} do not spell {data['caps'][i]!r}")
    return ids, tok


@torch.no_grad()
def clip_pooled(clip, tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled CLIP embeddings of the unique captions and each caption's index into them."""
    unique = sorted(set(captions))
    index = {c: i for i, c in enumerate(unique)}
    pooled = []
    for i in range(0, len(unique), 256):
        ids = tokenizer(unique[i : i + 256], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        pooled.append(clip(ids.input_ids).pooler_output)
    return torch.cat(pooled), torch.tensor([index[c] for c in captions])


def flow_losses(transformer, t5, z0, t5_ids, pooled, masks, tok, valid, g, blocks, loc_weight):
    """Rectified-flow loss and the localisation loss over ``blocks`` (mean of each block's loss)."""
    rows = z0.shape[0]
    t = torch.sigmoid(torch.randn(rows, generator=g))
    noise = torch.randn(z0.shape, generator=g)
    tt = t.view(rows, 1, 1, 1)
    zt = (1 - tt) * z0 + tt * noise
    packed = FluxPipeline._pack_latents(zt, rows, 4, 2 * GRID, 2 * GRID)
    target = FluxPipeline._pack_latents(noise - z0, rows, 4, 2 * GRID, 2 * GRID)
    image_ids = FluxPipeline._prepare_latent_image_ids(rows, GRID, GRID, z0.device, z0.dtype)
    text = t5(t5_ids)[0]
    with contextlib.ExitStack() as stack:
        recorders = [
            stack.enter_context(recording_joint_attention(transformer, [b], FM.T5_LENGTH, (GRID, GRID), 1, "joint"))
            for b in blocks
        ]
        pred = transformer(
            hidden_states=packed,
            timestep=t,
            guidance=torch.full([rows], FM.TRAIN_GUIDANCE),
            pooled_projections=pooled,
            encoder_hidden_states=text,
            txt_ids=torch.zeros(FM.T5_LENGTH, 3),
            img_ids=image_ids,
            return_dict=False,
        )[0]
        maps = [r.pop() for r in recorders]
    flow = ((pred - target) ** 2).mean()
    signal = (1 - t) ** 2 / ((1 - t) ** 2 + t**2)  # SD's alpha_bar at the same signal-to-noise ratio
    weight = torch.clamp(signal * 4, max=1.0)  # little weight where the latent is nearly pure noise
    loc = torch.stack([models.localisation_loss(a, masks, tok, valid) for a in maps]).mean(0)
    loc = (loc * weight).mean()
    return flow, loc, flow + loc_weight * loc


def save_pipeline(out: Path, transformer, t5, tokenizer_2) -> None:
    vae, clip, tokenizer = FM.load_sd_parts()
    pipe = FluxPipeline(
        scheduler=FM.make_scheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=copy.deepcopy(t5),
        tokenizer_2=tokenizer_2,
        transformer=copy.deepcopy(transformer),
    )
    pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)


def base(args: argparse.Namespace) -> None:
    t_start = time.time()
    vae, clip, tokenizer = FM.load_sd_parts()
    tokenizer_2 = FM.build_t5_tokenizer()
    log("drawing data")
    data = make_dataset(args.n_train, args.seed, tokenizer, scene_kwargs={"allow_heldout": False})
    t5_ids, tok_all = t5_data(tokenizer_2, data)
    z_all = encode_all(vae, data["imgs"]) * vae.config.scaling_factor
    pooled_u, pooled_idx = clip_pooled(clip, tokenizer, data["caps"] + [""])
    empty_ids = torch.tensor(tokenizer_2("", padding="max_length", max_length=FM.T5_LENGTH).input_ids)
    masks = soft_masks(data["masks"], GRID)
    log(f"{len(z_all)} scenes, latents {tuple(z_all.shape)}, {time.time() - t_start:.0f}s")

    transformer = FM.make_transformer()
    t5 = FM.make_t5_encoder(len(tokenizer_2))
    params = list(transformer.parameters()) + list(t5.parameters())
    log(
        f"parameters: transformer {sum(p.numel() for p in transformer.parameters())}, T5 {sum(p.numel() for p in t5.parameters())}"
    )
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ema = EMA([transformer, t5], 0.999)
    g = torch.Generator().manual_seed(args.seed + 1)
    hist, t0, step = [], time.time(), -1

    def save(final: bool) -> None:
        dst = args.out if final else args.work / "ckpt"
        save_pipeline(dst, ema.shadow[0], ema.shadow[1], tokenizer_2)
        record = {"args": {k: str(v) for k, v in vars(args).items() if k != "func"}, "step": step + 1}
        record |= {"minutes": round((time.time() - t_start) / 60, 1), "final": final, "hist": hist[-60:]}
        (dst / "training_log.json").write_text(json.dumps(record, indent=1))
        log(f"saved {dst}")

    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 300)
        idx = torch.randint(0, len(z_all), (args.bs,), generator=g)
        drop = torch.rand(args.bs, generator=g) < 0.1
        ids = torch.where(drop[:, None], empty_ids, t5_ids[idx])
        pooled = pooled_u[torch.where(drop, pooled_idx[-1], pooled_idx[idx])]
        tok = tok_all[idx]
        valid = (tok >= 0) & ~drop[:, None, None]
        flow, loc, loss = flow_losses(
            transformer, t5, z_all[idx], ids, pooled, masks[idx], tok, valid, g, FM.RECORDABLE_BLOCKS, args.loc_weight
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(decay=min(0.999, (1 + step) / (10 + step)))
        if step % 100 == 0:
            el = time.time() - t0
            hist.append({"step": step, "flow": round(flow.item(), 4), "loc": round(loc.item(), 4), "s": round(el)})
            log(f"step {step} flow {flow.item():.4f} loc {loc.item():.3f} ({el:.0f}s, {el / (step + 1):.3f}s/it)")
        if (step + 1) % args.save_every == 0:
            save(False)
        if (time.time() - t_start) / 60 > args.max_minutes:
            log("time budget reached")
            break
    save(True)
    log(f"done in {(time.time() - t_start) / 60:.1f} min")


def lora(args: argparse.Namespace) -> None:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    t_start = time.time()
    pipe = FluxPipeline.from_pretrained(str(args.model), torch_dtype=torch.float32)
    transformer, t5 = pipe.transformer, pipe.text_encoder_2.eval()
    if args.name == "dark_style":
        kw = {"background": world.STYLE_BACKGROUND}
    else:
        kw = {"n_objects": 1, "shapes": [world.CONCEPTS[args.name].shape], "concepts": [args.name]}
    data = make_dataset(args.n_train, args.seed + 1000, pipe.tokenizer, scene_kwargs=kw)
    log(f"{args.name}: {len(data['caps'])} images, e.g. {data['caps'][:3]}")
    t5_ids, tok_all = t5_data(pipe.tokenizer_2, data)
    z_all = encode_all(pipe.vae, data["imgs"]) * pipe.vae.config.scaling_factor
    pooled_u, pooled_idx = clip_pooled(pipe.text_encoder, pipe.tokenizer, data["caps"])
    masks = soft_masks(data["masks"], GRID)
    t5.requires_grad_(False)
    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    )
    params = [p for p in transformer.parameters() if p.requires_grad]
    log(f"LoRA params: {sum(p.numel() for p in params)}")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 7)
    transformer.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 50)
        idx = torch.randint(0, len(z_all), (args.bs,), generator=g)
        tok = tok_all[idx]
        flow, loc, loss = flow_losses(
            transformer,
            t5,
            z_all[idx],
            t5_ids[idx],
            pooled_u[pooled_idx[idx]],
            masks[idx],
            tok,
            tok >= 0,
            g,
            FM.RECORDABLE_BLOCKS,
            args.loc_weight,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            log(f"step {step} flow {flow.item():.4f} loc {loc.item():.3f}")
    weights = {k: v.detach().to(torch.float16).contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
    FluxPipeline.save_lora_weights(
        args.out_dir, transformer_lora_layers=weights, weight_name=f"{args.name}.safetensors", safe_serialization=True
    )
    log(f"saved {args.out_dir / (args.name + '.safetensors')} in {(time.time() - t_start) / 60:.1f} min")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(required=True)
    b = sub.add_parser("base")
    b.set_defaults(func=base)
    b.add_argument("--out", type=Path, default=FM.FLUX_MODEL_DIR)
    b.add_argument("--work", type=Path, default=Path("/tmp/clora_flux"))
    b.add_argument("--n-train", type=int, default=20000)
    b.add_argument("--steps", type=int, default=100000)
    b.add_argument("--bs", type=int, default=64)
    b.add_argument("--lr", type=float, default=1e-3)
    b.add_argument("--max-minutes", type=float, default=1e9, help="stop early after this wall time")
    b.add_argument("--save-every", type=int, default=500)
    lo = sub.add_parser("lora")
    lo.set_defaults(func=lora)
    lo.add_argument("--name", required=True, help="sks_circle | zwx_square | pqr_triangle | dark_style")
    lo.add_argument("--model", type=Path, default=FM.FLUX_MODEL_DIR)
    lo.add_argument("--out-dir", type=Path, default=FM.FLUX_LORA_DIR)
    lo.add_argument("--n-train", type=int, default=2000)
    lo.add_argument("--steps", type=int, default=400)
    lo.add_argument("--bs", type=int, default=32)
    lo.add_argument("--lr", type=float, default=1e-3)
    lo.add_argument("--rank", type=int, default=8)
    for p in (b, lo):
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--loc-weight", type=float, default=0.2)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    args.func(args)


if __name__ == "__main__":
    main()
