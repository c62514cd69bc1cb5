"""``clora`` command line: ``clora generate SPEC -o OUT.png`` and ``clora demo``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

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
    "--max-batch": ("max_batch", int),
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one ``error:`` line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


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
    gen.add_argument("--num-images", type=int, default=1, metavar="K", help="K images with seeds seed..seed+K-1")
    gen.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    gen.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="default: fp16 on GPUs, fp32 on CPU")
    gen.add_argument("--parity", action="store_true", default=None, help="reproduce the authors' implementation")
    gen.add_argument("--allow-pickle", action="store_true", help="allow pickled LoRA files (.ckpt/.pt/.bin)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    for flag, (key, kind) in OVERRIDES.items():
        gen.add_argument(flag, type=kind, dest=f"override_{key}", metavar=kind.__name__.upper(), help=f"override {key}")

    demo = commands.add_parser("demo", help="compose the bundled demo LoRAs on the bundled tiny model (offline)")
    demo.add_argument("--benchmark", action="store_true", help="judge CLoRA vs merged LoRAs over many seeds")
    demo.add_argument("--seeds", type=int, default=64, help="seeds per composition for --benchmark")
    demo.add_argument("--csv", default="clora-benchmark.csv", help="where --benchmark writes its table")
    demo.add_argument("--output-dir", default=".", help="folder for the demo picture")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return generate(args)
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
    overrides: dict[str, Any] = {
        key: getattr(args, f"override_{key}")
        for key, _ in OVERRIDES.values()
        if getattr(args, f"override_{key}") is not None
    }
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


def _output_paths(output: str | None, count: int) -> list[Path]:
    if not output:
        raise CLoRAError("-o/--output: give the PNG file to write")
    path = Path(output)
    if path.suffix.lower() != ".png":
        raise CLoRAError(f"-o/--output: {output} must end in .png")
    if not path.parent.is_dir():
        raise CLoRAError(f"-o/--output: folder {path.parent} does not exist")
    if count < 1:
        raise CLoRAError(f"--num-images: expected an integer >= 1, got {count}")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{k}{path.suffix}") for k in range(count)]


def _precheck_loras(spec: CompositionSpec, allow_pickle: bool) -> None:
    """Fail on a missing or unreadable LoRA before spending time on loading the model."""
    from .lora import read_lora_state_dict

    for item in (*spec.concepts, *spec.styles):
        read_lora_state_dict(item.lora, allow_pickle=allow_pickle)


def generate(args: argparse.Namespace) -> int:
    spec = _spec_from_args(args)
    from .runtime import load_tokenizer, quiet_libraries

    quiet_libraries()

    if args.dry_run:
        from .tokens import plan_tokens

        print(json.dumps(plan_tokens(load_tokenizer(spec.model, spec.model_config), spec).to_json(), indent=2))
        return 0

    outputs = _output_paths(args.output, args.num_images)
    if args.save_maps and Path(args.save_maps).suffix.lower() != ".png":
        raise CLoRAError(f"--save-maps: {args.save_maps} must end in .png")
    _precheck_loras(spec, args.allow_pickle)

    from .pngmeta import save_atomic, save_png
    from .runtime import load_pipeline, pick_device, pick_dtype

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    pipe = load_pipeline(spec.model, device, dtype, spec.model_config)
    pipe.set_progress_bar_config(disable=args.quiet, desc="clora", leave=False)
    runtime = {"clora": __version__, "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    for k, path in enumerate(outputs):
        result = pipe(spec, seed=spec.seed + k, allow_pickle=args.allow_pickle)
        save_png(result.images[0], path, result.spec.to_dict(), runtime)
        print(path)
        if args.save_maps:
            from .visualize import render_maps

            maps_path = Path(args.save_maps)
            if len(outputs) > 1:
                maps_path = maps_path.with_name(f"{maps_path.stem}-{k}{maps_path.suffix}")
            save_atomic(render_maps(result), maps_path)
            print(maps_path)
    return 0


def demo(args: argparse.Namespace) -> int:
    from .runtime import quiet_libraries

    quiet_libraries()
    try:
        from . import demo as demo_package
    except ImportError as exc:
        raise CLoRAError(f"demo: the bundled demo model is not available in this install ({exc})") from None
    if args.benchmark:
        demo_package.run_benchmark(Path(args.csv), seeds=args.seeds)
        return 0
    print(demo_package.run_demo(Path(args.output_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
