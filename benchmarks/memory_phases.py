"""Peak memory in each phase of one CLoRA image: loading, LoRAs, prompt encoding, gradient passes, the
other passes, the VAE decode.

    python benchmarks/memory_phases.py --arch sdxl --device cpu --dtype bf16 --loras 2 --max-batch 1

Builds (or reuses, under ``--work``) the model and LoRAs as ``speed.py`` does and makes one image
with one step and one contrastive update: the passes of a full run, each of which frees its memory
before the next. On CUDA a phase's peak is ``max_memory_allocated`` (reset when it starts); on the
CPU it is the largest resident size seen by a thread that samples it every 50 ms (an upper bound of
the tensors alive: freed memory the C allocator keeps counts too). An SDXL model in another dtype
than fp16 also decodes once in float32, which is what the pipeline does with an fp16 VAE on a GPU.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import ARCHS, SUBJECTS, prompt_of, run_in_subprocess  # noqa: E402

from clora.memory import process_memory_bytes  # noqa: E402


class PhasePeaks:
    """The peak memory of each named phase; ``phase(name)`` switches, ``wrap`` tags a method's calls."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.current, self.peaks = device, "start", {}
        if device.type == "cpu":
            threading.Thread(target=self._sample, daemon=True).start()

    def phase(self, name: str) -> None:
        self._close()
        self.current = name
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def wrap(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def tagged(*args: Any, **kwargs: Any) -> Any:
            outer = self.current
            self.phase(name)
            try:
                return method(*args, **kwargs)
            finally:
                self.phase(outer)

        return tagged

    def _close(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._record(torch.cuda.max_memory_allocated(self.device))
        else:
            self._record(process_memory_bytes("VmRSS"))

    def _record(self, size: int) -> None:
        self.peaks[self.current] = max(self.peaks.get(self.current, 0), size)

    def _sample(self) -> None:
        while True:
            self._record(process_memory_bytes("VmRSS"))
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=tuple(ARCHS), default="sdxl")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=("fp16", "bf16", "fp32"), default=None, help="default fp16 on CUDA, else bf16"
    )
    parser.add_argument("--size", type=int, default=None, help="default: the architecture's (SDXL 1024)")
    parser.add_argument("--loras", type=int, default=2, choices=range(1, len(SUBJECTS) + 1))
    parser.add_argument("--max-batch", type=int, default=None, help="the spec's max_batch (default automatic)")
    parser.add_argument("--work", type=Path, default=None, help="where to build (and reuse) the model and LoRAs")
    args = parser.parse_args(argv)
    from clora import spec_from_dict
    from clora.runtime import DTYPES, load_pipeline, quiet_libraries

    device = torch.device(args.device)
    dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "bf16")
    size = args.size or ARCHS[args.arch][0]
    work = args.work or Path(tempfile.mkdtemp(prefix="clora-memory-"))
    # built in a process of its own: a build's freed memory would stay in this one's resident size
    built = run_in_subprocess({"work": str(work), "build": [args.arch, dtype_name, args.loras]}, None)
    if built["status"] != "ok":
        sys.exit(f"building the {args.arch} model {built['status']}")
    folder, loras = Path(built["folder"]), built["lora_files"][: args.loras]
    quiet_libraries()
    peaks = PhasePeaks(device)
    peaks.phase("load the model")
    pipe = load_pipeline(str(folder), device, DTYPES[dtype_name])
    pipe.set_progress_bar_config(disable=True)
    peaks.phase("other: guided passes, masks, scheduler steps")
    pipe.add_lora = peaks.wrap("load the LoRAs", pipe.add_lora)
    pipe._encode_branches = peaks.wrap("encode the branches' prompts", pipe._encode_branches)
    pipe._contrastive_updates = peaks.wrap("gradient pass (contrastive update)", pipe._contrastive_updates)
    pipe._decode = peaks.wrap("VAE decode", pipe._decode)
    concepts = [{"lora": path, "phrase": subject} for path, subject in zip(loras, SUBJECTS, strict=False)]
    spec = {"model": str(folder), "prompt": prompt_of(args.loras), "concepts": concepts, "seed": 0}
    spec.update(height=size, width=size, steps=1, iterative_iters=0, max_batch=args.max_batch)
    pipe(spec_from_dict(spec, source="memory_phases"))
    if pipe.family.name == "sdxl" and pipe.vae.dtype != torch.float16:
        peaks.phase("VAE decode in float32 (as an fp16 GPU run does)")
        pipe.vae.to(torch.float32)
        with torch.no_grad():
            latent = torch.randn(1, 4, size // 8, size // 8, device=device)
            pipe.vae.decode(latent / pipe.vae.config.scaling_factor)
    peaks.phase("end")
    print(
        f"{args.arch}, {dtype_name}, {size}x{size}, {args.loras} LoRAs, max_batch {args.max_batch or 'automatic'}, "
        f"{device}; peak {'allocated' if device.type == 'cuda' else 'resident'} memory per phase:"
    )
    table = {name: peak / 1e9 for name, peak in peaks.peaks.items() if name not in ("start", "end")}
    for name in sorted(table, key=lambda name: name.startswith(("other", "VAE"))):  # roughly in the run's order
        print(f"  {name:<50} {table[name]:6.2f} GB")
    return table


if __name__ == "__main__":
    main()
