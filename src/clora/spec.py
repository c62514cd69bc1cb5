"""The composition spec: what to generate, as plain data.

A spec is read from YAML or JSON (``load_spec``), validated field by field with messages that name
the field, and written back fully resolved (``CompositionSpec.to_dict``) into every PNG we make.
Key names are a contract with users and tools; unknown keys are an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import CLoRAError, one_line
from .methods import METHODS
from .schedulers import check_scheduler_name

MORPHOLOGY_OPS = ("erode", "dilate", "open", "close")
ENGINES = ("batched", "sequential")
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes


@dataclass(frozen=True)
class ConceptSpec:
    """One concept LoRA and the words of the prompt it owns."""

    lora: str
    phrase: str
    trigger: str | None = None  # replaces the phrase in this LoRA's own prompt; default: the phrase
    weight: float = 1.0
    name: str | None = None
    occurrence: int = 1  # which occurrence of the phrase in the prompt (1 = first)
    sha256: str | None = None  # if given, the LoRA file must have this hash

    @property
    def label(self) -> str:
        return self.name or self.phrase

    @property
    def trigger_text(self) -> str:
        return self.trigger if self.trigger else self.phrase


@dataclass(frozen=True)
class StyleSpec:
    """A LoRA applied to every branch (a style), with its weight."""

    lora: str
    weight: float = 0.8
    name: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class CompositionSpec:
    """Everything that decides the pixels of one CLoRA image.

    The fields left ``None`` below (steps, guidance, scheduler and the contrastive update's step size
    and schedule) take the model family's defaults when the pipeline runs (``families``, and
    ``fill_defaults``); the spec written into every image carries the values used. On SD 1.x/2.x and
    SDXL they follow Stable Diffusion 1.5 practice (50 DDIM steps, guidance 7.5) and the authors'
    notebook for the CLoRA knobs, scaled to 50 steps where they count steps: the contrastive
    update runs in the first half of the steps (notebook: 50 of 100) with step size 20, and
    20 extra updates at steps 0, 10 and 20.
    """

    prompt: str
    concepts: tuple[ConceptSpec, ...]
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    model_config: str | None = None  # for a single-file model: diffusers folder or hub id with its configs
    negative_prompt: str = ""
    clip_skip: int | None = None  # A1111's count: 1 = CLIP's last layer, 2 = penultimate; None: the model's own
    styles: tuple[StyleSpec, ...] = ()
    seed: int = 0
    steps: int | None = None  # None: the family's (SD/SDXL 50, Flux 28)
    guidance: float | None = None  # SD/SDXL: classifier-free guidance; Flux: the distilled guidance embedding
    true_cfg: float = 1.0  # Flux: true classifier-free guidance over a negative prompt when > 1 (SD/SDXL: unused)
    guidance_rescale: float = 0.0  # for v-prediction models (SD 2.x); 0 = off
    height: int | None = None  # None: the model's native size
    width: int | None = None
    scheduler: str | None = None  # None: the family's (SD/SDXL ddim, Flux flow_euler)
    step_size: float | None = None
    max_iter_to_alter: int | None = None
    iterative_steps: tuple[int, ...] | None = None
    iterative_iters: int | None = None
    temperature: float = 0.5
    mask_threshold: float = 0.3
    mask_morphology: tuple[str, ...] = ()
    apply_mask_after: int = 0
    text_encoder_lora: bool = True
    lora_scale: float = 1.0
    parity: bool = False
    engine: str = "batched"  # batched: every branch in one UNet call; sequential: one call per branch
    method: str = "clora"  # clora, or a baseline to compare with: merge, switch, composite (``methods``)
    # switch: steps before the next concept LoRA takes over; None: Zhong et al.'s 5 per 100 steps
    switch_every: int | None = None
    num_images: int = 1  # images of one call, seeds seed .. seed+num_images-1, run as one batch
    max_batch: int | None = None  # samples per UNet call; None: automatic
    prompts: tuple[str, ...] | None = None
    concept_tokens: tuple[tuple[tuple[int, ...], ...], ...] | None = None
    mask_tokens: tuple[tuple[int, ...], ...] | None = None

    def replace(self, **changes: Any) -> CompositionSpec:
        """A copy with some fields changed, validated like a spec read from a file."""
        data = self.to_dict()
        data.update(changes)
        return spec_from_dict(data, source="spec")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data with the same keys a spec file uses."""
        data = dataclasses.asdict(self)
        data["concepts"] = [_drop_none(c) for c in data["concepts"]]
        data["styles"] = [_drop_none(s) for s in data["styles"]]
        return _lists(data)


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _lists(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


def load_spec(path: str | os.PathLike) -> CompositionSpec:
    """Read a YAML or JSON spec file; LoRA paths and local model folders resolve next to it."""
    path = Path(path)
    if not path.is_file():
        raise CLoRAError(f"{path}: spec file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CLoRAError(f"{path}: cannot read the spec file ({exc})") from None
    if not text.strip():
        raise CLoRAError(f"{path}: the file is empty; expected a spec with at least prompt: and concepts:")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:  # YAML is a superset of JSON, so .yaml, .yml and anything else go here
            data = yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise CLoRAError(f"{path}: invalid {kind}{line}: {one_line(getattr(exc, 'problem', None) or exc)}") from None
    if data is None:  # only comments, or a bare "---"
        raise CLoRAError(
            f"{path}: the file is empty (only comments); expected a spec with at least prompt: and concepts:"
        )
    return spec_from_dict(data, source=str(path), base_dir=path.parent)


def spec_from_dict(data: Any, source: str = "spec", base_dir: Path | None = None) -> CompositionSpec:
    """Validate plain data (from YAML, JSON or a PNG chunk) into a spec.

    ``source`` prefixes every error message; ``base_dir`` anchors relative paths.
    """
    if not isinstance(data, dict):
        raise CLoRAError(f"{source}: expected a mapping of keys (prompt:, concepts:, ...), got {type(data).__name__}")
    v = _Validator(source)
    known = {f.name for f in dataclasses.fields(CompositionSpec)}
    v.no_unknown_keys(data, known, "")
    for key in ("prompt", "concepts"):
        if key not in data:
            raise CLoRAError(f"{source}: missing required key '{key}'")

    concepts_raw = data["concepts"]
    if not isinstance(concepts_raw, list) or not concepts_raw:
        raise CLoRAError(f"{source}: concepts: expected a non-empty list of {{lora:, phrase:}} entries")
    concepts = tuple(_concept(v, c, f"concepts[{i}]", base_dir) for i, c in enumerate(concepts_raw))
    styles_raw = data.get("styles") or []
    if not isinstance(styles_raw, list):
        raise CLoRAError(f"{source}: styles: expected a list of {{lora:, weight:}} entries")
    styles = tuple(_style(v, s, f"styles[{i}]", base_dir) for i, s in enumerate(styles_raw))

    defaults = CompositionSpec(prompt="", concepts=())

    def get(key: str) -> Any:  # a missing key or an explicit null both mean "the default"
        return data[key] if data.get(key) is not None else getattr(defaults, key)

    spec = CompositionSpec(
        prompt=v.text(data["prompt"], "prompt"),
        concepts=concepts,
        model=_model(v.text(get("model"), "model"), base_dir),
        model_config=_opt(data, "model_config", lambda x: _model(v.text(x, "model_config"), base_dir)),
        negative_prompt=v.text(get("negative_prompt"), "negative_prompt", allow_empty=True),
        clip_skip=_opt(data, "clip_skip", lambda x: v.integer(x, "clip_skip", minimum=1, maximum=12)),
        styles=styles,
        seed=v.integer(get("seed"), "seed", minimum=0, maximum=MAX_SEED),
        steps=_opt(data, "steps", lambda x: v.integer(x, "steps", minimum=1)),
        guidance=_opt(data, "guidance", lambda x: v.number(x, "guidance", minimum=0.0)),
        true_cfg=v.number(get("true_cfg"), "true_cfg", minimum=1.0),
        guidance_rescale=v.number(get("guidance_rescale"), "guidance_rescale", minimum=0.0, maximum=1.0),
        height=None if data.get("height") is None else v.integer(data["height"], "height", minimum=8),
        width=None if data.get("width") is None else v.integer(data["width"], "width", minimum=8),
        scheduler=_opt(
            data, "scheduler", lambda x: check_scheduler_name(v.text(x, "scheduler").lower(), f"{source}: scheduler")
        ),
        step_size=_opt(data, "step_size", lambda x: v.number(x, "step_size", minimum=0.0)),
        max_iter_to_alter=_opt(data, "max_iter_to_alter", lambda x: v.integer(x, "max_iter_to_alter", minimum=0)),
        iterative_steps=_opt(data, "iterative_steps", lambda x: tuple(v.int_list(x, "iterative_steps"))),
        iterative_iters=_opt(data, "iterative_iters", lambda x: v.integer(x, "iterative_iters", minimum=0)),
        temperature=v.number(get("temperature"), "temperature", minimum=0.0, exclusive=True),
        mask_threshold=v.number(get("mask_threshold"), "mask_threshold", minimum=0.0, maximum=1.0),
        mask_morphology=tuple(v.choice_list(get("mask_morphology"), "mask_morphology", MORPHOLOGY_OPS)),
        apply_mask_after=v.integer(get("apply_mask_after"), "apply_mask_after", minimum=0),
        text_encoder_lora=v.boolean(get("text_encoder_lora"), "text_encoder_lora"),
        lora_scale=v.number(get("lora_scale"), "lora_scale"),
        parity=v.boolean(get("parity"), "parity"),
        engine=v.choice(get("engine"), "engine", ENGINES),
        method=v.choice(get("method"), "method", tuple(METHODS)),
        switch_every=_opt(data, "switch_every", lambda x: v.integer(x, "switch_every", minimum=1)),
        num_images=v.integer(get("num_images"), "num_images", minimum=1),
        max_batch=None
        if data.get("max_batch") in (None, "auto")
        else v.integer(data["max_batch"], "max_batch", minimum=1),
        prompts=_opt(data, "prompts", lambda x: tuple(v.text_list(x, "prompts"))),
        concept_tokens=_opt(data, "concept_tokens", lambda x: v.nested_positions(x, "concept_tokens", depth=3)),
        mask_tokens=_opt(data, "mask_tokens", lambda x: v.nested_positions(x, "mask_tokens", depth=2)),
    )
    _check_overrides(spec, source)
    return spec


FAMILY_DEFAULTED = (
    "steps",
    "guidance",
    "scheduler",
    "step_size",
    "max_iter_to_alter",
    "iterative_steps",
    "iterative_iters",
)
"""The spec fields whose default depends on the model family (``families.ModelFamily.spec_defaults``)."""


def fill_defaults(spec: CompositionSpec, defaults: dict[str, Any]) -> CompositionSpec:
    """``spec`` with every family-defaulted field it leaves unset taken from ``defaults``."""
    missing = {key: defaults[key] for key in FAMILY_DEFAULTED if getattr(spec, key) is None}
    return dataclasses.replace(spec, **missing) if missing else spec


def _opt(data: dict[str, Any], key: str, parse) -> Any:
    return None if data.get(key) is None else parse(data[key])


def _check_overrides(spec: CompositionSpec, source: str) -> None:
    n = len(spec.concepts)
    last_seed = spec.seed + spec.num_images - 1
    if last_seed > MAX_SEED:
        raise CLoRAError(
            f"{source}: num_images: {spec.num_images} images from seed {spec.seed} need seeds up to {last_seed}, "
            f"past the largest seed {MAX_SEED} (2**64-1); lower the seed or the number of images"
        )
    if spec.parity and spec.method != "clora":
        raise CLoRAError(
            f"{source}: parity: reproduces the authors' CLoRA code; method {spec.method!r} has no parity mode"
        )
    if spec.prompts is not None and len(spec.prompts) != n + 1:
        raise CLoRAError(
            f"{source}: prompts: expected {n + 1} prompts (the base prompt, then one per concept), got {len(spec.prompts)}"
        )
    if spec.concept_tokens is not None and (
        len(spec.concept_tokens) != n or any(len(per) != n + 1 for per in spec.concept_tokens)
    ):
        raise CLoRAError(
            f"{source}: concept_tokens: expected {n} lists (one per concept) of {n + 1} position lists (one per prompt)"
        )
    if spec.mask_tokens is not None and len(spec.mask_tokens) != n + 1:
        raise CLoRAError(f"{source}: mask_tokens: expected {n + 1} position lists (one per prompt, prompt 0 empty)")


def looks_like_local_path(model: str) -> bool:
    """Hub ids are ``owner/name``; anything else (absolute, ./relative, a single name, a file) is a path."""
    expanded = os.path.expanduser(model)
    suffixes = (".safetensors", ".ckpt", ".gguf")
    return expanded.startswith((".", "/")) or expanded.count("/") != 1 or expanded.endswith(suffixes)


def _model(model: str, base_dir: Path | None) -> str:
    """Local paths resolve against the spec's folder; hub ids stay as they are."""
    path = Path(os.path.expanduser(model))
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    if path.exists() or (looks_like_local_path(model) and base_dir is not None):
        return str(path.resolve())
    return model


def _lora_path(v: _Validator, value: Any, where: str, base_dir: Path | None) -> str:
    text = v.text(value, f"{where}.lora")
    path = Path(os.path.expanduser(text))
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    return str(path.resolve()) if base_dir is not None else str(path)


def _concept(v: _Validator, raw: Any, where: str, base_dir: Path | None) -> ConceptSpec:
    if not isinstance(raw, dict):
        raise CLoRAError(f"{v.source}: {where}: expected a mapping with lora: and phrase:")
    v.no_unknown_keys(raw, {f.name for f in dataclasses.fields(ConceptSpec)}, where + ".")
    for key in ("lora", "phrase"):
        if raw.get(key) is None:
            raise CLoRAError(f"{v.source}: {where}: missing required key '{key}'")
    return ConceptSpec(
        lora=_lora_path(v, raw["lora"], where, base_dir),
        phrase=v.text(raw["phrase"], f"{where}.phrase"),
        trigger=None if raw.get("trigger") is None else v.text(raw["trigger"], f"{where}.trigger"),
        weight=v.number(raw.get("weight", 1.0), f"{where}.weight"),
        name=None if raw.get("name") is None else v.text(raw["name"], f"{where}.name"),
        occurrence=v.integer(raw.get("occurrence", 1), f"{where}.occurrence", minimum=1),
        sha256=None if raw.get("sha256") is None else v.text(raw["sha256"], f"{where}.sha256").lower(),
    )


def _style(v: _Validator, raw: Any, where: str, base_dir: Path | None) -> StyleSpec:
    if not isinstance(raw, dict):
        raise CLoRAError(f"{v.source}: {where}: expected a mapping with lora: and weight:")
    v.no_unknown_keys(raw, {f.name for f in dataclasses.fields(StyleSpec)}, where + ".")
    if raw.get("lora") is None:
        raise CLoRAError(f"{v.source}: {where}: missing required key 'lora'")
    return StyleSpec(
        lora=_lora_path(v, raw["lora"], where, base_dir),
        weight=v.number(raw.get("weight", 0.8), f"{where}.weight"),
        name=None if raw.get("name") is None else v.text(raw["name"], f"{where}.name"),
        sha256=None if raw.get("sha256") is None else v.text(raw["sha256"], f"{where}.sha256").lower(),
    )


class _Validator:
    """Type checks that raise one-line errors naming the source and the field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, name: str, expected: str, got: Any) -> CLoRAError:
        return CLoRAError(f"{self.source}: {name}: expected {expected}, got {got!r}")

    def no_unknown_keys(self, data: dict[str, Any], known: set[str], prefix: str) -> None:
        unknown = sorted(set(map(str, data)) - known)
        if unknown:
            raise CLoRAError(
                f"{self.source}: unknown key '{prefix}{unknown[0]}' (valid keys: {', '.join(sorted(known))})"
            )

    def text(self, value: Any, name: str, allow_empty: bool = False) -> str:
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            raise self.fail(name, "a non-empty string" if not allow_empty else "a string", value)
        return value

    def integer(self, value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, "an integer", value)
        if minimum is not None and value < minimum:
            raise self.fail(name, f"an integer >= {minimum}", value)
        if maximum is not None and value > maximum:
            raise self.fail(name, f"an integer <= {maximum}", value)
        return value

    def number(
        self, value: Any, name: str, minimum: float | None = None, maximum: float | None = None, exclusive: bool = False
    ) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise self.fail(name, "a number", value)
        if minimum is not None and (value < minimum or (exclusive and value == minimum)):
            raise self.fail(name, f"a number {'>' if exclusive else '>='} {minimum}", value)
        if maximum is not None and value > maximum:
            raise self.fail(name, f"a number <= {maximum}", value)
        return float(value)

    def boolean(self, value: Any, name: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(name, "true or false", value)
        return value

    def choice(self, value: Any, name: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.fail(name, f"one of {', '.join(choices)}", value)
        return value

    def int_list(self, value: Any, name: str) -> list[int]:
        if not isinstance(value, (list, tuple)):
            raise self.fail(name, "a list of integers", value)
        return [self.integer(x, f"{name}[{i}]", minimum=0) for i, x in enumerate(value)]

    def text_list(self, value: Any, name: str) -> list[str]:
        if not isinstance(value, (list, tuple)):
            raise self.fail(name, "a list of strings", value)
        return [self.text(x, f"{name}[{i}]") for i, x in enumerate(value)]

    def choice_list(self, value: Any, name: str, choices: tuple[str, ...]) -> list[str]:
        if not isinstance(value, (list, tuple)):
            raise self.fail(name, f"a list of {', '.join(choices)}", value)
        for i, x in enumerate(value):
            if x not in choices:
                raise self.fail(f"{name}[{i}]", f"one of {', '.join(choices)}", x)
        return list(value)

    def nested_positions(self, value: Any, name: str, depth: int) -> tuple:
        if depth == 1:
            if not isinstance(value, (list, tuple)):
                raise self.fail(name, "a list of token positions", value)
            return tuple(self.integer(x, f"{name}[{i}]") for i, x in enumerate(value))
        if not isinstance(value, (list, tuple)):
            raise self.fail(name, "a list of lists", value)
        return tuple(self.nested_positions(x, f"{name}[{i}]", depth - 1) for i, x in enumerate(value))
