"""The web UI's form as plain data: which spec keys it shows, how its values become a spec, the
token preview shown while the user types, trigger suggestions, and settings restored from a PNG.

Nothing here imports Gradio; ``clora.ui.app`` lays these out in the browser.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ..errors import CLoRAError, one_line
from ..methods import METHODS
from ..schedulers import SCHEDULERS
from ..spec import ENGINES, FAMILY_DEFAULTED, MORPHOLOGY_OPS, CompositionSpec, spec_from_dict

MAX_CONCEPTS = 8
MAX_STYLES = 3
CONCEPT_FIELDS = ("lora", "phrase", "trigger", "weight")
STYLE_FIELDS = ("lora", "weight")
EMPTY_CONCEPT = {"lora": "", "phrase": "", "trigger": "", "weight": 1.0}
EMPTY_STYLE = {"lora": "", "weight": 0.8}
PINNED_KEYS = ("prompts", "concept_tokens", "mask_tokens")
"""Explicit prompts and positions a restored PNG carries; kept only while the words they were made
for stay the same (the UI re-derives positions from the phrases otherwise)."""


@dataclass(frozen=True)
class Field:
    """One spec key under the "advanced" fold."""

    key: str
    kind: str  # int, float, text, bool, choice, list (comma-separated), choices (several of ``choices``)
    help: str
    choices: tuple[str, ...] = ()
    optional: bool = False  # an empty box means None: the model's own value, or automatic

    @property
    def default(self) -> Any:
        return _SPEC_DEFAULTS[self.key]

    @property
    def label(self) -> str:
        shown = self.default
        if isinstance(shown, (list, tuple)):
            shown = ", ".join(str(x) for x in shown) or "none"
        elif shown is None and self.key in FAMILY_DEFAULTED:
            shown = "empty: the model family's own"
        elif shown is None:
            shown = "empty (the model's own)" if self.key in ("height", "width", "clip_skip") else "empty"
        return f"{self.key} (default {shown})"


_SPEC_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(CompositionSpec) if f.name not in ("prompt", "concepts")
}

ADVANCED: tuple[Field, ...] = (
    Field("negative_prompt", "text", "what the image should not show"),
    Field("steps", "int", "denoising steps (SD/SDXL 50, Flux 28)", optional=True),
    Field("guidance", "float", "guidance scale (SD/SDXL 7.5; Flux's distilled guidance 3.5)", optional=True),
    Field("true_cfg", "float", "Flux: true classifier-free guidance with the negative prompt when > 1"),
    Field(
        "scheduler", "choice", "the sampler (SD/SDXL ddim, Flux flow_euler)", choices=tuple(SCHEDULERS), optional=True
    ),
    Field("height", "int", "image height in pixels, a multiple of 8", optional=True),
    Field("width", "int", "image width in pixels, a multiple of 8", optional=True),
    Field("method", "choice", "CLoRA, or a baseline to compare with", choices=tuple(METHODS)),
    Field("step_size", "float", "how far each contrastive update moves the latent", optional=True),
    Field("max_iter_to_alter", "int", "the contrastive update runs in steps 0 .. this - 1", optional=True),
    Field("iterative_steps", "list", "steps with extra updates, comma-separated", optional=True),
    Field("iterative_iters", "int", "extra updates at each of those steps", optional=True),
    Field("temperature", "float", "InfoNCE temperature"),
    Field("mask_threshold", "float", "attention above this share of its maximum joins a concept's mask"),
    Field("mask_morphology", "choices", "operations on the masks, in order", choices=MORPHOLOGY_OPS),
    Field("apply_mask_after", "int", "steps fused by plain averaging before the masks take over"),
    Field("text_encoder_lora", "bool", "apply the LoRAs' text-encoder parts"),
    Field("lora_scale", "float", "scale of every LoRA"),
    Field("clip_skip", "int", "1 = CLIP's last layer, 2 = the one before (Pony-style fine-tunes)", optional=True),
    Field("guidance_rescale", "float", "for v-prediction models (SD 2.x); 0 = off"),
    Field("switch_every", "int", "LoRA Switch: steps per LoRA; empty = 5 per 100 steps", optional=True),
    Field("engine", "choice", "batched: all branches in one UNet call", choices=ENGINES),
    Field("max_batch", "int", "samples per UNet call; empty = automatic", optional=True),
    Field("parity", "bool", "reproduce the authors' code exactly (SD 1.x only)"),
    Field("model_config", "text", "for a single .safetensors checkpoint: a diffusers folder or hub id", optional=True),
)
ADVANCED_KEYS = tuple(f.key for f in ADVANCED)


def field_value(f: Field, value: Any) -> Any:
    """A spec value as the form shows it (lists as comma-separated text, None as an empty box)."""
    if value is None:
        return None if f.kind in ("int", "float") else ("" if f.kind in ("text", "list") else value)
    if f.kind == "list":
        return ", ".join(str(x) for x in value)
    if f.kind == "choices":
        return list(value)
    return value


def _from_field(f: Field, value: Any) -> Any:
    """A form value as spec data; what the spec's validator then checks."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None if f.optional or f.kind in ("int", "float") else ([] if f.kind == "list" else value)
    if f.kind == "int" and isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else value
    if f.kind == "list":
        items = [item.strip() for item in str(value).replace(";", ",").split(",") if item.strip()]
        try:
            return [int(item) for item in items]
        except ValueError:
            raise CLoRAError(f"{f.key}: expected whole numbers separated by commas, got {value!r}") from None
    if f.kind == "text":
        return str(value)
    return value


def spec_data(
    model: str,
    prompt: str,
    concepts: list[dict[str, Any]],
    styles: list[dict[str, Any]],
    seed: float | str | None,
    advanced: dict[str, Any],
    pinned: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Spec data from the form: concept and style rows without a LoRA file are left out, advanced
    values are converted back from their boxes, and ``pinned`` (from a restored PNG) is kept when
    its words still match."""
    if isinstance(seed, str):
        seed = int(seed.strip()) if seed.strip().isdigit() else (seed.strip() or None)
    elif isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    data: dict[str, Any] = {"model": (model or "").strip(), "prompt": prompt or "", "seed": seed}
    rows = []
    for row in concepts:
        if not str(row.get("lora") or "").strip() and not str(row.get("phrase") or "").strip():
            continue
        item = {"lora": str(row.get("lora") or "").strip(), "phrase": row.get("phrase") or ""}
        if str(row.get("trigger") or "").strip():
            item["trigger"] = row["trigger"]
        item["weight"] = 1.0 if row.get("weight") is None else row["weight"]
        rows.append(item | _extras(pinned, "concepts", item))
    data["concepts"] = rows
    data["styles"] = [
        item | _extras(pinned, "styles", item)
        for item in (
            {"lora": str(row["lora"]).strip(), "weight": 0.8 if row.get("weight") is None else row["weight"]}
            for row in styles
            if str(row.get("lora") or "").strip()
        )
    ]
    by_key = {f.key: f for f in ADVANCED}
    for key, value in advanced.items():
        data[key] = _from_field(by_key[key], value)
    if pinned and _same_words(pinned, data):
        data.update({k: pinned[k] for k in PINNED_KEYS if pinned.get(k) is not None})
    return data


def _extras(pinned: dict[str, Any] | None, kind: str, item: dict[str, Any]) -> dict[str, Any]:
    """The keys a row has no box for (name, occurrence, sha256), kept from a restored PNG or the demo
    for the row that still holds the same LoRA file (and, for a concept, the same phrase)."""
    for extra in (pinned or {}).get(f"{kind}_extras", ()):
        if extra["lora"] == item["lora"] and extra.get("phrase", item.get("phrase")) == item.get("phrase"):
            return {k: v for k, v in extra.items() if k not in ("lora", "phrase")}
    return {}


def _same_words(pinned: dict[str, Any], data: dict[str, Any]) -> bool:
    def words(d):
        return (d.get("prompt"), [(c.get("phrase"), c.get("trigger")) for c in d.get("concepts", [])])

    return words(pinned) == words(data)


def build_spec(data: dict[str, Any]) -> CompositionSpec:
    """The validated spec; a problem is a ``CLoRAError`` whose text names the field."""
    if not data.get("concepts"):
        raise CLoRAError("concepts: add at least one concept row with a LoRA file and a phrase of the prompt")
    return spec_from_dict(data, source="form")


def message(exc: CLoRAError) -> str:
    return str(exc).removeprefix("form: ")


def remove_row(
    i: int, count: int, values: tuple[Any, ...], keys: tuple[str, ...], empty: dict[str, Any]
) -> tuple[int, list[Any]]:
    """The rows' values (every row's ``keys``, flat) without row ``i``: the rows below move up and an
    empty row fills the end; and the new count of shown rows."""
    width = len(keys)
    rows = [list(values[r : r + width]) for r in range(0, len(values), width)]
    del rows[i]
    rows.append([empty[k] for k in keys])
    return (max(count - 1, 0) if i < count else count), [v for row in rows for v in row]


# -- what the user sees while typing ---------------------------------------------------------------


@dataclass
class Preview:
    """The token plan of the form as it is: highlighted prompt, positions table and problems."""

    highlighted: list[tuple[str, str | None]]  # (text, concept label or None) pieces of the prompt
    table: str  # markdown: each prompt with its concepts' token positions
    problems: list[str]  # one line each; empty when the form would run
    plan: Any = None  # the TokenPlan, when there is one


@lru_cache(maxsize=8)
def _tokenizer(model: str, config: str | None) -> Any:
    from ..runtime import load_tokenizer

    return load_tokenizer(model, config)


def highlight(prompt: str, concepts: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    """The prompt cut into pieces, each concept's phrase labelled with its name (phrase not found: left out)."""
    from ..tokens import find_phrase

    spans = []
    for row in concepts:
        span = find_phrase(prompt, row.get("phrase") or "", int(row.get("occurrence") or 1))
        if span and all(span[1] <= s or e <= span[0] for s, e, _ in spans):
            spans.append((*span, row.get("name") or row["phrase"].strip()))
    pieces, cursor = [], 0
    for start, end, label in sorted(spans):
        if start > cursor:
            pieces.append((prompt[cursor:start], None))
        pieces.append((prompt[start:end], label))
        cursor = end
    if cursor < len(prompt):
        pieces.append((prompt[cursor:], None))
    return pieces


def preview(data: dict[str, Any]) -> Preview:
    """Validate the form and plan its tokens as ``--dry-run`` would, without loading a model."""
    from ..tokens import PromptTruncatedWarning, plan_tokens, truncation_messages

    shown = highlight(data.get("prompt") or "", data.get("concepts") or [])
    try:
        spec = build_spec(data)
    except CLoRAError as exc:
        return Preview(shown, "", [message(exc)])
    try:
        tokenizer = _tokenizer(spec.model, spec.model_config)
    except CLoRAError as exc:
        return Preview(shown, "", [str(exc)])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PromptTruncatedWarning)
            plan = plan_tokens(tokenizer, spec)
    except CLoRAError as exc:
        return Preview(shown, "", [message(exc)])
    problems = truncation_messages(plan, spec, tokenizer.model_max_length)
    return Preview(shown, token_table(plan, spec), problems, plan)


def token_table(plan: Any, spec: CompositionSpec) -> str:
    """Markdown: one row per prompt and concept, with the positions and the tokens at them."""
    lines = ["| prompt | text | concept | positions | tokens |", "|---|---|---|---|---|"]
    for i, prompt in enumerate(plan.prompts):
        whose = "base" if i == 0 else spec.concepts[i - 1].label
        for c, concept in enumerate(spec.concepts):
            positions = plan.concept_tokens[c][i]
            tokens = " ".join(plan.tokens[i][p] for p in positions if p < len(plan.tokens[i]))
            cell = _cell(prompt) if c == 0 else ""
            lines.append(
                f"| {i} ({_cell(whose)}) | {cell} | {_cell(concept.label)} | "
                f"{', '.join(map(str, positions))} | `{_cell(tokens)}` |"
            )
    return "\n".join(lines)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def suggested_trigger(lora_path: str) -> str | None:
    """A trigger word from a LoRA file's metadata: ``modelspec.trigger_phrase``, else the most
    frequent training tag in kohya's ``ss_tag_frequency``; ``None`` when it has neither."""
    from ..lora import read_lora_metadata

    try:
        metadata = read_lora_metadata(lora_path)
    except Exception:  # noqa: BLE001 - any unreadable file just gets no suggestion
        return None
    phrase = (metadata.get("modelspec.trigger_phrase") or "").strip()
    if phrase:
        return phrase
    try:
        frequencies = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except json.JSONDecodeError:
        return None
    counts: dict[str, float] = {}
    for tags in frequencies.values() if isinstance(frequencies, dict) else ():
        for tag, count in tags.items() if isinstance(tags, dict) else ():
            if isinstance(count, (int, float)) and tag.strip():
                counts[tag.strip()] = counts.get(tag.strip(), 0) + count
    return max(counts, key=lambda tag: (counts[tag], -len(tag))) if counts else None


def form_from_spec_data(data: dict[str, Any]) -> dict[str, Any]:
    """Form values for spec data (a restored PNG, the demo): main fields, rows, advanced boxes, pinned."""
    spec = spec_from_dict(data, source="png")
    if len(spec.concepts) > MAX_CONCEPTS:
        raise CLoRAError(f"concepts: the UI shows up to {MAX_CONCEPTS} concepts, this spec has {len(spec.concepts)}")
    concepts = [
        {"lora": c.lora, "phrase": c.phrase, "trigger": c.trigger or "", "weight": c.weight} for c in spec.concepts
    ]
    styles = [{"lora": s.lora, "weight": s.weight} for s in spec.styles[:MAX_STYLES]]
    resolved = spec.to_dict()
    pinned = {k: resolved[k] for k in PINNED_KEYS} | {  # what the rows' boxes do not hold
        "prompt": spec.prompt,
        "concepts": [{"phrase": c["phrase"], "trigger": c["trigger"] or None} for c in concepts],
        "concepts_extras": [
            {k: v for k, v in c.items() if k not in ("trigger", "weight")} for c in resolved["concepts"]
        ],
        "styles_extras": [{k: v for k, v in s.items() if k != "weight"} for s in resolved["styles"]],
    }
    return {
        "model": spec.model,
        "prompt": spec.prompt,
        "seed": spec.seed,
        "concepts": concepts,
        "styles": styles,
        "advanced": {f.key: field_value(f, resolved[f.key]) for f in ADVANCED},
        "pinned": pinned,
    }


def form_from_png(path: str) -> dict[str, Any]:
    """The form values stored in a PNG made by clora (``clora generate`` or this UI)."""
    from ..pngmeta import read_png_spec

    try:
        return form_from_spec_data(read_png_spec(path))
    except CLoRAError as exc:
        raise CLoRAError(f"{path}: {message(exc).removeprefix('png: ')}") from None
    except Exception as exc:  # noqa: BLE001 - a broken PNG is the user's input, not our bug
        raise CLoRAError(f"{path}: cannot read its settings ({one_line(exc)})") from None


def demo_form() -> dict[str, Any]:
    """The bundled demo composition (tiny model, two shape LoRAs), as the form opens with it."""
    from ..demo.bench import DEMO_CONCEPTS, DEMO_SEED, clora_spec

    return form_from_spec_data(clora_spec(DEMO_CONCEPTS, DEMO_SEED).to_dict())
