"""What the web UI runs when the user presses Generate: pipelines loaded once per model, a progress
report after every denoising step, a cancel that stops at the next step, and the files to download
(each PNG with its spec embedded, the spec as YAML)."""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import __version__
from ..errors import CLoRAError
from ..spec import MAX_SEED, CompositionSpec, fill_defaults

Progress = Callable[[int, int, str], None]  # (steps done, steps in all, what runs)


class Cancelled(CLoRAError):
    """The user pressed Cancel; the run stopped after the step it was in."""


@dataclass
class Run:
    """The files and outputs of one press of Generate."""

    folder: Path
    images: list[Path] = field(default_factory=list)  # CLoRA (or the spec's method) images, with their spec
    merged: list[Path] = field(default_factory=list)  # the same seeds with the LoRAs merged, when asked
    spec_yaml: Path | None = None
    output: Any = None  # the CLoRAOutput of the spec's method: every image's maps and masks per step
    labels: list[str] = field(default_factory=list)  # concept labels for the map pictures

    @property
    def downloads(self) -> list[str]:
        return [str(p) for p in (*self.images, *self.merged, *([self.spec_yaml] if self.spec_yaml else []))]


class Runner:
    """Generates for the UI on one device; keeps each loaded pipeline for the next request.

    ``load`` builds a pipeline for (model, model_config); the default is ``runtime.load_pipeline``.
    """

    def __init__(
        self,
        device: str = "auto",
        dtype: str | None = None,
        output_root: str | Path | None = None,
        load: Callable[..., Any] | None = None,
    ) -> None:
        from ..runtime import load_pipeline, pick_device, pick_dtype

        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.output_root = Path(output_root or tempfile.mkdtemp(prefix="clora-ui-"))
        self._load = load or load_pipeline
        self._pipelines: dict[tuple[str, str | None], Any] = {}
        self._lock = threading.Lock()

    def pipeline(self, spec: CompositionSpec) -> Any:
        key = (spec.model, spec.model_config)
        with self._lock:
            if key not in self._pipelines:
                pipe = self._load(spec.model, self.device, self.dtype, spec.model_config)
                pipe.set_progress_bar_config(disable=True)
                self._pipelines = {key: pipe}  # one model in memory at a time
            return self._pipelines[key]

    def generate(
        self,
        spec: CompositionSpec,
        num_images: int = 1,
        with_merged: bool = False,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> Run:
        """``num_images`` images from seeds ``spec.seed ..``, and with ``with_merged`` the same seeds
        with every concept LoRA merged (method ``merge``) to compare with."""
        from ..lora import check_lora_files
        from ..pngmeta import save_png

        if not 1 <= num_images <= 16:
            raise CLoRAError(f"number of images: expected 1..16, got {num_images}")
        if spec.seed + num_images - 1 > MAX_SEED:
            raise CLoRAError(f"seed: {num_images} images from seed {spec.seed} go past the largest seed {MAX_SEED}")
        check_lora_files(spec)  # a bad file: one line, before the model loads
        pipe = self.pipeline(spec)
        spec = fill_defaults(spec, pipe.family.spec_defaults)  # the step count below is the model family's
        calls = [(spec.replace(num_images=num_images), "")]  # the images of one call run as one batch
        if with_merged and spec.method != "merge":
            calls.append((spec.replace(method="merge", num_images=num_images), "-merged"))
        total, done = spec.steps * len(calls), 0
        run = Run(folder=Path(tempfile.mkdtemp(prefix="run-", dir=self.output_root)))
        run.labels = [c.label for c in spec.concepts]
        runtime = {"clora": __version__, "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}

        for call_spec, suffix in calls:
            what = f"{num_images} image(s)" + (" merged" if suffix else "")

            def on_step(_pipe: Any, index: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
                nonlocal done
                done += 1
                if progress is not None:
                    progress(min(done, total), total, what)
                if cancel is not None and cancel.is_set():
                    raise Cancelled("cancelled; nothing was written for the images being made")
                return kwargs

            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled before the run started")
            result = pipe(call_spec, keep_maps=not suffix, callback_on_step_end=on_step)
            for k, image in enumerate(result.images):
                path = run.folder / f"clora-{spec.seed + k}{suffix}.png"
                save_png(image, path, result.image_spec(k).to_dict(), runtime)
                (run.merged if suffix else run.images).append(path)
            if not suffix:
                run.output = result
                run.spec_yaml = run.folder / "clora-spec.yaml"
                run.spec_yaml.write_text(spec_yaml(result.image_spec(0)), encoding="utf-8")
        return run


def spec_yaml(spec: CompositionSpec) -> str:
    """The resolved spec as a YAML file ``clora generate`` reads back."""
    return yaml.safe_dump(spec.to_dict(), sort_keys=False, allow_unicode=True)


def maps_picture(run: Run, image: int, step: int) -> Any:
    """The attention maps and masks of image ``image`` (0-based) at denoising step ``step`` (1-based)."""
    from ..visualize import render_maps

    output = run.output
    step = max(1, min(step, len(output.masks[image])))
    return render_maps(output, labels=run.labels, tile=192, image=image, step=step - 1)
