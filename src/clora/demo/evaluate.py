"""Measurements of the demo model: localisation of object-token attention, base-model
accuracy, LoRA presence, and the merged-LoRA baseline (plain diffusers ``set_adapters``).

    python -m clora.demo.evaluate --what all --out /tmp/clora_eval.json

All generation here uses plain diffusers (``StableDiffusionPipeline``); CLoRA itself runs
through the core pipeline in :mod:`clora.demo.bench`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline

from . import judge as J
from . import models, world

ASSETS = Path(__file__).parent / "assets"
MODEL_DIR = ASSETS / "model"
LORA_DIR = ASSETS / "loras"
CONCEPT_LORAS = ("sks_circle", "zwx_square", "pqr_triangle")
STYLE_LORA = "dark_style"
STEPS = 20
GUIDANCE = 5.0


def log(msg):
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def lora_path(name: str) -> Path:
    return LORA_DIR / f"{name}.safetensors"


def load_pipe(model_dir: Path = MODEL_DIR, loras: Sequence[str] = ()):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(model_dir), safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    for name in loras:
        pipe.load_lora_weights(str(lora_path(name)), adapter_name=name)
    return pipe


def use_adapters(pipe, names: Sequence[str], weights: Sequence[float] | None = None):
    if names:
        pipe.enable_lora()
        pipe.set_adapters(list(names), list(weights) if weights is not None else [1.0] * len(names))
    elif getattr(pipe.unet, "peft_config", None):
        pipe.disable_lora()


@torch.no_grad()
def sample(
    pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int = STEPS, guidance: float = GUIDANCE, chunk: int = 64
) -> np.ndarray:
    """Images (N, 32, 32, 3) uint8; seed i gives the same initial noise as CLoRA with seed i."""
    out = []
    for i in range(0, len(prompts), chunk):
        p = list(prompts[i : i + chunk])
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i : i + chunk]]
        # the parent's __call__, so a CLoRAPipeline samples as plain Stable Diffusion too
        im = StableDiffusionPipeline.__call__(
            pipe,
            prompt=p,
            generator=gens,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=world.IMG,
            width=world.IMG,
            output_type="np",
        ).images
        out.append((np.clip(im, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


# ----------------------------------------------------------------------------- localisation


def _token_pos(tokenizer, caption, scene):
    from .train_base import token_positions

    return token_positions(tokenizer, caption, world.phrase_token_words(scene))


def heldout_pairs() -> list[tuple]:
    out = []
    for s1, s2 in itertools.combinations(world.SHAPES, 2):
        for c1, c2 in itertools.product(world.COLORS, world.COLORS):
            objs = [world.Obj(s1, c1), world.Obj(s2, c2)]
            if world.is_heldout(objs):
                out.append(((c1, s1), (c2, s2)))
    return out


def _loc_stats(A: torch.Tensor, m_own: torch.Tensor, m_other: torch.Tensor | None, k: int):
    a = A[:, k]
    a = a / a.sum().clamp(min=1e-12)
    own = float((a * m_own).sum())
    mult = own / float(m_own.mean().clamp(min=1e-6))
    other = float((a * m_other).sum()) if m_other is not None else None
    return mult, own, other


@torch.no_grad()
def localisation_noised(pipe, n: int = 128, ts=(100, 300, 500, 700), seed: int = 11) -> dict:
    """Attention at the recorded (8x8) level for drawn two-object scenes of held-out colour/shape
    pairs, noised to timestep t: share of each object word's attention mass on its own object
    as a multiple of the object's area fraction, and how often own > other object."""
    from .train_base import encode_all, soft_masks

    use_adapters(pipe, [])
    rng = np.random.default_rng(seed)
    pairs = heldout_pairs()
    scenes = []
    for i in range(n):
        (c1, s1), (c2, s2) = pairs[i % len(pairs)]
        scenes.append(world.sample_scene(rng, shapes=[s1, s2], colors=[c1, c2]))
    imgs = np.stack([world.render(s)[0] for s in scenes])
    masks = np.stack([np.stack(world.render(s)[1]) for s in scenes])
    m8 = soft_masks(masks, 8)
    z0 = encode_all(pipe.vae, imgs) * pipe.vae.config.scaling_factor
    caps = [s.caption() for s in scenes]
    pos = [_token_pos(pipe.tokenizer, c, s)[1] for c, s in zip(caps, scenes)]
    ids = torch.tensor([pipe.tokenizer(c, padding="max_length", max_length=77).input_ids for c in caps])
    enc = pipe.text_encoder(ids)[0]
    store = models.AttnStore()
    orig = pipe.unet.attn_processors
    models.install_recorder(pipe.unet, store, models.RECORDED_PREFIXES)
    g = torch.Generator().manual_seed(seed)
    res = {}
    try:
        for t in ts:
            ab = pipe.scheduler.alphas_cumprod[t].float()
            zt = ab.sqrt() * z0 + (1 - ab).sqrt() * torch.randn(z0.shape, generator=g)
            store.reset()
            pipe.unet(zt, torch.full((n,), t), encoder_hidden_states=enc)
            A = store.level(models.RECORDED_PREFIXES)  # (n, 64, 77)
            res[f"t{t}"] = _summarise([(A[i].T, m8[i], pos[i]) for i in range(n)])
    finally:
        pipe.unet.set_attn_processor(orig)
    return res


def _summarise(items) -> dict:
    """items: (A (tokens, HW), masks (K, HW), positions per object [[colour?, shape]])."""
    noun_mult, col_mult, noun_win, col_win, scene_win = [], [], [], [], []
    for A, m, pos in items:
        K = len(pos)
        all_ok = True
        for k in range(K):
            other = sum(m[j] for j in range(K) if j != k) if K > 1 else None
            for role, p in (("noun", pos[k][-1]), ("colour", pos[k][0] if len(pos[k]) > 1 else None)):
                if p is None:
                    continue
                a = A[p] / A[p].sum().clamp(min=1e-12)
                own = float((a * m[k]).sum())
                mult = own / max(float(m[k].mean()), 1e-6)
                win = None if other is None else own > float((a * other).sum())
                (noun_mult if role == "noun" else col_mult).append(mult)
                if win is not None:
                    (noun_win if role == "noun" else col_win).append(win)
                    if role == "noun":
                        all_ok &= win
        scene_win.append(all_ok)
    f = lambda x: round(float(np.mean(x)), 3) if x else None
    return {
        "noun_multiple": f(noun_mult),
        "noun_multiple_median": round(float(np.median(noun_mult)), 3) if noun_mult else None,
        "colour_multiple": f(col_mult),
        "noun_own_gt_other": f(noun_win),
        "colour_own_gt_other": f(col_win),
        "scenes_all_nouns_own_gt_other": f(scene_win),
        "n": len(items),
    }


@torch.no_grad()
def localisation_generated(pipe, n: int = 64, seed0: int = 0) -> dict:
    """The same statistics during sampling: maps at the recorded level (prompt half of CFG,
    averaged over all steps) for held-out two-object prompts; object masks are the objects the
    judge found in the final image (scenes where both objects were found)."""
    use_adapters(pipe, [])
    pairs = heldout_pairs()
    store = models.AttnStore()
    orig = pipe.unet.attn_processors
    models.install_recorder(pipe.unet, store, models.RECORDED_PREFIXES)
    items, found = [], 0
    try:
        for i in range(n):
            (c1, s1), (c2, s2) = pairs[i % len(pairs)]
            sc = world.Scene([world.Obj(s1, c1), world.Obj(s2, c2)])
            cap = sc.caption()
            _, pos = _token_pos(pipe.tokenizer, cap, sc)
            store.reset()
            img = sample(pipe, [cap], [seed0 + i])[0]
            maps = []
            for name, lst in store.maps.items():
                h = store.heads[name]
                for p in lst:  # (2*heads, HW, T): [uncond, cond]
                    maps.append(p.reshape(2, h, *p.shape[1:])[1].mean(0))
            A = torch.stack(maps).mean(0).T  # (T, HW)
            v = J.judge(img, J.expects_for_scene(sc))
            comps = v.components
            # recover which component each object matched
            ok = [[J._matches(e, c) for c in comps] for e in J.expects_for_scene(sc)]
            idx = []
            for k in range(2):
                cand = [j for j in range(len(comps)) if ok[k][j]]
                idx.append(cand[0] if cand else None)
            if None in idx or idx[0] == idx[1]:
                continue
            found += 1
            m = torch.stack(
                [F.adaptive_avg_pool2d(torch.from_numpy(comps[j].mask).float()[None, None], 8).flatten() for j in idx]
            )
            items.append((A, m, pos))
    finally:
        pipe.unet.set_attn_processor(orig)
    out = _summarise(items) if items else {}
    out["both_found"] = found / n
    return out


# ----------------------------------------------------------------------------- quality


def base_quality(pipe, seeds: int = 8) -> dict:
    use_adapters(pipe, [])
    singles = [(c, s) for c in world.COLORS for s in world.SHAPES]
    prompts, exps, sd = [], [], []
    for c, s in singles:
        for k in range(seeds):
            prompts.append(f"a {c} {s}"), exps.append([J.Expect(s, c)]), sd.append(1000 + k)
    imgs = sample(pipe, prompts, sd)
    single = np.mean([J.judge(im, e).passed for im, e in zip(imgs, exps)])
    prompts, exps, sd = [], [], []
    for (c1, s1), (c2, s2) in heldout_pairs():
        for k in range(seeds):
            prompts.append(f"a {c1} {s1} and a {c2} {s2}"), exps.append([J.Expect(s1, c1), J.Expect(s2, c2)])
            sd.append(2000 + k)
    imgs = sample(pipe, prompts, sd)
    pair = np.mean([J.judge(im, e).passed for im, e in zip(imgs, exps)])
    return {
        "single_object_pass": round(float(single), 3),
        "heldout_pairs_pass": round(float(pair), 3),
        "n_single": len(singles) * seeds,
        "n_pairs": len(prompts),
    }


def lora_presence(pipe, name: str, seeds: int = 64) -> dict:
    """Share of samples of 'a <trigger> <shape>' that show the concept, with and without its LoRA."""
    c = world.CONCEPTS[name]
    prompts = [f"a {c.phrase}"] * seeds
    sd = list(range(3000, 3000 + seeds))
    exp = [J.Expect(c.shape, concept=name)]
    res = {}
    for on in (True, False):
        use_adapters(pipe, [name] if on else [])
        imgs = sample(pipe, prompts, sd)
        res["with_lora" if on else "without_lora"] = round(
            float(np.mean([J.judge(im, exp).objects[0].present for im in imgs])), 3
        )
    use_adapters(pipe, [])
    return res


def style_effect(pipe, seeds: int = 32) -> dict:
    rng = np.random.default_rng(5)
    scenes = [world.sample_scene(rng, n_objects=int(rng.integers(1, 3))) for _ in range(seeds)]
    prompts = [s.caption() for s in scenes]
    sd = list(range(4000, 4000 + seeds))
    res = {}
    for on in (True, False):
        use_adapters(pipe, [STYLE_LORA] if on else [])
        imgs = sample(pipe, prompts, sd)
        vs = [J.judge(im, J.expects_for_scene(s), style="dark") for im, s in zip(imgs, scenes)]
        key = "with_lora" if on else "without_lora"
        res[key + "_dark_background"] = round(float(np.mean([v.style_ok for v in vs])), 3)
        res[key + "_objects_ok"] = round(
            float(np.mean([all(o.present for o in v.objects) and v.extras == 0 for v in vs])), 3
        )
    use_adapters(pipe, [])
    return res


def compositions(two_only: bool = False) -> list[tuple]:
    out = [tuple(c) for c in itertools.combinations(CONCEPT_LORAS, 2)]
    if not two_only:
        out.append(tuple(CONCEPT_LORAS))
    return out


def composition_prompts(names: Sequence[str]):
    """(base prompt, merged prompt, expects) for a tuple of concept names."""
    cs = [world.CONCEPTS[n] for n in names]
    base = world.join_phrases([c.shape for c in cs])
    merged = world.join_phrases([c.phrase for c in cs])
    return base, merged, [J.Expect(c.shape, concept=c.name) for c in cs]


def merged_benchmark(pipe, comps, seeds: int) -> list[dict]:
    """Plain LoRA merging: all concept LoRAs on at weight 1, prompt with every trigger."""
    rows = []
    for names in comps:
        _, prompt, exp = composition_prompts(names)
        use_adapters(pipe, list(names))
        imgs = sample(pipe, [prompt] * seeds, list(range(seeds)))
        for s, im in enumerate(imgs):
            v = J.judge(im, exp)
            rows.append(
                {
                    "method": "merged",
                    "composition": "+".join(names),
                    "seed": s,
                    "passed": v.passed,
                    "present": sum(o.present for o in v.objects),
                    "leaked": sum(o.leaked for o in v.objects),
                    "extras": v.extras,
                }
            )
    use_adapters(pipe, [])
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", default="all")
    ap.add_argument("--out", type=Path, default=Path("/tmp/clora_eval.json"))
    ap.add_argument("--model", type=Path, default=MODEL_DIR)
    ap.add_argument("--seeds", type=int, default=64)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    what = set(args.what.split(","))
    res = json.loads(args.out.read_text()) if args.out.exists() else {}
    loras = [n for n in CONCEPT_LORAS + (STYLE_LORA,) if lora_path(n).exists()]
    pipe = load_pipe(args.model, loras)
    use_adapters(pipe, [])
    t0 = time.time()

    def save(key, val):
        res[key] = val
        args.out.write_text(json.dumps(res, indent=1))
        log(f"{key}: {val} ({time.time() - t0:.0f}s)")

    if what & {"all", "judge"}:
        save("judge_validation", J.validate(300))
    if what & {"all", "loc"}:
        save("localisation_noised", localisation_noised(pipe))
        save("localisation_generated", localisation_generated(pipe))
    if what & {"all", "base"}:
        save("base_quality", base_quality(pipe))
    if what & {"all", "lora"}:
        for n in loras:
            if n in world.CONCEPTS:
                save(f"presence_{n}", lora_presence(pipe, n, args.seeds))
        if STYLE_LORA in loras:
            save("style", style_effect(pipe))
    if what & {"merged"}:
        rows = merged_benchmark(pipe, compositions(), args.seeds)
        save(
            "merged",
            {
                c: float(np.mean([r["passed"] for r in rows if r["composition"] == c]))
                for c in sorted({r["composition"] for r in rows})
            },
        )


if __name__ == "__main__":
    main()
