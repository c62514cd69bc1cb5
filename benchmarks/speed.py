"""Seconds per image and peak memory, side by side in one run: CLoRA's batched engine, its sequential
engine, parity mode (the authors' computation), and plain diffusers with the LoRAs merged.

    python benchmarks/speed.py                     # GPU: SD 1.5 architecture, 512x512, 50 DDIM steps, N = 2, 4, 8
    python benchmarks/speed.py --arch sdxl --loras 2,4 --max-batch 1   # GPU: SDXL 1024x1024, 30 steps; 24 GB plan
    python benchmarks/speed.py --device cpu --size 128 --steps 2 --loras 2          # the real architecture, small
    python benchmarks/speed.py --arch tiny --device cpu --size 64 --steps 2 --loras 2   # a check in a minute
    python benchmarks/speed.py --arch flux --loras 2 --cases batched,merged   # GPU: FLUX.1-dev 1024x1024, 28 steps, bf16
    python benchmarks/speed.py --arch flux-small --device cpu --size 256 --steps 2 --loras 2 --repeats 1  # CPU

``--arch sd15`` (the default) builds SD 1.5's architecture with seeded random weights (``sd15_random``;
same compute as the real model, nothing downloaded) and N rank-32 kohya LoRAs; ``--arch sdxl`` does the
same for SDXL 1.0 (``sdxl_random``, kohya SDXL LoRAs; no parity case, the authors' code is SD 1.5 only);
``--arch flux`` builds FLUX.1-dev's architecture (``flux_random``: the 12B transformer, T5-XXL, CLIP-L, the
16-channel VAE; 24 GB of transformer weights in bf16, so a GPU only: this project's CPU machines cannot hold
it) with N rank-32 diffusers-format Flux LoRAs, and runs Flux's own defaults (flow-matching Euler, distilled
guidance 3.5, no negative half); ``flux-small`` is its layout at 1024 wide and 6 blocks, for a CPU memory
figure. ``--arch tiny`` / ``tiny-sdxl`` use the tests' tiny models. All are written to ``--work`` (a
temporary folder unless given; a matching build there is reused) and every case loads them with
``from_pretrained``.

Each case runs in a fresh Python process, so one case's memory, loaded adapters or out-of-memory error
cannot leak into the next. There it loads the pipeline, runs one untimed 1-step warm-up image (which also
loads the LoRAs), then times ``--repeats`` images (text encoding, adapter switching and the VAE decode
included; ``torch.cuda.synchronize`` around the timer) and reports their median. Peak memory is measured
over the timed images: CUDA ``max_memory_allocated`` after a reset, on the CPU the process's peak resident
size (``VmHWM``, reset through ``/proc/self/clear_refs`` where Linux allows). CLoRA runs the spec's
defaults for the model's family (SD/SDXL: guidance 7.5, contrastive updates for the first 25 steps, 20
extra at steps 0, 10, 20; Flux: ``families.FLUX.spec_defaults``);
``merged`` is diffusers' own pipeline for the model (``StableDiffusionPipeline`` or
``StableDiffusionXLPipeline``) with every LoRA loaded by ``load_lora_weights`` and active at weight 1, one
CFG batch per step, the same DDIM scheduler. ``--set KEY=VALUE`` changes a CLoRA spec value (a memory-only
run: ``--set iterative_iters=0``); the table's header names it. ``--budget-seconds`` stops the run in time:
the table shows what finished.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

CASES = ("batched", "sequential", "parity", "merged")
SUBJECTS = ("cat", "dog", "horse", "bird", "car", "tree", "house", "boat")
COLUMNS = (
    "case",
    "loras",
    "images_per_call",
    "s_per_image",
    "vs_sequential",
    "vs_one_image",
    "peak_gb",
    "times_s",
    "status",
    "device",
    "dtype",
)


def prompt_of(n: int, triggers: bool = False) -> str:
    """'a photo of a cat, a dog and a horse' for n = 3; with ``triggers`` each subject gets 'sks'."""
    things = [f"a {'sks ' if triggers else ''}{subject}" for subject in SUBJECTS[:n]]
    return "a photo of " + (things[0] if n == 1 else ", ".join(things[:-1]) + " and " + things[-1])


ARCHS = {
    "sd15": (512, 50),
    "sdxl": (1024, 30),
    "flux": (1024, 28),
    "flux-small": (512, 28),
    "tiny": (512, 50),
    "tiny-sdxl": (1024, 30),
}
"""Each ``--arch``'s default image size and steps: its family's own (SDXL: 1024 px, 30 steps; Flux 28)."""
NO_PARITY = {"sdxl": "SDXL", "tiny-sdxl": "SDXL", "flux": "FLUX.1", "flux-small": "FLUX.1"}
"""The architectures without a parity case (the authors' code is SD 1.5 only), and their family's name."""


def prepare(work: Path, arch: str, dtype_name: str, loras: int) -> tuple[Path, list[Path]]:
    """The model folder and ``loras`` LoRA files under ``work``, built unless a matching build is there."""
    import torch
    from flux_random import build_flux, write_random_flux_lora
    from sd15_random import TOKENIZER_DIR, build_sd15, write_random_kohya_lora
    from sdxl_random import build_sdxl, write_random_kohya_sdxl_lora

    folder = work / f"{arch}-{dtype_name}"
    marker = folder / "benchmark-build.json"
    paths = [folder / "loras" / f"lora{i}.safetensors" for i in range(loras)]
    if marker.is_file() and json.loads(marker.read_text())["loras"] >= loras:
        return folder, paths
    print(f"building the {arch} model and {loras} LoRAs in {folder} ...", flush=True)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype_name, torch.float32)
    if arch == "sd15":
        components = build_sd15(folder, dtype)
    elif arch == "sdxl":
        components = build_sdxl(folder, dtype, TOKENIZER_DIR)
    elif arch.startswith("flux"):
        components = build_flux(folder, dtype, small=arch == "flux-small")
    else:
        from diffusers import DiffusionPipeline
        from tiny_sd import build_tiny_sd15, build_tiny_sdxl

        build = build_tiny_sdxl if arch == "tiny-sdxl" else build_tiny_sd15
        components = DiffusionPipeline.from_pretrained(str(build(folder, TOKENIZER_DIR))).components
    if arch.startswith("flux"):
        write = write_random_flux_lora
    else:
        write = write_random_kohya_sdxl_lora if "sdxl" in arch else write_random_kohya_lora
    for i, path in enumerate(paths):
        write(components, path, seed=i + 1, rank=4 if arch.startswith("tiny") else 32)
    marker.write_text(json.dumps({"loras": loras}))
    return folder, paths


# -- one case, in its own process -----------------------------------------------------------------


def run_case(cfg: dict[str, Any]) -> dict[str, Any]:
    """Load, warm up, time ``repeats`` images; returns times and peak memory."""
    import torch

    from clora import spec_from_dict
    from clora.memory import process_memory_bytes
    from clora.runtime import DTYPES, load_pipeline, quiet_libraries

    quiet_libraries()
    device, dtype = torch.device(cfg["device"]), DTYPES[cfg["dtype"]]
    cuda = device.type == "cuda"
    n, case = cfg["loras"], cfg["case"]
    if case == "merged":
        from diffusers import DDIMScheduler, DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(cfg["model"], torch_dtype=dtype).to(device)
        if not cfg.get("arch", "").startswith("flux"):  # Flux keeps its flow-matching scheduler (and guidance 3.5)
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    else:
        pipe = load_pipeline(cfg["model"], device, dtype)  # the CLoRA pipeline of the model's family
    pipe.set_progress_bar_config(disable=True)

    if case == "merged":

        def generate(steps: int, warm_up: bool = False) -> None:
            if not pipe.get_list_adapters():
                for i, path in enumerate(cfg["lora_files"]):
                    pipe.load_lora_weights(path, adapter_name=f"lora{i}")
                pipe.set_adapters([f"lora{i}" for i in range(n)], adapter_weights=[1.0] * n)
            images = 1 if warm_up else cfg["num_images"]
            generators = [torch.Generator("cpu").manual_seed(k) for k in range(images)]
            size = cfg["size"]
            pipe(
                prompt_of(n, triggers=True),
                height=size,
                width=size,
                num_inference_steps=steps,
                num_images_per_prompt=images,
                generator=generators,
            )

    else:
        spec = spec_from_dict(
            {
                "model": cfg["model"],
                "prompt": prompt_of(n),
                "concepts": [
                    {"lora": path, "phrase": subject, "trigger": f"sks {subject}"}
                    for path, subject in zip(cfg["lora_files"], SUBJECTS, strict=False)
                ],
                "seed": 0,
                "height": cfg["size"],
                "width": cfg["size"],
                "max_batch": cfg["max_batch"],
                **({"parity": True} if case == "parity" else {"engine": case}),
                **cfg.get("spec_overrides", {}),  # --set; the benchmark's table keeps the defaults
            },
            source="benchmark",
        )

        def generate(steps: int, warm_up: bool = False) -> None:
            pipe(spec, steps=steps, **({"iterative_iters": 0} if warm_up else {"num_images": cfg["num_images"]}))

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    generate(1, warm_up=True)  # loads the LoRAs, CUDA kernels and allocator
    sync()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current size
        except OSError:
            pass
    times = []
    for _ in range(cfg["repeats"]):
        sync()
        start = time.perf_counter()
        generate(cfg["steps"])
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if cuda else process_memory_bytes()
    return {"times_s": [t / cfg["num_images"] for t in times], "peak_gb": peak / 1e9}  # seconds per image


def run_in_subprocess(cfg: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="clora-speed-") as tmp:
        config, result = Path(tmp) / "case.json", Path(tmp) / "result.json"
        config.write_text(json.dumps({**cfg, "result": str(result)}))
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(config)]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"status": "stopped by the time budget"}
        if proc.returncode != 0:
            error = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or [f"exit {proc.returncode}"]
            status = "out of memory" if "out of memory" in proc.stderr.lower() else f"failed: {error[0][:120]}"
            return {"status": status}
        return {**json.loads(result.read_text()), "status": "ok"}


# -- the driver -----------------------------------------------------------------------------------


def compare(rows: list[dict[str, Any]]) -> None:
    """Each row's time per image as a multiple of the sequential engine's (same LoRAs and images per call)
    and of its own case with one image per call."""
    for row in rows:
        same = [r for r in rows if r["loras"] == row["loras"] and r.get("s_per_image")]
        sequential = next(
            (r for r in same if r["case"] == "sequential" and r["images_per_call"] == row["images_per_call"]), {}
        )
        one = next((r for r in same if r["case"] == row["case"] and r["images_per_call"] == 1), {})
        if row.get("s_per_image") and sequential:
            row["vs_sequential"] = row["s_per_image"] / sequential["s_per_image"]
        if row.get("s_per_image") and one and row["images_per_call"] > 1:
            row["vs_one_image"] = row["s_per_image"] / one["s_per_image"]


def table(rows: list[dict[str, Any]]) -> list[str]:
    header = f"{'case':<11} {'LoRAs':>5} {'images/call':>11} {'s/image':>9} {'vs sequential':>14} {'vs 1/call':>10}"
    lines = [f"{header} {'peak memory GB':>15}"]
    lines.append("-" * len(lines[0]))
    for row in rows:
        seconds = f"{row['s_per_image']:.2f}" if row.get("s_per_image") else "-"
        ratio = f"{row['vs_sequential']:.2f}x" if row.get("vs_sequential") else "-"
        per_call = f"{row['vs_one_image']:.2f}x" if row.get("vs_one_image") else "-"
        peak = f"{row['peak_gb']:.2f}" if row.get("peak_gb") else "-"
        status = "" if row["status"] == "ok" else f"  ({row['status']})"
        lines.append(
            f"{row['case']:<11} {row['loras']:>5} {row['images_per_call']:>11} {seconds:>9} {ratio:>14} {per_call:>10}"
            f" {peak:>15}{status}"
        )
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", choices=tuple(ARCHS), default="sd15", help="sd15, sdxl (random weights), or a tiny one"
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument(
        "--dtype", choices=("fp16", "bf16", "fp32"), default=None, help="default fp16 on CUDA, fp32 on CPU"
    )
    parser.add_argument(
        "--size", type=int, default=None, help="image height and width, a multiple of 32 (default: 512, SDXL 1024)"
    )
    parser.add_argument("--steps", type=int, default=None, help="default 50, SDXL 30")
    parser.add_argument("--loras", default="2,4,8", help="comma-separated LoRA counts N, each 1..8")
    parser.add_argument(
        "--cases", default=None, help=f"comma-separated subset of {','.join(CASES)} (default: all; SDXL: no parity)"
    )
    parser.add_argument(
        "--num-images",
        default="1",
        help="comma-separated images per call, e.g. 1,4: each case runs once per value (the spec's num_images)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed calls per case (the median per image is reported)"
    )
    parser.add_argument("--max-batch", type=int, default=None, help="the spec's max_batch (default automatic)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a spec value for the CLoRA cases (YAML), e.g. iterative_iters=0 for a memory-only run; repeatable",
    )
    parser.add_argument("--budget-seconds", type=float, default=None, help="stop the whole run after this long")
    parser.add_argument("--csv", type=Path, default=None, help="also write the rows to this CSV file")
    parser.add_argument("--work", type=Path, default=None, help="where to build (and reuse) the model and LoRAs")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    try:
        args.loras = [int(n) for n in args.loras.split(",")]
    except ValueError:
        parser.error(f"--loras: expected comma-separated integers, got {args.loras!r}")
    if not all(1 <= n <= len(SUBJECTS) for n in args.loras):
        parser.error(f"--loras: each count must be 1..{len(SUBJECTS)}, got {args.loras}")
    try:
        args.num_images = [int(k) for k in args.num_images.split(",")]
    except ValueError:
        parser.error(f"--num-images: expected comma-separated integers, got {args.num_images!r}")
    if not all(k >= 1 for k in args.num_images):
        parser.error(f"--num-images: each value must be at least 1, got {args.num_images}")
    no_parity = args.arch in NO_PARITY
    if args.cases is None:
        args.cases = [case for case in CASES if not (no_parity and case == "parity")]
    else:
        args.cases = [case.strip() for case in args.cases.split(",")]
    if not set(args.cases) <= set(CASES):
        parser.error(f"--cases: expected some of {', '.join(CASES)}, got {','.join(args.cases)}")
    if no_parity and "parity" in args.cases:
        parser.error(f"--cases: parity reproduces the authors' SD 1.5 code and has no {NO_PARITY[args.arch]} version")
    default_size, default_steps = ARCHS[args.arch]
    args.size = args.size or default_size
    args.steps = args.steps or default_steps
    try:
        args.set = {key.strip(): yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    except ValueError:
        parser.error(f"--set: expected KEY=VALUE, got {args.set}")
    if args.size % 32 or args.size < 32:
        parser.error(f"--size: expected a multiple of 32 (VAE x8, attention maps at 1/32), got {args.size}")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu_dtype = "bf16" if args.arch.startswith("flux") else "fp16"  # Flux's activations overflow fp16
    args.dtype = args.dtype or (gpu_dtype if args.device.startswith("cuda") else "fp32")
    return args


def machine_line(device: str) -> str:
    import diffusers
    import torch

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if "model name" in line
            ),
            platform.processor(),
        )
        name += f", {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"{name} | torch {torch.__version__}, diffusers {diffusers.__version__}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        cfg = json.loads(args.worker.read_text())
        if "build" in cfg:
            folder, paths = prepare(Path(cfg["work"]), *cfg["build"])
            result: dict[str, Any] = {"folder": str(folder), "lora_files": [str(p) for p in paths]}
        else:
            result = run_case(cfg)
        Path(cfg["result"]).write_text(json.dumps(result))
        return 0
    started = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="clora-speed-"))
    print(f"model and LoRAs: {work / f'{args.arch}-{args.dtype}'} (built unless a matching build is there)", flush=True)
    # built in a process of its own too: the freed build would otherwise stay in this one's resident memory
    built = run_in_subprocess({"work": str(work), "build": [args.arch, args.dtype, max(args.loras)]}, None)
    if built["status"] != "ok":
        print(f"building the {args.arch} model {built['status']}", file=sys.stderr)
        return 1
    folder, lora_files = Path(built["folder"]), [Path(p) for p in built["lora_files"]]
    rows: list[dict[str, Any]] = []
    jobs = [(n, case, k) for n in args.loras for case in CASES if case in args.cases for k in args.num_images]
    for n, case, images in jobs:
        left = None if args.budget_seconds is None else args.budget_seconds - (time.monotonic() - started)
        row: dict[str, Any] = {"case": case, "loras": n, "images_per_call": images, "device": args.device}
        row["dtype"] = args.dtype
        if left is not None and left <= 0:
            rows.append({**row, "status": "skipped: time budget"})
            continue
        cfg = {
            "case": case,
            "arch": args.arch,
            "loras": n,
            "model": str(folder),
            "lora_files": [str(p) for p in lora_files[:n]],
            "device": args.device,
            "dtype": args.dtype,
            "size": args.size,
            "steps": args.steps,
            "repeats": args.repeats,
            "num_images": images,
            "max_batch": args.max_batch,
            "spec_overrides": args.set,
        }
        row.update(run_in_subprocess(cfg, left))
        if row.get("times_s"):
            row["s_per_image"] = statistics.median(row["times_s"])
        rows.append(row)
        print(f"{case} N={n} K={images}: {row.get('s_per_image', '-')} s/image, {row['status']}", flush=True)
    compare(rows)
    print(f"\n{machine_line(args.device)}")
    sampler = "flow-matching Euler" if args.arch.startswith("flux") else "DDIM"
    print(f"{args.arch} architecture, {args.dtype}, {args.size}x{args.size}, {args.steps} {sampler} steps", end="")
    print(f", median of {args.repeats} call(s) per case", end="")
    print(
        "".join(
            f", {key}={value}" for key, value in {"max_batch": args.max_batch, **args.set}.items() if value is not None
        )
    )
    print("\n".join(table(rows)))
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, "times_s": " ".join(f"{t:.3f}" for t in row.get("times_s", []))})
    return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
