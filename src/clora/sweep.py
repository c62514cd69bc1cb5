"""Sweep files: compositions x seeds x methods x grid points, as a list of jobs (plain data).

```yaml
base: spec.yaml                  # a spec file (relative to this file) or an inline spec mapping
compositions:                    # each: a name, and spec keys that replace the base's
  - name: cat-dog
    prompt: a cat and a dog in a garden
    concepts: [{lora: loras/cat.safetensors, phrase: cat}, {lora: loras/dog.safetensors, phrase: dog}]
  - {composlora: reality_lora_info.json, loras: loras/reality, elements: 2}
seeds: [0, 1, "8-15"]            # integers and inclusive ranges
methods: [clora, merge]          # default [clora]
grid: {mask_threshold: [0.3, 0.4]}   # optional: every combination of these spec values
```

A job is one composition x method x grid point x seed; its key (``cat-dog/clora/mask_threshold=0.4/8``)
is also where its PNG goes under the output folder (``.png`` added). Nothing here loads a model.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import CLoRAError, one_line
from .methods import METHODS
from .spec import MAX_SEED, CompositionSpec, load_spec, spec_from_dict

SWEEP_KEYS = ("base", "compositions", "seeds", "methods", "grid")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")  # a composition name is a folder name


@dataclass(frozen=True)
class Job:
    """One image of a sweep: its spec (seed included) and where it goes."""

    composition: str
    method: str
    grid: tuple[tuple[str, Any], ...]  # (key, value) pairs of the grid point, in the sweep's order
    seed: int
    spec: CompositionSpec

    @property
    def grid_name(self) -> str:
        """``mask_threshold=0.4,steps=30``; empty without a grid."""
        return ",".join(f"{key}={_plain(value)}" for key, value in self.grid)

    @property
    def group(self) -> tuple[str, str, str]:
        """Jobs of one group differ only in their seed: one LoRA loading, seeds in batches."""
        return (self.composition, self.method, self.grid_name)

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of everything that decides the job's pixels (its spec, seed included)."""
        return hashlib.sha256(json.dumps(self.spec.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def same_but_seed(self, other: Job) -> bool:
        """Whether ``other`` differs from this job in its seed alone."""
        return self.group == other.group and dataclasses.replace(self.spec, seed=other.seed) == other.spec

    @property
    def key(self) -> str:
        """Stable across runs; also the PNG's path under the output folder, without ``.png``."""
        return "/".join(part for part in (*self.group, str(self.seed)) if part)


def load_sweep(path: str | Path) -> list[Job]:
    """Every job of a sweep file, validated before anything runs; a bad file is one ``CLoRAError``
    line naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise CLoRAError(f"{path}: sweep file not found")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise CLoRAError(f"{path}: cannot read the sweep file ({one_line(exc)})") from None
    return sweep_jobs(data, path.parent, str(path))


def sweep_jobs(data: Any, base_dir: Path, source: str = "sweep") -> list[Job]:
    """The jobs of sweep data (as read from YAML/JSON), paths relative to ``base_dir``."""
    if not isinstance(data, dict):
        raise CLoRAError(f"{source}: expected a mapping with base:, compositions: and seeds:")
    unknown = sorted(set(map(str, data)) - set(SWEEP_KEYS))
    if unknown:
        raise CLoRAError(f"{source}: unknown key '{unknown[0]}' (valid keys: {', '.join(SWEEP_KEYS)})")
    for key in ("base", "compositions", "seeds"):
        if key not in data:
            raise CLoRAError(f"{source}: missing required key '{key}'")
    base = _base(data["base"], base_dir, source)
    compositions = _compositions(data["compositions"], base_dir, source)
    seeds = parse_seeds(data["seeds"], f"{source}: seeds")
    methods = _methods(data.get("methods", ["clora"]), source)
    grid = grid_points(data.get("grid") or {}, f"{source}: grid")
    jobs = []
    for name, overrides in compositions:
        for method, point in itertools.product(methods, grid):
            where = f"{source}: composition {name!r}" + (f" at {_point_name(point)}" if point else "")
            spec = spec_from_dict({**base, **overrides, **dict(point), "method": method}, where, base_dir)
            jobs += [Job(name, method, point, seed, spec.replace(seed=seed, num_images=1)) for seed in seeds]
    return jobs


def parse_seeds(value: Any, where: str) -> list[int]:
    """``[0, 1, "8-15"]``: integers and inclusive ranges, in order, each seed once."""
    if not isinstance(value, list) or not value:
        raise CLoRAError(f'{where}: expected a non-empty list of integers and ranges like "8-15"')
    seeds: list[int] = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool):
            first, last = item, item
        elif isinstance(item, str) and re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", item):
            first, last = (int(part) for part in item.split("-"))
        else:
            raise CLoRAError(f'{where}: expected an integer or a range like "8-15", got {item!r}')
        if not 0 <= first <= last <= MAX_SEED:
            raise CLoRAError(f"{where}: {item!r} is not a range of seeds within 0..{MAX_SEED}, first <= last")
        seeds += [seed for seed in range(first, last + 1) if seed not in seeds]
    return seeds


def grid_points(grid: Any, where: str) -> list[tuple[tuple[str, Any], ...]]:
    """Every combination of the grid's values, as (key, value) pairs; one empty point without a grid."""
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise CLoRAError(f"{where}: expected a mapping of spec keys to non-empty lists of values")
    for key in grid:
        if key in ("seed", "method", "num_images"):
            raise CLoRAError(f"{where}: {key} cannot be a grid key (seeds: and methods: say them)")
    return [tuple(zip(grid, values)) for values in itertools.product(*grid.values())]


def _base(value: Any, base_dir: Path, source: str) -> dict[str, Any]:
    if isinstance(value, str):
        return load_spec(base_dir / value).to_dict()  # paths inside resolve next to the spec file
    if isinstance(value, dict):
        return dict(value)  # checked with each composition's keys; relative paths resolve next to the sweep
    raise CLoRAError(f"{source}: base: expected a spec file name or a spec mapping")


def _compositions(value: Any, base_dir: Path, source: str) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(value, list) or not value:
        raise CLoRAError(f"{source}: compositions: expected a non-empty list")
    out: list[tuple[str, dict[str, Any]]] = []
    for i, item in enumerate(value):
        where = f"{source}: compositions[{i}]"
        if not isinstance(item, dict):
            raise CLoRAError(f"{where}: expected a mapping with name: and spec keys, or composlora:")
        if "composlora" in item:
            out += composlora_compositions(item, base_dir, where)
            continue
        name = item.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise CLoRAError(f"{where}: name: expected a folder name (letters, digits, . _ + = -), got {name!r}")
        out.append((name, {k: v for k, v in item.items() if k != "name"}))
    names = [name for name, _ in out]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise CLoRAError(f"{source}: compositions: the name {repeated[0]!r} is used twice; names must differ")
    return out


def _methods(value: Any, source: str) -> list[str]:
    if not isinstance(value, list) or not value or any(m not in METHODS for m in value):
        raise CLoRAError(f"{source}: methods: expected a list of {', '.join(METHODS)}, got {value!r}")
    return list(dict.fromkeys(value))


def _plain(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _point_name(point: tuple[tuple[str, Any], ...]) -> str:
    return ",".join(f"{key}={_plain(value)}" for key, value in point)


# -- ComposLoRA (Zhong et al., Multi-LoRA Composition) ---------------------------------------------

COMPOSLORA_KEYS = ("composlora", "loras", "elements", "prompt", "negative_prompt")
COMPOSLORA_PROMPTS = {  # their base prompt and negative prompt per image style, as in their code
    "reality": "RAW photo, subject, 8k uhd, dslr, high quality, Fujifilm XT3, half-length portrait from knees up",
    "anime": "masterpiece, best quality",
}


def composlora_compositions(entry: dict[str, Any], base_dir: Path, where: str) -> list[tuple[str, dict[str, Any]]]:
    """ComposLoRA's compositions of ``elements`` elements from a ``*_lora_info.json``: one character and
    one element of each of ``elements - 1`` other categories, every category combination and every
    product of their elements (their ``generate_combinations``). Each element's LoRA is
    ``loras/<id>.safetensors``; the prompt is their base prompt for the set (``reality`` or ``anime``,
    from the file name; ``prompt:`` overrides) followed by every element's trigger words, comma
    separated, in the order character, then the categories' order in the file. Elements of the
    ``style`` category go to ``styles:`` (weight 0.8, their LoRA scale); the others are concepts whose
    phrase is their trigger words as they stand in the prompt. The name is the element ids joined by
    ``+``."""
    unknown = sorted(set(map(str, entry)) - set(COMPOSLORA_KEYS))
    if unknown:
        raise CLoRAError(f"{where}: unknown key '{unknown[0]}' (valid keys: {', '.join(COMPOSLORA_KEYS)})")
    info_path = base_dir / str(entry["composlora"])
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CLoRAError(f"{where}: composlora: cannot read {info_path} ({one_line(exc)})") from None
    if not isinstance(info, dict) or "character" not in info:
        raise CLoRAError(f"{where}: composlora: {info_path} has no 'character' category; is it a lora_info.json?")
    elements = entry.get("elements", 2)
    if not isinstance(elements, int) or not 2 <= elements <= len(info):
        raise CLoRAError(f"{where}: elements: expected an integer 2..{len(info)}, got {elements!r}")
    if "loras" not in entry:
        raise CLoRAError(f"{where}: missing required key 'loras' (the folder of <id>.safetensors files)")
    loras = base_dir / str(entry["loras"])
    style = "anime" if "anime" in info_path.name else "reality"
    prompt = entry.get("prompt", COMPOSLORA_PROMPTS[style])
    others = [category for category in info if category != "character"]
    out = []
    for categories in itertools.combinations(others, elements - 1):
        chosen = ("character", *categories)
        for combination in itertools.product(*(info[c] for c in chosen)):
            triggers = [word for element in combination for word in element["trigger"]]
            concepts, styles = [], []
            for category, e in zip(chosen, combination):
                lora = str(loras / f"{e['id']}.safetensors")
                if category == "style":
                    styles.append({"lora": lora, "weight": 0.8, "name": e["id"]})
                else:
                    concepts.append({"lora": lora, "phrase": ", ".join(e["trigger"]), "name": e["id"]})
            overrides = {"prompt": ", ".join([prompt, *triggers]), "concepts": concepts, "styles": styles}
            if "negative_prompt" in entry:
                overrides["negative_prompt"] = entry["negative_prompt"]
            out.append(("+".join(e["id"] for e in combination), overrides))
    return out
