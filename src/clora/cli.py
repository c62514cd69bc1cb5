"""``clora`` command line: ``clora generate SPEC -o OUT.png`` and ``clora demo``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import CLoRAError
from .spec import CompositionSpec, load_spec, spec_from_dict

# flag -> spec key, for the flags that override a spec field
OVERRIDES: dict[str, tuple[str, type]] = {
    "--seed": ("seed", int),
    "--steps": ("steps", int),
    "--height": ("height", int),
    "--width": ("width", int),
    "--guidance": ("guidance", float),
    "--scheduler": ("scheduler", str),
    "--prompt": ("prompt", str),
    "--negative-prompt": ("negative_prompt", str),
    "--step-size": ("step_size", float),
    "--max-iter-to-alter": ("max_iter_to_alter", int),
    "--iterative-iters": ("iterative_iters", int),
    "--mask-threshold": ("mask_threshold", float),
    "--apply-mask-after": ("apply_mask_after", int),
    "--lora-scale": ("lora_scale", float),
    "--model": ("model", str),
    "--engine": ("engine", str),
    "--method": ("method", str),
    "--switch-every": ("switch_every", int),
    "--max-batch": ("max_batch", int),
    "--num-images": ("num_images", int),
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one ``error:`` line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


QUANTIZE_HELP = "nf4: load the FLUX.1 transformer in bitsandbytes 4-bit NF4 (CUDA; pip install bitsandbytes)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="clora", description="Compose several LoRAs into one Stable Diffusion image with CLoRA.")
    parser.add_argument("--version", action="version", version=f"clora {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = commands.add_parser("generate", help="generate an image from a composition spec (YAML/JSON)")
    gen.add_argument("spec", nargs="?", help="the composition spec file (YAML or JSON)")
    gen.add_argument("-o", "--output", help="output PNG (with --num-images K: OUT-0.png ... OUT-(K-1).png)")
    gen.add_argument("--from-png", metavar="PNG", help="take the spec stored in a PNG made by clora")
    gen.add_argument("--dry-run", action="store_true", help="print prompts and token positions as JSON; load no UNet")
    gen.add_argument("--save-maps", metavar="MAPS.png", help="also write the attention maps and masks as a picture")
    gen.add_argument(
        "--device", help="auto (default), cpu, cuda, cuda:N or mps; with --from-png: the kind the image was made on"
    )
    gen.add_argument(
        "--dtype",
        choices=("fp16", "bf16", "fp32"),
        help="default: fp16 on GPUs, fp32 on CPU; with --from-png: the dtype the image was made in",
    )
    gen.add_argument("--parity", action="store_true", default=None, help="reproduce the authors' implementation")
    gen.add_argument("--allow-pickle", action="store_true", help="allow pickled LoRA files (.ckpt/.pt/.bin)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.add_argument("--quantize", choices=("nf4",), help=QUANTIZE_HELP)
    helps = {"--num-images": "K images with seeds seed..seed+K-1, made as one batch (the spec's num_images)"}
    for flag, (key, kind) in OVERRIDES.items():
        gen.add_argument(
            flag,
            type=kind,
            dest=f"override_{key}",
            metavar="K" if key == "num_images" else kind.__name__.upper(),
            help=helps.get(flag, f"override {key}"),
        )

    batch = commands.add_parser("batch", help="run a sweep (compositions x seeds x methods x grid), resumably")
    batch.add_argument("sweep", help="the sweep file (YAML or JSON)")
    batch.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the PNGs and manifest.jsonl")
    batch.add_argument(
        "--dry-run", action="store_true", help="print the number of jobs and the first ones; load no model"
    )
    batch.add_argument("--images-per-call", type=int, default=8, metavar="K", help="seeds made as one batch (8)")
    batch.add_argument(
        "--device", default="auto", help="auto (default), cpu, cuda or mps; several processes: cuda:LOCAL_RANK"
    )
    batch.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="default: fp16 on GPUs, fp32 on CPU")
    batch.add_argument("--quiet", action="store_true", help="no progress bar")
    batch.add_argument("--quantize", choices=("nf4",), help=QUANTIZE_HELP)

    score = commands.add_parser("score", help="CLIP-T, CLIP-I and DINO scores of the PNGs clora generate wrote")
    score.add_argument("folder", help="folder of PNGs made by clora generate (each carries its prompt)")
    score.add_argument(
        "--references", metavar="DIR", help="reference images per concept, DIR/<concept name or phrase>/*.png"
    )
    score.add_argument("--clip", metavar="MODEL", help="CLIP hub id or folder (default openai/clip-vit-base-patch32)")
    score.add_argument("--dino", metavar="MODEL", help="DINO hub id or folder (default facebook/dino-vits16)")
    score.add_argument("--csv", default="scores.csv", help="where the per-image table goes (default scores.csv)")
    score.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")

    ui = commands.add_parser("ui", help="a local web app to compose LoRAs in the browser (needs clora-diffusion[ui])")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    ui.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    ui.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="default: fp16 on GPUs, fp32 on CPU")

    demo = commands.add_parser("demo", help="compose the bundled demo LoRAs on the bundled tiny model (offline)")
    demo.add_argument(
        "--benchmark", action="store_true", help="judge every method (clora, merge, switch, composite) over many seeds"
    )
    demo.add_argument("--seeds", type=int, default=64, help="seeds per composition for --benchmark")
    demo.add_argument(
        "--methods", default="clora,merge,switch,composite", help="comma-separated methods for --benchmark"
    )
    demo.add_argument("--csv", default="clora-benchmark.csv", help="where --benchmark writes its table")
    demo.add_argument("--output-dir", default=".", help="folder for the demo picture")
    demo.add_argument("--family", choices=("sd", "flux"), default="sd", help="the demo model: SD (default) or Flux")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return generate(args)
        if args.command == "score":
            return score(args)
        if args.command == "batch":
            return batch(args)
        if args.command == "ui":
            return ui(args)
        return demo(args)
    except CLoRAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _spec_from_args(args: argparse.Namespace) -> CompositionSpec:
    if args.from_png:
        from .pngmeta import read_png_spec

        spec = spec_from_dict(read_png_spec(args.from_png), source=args.from_png)
    elif args.spec:
        spec = load_spec(args.spec)
    else:
        raise CLoRAError("generate: give a spec file or --from-png PNG")
    overrides: dict[str, Any] = {}
    for flag, (key, _) in OVERRIDES.items():
        value = getattr(args, f"override_{key}")
        if value is not None:
            overrides[key] = value
            _check_override(spec, flag, overrides)  # with the flags before it: --seed, then --num-images
    if args.parity:
        overrides["parity"] = True
    if overrides.get("prompt") is not None and spec.prompts is not None:
        # a new prompt invalidates explicit prompts/positions carried over from a PNG
        overrides.update(prompts=None, concept_tokens=None, mask_tokens=None)
    source = args.from_png or args.spec
    try:
        return spec.replace(**overrides) if overrides else spec
    except CLoRAError as exc:
        raise CLoRAError(f"{source}: {str(exc).removeprefix('spec: ')}") from None


def _check_override(spec: CompositionSpec, flag: str, overrides: dict[str, Any]) -> None:
    """A bad value given on the command line is the flag's fault, not the spec file's."""
    key = OVERRIDES[flag][0]
    try:
        spec.replace(**overrides)
    except CLoRAError as exc:
        message = str(exc).removeprefix("spec: ").removeprefix(f"{key}: ")
        raise CLoRAError(f"{flag}: {message}") from None


def _image_paths(output: str | None, count: int, flag: str = "-o/--output") -> list[Path]:
    """The files one run writes for ``flag``: OUT.png, or OUT-0.png .. OUT-(K-1).png."""
    if not output:
        raise CLoRAError(f"{flag}: give the PNG file to write")
    path = Path(output)
    if path.suffix.lower() != ".png":
        raise CLoRAError(f"{flag}: {output} must end in .png")
    if path.is_dir():
        raise CLoRAError(f"{flag}: {output} is a folder; give the PNG file to write")
    if not path.parent.is_dir():
        raise CLoRAError(f"{flag}: folder {path.parent} does not exist")
    _check_writable(path.parent, flag)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{k}{path.suffix}") for k in range(count)]


def _check_writable(folder: Path, flag: str) -> None:
    """Write and remove a file there: permission bits alone lie (root, read-only mounts, ACLs)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".clora-write-check-", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise CLoRAError(f"{flag}: cannot write into folder {folder} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def _output_plan(args: argparse.Namespace, spec: CompositionSpec) -> tuple[list[Path], list[Path | None]]:
    """Every file the run will write, checked before any model is loaded: image paths, and the
    maps picture per image (``None`` without --save-maps)."""
    count = spec.num_images  # checked with the spec (at least 1, seeds within range)
    images = _image_paths(args.output, count)
    if not args.save_maps:
        return images, [None] * count
    if spec.method != "clora":
        raise CLoRAError(f"--save-maps: the picture shows CLoRA's attention masks; method {spec.method!r} cuts none")
    maps = _image_paths(args.save_maps, count, "--save-maps")
    taken = {p.resolve() for p in images}
    for path in maps:
        if path.resolve() in taken:
            raise CLoRAError(
                f"--save-maps: {path} is also where -o writes an image; give the maps picture another name"
            )
    return images, maps


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def _no_truncation_warnings() -> Iterator[None]:
    """The CLI prints its own one-line truncation warnings; keep Python's two-line ones out."""
    from .tokens import PromptTruncatedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        yield


def _plan(tokenizer: Any, spec: CompositionSpec) -> Any:
    """The token plan, with one warning line per prompt that is cut at the text encoder's limit."""
    from .tokens import plan_tokens, truncation_messages

    with _no_truncation_warnings():
        plan = plan_tokens(tokenizer, spec)
    for message in truncation_messages(plan, spec, tokenizer.model_max_length):
        _warn(message)
    return plan


def _early_plan(spec: CompositionSpec) -> Any:
    """The token plan before the model loads (phrase errors and truncation warnings come first),
    when the tokenizer can be had without the hub guessing: not for a lone checkpoint file."""
    from .runtime import load_tokenizer

    if spec.model.lower().endswith((".safetensors", ".gguf")) and spec.model_config is None:
        return None
    try:
        tokenizer = load_tokenizer(spec.model, spec.model_config)
    except CLoRAError:
        return None  # loading the model says what is wrong, in full
    return _plan(tokenizer, spec)


def generate(args: argparse.Namespace) -> int:
    spec = _spec_from_args(args)
    from .runtime import check_lora_families, load_tokenizer, quiet_libraries

    quiet_libraries()

    if args.dry_run:
        from .tokens import trigger_prompt

        plan = _plan(load_tokenizer(spec.model, spec.model_config), spec)
        shown = {"method": spec.method, **plan.to_json()}
        if spec.method != "clora":  # the baselines prompt every LoRA with the one trigger prompt
            shown["trigger_prompt"] = trigger_prompt(spec)
        print(json.dumps(shown, indent=2))
        return 0

    outputs, maps_paths = _output_plan(args, spec)
    from .lora import check_lora_files

    check_lora_files(spec, args.allow_pickle)
    check_lora_families(spec)
    planned = _early_plan(spec)

    from .pngmeta import read_png_runtime, save_atomic, save_png
    from .runtime import load_pipeline, pick_device, pick_dtype, runtime_like

    quantize = args.quantize
    if args.from_png:
        made = read_png_runtime(args.from_png)
        device, dtype, warning = runtime_like(made, args.device, args.dtype)
        if warning:
            _warn(f"{args.from_png}: {warning}")
        quantize = quantize or made.get("quantize")  # the transformer as it was quantized, unless told
    else:
        device = pick_device(args.device or "auto")
        dtype = pick_dtype(args.dtype, device)
    pipe = load_pipeline(spec.model, device, dtype, spec.model_config, quantize=quantize)
    if planned is None:
        _plan(pipe.phrase_tokenizer, spec)
    pipe.set_progress_bar_config(disable=args.quiet, desc="clora", leave=False)
    runtime = {"clora": __version__, "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    if quantize:
        runtime["quantize"] = quantize
    with _no_truncation_warnings():
        result = pipe(spec, allow_pickle=args.allow_pickle, keep_maps=bool(args.save_maps))
    for k, (path, maps_path) in enumerate(zip(outputs, maps_paths, strict=True)):
        save_png(result.images[k], path, result.image_spec(k).to_dict(), runtime)  # each PNG redoes its image alone
        print(path)
        if maps_path is not None:
            from .visualize import render_maps

            save_atomic(render_maps(result, image=k), maps_path)
            print(maps_path)
    return 0


def batch(args: argparse.Namespace) -> int:
    from .sweep import load_sweep

    jobs = load_sweep(args.sweep)  # a bad sweep file: one line, exit 2, nothing run
    if args.images_per_call < 1:
        raise CLoRAError(f"--images-per-call: expected an integer >= 1, got {args.images_per_call}")
    if args.dry_run:
        print(f"{len(jobs)} jobs")
        for job in jobs[:10]:
            print(f"{job.key}.png  {job.spec.prompt!r}")
        return 0
    folder = Path(args.output)
    if folder.exists() and not folder.is_dir():
        raise CLoRAError(f"-o/--output: {folder} is a file; give a folder")
    folder.mkdir(parents=True, exist_ok=True)
    _check_writable(folder, "-o/--output")

    from .batch import distributed_rank, peak_memory_reader, run_batch
    from .runtime import load_pipeline, pick_device, pick_dtype, quiet_libraries

    quiet_libraries()
    rank, world, local_rank = distributed_rank()
    device = pick_device(args.device)
    if device.type == "cuda" and world > 1 and device.index is None:
        device = pick_device(f"cuda:{local_rank}")
    dtype = pick_dtype(args.dtype, device)
    loaded: dict[tuple[str, str | None], Any] = {}

    def load(model: str, config: str | None) -> Any:
        if (model, config) not in loaded:
            loaded.clear()  # one model in memory at a time
            loaded[(model, config)] = load_pipeline(model, device, dtype, config, quantize=args.quantize)
            loaded[(model, config)].set_progress_bar_config(disable=True)
        return loaded[(model, config)]

    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="clora batch", disable=args.quiet or rank != 0)
    runtime = {"clora": __version__, "device": str(device), "dtype": str(dtype).removeprefix("torch.")}

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    on_progress = progress if rank == 0 and not args.quiet else None  # only rank 0 shows the overall bar
    result = run_batch(
        jobs, folder, load, runtime, rank, world, args.images_per_call, on_progress, peak_memory_reader(device)
    )
    bar.close()
    print(f"rank {rank}/{world}: {result.ran} job(s) run, {result.skipped} already done, {result.failed} failed")
    if result.failed:
        print(f"error: {result.failed} of {result.ran} job(s) failed; see {folder / 'manifest.jsonl'}", file=sys.stderr)
        return 1
    return 0


def score(args: argparse.Namespace) -> int:
    csv_path = Path(args.csv)
    if csv_path.suffix.lower() != ".csv":
        raise CLoRAError(f"--csv: {args.csv} must end in .csv")
    if not csv_path.parent.is_dir():
        raise CLoRAError(f"--csv: folder {csv_path.parent} does not exist")
    _check_writable(csv_path.parent, "--csv")

    from . import evaluation
    from .runtime import pick_device, quiet_libraries

    quiet_libraries()
    inputs = evaluation.scoring_inputs(args.folder, args.references)  # all checked before any model loads
    dino = (args.dino or evaluation.DEFAULT_DINO) if inputs.references else None  # DINO needs references
    device = str(pick_device(args.device or "auto"))
    embedder = evaluation.Embedder(args.clip or evaluation.DEFAULT_CLIP, dino, device)
    rows = evaluation.score_rows(evaluation.score_images(inputs, embedder), Path(args.folder))
    print(evaluation.table(rows))
    evaluation.write_csv(rows, csv_path)
    print(csv_path)
    return 0


def ui(args: argparse.Namespace) -> int:
    from . import ui as web

    if not 1 <= args.port <= 65535:
        raise CLoRAError(f"--port: expected 1..65535, got {args.port}")
    if args.host not in web.LOCAL_HOSTS:
        _warn(
            f"--host {args.host}: the UI is reachable from other machines; anyone who reaches it can run "
            "generations and read files this user can read through the LoRA and model fields"
        )
    from .runtime import quiet_libraries
    from .ui.runner import Runner

    quiet_libraries()
    web.serve(Runner(args.device, args.dtype), args.host, args.port)
    return 0


def demo(args: argparse.Namespace) -> int:
    from .runtime import quiet_libraries

    quiet_libraries()
    try:
        from . import demo as demo_package
    except ImportError as exc:
        raise CLoRAError(f"demo: the bundled demo model is not available in this install ({exc})") from None
    if args.benchmark:
        from .methods import METHODS

        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise CLoRAError(
                f"--methods: expected a comma-separated list of {', '.join(METHODS)}, got {args.methods!r}"
            )
        demo_package.run_benchmark(Path(args.csv), seeds=args.seeds, methods=methods, family=args.family)
        return 0
    print(demo_package.run_demo(Path(args.output_dir), family=args.family))
    return 0


if __name__ == "__main__":
    sys.exit(main())
