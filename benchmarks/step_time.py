"""Seconds per denoising step, default mode vs parity, on the tiny SD 1.5-layout test model.

    python benchmarks/step_time.py [--size 256] [--repeats 3] [--threads 1]

Prints a table of medians over repeats, both modes measured side by side in one run. A step "with
loss" runs the contrastive update (2 concepts: 3 branches); a "plain" step only predicts and fuses.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from lora_files import make_lora_weights, write_diffusers_lora  # noqa: E402
from tiny_sd import build_tiny_sd15  # noqa: E402

from clora import CLoRAPipeline, spec_from_dict  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="clora-bench-"))
    model = build_tiny_sd15(work / "model", ROOT / "tests" / "fixtures" / "sd15_tokenizer")
    pipe = CLoRAPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    loras = [write_diffusers_lora(make_lora_weights(pipe, seed=s), work / f"l{s}.safetensors") for s in (1, 2)]
    spec = spec_from_dict(
        {
            "model": str(model),
            "prompt": "a cat and a dog in a garden",
            "steps": args.steps,
            "height": args.size,
            "width": args.size,
            "iterative_steps": [],
            "concepts": [
                {"lora": str(loras[0]), "phrase": "cat", "trigger": "sks cat"},
                {"lora": str(loras[1]), "phrase": "dog", "trigger": "sks dog"},
            ],
        }
    )
    pipe(spec, steps=1)  # warm-up, loads the adapters
    rows = []
    for label, alter in (("with loss", args.steps), ("plain", 0)):
        for parity in (False, True):
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                pipe(spec, parity=parity, max_iter_to_alter=alter)
                times.append((time.perf_counter() - start) / args.steps)
            rows.append((label, "parity" if parity else "default", statistics.median(times)))
    print(
        f"tiny SD 1.5-layout model, {args.size}x{args.size}, 2 concepts (3 branches), "
        f"{args.threads} thread(s), {args.repeats} repeats, {args.steps} steps each"
    )
    print(f"{'step':<10} {'mode':<8} {'s/step (median)':>16} {'parity/default':>15}")
    for label, mode, seconds in rows:
        base = next(s for lab, m, s in rows if lab == label and m == "default")
        print(f"{label:<10} {mode:<8} {seconds:>16.3f} {seconds / base:>15.2f}")


if __name__ == "__main__":
    main()
