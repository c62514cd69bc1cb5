"""The synthetic world of the embedded demo model.

Procedurally drawn 32x32 images of 1-3 flat shapes on a plain background, captions from a
small grammar ("a red circle and a blue square"), and the exact mask of every object.  The
truth is known, so a programmatic judge (:mod:`clora.demo.judge`) can score generations.

Concepts (taught by LoRAs, never seen by the base model):

* ``sks circle``  - a circle, orange on the top half and purple on the bottom half
* ``zwx square``  - a square of four quadrants, cyan and magenta in a checkerboard
* ``pqr triangle`` - a triangle, pink on the left half and brown on the right half

(Coarse two-colour designs: at 32x32 with a 2x VAE, finer patterns do not survive the tiny VAE.)

Style (a LoRA with no trigger word): a dark navy background instead of the light one.
Everything here is pure numpy and deterministic given a ``numpy.random.Generator``.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

IMG = 32  # image side in pixels

SHAPES = ("circle", "square", "triangle")

# Plain colours the base model is trained on.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 30),
}

# Colours only the concept LoRAs use.
CONCEPT_COLORS: dict[str, tuple[int, int, int]] = {
    "orange": (255, 140, 0),
    "purple": (120, 30, 160),
    "cyan": (0, 210, 220),
    "magenta": (230, 40, 200),
    "pink": (255, 160, 190),
    "brown": (110, 60, 20),
}

BACKGROUND = (240, 240, 240)
STYLE_BACKGROUND = (25, 30, 70)  # the style LoRA's dark navy background


@dataclass(frozen=True)
class Concept:
    """A concept LoRA's subject: a shape with a two-colour pattern, bound to a trigger."""

    name: str  # short id, e.g. "sks_circle"
    trigger: str  # trigger word, e.g. "sks"
    shape: str  # the class noun it replaces / qualifies, e.g. "circle"
    colors: tuple[str, str]
    pattern: str  # "hstripes" | "checker" | "vsplit"

    @property
    def phrase(self) -> str:
        return f"{self.trigger} {self.shape}"


CONCEPTS: dict[str, Concept] = {
    "sks_circle": Concept("sks_circle", "sks", "circle", ("orange", "purple"), "hsplit"),
    "zwx_square": Concept("zwx_square", "zwx", "square", ("cyan", "magenta"), "quadrants"),
    "pqr_triangle": Concept("pqr_triangle", "pqr", "triangle", ("pink", "brown"), "vsplit"),
}

ALL_COLORS: dict[str, tuple[int, int, int]] = {**COLORS, **CONCEPT_COLORS}

WORDS = (
    ["a", "and", "an", "the", "on", "with", "background", "dark", "light", "style"]
    + list(SHAPES)
    + list(COLORS)
    + list(CONCEPT_COLORS)
    + [c.trigger for c in CONCEPTS.values()]
)


@dataclass
class Obj:
    shape: str
    color: str | None = None  # plain colour name, or None when ``concept`` is set
    concept: str | None = None  # key of CONCEPTS
    cx: float = 16.0
    cy: float = 16.0
    size: float = 10.0  # side of the bounding box in pixels
    say_color: bool = True  # caption mentions the colour

    def phrase(self, with_trigger: bool = True) -> str:
        """Caption phrase: 'red circle', 'circle', 'sks circle'."""
        if self.concept is not None:
            return CONCEPTS[self.concept].phrase if with_trigger else self.shape
        if self.say_color and self.color:
            return f"{self.color} {self.shape}"
        return self.shape


@dataclass
class Scene:
    objects: list[Obj]
    background: tuple[int, int, int] = BACKGROUND
    caption_order: list[int] = field(default_factory=list)

    def caption(self, with_trigger: bool = True) -> str:
        order = self.caption_order or list(range(len(self.objects)))
        parts = ["a " + self.objects[i].phrase(with_trigger) for i in order]
        if len(parts) == 1:
            return parts[0]
        if len(parts) == 2:
            return f"{parts[0]} and {parts[1]}"
        return ", ".join(parts[:-1]) + " and " + parts[-1]


def join_phrases(phrases: Sequence[str]) -> str:
    parts = ["a " + p for p in phrases]
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return f"{parts[0]} and {parts[1]}"
    return ", ".join(parts[:-1]) + " and " + parts[-1]


# ----------------------------------------------------------------------------- drawing


def shape_mask(shape: str, cx: float, cy: float, size: float, n: int = IMG) -> np.ndarray:
    """Boolean (n, n) mask of one shape, sampled at pixel centres."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    h = size / 2.0
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= h * h
    if shape == "square":
        return (np.abs(xx - cx) <= h) & (np.abs(yy - cy) <= h)
    if shape == "triangle":  # apex up, base at the bottom
        top, bottom = cy - h, cy + h
        t = (yy - top) / max(bottom - top, 1e-6)  # 0 at apex, 1 at base
        return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= t * h)
    raise ValueError(shape)


def pattern_index(pattern: str, mask: np.ndarray, cx: float, cy: float) -> np.ndarray:
    """0/1 array choosing the first or second colour of a pattern inside a mask."""
    n = mask.shape[0]
    yy, xx = np.mgrid[0:n, 0:n]
    if pattern == "hstripes":
        return ((yy - round(cy) + 100) // 3) % 2
    if pattern == "checker":
        return (((yy + 100) // 4) + ((xx + 100) // 4)) % 2
    if pattern == "vsplit":
        return (xx + 0.5 >= cx).astype(np.int64)
    if pattern == "hsplit":
        return (yy + 0.5 >= cy).astype(np.int64)
    if pattern == "quadrants":
        return ((xx + 0.5 >= cx).astype(np.int64) + (yy + 0.5 >= cy).astype(np.int64)) % 2
    raise ValueError(pattern)


def render(scene: Scene, n: int = IMG) -> tuple[np.ndarray, list[np.ndarray]]:
    """Draw a scene. Returns (uint8 image (n, n, 3), list of boolean masks per object)."""
    img = np.empty((n, n, 3), np.uint8)
    img[:] = scene.background
    masks = []
    for o in scene.objects:
        m = shape_mask(o.shape, o.cx, o.cy, o.size, n)
        if o.concept is not None:
            c = CONCEPTS[o.concept]
            idx = pattern_index(c.pattern, m, o.cx, o.cy)
            c0, c1 = np.array(ALL_COLORS[c.colors[0]]), np.array(ALL_COLORS[c.colors[1]])
            col = np.where(idx[..., None] == 0, c0, c1)
            img[m] = col[m]
        else:
            img[m] = ALL_COLORS[o.color]
        masks.append(m)
    # objects do not overlap by construction; masks stay exact
    return img, masks


# ----------------------------------------------------------------------------- sampling


def _place(
    rng: np.random.Generator, sizes: Sequence[float], n: int = IMG, gap: float = 2.0, tries: int = 200
) -> list[tuple[float, float]] | None:
    for _ in range(tries):
        pos = []
        ok = True
        for s in sizes:
            h = s / 2
            cx = rng.uniform(h + 1, n - h - 1)
            cy = rng.uniform(h + 1, n - h - 1)
            for (px, py), ps in zip(pos, sizes):
                # separated boxes along x or y
                if abs(cx - px) < (s + ps) / 2 + gap and abs(cy - py) < (s + ps) / 2 + gap:
                    ok = False
                    break
            if not ok:
                break
            pos.append((cx, cy))
        if ok:
            return pos
    return None


def size_range(k: int) -> tuple[float, float]:
    return {1: (10.0, 16.0), 2: (9.0, 13.0), 3: (8.0, 10.5)}[k]


def pair_key(objs: Sequence[Obj]) -> str:
    return "|".join(sorted(f"{o.color}-{o.shape}" for o in objs))


def is_heldout(objs: Sequence[Obj]) -> bool:
    """Two-object plain combinations held out of base training (about 20% of them)."""
    if len(objs) != 2 or any(o.concept for o in objs):
        return False
    return zlib.crc32(pair_key(objs).encode()) % 5 == 0


def sample_scene(
    rng: np.random.Generator,
    n_objects: int | None = None,
    shapes: Sequence[str] | None = None,
    colors: Sequence[str | None] | None = None,
    concepts: Sequence[str | None] | None = None,
    p_no_color: float = 0.1,
    background=BACKGROUND,
    allow_heldout: bool = True,
) -> Scene:
    """Sample a scene. Unspecified attributes are random; shapes in one scene are distinct."""
    while True:
        k = n_objects or int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
        shp = list(shapes) if shapes is not None else list(rng.permutation(SHAPES)[:k])
        k = len(shp)
        objs = []
        for i, s in enumerate(shp):
            con = concepts[i] if concepts is not None else None
            if con is not None:
                objs.append(Obj(shape=s, concept=con))
            else:
                col = colors[i] if colors is not None and colors[i] is not None else str(rng.choice(list(COLORS)))
                say = not (colors is None and rng.random() < p_no_color)
                objs.append(Obj(shape=s, color=col, say_color=say))
        if not allow_heldout and is_heldout(objs):
            continue
        lo, hi = size_range(k)
        sizes = [float(rng.uniform(lo, hi)) for _ in objs]
        pos = _place(rng, sizes)
        if pos is None:
            continue
        for o, (cx, cy), s in zip(objs, pos, sizes):
            o.cx, o.cy, o.size = cx, cy, s
        order = list(rng.permutation(k))
        return Scene(objects=objs, background=background, caption_order=[int(i) for i in order])


def phrase_token_words(scene: Scene, with_trigger: bool = True) -> list[list[str]]:
    """Per object, the caption words that name it (colour/trigger and shape)."""
    out = []
    for o in scene.objects:
        out.append(o.phrase(with_trigger).split())
    return out


def render_generic(rng: np.random.Generator, n: int = IMG) -> np.ndarray:
    """A generic image for training the VAE only: 1-3 shapes in random RGB colours or random
    two-colour patterns (stripes, checkers, halves, with random periods) on a random plain
    background.  The VAE must be able to draw whatever a LoRA may later teach; it is never
    shown the concepts themselves (their exact colours are as unlikely as any others)."""
    bg = tuple(int(v) for v in rng.integers(0, 256, 3)) if rng.random() < 0.5 else BACKGROUND
    img = np.empty((n, n, 3), np.uint8)
    img[:] = bg
    k = int(rng.integers(1, 4))
    lo, hi = size_range(k)
    sizes = [float(rng.uniform(lo, hi)) for _ in range(k)]
    pos = _place(rng, sizes) or [(n / 2, n / 2)]
    yy, xx = np.mgrid[0:n, 0:n]
    for (cx, cy), s in zip(pos, sizes):
        m = shape_mask(str(rng.choice(SHAPES)), cx, cy, s, n)
        c0 = rng.integers(0, 256, 3)
        if rng.random() < 0.4:
            img[m] = c0
            continue
        c1 = rng.integers(0, 256, 3)
        per = int(rng.integers(2, 5))
        kind = int(rng.integers(0, 5))
        if kind == 0:
            idx = (yy // per) % 2
        elif kind == 1:
            idx = (xx // per) % 2
        elif kind == 2:
            idx = (yy // per + xx // per) % 2
        elif kind == 3:
            idx = (xx + 0.5 >= cx).astype(int)
        else:
            idx = (yy + 0.5 >= cy).astype(int)
        col = np.where(idx[..., None] == 0, c0, c1)
        img[m] = col[m]
    return img
