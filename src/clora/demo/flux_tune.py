"""Choose the Flux demo's CLoRA defaults by measurement: recorded blocks, softmax, update schedule.

    python -m clora.demo.flux_tune --seeds 33 --csv flux-tune.csv

Each row changes one thing from the reference (``FLUX_CLORA_SETTINGS``, the pipeline's
``recorded_blocks`` and ``attention_softmax``) and runs CLoRA on the three two-concept compositions,
the seeds split among them (seeds from 1000 on: the benchmark's seeds 0..63 are never used to tune),
judged like the benchmark. Prints the table (pass rate, all present, any leak) and writes it as CSV.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from . import flux_model as FM
from . import judge as J
from . import world
from .bench import _write_csv, clora_spec, load_clora_pipe, to_uint8
from .evaluate import CONCEPT_LORAS, composition_prompts, compositions

DOUBLE = [f"transformer_blocks.{i}" for i in range(FM.TRANSFORMER_CONFIG["num_layers"])]
SINGLE = [f"single_transformer_blocks.{i}" for i in range(FM.TRANSFORMER_CONFIG["num_single_layers"])]
BLOCKS = {
    "double, second half": DOUBLE[len(DOUBLE) // 2 :],
    "double, all": DOUBLE,
    "single": SINGLE,
    "double + single": DOUBLE + SINGLE,
}
VARIANTS: list[tuple[str, dict]] = [
    ("reference", {}),
    ("blocks: double, all", {"blocks": "double, all"}),
    ("blocks: single", {"blocks": "single"}),
    ("softmax: joint", {"softmax": "joint"}),
    ("step_size 0 (masked fusion only)", {"step_size": 0.0}),
    ("step_size 10", {"step_size": 10.0}),
    ("step_size 40", {"step_size": 40.0}),
    ("max_iter_to_alter 5", {"max_iter_to_alter": 5}),
    ("max_iter_to_alter 15", {"max_iter_to_alter": 15}),
    ("no iterative refinement", {"iterative_iters": 0}),
    ("step_size 80", {"step_size": 80.0}),
    ("step_size 40, softmax: joint", {"step_size": 40.0, "softmax": "joint"}),
    ("step_size 40, blocks: single, softmax: joint", {"step_size": 40.0, "blocks": "single", "softmax": "joint"}),
    ("step_size 40, mask_threshold 0.6", {"step_size": 40.0, "mask_threshold": 0.6}),
    ("merge (baseline)", {"method": "merge"}),
    ("switch (baseline)", {"method": "switch"}),
    ("composite (baseline)", {"method": "composite"}),
]
SEED0 = 1000


def measure(
    pipe,
    seeds: int,
    blocks: str = "double, second half",
    softmax: str = "text",
    method: str = "clora",
    seed0: int = SEED0,
    **settings,
) -> dict:
    """CLoRA's pass rate over the two-concept compositions with ``seeds`` seeds split among them."""
    pipe.recorded_blocks = lambda: BLOCKS[blocks]  # the instance's choice shadows the class's
    pipe.attention_softmax = softmax
    comps = compositions(two_only=True)
    passed, present, leaked, separated = [], [], [], []
    for k, names in enumerate(comps):
        count = seeds // len(comps) + (k < seeds % len(comps))
        first = seed0 + sum(seeds // len(comps) + (j < seeds % len(comps)) for j in range(k))
        _, _, expects = composition_prompts(names)
        result = pipe(clora_spec(names, first, family="flux", num_images=count, method=method, **settings))
        for image in result.images:
            verdict = J.judge(to_uint8(image), expects)
            passed.append(verdict.passed)
            present.append(all(o.present for o in verdict.objects))
            leaked.append(any(o.leaked for o in verdict.objects))
            separated.append(concepts_separated(verdict, names))
    return {
        "images": len(passed),
        "pass_rate": round(float(np.mean(passed)), 3),
        "all_present": round(float(np.mean(present)), 3),
        "any_leak": round(float(np.mean(leaked)), 3),
        "separated": round(float(np.mean(separated)), 3),
    }


def concepts_separated(verdict: J.Verdict, names: tuple[str, ...]) -> bool:
    """Shape-blind: every concept's colour pattern is the appearance of exactly one object (the judge's
    appearance classifier on its components)."""
    shown = [J.appearance(c) for c in verdict.components]
    return all(shown.count(n) == 1 for n in names)


@torch.no_grad()
def localisation(pipe, n: int = 128, ts: tuple[float, ...] = (0.3, 0.5, 0.7)) -> list[dict]:
    """How well each block group's maps sit on their objects, per softmax, on drawn two-object scenes
    noised to t: the shape word's attention mass on its own object / the object's area fraction (the
    multiple; chance 1x) and the share of shape words with more mass on their own object than the other."""
    from diffusers import FluxPipeline

    from ..joint_attention import recording_joint_attention
    from .train_base import encode_all, make_dataset, soft_masks
    from .train_flux import GRID, clip_pooled, t5_data

    data = make_dataset(n, 11, pipe.tokenizer, scene_kwargs={"n_objects": 2})
    t5_ids, tok = t5_data(pipe.tokenizer_2, data)
    z0 = encode_all(pipe.vae, data["imgs"]) * pipe.vae.config.scaling_factor
    pooled, index = clip_pooled(pipe.text_encoder, pipe.tokenizer, data["caps"])
    masks = soft_masks(data["masks"], GRID)[:, :2]  # (n, 2, 64)
    shape_pos = tok[:, :2].amax(-1)  # the shape word is each object's last word
    text = pipe.text_encoder_2(t5_ids)[0]
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    rows = []
    for t in ts:
        zt = (1 - t) * z0 + t * noise
        for blocks, names in BLOCKS.items():
            for softmax in ("text", "joint"):
                with recording_joint_attention(
                    pipe.transformer, names, FM.T5_LENGTH, (GRID, GRID), 1, softmax
                ) as recorder:
                    pipe.transformer(
                        hidden_states=FluxPipeline._pack_latents(zt, n, 4, 2 * GRID, 2 * GRID),
                        timestep=torch.full([n], t),
                        guidance=torch.full([n], FM.TRAIN_GUIDANCE),
                        pooled_projections=pooled[index],
                        encoder_hidden_states=text,
                        txt_ids=torch.zeros(FM.T5_LENGTH, 3),
                        img_ids=FluxPipeline._prepare_latent_image_ids(n, GRID, GRID, z0.device, z0.dtype),
                    )
                    maps = recorder.pop()  # (n, 64, tokens)
                word = torch.gather(maps, 2, shape_pos[:, None, :].expand(n, maps.shape[1], 2)).transpose(1, 2)
                word = word / word.sum(-1, keepdim=True)  # (n, 2 objects, 64), normalised over the grid
                own = (word * (masks > 0.5)).sum(-1)
                other = (word * (masks.flip(1) > 0.5)).sum(-1)
                area = (masks > 0.5).float().mean(-1).clamp(min=1 / 64)
                rows.append(
                    {
                        "t": t,
                        "blocks": blocks,
                        "softmax": softmax,
                        "multiple": round(float((own / area).mean()), 2),
                        "own > other": round(float((own > other).float().mean()), 3),
                    }
                )
    return rows


@torch.no_grad()
def sample(pipe, prompts: list[str], seeds: list[int]) -> np.ndarray:
    """Plain FluxPipeline sampling with the demo's steps and guidance, (N, 32, 32, 3) uint8."""
    from diffusers import FluxPipeline

    images = FluxPipeline.__call__(
        pipe,
        prompt=prompts,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        num_inference_steps=FM.FLUX_CLORA_SETTINGS["steps"],
        guidance_scale=FM.FLUX_CLORA_SETTINGS["guidance"],
        height=world.IMG,
        width=world.IMG,
        max_sequence_length=FM.T5_LENGTH,
        output_type="np",
    ).images
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def quality(pipe, seeds: int) -> dict:
    """The base model on single-object captions (12 colour x shape) and each concept LoRA alone ("a sks
    circle"): share of images the judge passes, with the LoRA and without."""
    pairs = [(c, s) for c in world.COLORS for s in world.SHAPES]
    prompts = [f"a {c} {s}" for c, s in pairs for _ in range(seeds // 4)]
    images = sample(pipe, prompts, [SEED0 + i for i in range(len(prompts))])
    expects = [[J.Expect(s, c)] for c, s in pairs for _ in range(seeds // 4)]
    out = {"base single object": float(np.mean([J.judge(i, e).passed for i, e in zip(images, expects)]))}
    for name in CONCEPT_LORAS:
        concept = world.CONCEPTS[name]
        prompts, expects = [f"a {concept.phrase}"] * seeds, [J.Expect(concept.shape, concept=name)]
        without = sample(pipe, prompts, list(range(SEED0, SEED0 + seeds)))
        pipe.load_lora_weights(str(FM.FLUX_LORA_DIR / f"{name}.safetensors"), adapter_name=name)
        with_lora = sample(pipe, prompts, list(range(SEED0, SEED0 + seeds)))
        pipe.delete_adapters(name)
        out[f"{name} with / without"] = tuple(
            float(np.mean([J.judge(i, expects).passed for i in x])) for x in (with_lora, without)
        )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=33, help="images per variant, split over the three pairs")
    ap.add_argument("--csv", type=Path, default=Path("flux-tune.csv"))
    ap.add_argument("--seed0", type=int, default=SEED0, help="first seed (the benchmark's: 0)")
    ap.add_argument("--only", help="semicolon-separated variant names to run (default: all)")
    ap.add_argument("--localisation", action="store_true", help="measure each block group's maps instead")
    ap.add_argument("--quality", action="store_true", help="measure the base model and the LoRAs alone instead")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pipe = load_clora_pipe(FM.FLUX_MODEL_DIR)
    if args.localisation:
        rows = localisation(pipe)
        print("| t | blocks | softmax | multiple | own > other |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['t']} | {r['blocks']} | {r['softmax']} | {r['multiple']}x | {r['own > other']:.1%} |")
        return
    if args.quality:
        for key, value in quality(pipe, args.seeds).items():
            print(f"{key}: {value}")
        return
    wanted = [v.strip() for v in args.only.split(";")] if args.only else None
    rows = []
    for name, change in VARIANTS:
        if wanted and name not in wanted:
            continue
        t0 = time.time()
        rows.append(
            {
                "variant": name,
                **measure(pipe, args.seeds, seed0=args.seed0, **change),
                "seconds": round(time.time() - t0),
            }
        )
        print(" | ".join(str(v) for v in rows[-1].values()), flush=True)
        _write_csv(args.csv, rows)
    print("| variant | images | pass rate | all present | any leak | separated |\n|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[k]:.1%}" for k in ("pass_rate", "all_present", "any_leak", "separated")]
        print(f"| {r['variant']} | {r['images']} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
