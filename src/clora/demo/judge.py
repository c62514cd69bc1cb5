"""A programmatic judge for images of the synthetic world.

Given an image and the composition that was asked for (a list of :class:`Expect`), it finds
the objects (connected components that differ from the background), classifies each one's
shape (best IoU against circle/square/triangle templates fitted to its bounding box) and
colours (nearest palette colour per pixel), and reports per requested object whether it is
present with the right shape and colour/pattern, whether a concept's pattern leaked onto
another object, whether there are extra objects, and pass/fail for the image.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import world

PALETTE_NAMES = list(world.ALL_COLORS)
PALETTE = np.array([world.ALL_COLORS[c] for c in PALETTE_NAMES], np.float32)

FG_THRESHOLD = 60.0  # RGB distance from the background that counts as an object
COLOR_MAX_DIST = 70.0  # a pixel counts towards a palette colour only if this close to it
MIN_AREA_FRAC = 0.012  # components smaller than this fraction of the image are ignored (12 px at 32x32)
EXTRA_AREA_FRAC = 0.02  # an unmatched component at least this big is an extra object


@dataclass
class Expect:
    """One requested object: a shape with a plain colour (None = any plain colour) or a concept."""

    shape: str
    color: str | None = None
    concept: str | None = None

    @property
    def name(self) -> str:
        if self.concept:
            return self.concept
        return f"{self.color or 'any'} {self.shape}"


@dataclass
class Component:
    mask: np.ndarray
    area: int
    shape: str
    shape_iou: float  # the shape classifier's score
    fracs: dict[str, float]  # share of (unblended) pixels nearest to each palette colour
    image: np.ndarray = field(repr=False, default=None)  # the float RGB image it was cut from
    vector: np.ndarray = field(repr=False, default=None)  # share of all its pixels per palette colour

    def core(self) -> np.ndarray:
        """The mask without its one-pixel rim (blended with the background), if enough remains."""
        m = self.mask
        e = m.copy()
        e[1:] &= m[:-1]
        e[:-1] &= m[1:]
        e[:, 1:] &= m[:, :-1]
        e[:, :-1] &= m[:, 1:]
        return e if e.sum() >= 6 else m

    def median(self, region: np.ndarray | None = None) -> np.ndarray | None:
        m = self.core() if region is None else self.core() & region
        if m.sum() < 2:
            return None
        return np.median(self.image[m], axis=0)


@dataclass
class ObjectVerdict:
    name: str
    present: bool
    leaked: bool  # this concept's pattern shows on another object (concepts only)
    shape_seen: str | None = None


@dataclass
class Verdict:
    passed: bool
    objects: list[ObjectVerdict]
    extras: int
    style_ok: bool | None
    components: list[Component] = field(repr=False, default_factory=list)


def _components(fg: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean image (plain BFS; images are tiny)."""
    h, w = fg.shape
    lab = np.zeros((h, w), np.int32)
    comps = []
    n = 0
    for y in range(h):
        for x in range(w):
            if fg[y, x] and lab[y, x] == 0:
                n += 1
                stack = [(y, x)]
                lab[y, x] = n
                while stack:
                    cy, cx = stack.pop()
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = cy + dy, cx + dx
                            if 0 <= ny < h and 0 <= nx < w and fg[ny, nx] and lab[ny, nx] == 0:
                                lab[ny, nx] = n
                                stack.append((ny, nx))
                comps.append(lab == n)
    return comps


def _blur3(x: np.ndarray) -> np.ndarray:
    """3x3 mean filter (edges averaged over the pixels that exist)."""
    p = np.pad(x, 1)
    ones = np.pad(np.ones_like(x), 1)
    acc = sum(p[dy : dy + x.shape[0], dx : dx + x.shape[1]] for dy in range(3) for dx in range(3))
    cnt = sum(ones[dy : dy + x.shape[0], dx : dx + x.shape[1]] for dy in range(3) for dx in range(3))
    return acc / cnt


def _shape_of(mask: np.ndarray, soft: np.ndarray):
    """Classify a blob as circle/square/triangle by template matching that models blur: each
    shape is drawn at the blob's place and size (a few sizes and offsets), blurred with a 3x3
    mean, and compared (mean squared difference) with the soft foreground map around the blob.
    Returns (shape, margin between the best and the second-best shape's error)."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    H, W = y1 - y0, x1 - x0
    if H < 3 or W < 3 or not (0.55 <= H / W <= 1.8):
        return "unknown", 0.0
    n = mask.shape[0]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    Y0, Y1, X0, X1 = max(0, y0 - 2), min(n, y1 + 2), max(0, x0 - 2), min(mask.shape[1], x1 + 2)
    target = soft[Y0:Y1, X0:X1]
    err = {}
    for s in world.SHAPES:
        for size in (max(H, W) - 0.01, max(H, W) + 1.0, max(H, W) + 2.0):
            for dy in (0.0, -0.5, -1.0):
                t = _blur3(world.shape_mask(s, cx, cy + dy, size, n=n).astype(np.float32))
                d = float(((target - t[Y0:Y1, X0:X1]) ** 2).mean())
                err[s] = min(err.get(s, 1e9), d)
    order = sorted(err, key=err.get)
    return order[0], err[order[1]] - err[order[0]]


def background_of(img: np.ndarray) -> np.ndarray:
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).astype(np.float32)
    return np.median(border, axis=0)


def analyse(img: np.ndarray) -> tuple:
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    x = img[..., :3].astype(np.float32)
    bg = background_of(x)
    fg = np.linalg.norm(x - bg, axis=-1) > FG_THRESHOLD
    npx = fg.size
    d2 = ((x[..., None, :] - PALETTE) ** 2).sum(-1)
    near = np.argmin(d2, axis=-1)
    sure = np.sqrt(d2.min(-1)) < COLOR_MAX_DIST  # blends (edges, pattern boundaries) are not counted
    comps = []
    soft = np.clip(np.linalg.norm(x - bg, axis=-1) / 100.0, 0, 1)  # how much each pixel is "object"
    for m in _components(fg):
        a = int(m.sum())
        if a < MIN_AREA_FRAC * npx:
            continue
        shape, iou = _shape_of(m, soft)
        core = m & sure
        if core.sum() < 0.25 * a:
            core = m
        counts = np.bincount(near[core], minlength=len(PALETTE_NAMES)) / core.sum()
        allc = np.bincount(near[m], minlength=len(PALETTE_NAMES)) / a
        comps.append(
            Component(
                m, a, shape, iou, {c: float(counts[i]) for i, c in enumerate(PALETTE_NAMES)}, x, allc.astype(np.float32)
            )
        )
    return bg, comps


# ----------------------------------------------------------------------------- appearance
# An object's appearance is the vector of shares of its pixels nearest to each palette colour.
# Each appearance class (a plain colour or a concept) has prototypes: the mean vector over drawn
# objects, and (from assets/judge_prototypes.json, written by ``calibrate``) the mean vector over
# the same objects passed through the demo model's VAE, which blurs edges and shifts colours.
# An object gets the class of its nearest prototype (L1 distance) if that is close enough.

APPEARANCE_MAX_L1 = 0.9
PROTO_FILE = Path(__file__).parent / "assets" / "judge_prototypes.json"
_PROTOS: list[tuple] | None = None


def appearance_classes() -> list[str]:
    return list(world.COLORS) + list(world.CONCEPTS)


def _drawn_prototypes() -> list[tuple]:
    rng = np.random.default_rng(0)
    out = []
    for cls in appearance_classes():
        vecs = []
        for _ in range(6):
            kw = {"concepts": [cls]} if cls in world.CONCEPTS else {"colors": [cls]}
            shape = world.CONCEPTS[cls].shape if cls in world.CONCEPTS else str(rng.choice(world.SHAPES))
            sc = world.sample_scene(rng, shapes=[shape], **kw)
            _, comps = analyse(world.render(sc)[0])
            vecs += [c.vector for c in comps]
        out.append((cls, "drawn", np.mean(vecs, 0)))
    return out


def prototypes() -> list[tuple]:
    global _PROTOS
    if _PROTOS is None:
        protos = _drawn_prototypes()
        if PROTO_FILE.exists():
            data = json.loads(PROTO_FILE.read_text())
            protos += [
                (d["class"], d["source"], np.array(d["vector"], np.float32))
                for d in data
                if d.get("kind") == "appearance"
            ]
        _PROTOS = protos
    return _PROTOS


def appearance(comp: Component) -> str | None:
    best, dist = None, 1e9
    for cls, _, v in prototypes():
        d = float(np.abs(comp.vector - v).sum())
        if d < dist:
            best, dist = cls, d
    return best if dist <= APPEARANCE_MAX_L1 else None


def _shows_concept(comp: Component, concept: str) -> bool:
    return appearance(comp) == concept


def _matches(e: Expect, comp: Component) -> bool:
    if comp.shape != e.shape:
        return False
    cls = appearance(comp)
    if e.concept:
        return cls == e.concept
    return cls == e.color if e.color is not None else cls in world.COLORS


def calibrate(vae, n: int = 400, seed: int = 0, out: Path = PROTO_FILE) -> dict[str, int]:
    """Write VAE-reconstruction prototypes for every appearance class (one-off, after training)."""
    import torch

    rng = np.random.default_rng(seed)
    keys = list(world.CONCEPTS)
    scenes = []
    for i in range(n):
        if i % 2:
            k = int(rng.choice([1, 2, 3]))
            chosen = list(rng.permutation(keys)[:k])
            sc = world.sample_scene(rng, shapes=[world.CONCEPTS[c].shape for c in chosen], concepts=chosen)
        else:
            sc = world.sample_scene(rng)
        if i % 4 == 0:
            sc.background = world.STYLE_BACKGROUND
        scenes.append(sc)
    imgs = np.stack([world.render(s)[0] for s in scenes])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        rec = vae.decode(vae.encode(x.to(vae.dtype)).latent_dist.mean).sample.float()
    rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    vecs: dict[str, list] = {}
    for sc, im in zip(scenes, rec):
        _, masks = world.render(sc)
        _, comps = analyse(im)
        for c in comps:
            ov = [(c.mask & m).sum() for m in masks]
            j = int(np.argmax(ov))
            if ov[j] > 0.6 * c.area and (c.mask & masks[j]).sum() > 0.6 * masks[j].sum():
                o = sc.objects[j]
                vecs.setdefault(str(o.concept or o.color), []).append(c.vector)
    data = [
        dict(**{"class": cls}, kind="appearance", source="vae", n=len(v), vector=np.mean(v, 0).round(4).tolist())
        for cls, v in vecs.items()
    ]
    out.write_text(json.dumps(data, indent=1))
    global _PROTOS
    _PROTOS = None
    return {d["class"]: d["n"] for d in data}


def judge(img: np.ndarray, expected: Sequence[Expect], style: str | None = None) -> Verdict:
    """Judge one image (H, W, 3; uint8 or float in [0, 1]) against the requested objects.

    ``style``: None (not checked) or "dark" (the style LoRA's navy background)."""
    bg, comps = analyse(img)
    E, C = len(expected), len(comps)
    ok = [[_matches(e, c) for c in comps] for e in expected]
    # best assignment of requested objects to distinct components
    best, best_n = [None] * E, -1
    for perm in itertools.permutations(list(range(C)) + [None] * E, E):
        used = [p for p in perm if p is not None]
        if len(used) != len(set(used)):
            continue
        n = sum(1 for i, p in enumerate(perm) if p is not None and ok[i][p])
        if n > best_n:
            best, best_n = [p if (p is not None and ok[i][p]) else None for i, p in enumerate(perm)], n
        if best_n == E:
            break
    verdicts = []
    assigned = {p for p in best if p is not None}
    for i, e in enumerate(expected):
        leaked = False
        if e.concept:
            leaked = any(_shows_concept(c, e.concept) for j, c in enumerate(comps) if j != best[i])
        seen = comps[best[i]].shape if best[i] is not None else None
        verdicts.append(ObjectVerdict(e.name, best[i] is not None, leaked, seen))
    npx = np.asarray(img).shape[0] * np.asarray(img).shape[1]
    extras = sum(1 for j, c in enumerate(comps) if j not in assigned and c.area >= EXTRA_AREA_FRAC * npx)
    style_ok = None
    if style == "dark":
        style_ok = bool(np.linalg.norm(bg - np.array(world.STYLE_BACKGROUND)) < 60)
    passed = all(v.present and not v.leaked for v in verdicts) and extras == 0 and style_ok is not False
    return Verdict(passed, verdicts, extras, style_ok, comps)


def expects_for_scene(scene: world.Scene) -> list[Expect]:
    return [Expect(o.shape, None if o.concept else o.color, o.concept) for o in scene.objects]


def validate(n: int = 200, seed: int = 123) -> dict[str, float]:
    """Pass rates of the judge on drawn images: full compositions (should be ~1) and the same
    compositions with one requested concept removed or drawn plain (should be ~0)."""
    rng = np.random.default_rng(seed)
    keys = list(world.CONCEPTS)
    ok_full = ok_missing = ok_plain = 0
    for i in range(n):
        k = int(rng.choice([2, 3]))
        chosen = list(rng.permutation(keys)[:k])
        shapes = [world.CONCEPTS[c].shape for c in chosen]
        sc = world.sample_scene(rng, shapes=shapes, concepts=chosen)
        img, _ = world.render(sc)
        exp = expects_for_scene(sc)
        ok_full += judge(img, exp).passed
        drop = int(rng.integers(k))
        sc2 = world.Scene([o for j, o in enumerate(sc.objects) if j != drop], sc.background)
        ok_missing += judge(world.render(sc2)[0], exp).passed
        objs = [
            world.Obj(o.shape, color=str(rng.choice(list(world.COLORS))), cx=o.cx, cy=o.cy, size=o.size)
            if j == drop
            else o
            for j, o in enumerate(sc.objects)
        ]
        ok_plain += judge(world.render(world.Scene(objs, sc.background))[0], exp).passed
    return {"full": ok_full / n, "missing": ok_missing / n, "plain": ok_plain / n}
