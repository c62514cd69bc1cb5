"""CLoRA on the embedded demo model: the demo picture and the composition benchmark.

CLoRA runs through the core pipeline (:class:`clora.CLoRAPipeline`; :class:`clora.CLoRAFluxPipeline` for the
Flux demo model, ``family="flux"``, ``flux_model``). The demo picture's
baseline is plain LoRA merging (diffusers ``set_adapters`` with every concept LoRA on at weight 1
and a prompt that holds every trigger); the benchmark runs every method of ``clora.methods``
(CLoRA, merge, LoRA Switch, LoRA Composite) through the same pipeline from the same seeds.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..methods import METHODS
from . import evaluate as E
from . import flux_model as FM
from . import judge as J
from . import world
from .evaluate import GUIDANCE, STEPS, composition_prompts, compositions

# CLoRA settings for the demo model: the authors' notebook settings (100 steps, contrast during
# the first 50, 20 extra updates at steps 0/10/20, step size 20, mask threshold 0.4) scaled to
# 20 DDIM steps.
CLORA_SETTINGS = {
    "steps": STEPS,
    "guidance": GUIDANCE,
    "step_size": 20.0,
    "max_iter_to_alter": 10,
    "iterative_steps": [0, 2, 4],
    "iterative_iters": 4,
    "mask_threshold": 0.4,
}
DEMO_CONCEPTS = ("sks_circle", "zwx_square")
SEEDS_PER_CALL = 16  # the benchmark's images per call: one batch through every pass
DEMO_SEED = 12  # the first seed (0..63) where CLoRA passes the judge on sks circle + zwx square


@dataclass(frozen=True)
class DemoModel:
    """A demo model family's folder, LoRAs, CLoRA settings and demo seed."""

    model_dir: Path
    lora_dir: Path
    settings: dict
    demo_seed: int

    def lora_path(self, name: str) -> Path:
        return self.lora_dir / f"{name}.safetensors"


DEMO_MODELS = {
    "sd": DemoModel(E.MODEL_DIR, E.LORA_DIR, CLORA_SETTINGS, DEMO_SEED),
    "flux": DemoModel(FM.FLUX_MODEL_DIR, FM.FLUX_LORA_DIR, FM.FLUX_CLORA_SETTINGS, FM.FLUX_DEMO_SEED),
}


def load_clora_pipe(model_dir: Path | None = None):
    from ..runtime import load_pipeline

    pipe = load_pipeline(str(model_dir or E.MODEL_DIR), torch.device("cpu"), torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def clora_spec(names: Sequence[str], seed: int, styles: Sequence[str] = (), family: str = "sd", **overrides):
    from ..spec import spec_from_dict

    demo = DEMO_MODELS[family]
    base, _, _ = composition_prompts(names)
    data = dict(
        model=str(demo.model_dir),
        prompt=base,
        seed=int(seed),
        height=world.IMG,
        width=world.IMG,
        concepts=[
            {
                "lora": str(demo.lora_path(n)),
                "phrase": world.CONCEPTS[n].shape,
                "trigger": world.CONCEPTS[n].phrase,
                "name": n,
            }
            for n in names
        ],
        styles=[{"lora": str(demo.lora_path(s)), "weight": 0.8, "name": s} for s in styles],
        **demo.settings,
    )
    data.update(overrides)
    return spec_from_dict(data, source="demo")


def to_uint8(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


@torch.no_grad()
def merged_images(
    pipe, names: Sequence[str], seeds: Sequence[int], prompt: str | None = None, styles: Sequence[str] = ()
) -> np.ndarray:
    """Plain diffusers generation with all concept LoRAs merged (set_adapters, weight 1)."""
    adapters = [pipe.add_lora(str(E.lora_path(n))) for n in names]
    style_adapters = [pipe.add_lora(str(E.lora_path(s))) for s in styles]
    from ..lora import activate_adapters

    activate_adapters(pipe, adapters + style_adapters, [1.0] * len(adapters) + [0.8] * len(style_adapters))
    prompt = prompt or composition_prompts(names)[1]
    try:
        return E.sample(pipe, [prompt] * len(seeds), seeds)
    finally:
        activate_adapters(pipe, [], [])


def _verdict_text(v: J.Verdict) -> str:
    return "PASS" if v.passed else "FAIL"


def run_demo(
    out_dir: Path = Path("."),
    seed: int | None = None,
    names: Sequence[str] = DEMO_CONCEPTS,
    family: str = "sd",
    **spec_overrides,
) -> Path:
    """Compose the demo LoRAs with CLoRA on the demo model of ``family`` (sd, flux; CPU, offline) and
    write one PNG: the CLoRA image, each concept's attention map and mask, and the merged-LoRA image.
    ``spec_overrides`` change CLoRA settings (e.g. ``steps=8`` for a quick check)."""
    from PIL import Image, ImageDraw

    from ..visualize import render_maps

    torch.set_num_threads(min(2, torch.get_num_threads()))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    demo = DEMO_MODELS[family]
    seed = demo.demo_seed if seed is None else seed
    pipe = load_clora_pipe(demo.model_dir)
    spec = clora_spec(names, seed, family=family, **spec_overrides)
    result = pipe(spec, keep_maps=True)
    _, merged_prompt, exp = composition_prompts(names)
    if family == "sd":
        merged = merged_images(pipe, names, [seed])[0]
    else:  # the core pipeline's merge, which equals diffusers' set_adapters (tests/test_methods.py)
        merged = to_uint8(pipe(clora_spec(names, seed, family=family, method="merge", **spec_overrides)).images[0])
    v_clora = J.judge(to_uint8(result.images[0]), exp)
    v_merged = J.judge(merged, exp)
    panel = render_maps(result, labels=[world.CONCEPTS[n].phrase for n in names], tile=192)
    tile = 192
    lh = 14
    head = 30
    canvas = Image.new("RGB", (panel.width + tile, panel.height + head), "white")
    canvas.paste(panel, (0, head))
    draw = ImageDraw.Draw(canvas)
    draw.text(
        (3, 2),
        f'CLoRA: "{spec.prompt}" with LoRAs: {", ".join(names)} (seed {seed}) -> judge: {_verdict_text(v_clora)}',
        fill="black",
    )
    draw.text(
        (3, 16), f'merged LoRAs (set_adapters): "{merged_prompt}"  -> judge {_verdict_text(v_merged)}', fill="black"
    )
    x = panel.width
    draw.text((x + 3, head + 1), "merged LoRAs", fill="black")
    canvas.paste(Image.fromarray(merged).resize((tile, tile), Image.NEAREST), (x, head + lh))
    # the CLoRA image is drawn by render_maps with smoothing; redraw it pixel-exact
    canvas.paste(result.images[0].resize((tile, tile), Image.NEAREST), (0, head + lh))
    path = (out_dir / ("clora-demo.png" if family == "sd" else f"clora-demo-{family}.png")).resolve()
    canvas.save(path)
    return path


def run_benchmark(
    out_csv: Path = Path("clora-benchmark.csv"),
    seeds: int = 64,
    comps: Sequence[Sequence[str]] | None = None,
    progress: bool = True,
    methods: Sequence[str] = tuple(METHODS),
    family: str = "sd",
    **clora_overrides,
) -> list[dict]:
    """Judge's pass rate of each method (default: every one of ``clora.methods``) on 2- and 3-concept
    compositions x seeds, on the demo model of ``family`` (sd, flux).

    Prints a table, writes it as CSV to ``out_csv`` and every image's verdict to
    ``<out_csv stem>-images.csv``. Returns the table rows."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    comps = [tuple(c) for c in (comps or compositions())]
    pipe = load_clora_pipe(DEMO_MODELS[family].model_dir)
    per_image = []
    t0 = time.time()
    for names in comps:
        _, _, exp = composition_prompts(names)
        for first in range(0, seeds, SEEDS_PER_CALL):
            count = min(SEEDS_PER_CALL, seeds - first)
            for method in methods:  # the seeds of one method as one batch (num_images)
                spec = clora_spec(names, first, method=method, num_images=count, family=family, **clora_overrides)
                result = pipe(spec)
                for k, image in enumerate(result.images):
                    v = J.judge(to_uint8(image), exp)
                    row = {
                        "composition": "+".join(names),
                        "concepts": len(names),
                        "method": method,
                        "seed": first + k,
                        "passed": int(v.passed),
                        "extras": v.extras,
                    }
                    for o in v.objects:
                        row[f"present_{o.name}"] = int(o.present)
                        row[f"leaked_{o.name}"] = int(o.leaked)
                    per_image.append(row)
            if progress:
                print(f"  {'+'.join(names)}: {first + count}/{seeds} seeds ({time.time() - t0:.0f}s)", flush=True)
        _write_csv(Path(out_csv).with_name(Path(out_csv).stem + "-images.csv"), per_image)  # partial results
    table = summarise(per_image)
    out_csv = Path(out_csv)
    _write_csv(out_csv, table)
    print(format_table(table))
    print(f"wrote {out_csv}")
    return table


def summarise(per_image: list[dict]) -> list[dict]:
    table = []
    keys = []
    for r in per_image:
        k = (r["composition"], r["method"])
        if k not in keys:
            keys.append(k)
    for comp, method in keys:
        rows = [r for r in per_image if r["composition"] == comp and r["method"] == method]
        names = comp.split("+")
        table.append(
            {
                "composition": comp,
                "concepts": len(names),
                "method": method,
                "images": len(rows),
                "pass_rate": round(float(np.mean([r["passed"] for r in rows])), 3),
                "all_present": round(float(np.mean([all(r[f"present_{n}"] for n in names) for r in rows])), 3),
                "any_leak": round(float(np.mean([any(r[f"leaked_{n}"] for n in names) for r in rows])), 3),
                "extra_objects": round(float(np.mean([r["extras"] > 0 for r in rows])), 3),
            }
        )
    for k in (2, 3):
        for method in dict.fromkeys(r["method"] for r in per_image):
            rows = [r for r in per_image if r["concepts"] == k and r["method"] == method]
            if rows and len({r["composition"] for r in rows}) > 1:
                table.append(
                    {
                        "composition": f"all {k}-concept",
                        "concepts": k,
                        "method": method,
                        "images": len(rows),
                        "pass_rate": round(float(np.mean([r["passed"] for r in rows])), 3),
                        "all_present": "",
                        "any_leak": "",
                        "extra_objects": "",
                    }
                )
    return table


def _write_csv(path: Path, rows: list[dict]):
    fields = []
    for r in rows:
        for k in r:
            if k not in fields:
                fields.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def format_table(rows: list[dict]) -> str:
    cols = ["composition", "method", "images", "pass_rate", "all_present", "any_leak", "extra_objects"]
    width = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    line = lambda r: "  ".join(str(r.get(c, "")).ljust(width[c]) for c in cols)
    return "\n".join([line({c: c for c in cols})] + [line(r) for r in rows])
