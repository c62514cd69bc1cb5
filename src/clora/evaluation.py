"""Scores for generated images, as the CLoRA paper reports them: CLIP-T, CLIP-I and DINO.

- CLIP-T: cosine similarity of CLIP's embeddings of the image and of its prompt (the spec's
  ``prompt``, with the concepts' plain phrases: CLIP does not know trigger words such as ``sks``);
- CLIP-I: per concept, the mean cosine similarity of CLIP image embeddings between the image and
  that concept's reference images, then the mean over the concepts;
- DINO: the same with DINO's [CLS] embedding.

Each PNG's prompt and concepts come from the spec ``clora generate`` stored in it. Reference images
of a concept lie in ``REFERENCES/<label>/`` (the concept's ``name``, else its phrase).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .errors import CLoRAError, one_line
from .pngmeta import read_png_spec
from .spec import spec_from_dict

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINO = "facebook/dino-vits16"
REFERENCE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class ImageScore:
    image: Path
    method: str
    seed: int
    clip_t: float
    clip_i: float | None = None  # None without reference images
    dino: float | None = None
    per_concept: dict[str, tuple[float, float]] = field(default_factory=dict)  # label -> (CLIP-I, DINO)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities of the rows of ``a`` (n, d) and ``b`` (m, d): (n, m)."""
    return torch.nn.functional.normalize(a.float(), dim=-1) @ torch.nn.functional.normalize(b.float(), dim=-1).T


def _features(output: Any) -> torch.Tensor:
    """transformers 4 returns the projected features; 5 returns an output with them as ``pooler_output``."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _load(kind: str, flag: str, name: str, loader: Any) -> Any:
    try:
        return loader.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - any loading failure becomes one line
        from .runtime import hub_problem

        problem = hub_problem(exc)
        if problem:
            raise CLoRAError(
                f"{flag}: {name!r} {problem}; download it once while online, or give a local folder "
                f"saved with save_pretrained"
            ) from None
        raise CLoRAError(f"{flag}: cannot load the {kind} model {name!r} ({one_line(exc)})") from None


class Embedder:
    """CLIP (text and image) and DINO (image) embeddings, loaded by hub id or local folder."""

    def __init__(self, clip: str = DEFAULT_CLIP, dino: str | None = DEFAULT_DINO, device: str = "cpu") -> None:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

        self.device = torch.device(device)
        self.clip = _load("CLIP", "--clip", clip, CLIPModel).to(self.device).eval()
        self.clip_images = _load("CLIP image processor", "--clip", clip, AutoImageProcessor)
        self.clip_tokenizer = _load("CLIP tokenizer", "--clip", clip, AutoTokenizer)
        self.dino = _load("DINO", "--dino", dino, AutoModel).to(self.device).eval() if dino else None
        self.dino_images = _load("DINO image processor", "--dino", dino, AutoImageProcessor) if dino else None

    @torch.no_grad()
    def text(self, prompts: list[str]) -> torch.Tensor:
        inputs = self.clip_tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _features(self.clip.get_text_features(**inputs))

    @torch.no_grad()
    def clip_image(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.clip_images(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return _features(self.clip.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def dino_image(self, images: list[Image.Image]) -> torch.Tensor:
        if self.dino is None:
            raise RuntimeError("no DINO model loaded")
        pixels = self.dino_images(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return self.dino(pixel_values=pixels).last_hidden_state[:, 0]  # the [CLS] token


def generated_images(folder: Path) -> list[Path]:
    """The PNGs under ``folder`` and its sub-folders (``clora batch`` writes <composition>/<method>/<seed>.png;
    hidden folders skipped), sorted; each must carry its spec."""
    if not folder.is_dir():
        raise CLoRAError(f"{folder}: folder not found (give the folder of PNGs that clora generate wrote)")
    pngs = sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() == ".png"
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not pngs:
        raise CLoRAError(f"{folder}: no .png files to score")
    return pngs


def reference_images(references: Path, label: str) -> list[Path]:
    folder = references / label
    if not folder.is_dir():
        raise CLoRAError(
            f"--references: no folder {folder} for concept {label!r}; expected REFERENCES/<concept name or phrase>/"
        )
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in REFERENCE_SUFFIXES and p.is_file())
    if not files:
        raise CLoRAError(f"--references: {folder} holds no images ({', '.join(REFERENCE_SUFFIXES)})")
    return files


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError) as exc:
        raise CLoRAError(f"{path}: not a readable image ({exc})") from None


@dataclass
class ScoringInputs:
    """What ``score_images`` reads, checked before any model loads."""

    pngs: list[Path]
    specs: list[Any]  # the CompositionSpec each PNG carries
    references: dict[str, list[Path]]  # concept label -> reference images; empty: no CLIP-I/DINO


def scoring_inputs(folder: str | os.PathLike, references: str | os.PathLike | None = None) -> ScoringInputs:
    """Every PNG of ``folder`` with its spec, and each concept's reference images under ``references``."""
    pngs = generated_images(Path(folder))
    specs = [spec_from_dict(read_png_spec(p), source=str(p)) for p in pngs]
    sets: dict[str, list[Path]] = {}
    if references is not None:
        references = Path(references)
        if not references.is_dir():
            raise CLoRAError(f"--references: folder {references} not found")
        for spec in specs:
            for concept in spec.concepts:
                if concept.label not in sets:
                    sets[concept.label] = reference_images(references, concept.label)
    return ScoringInputs(pngs, specs, sets)


def score_images(inputs: ScoringInputs, embedder: Embedder) -> list[ImageScore]:
    """CLIP-T of every image; CLIP-I (and DINO, with a DINO model) where there are references."""
    reference_clip: dict[str, torch.Tensor] = {}
    reference_dino: dict[str, torch.Tensor] = {}
    for label, files in inputs.references.items():
        images = [_open_rgb(p) for p in files]
        reference_clip[label] = embedder.clip_image(images)
        if embedder.dino is not None:
            reference_dino[label] = embedder.dino_image(images)

    scores = []
    for path, spec in zip(inputs.pngs, inputs.specs, strict=True):
        image = [_open_rgb(path)]
        clip = embedder.clip_image(image)
        score = ImageScore(path, spec.method, spec.seed, float(cosine(clip, embedder.text([spec.prompt]))[0, 0]))
        if inputs.references:
            dino = embedder.dino_image(image) if embedder.dino is not None else None
            for concept in spec.concepts:
                clip_i = float(cosine(clip, reference_clip[concept.label]).mean())
                dino_i = float(cosine(dino, reference_dino[concept.label]).mean()) if dino is not None else float("nan")
                score.per_concept[concept.label] = (clip_i, dino_i)
            score.clip_i = sum(c for c, _ in score.per_concept.values()) / len(score.per_concept)
            if dino is not None:
                score.dino = sum(d for _, d in score.per_concept.values()) / len(score.per_concept)
        scores.append(score)
    return scores


COLUMNS = ("image", "method", "seed", "clip_t", "clip_i", "dino")


def score_rows(scores: list[ImageScore], root: Path | None = None) -> list[dict[str, Any]]:
    """One row per image: the columns of ``COLUMNS`` and, per concept, ``clip_i:<label>`` and ``dino:<label>``."""
    rows = []
    for s in scores:
        name = s.image.relative_to(root).as_posix() if root is not None else s.image.name  # unique in sub-folders
        row: dict[str, Any] = {"image": name, "method": s.method, "seed": s.seed}
        row.update(clip_t=round(s.clip_t, 4), clip_i=_rounded(s.clip_i), dino=_rounded(s.dino))
        for label, (clip_i, dino) in s.per_concept.items():
            row[f"clip_i:{label}"], row[f"dino:{label}"] = _rounded(clip_i), _rounded(dino)
        rows.append(row)
    return rows


def _rounded(value: float | None) -> float | str:
    return "" if value is None or value != value else round(value, 4)


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """All columns, written to a temporary file first: a failed run leaves no half-written CSV."""
    path = Path(path)
    columns = list(COLUMNS) + sorted({k for row in rows for k in row} - set(COLUMNS))
    partial = path.with_name(f".{path.name}.tmp")
    try:
        with open(partial, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def table(rows: list[dict[str, Any]]) -> str:
    """The main columns as aligned text, with the mean of each score per method at the bottom."""
    lines = [list(COLUMNS)] + [[str(row[c]) for c in COLUMNS] for row in rows]
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = [row for row in rows if row["method"] == method]
        means = []
        for c in ("clip_t", "clip_i", "dino"):
            values = [row[c] for row in mine if row[c] != ""]
            means.append(f"{sum(values) / len(values):.4f}" if values else "")
        lines.append([f"mean of {len(mine)}", method, "", *means])
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
