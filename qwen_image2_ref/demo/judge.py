"""Read a demo scene back from an RGBA image: background, each object's color/shape/position, glyph.

Used to score prompt adherence of the demo model's outputs, so it must cope with soft, slightly
blurry, noisy images rather than only the generator's crisp renders. numpy only (plus the
generator's own glyph strokes), no torch: the torch-free runtime and the benches use it.

How it reads an image:
- background: the median of a 2 px border; transparent when its alpha is low, else the nearer
  of white and black;
- foreground: per-pixel "strength" (alpha on a transparent background, else RGB distance from
  the background colour), a low threshold for connected components (run-length union-find), then
  per component a re-threshold at half its own strength, so every colour's outline sits at about
  half coverage whatever its contrast with the background;
- shape and glyph: the component's mask is resampled to a 24x24 grid over its bounding box and
  compared (soft IoU) with templates of circle, square, triangle and each glyph; the best wins.
  Normalising by the bounding box makes the match size-invariant, and fill ratios differ enough
  (circle 0.785, square 1.0, triangle 0.5, glyphs ~0.4) to survive blur;
- color: the median RGB of the component's core pixels, nearest named colour;
- position: the centroid against the image centre (|offset| < 1/8 of the size is "center").
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np

from qwen_image2_ref.demo import data
from qwen_image_edge.runtime.errors import InputError, ShapeError

GRID = 24
_SUB = 3  # samples per grid cell along each axis
CENTER_TOLERANCE = 0.125
_COARSE_STRENGTH = 0.25  # finds components; pink on white, the weakest pair, has contrast 0.59
_CORE_STRENGTH = 0.8  # of a component's 90th percentile strength: pixels whose colour is read


@dataclass(frozen=True)
class ObjectReading:
    color: str
    shape: str
    position: str
    cx: float  # centroid, fraction of the width
    cy: float  # centroid, fraction of the height
    area: int  # pixels
    rgb: tuple[float, float, float] = (0.0, 0.0, 0.0)  # median colour of the core pixels


@dataclass(frozen=True)
class Judgement:
    background: str
    objects: tuple[ObjectReading, ...]
    glyph: str | None


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a bool [H, W] mask: (int32 labels, 0 = none; count)."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)  # [H, W + 1]: +1 where a run starts, -1 one past its end
    ys, xs = np.nonzero(edges)
    starts_ends = edges[ys, xs]
    run_y, run_x0, run_x1 = ys[starts_ends == 1], xs[starts_ends == 1], xs[starts_ends == -1]
    parent = list(range(len(run_y)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_start = np.searchsorted(run_y, np.arange(h + 1))
    for y in range(1, h):
        a, a_end, b, b_end = row_start[y - 1], row_start[y], row_start[y], row_start[y + 1]
        while a < a_end and b < b_end:  # two pointers over the overlapping runs of rows y-1 and y
            if run_x0[a] < run_x1[b] and run_x0[b] < run_x1[a]:
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            if run_x1[a] < run_x1[b]:
                a += 1
            else:
                b += 1
    labels = np.zeros((h, w), np.int32)
    ids: dict[int, int] = {}
    for i in range(len(run_y)):
        root = find(i)
        labels[run_y[i], run_x0[i]:run_x1[i]] = ids.setdefault(root, len(ids) + 1)
    return labels, len(ids)


def _box3(a: np.ndarray) -> np.ndarray:
    """3x3 mean filter with edge padding."""
    p = np.pad(a, 1, mode="edge")
    h, w = a.shape
    return sum(p[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def _grid(mask: np.ndarray) -> np.ndarray:
    """A float [H, W] mask resampled over its bounding box to [GRID, GRID] by point sampling."""
    ys, xs = np.nonzero(mask > 0.5)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    n = GRID * _SUB
    rows = np.clip((y0 + (np.arange(n) + 0.5) * (y1 - y0) / n).astype(int), y0, y1 - 1)
    cols = np.clip((x0 + (np.arange(n) + 0.5) * (x1 - x0) / n).astype(int), x0, x1 - 1)
    samples = mask[np.ix_(rows, cols)]  # [n, n]
    return samples.reshape(GRID, _SUB, GRID, _SUB).mean(axis=(1, 3))  # [GRID, GRID]


@functools.lru_cache(maxsize=1)
def templates() -> dict[str, np.ndarray]:
    """Bounding-box-normalised [GRID, GRID] masks of every shape and glyph."""
    u = (np.arange(GRID * _SUB) + 0.5) / (GRID * _SUB)
    uu, vv = np.meshgrid(u, u)  # x, y in (0, 1), y down
    shapes = {
        "circle": (uu - 0.5) ** 2 + (vv - 0.5) ** 2 <= 0.25,
        "square": np.ones_like(uu, dtype=bool),
        "triangle": np.abs(uu - 0.5) <= 0.5 * vv,
    }
    out = {k: m.reshape(GRID, _SUB, GRID, _SUB).mean(axis=(1, 3)) for k, m in shapes.items()}
    for g in data.GLYPHS:
        out[g] = _grid(data.glyph_coverage(g))
    return out


def classify(mask: np.ndarray) -> tuple[str, float]:
    """Best template name for a component mask, and its soft IoU."""
    g = _grid(mask)
    scores = {k: float(np.minimum(g, t).sum() / np.maximum(g, t).sum()) for k, t in templates().items()}
    best = max(scores, key=scores.__getitem__)
    return best, scores[best]


def read_background(image: np.ndarray) -> str:
    border = np.concatenate([image[:2].reshape(-1, 4), image[-2:].reshape(-1, 4),
                             image[:, :2].reshape(-1, 4), image[:, -2:].reshape(-1, 4)])  # [N, 4]
    if np.median(border[:, 3]) < 128:
        return "transparent"
    return "white" if np.median(border[:, :3].astype(np.float32).mean(axis=1)) >= 128 else "black"


def nearest_color(rgb: np.ndarray) -> str:
    names = list(data.COLORS)
    table = np.array([data.COLORS[n] for n in names], np.float32)
    return names[int(np.argmin(((table - rgb) ** 2).sum(axis=1)))]


def position_name(fx: float, fy: float) -> str:
    """Position word of a centroid given as fractions of width and height."""
    dx, dy = fx - 0.5, fy - 0.5
    if max(abs(dx), abs(dy)) < CENTER_TOLERANCE:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def judge(image: np.ndarray, min_area_fraction: float = 0.005) -> Judgement:
    """Read a uint8 RGBA [H, W, 4] image. Components under ``min_area_fraction`` of it are noise."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 4 or image.dtype != np.uint8:
        raise ShapeError(f"judge image: expected uint8[H, W, 4], got {image.dtype}{list(image.shape)}")
    h, w = image.shape[:2]
    background = read_background(image)
    rgb = image[..., :3].astype(np.float32)
    if background == "transparent":
        strength = image[..., 3].astype(np.float32) / 255.0
    else:
        bg = np.float32(data.COLORS[background])
        strength = np.sqrt(((rgb - bg) ** 2).sum(axis=-1)) / 255.0  # [H, W]; white-black is sqrt(3)
    smooth = _box3(strength)  # [H, W]; averages out pixel noise before any threshold
    labels, n = label_components(smooth > _COARSE_STRENGTH)
    min_area = min_area_fraction * h * w
    objects, glyphs = [], []
    for k in range(1, n + 1):
        ys, xs = np.nonzero(labels == k)
        if len(ys) < min_area:
            continue
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        comp = labels[y0:y1, x0:x1] == k  # [h', w'] crop around the component
        s = np.where(comp, smooth[y0:y1, x0:x1], 0.0)
        top = np.percentile(s[comp], 90)
        # half of this component's own contrast; re-label, as blur may have bridged two objects
        parts, m = label_components(s >= 0.5 * top)
        for j in range(1, m + 1):
            mask = parts == j
            if mask.sum() < min_area:
                continue
            name, _ = classify(mask.astype(np.float32))
            py, px = np.nonzero(mask)
            cx, cy = (px.mean() + x0 + 0.5) / w, (py.mean() + y0 + 0.5) / h
            if name in data.GLYPHS:
                glyphs.append((int(mask.sum()), name))
                continue
            core = mask & (s >= _CORE_STRENGTH * top)
            core = core if core.any() else mask
            median = np.median(rgb[y0:y1, x0:x1][core], axis=0)  # [3]
            objects.append(ObjectReading(nearest_color(median), name, position_name(cx, cy), round(float(cx), 4),
                                         round(float(cy), 4), int(mask.sum()), tuple(round(float(v), 1) for v in median)))
    objects.sort(key=lambda o: (o.cx, o.cy))
    glyph = max(glyphs)[1] if glyphs else None
    return Judgement(background, tuple(objects), glyph)


def _match(readings: tuple[ObjectReading, ...], scene: data.Scene) -> list[ObjectReading | None]:
    """For each expected object, the reading assigned to it (nearest centroids overall), or None."""
    centers = []
    for o in scene.objects:
        x, y = data.slot_center(o.position, scene.width, scene.height)
        centers.append(((x + o.dx) / scene.width, (y + o.dy) / scene.height))
    k = min(len(readings), len(centers))
    best, best_cost = [None] * len(centers), float("inf")
    for expected in itertools.permutations(range(len(centers)), k):
        for got in itertools.permutations(range(len(readings)), k):
            cost = sum(np.hypot(readings[g].cx - centers[e][0], readings[g].cy - centers[e][1])
                       for e, g in zip(expected, got))
            if cost < best_cost:
                best_cost, best = cost, [None] * len(centers)
                for e, g in zip(expected, got):
                    best[e] = readings[g]
    return best


def score(judgement: Judgement, scene: data.Scene, edit: data.EditExample | None = None) -> dict[str, bool]:
    """Per-attribute correctness of a reading against the scene it should show.

    With ``edit`` (``scene`` is then the edit's target), adds ``edit_applied`` (the attribute the edit
    changes reads as the target's) and ``preserved`` (every other attribute is right too).
    """
    if edit is not None and scene != edit.target:
        raise InputError(f"score: with an edit, expected its target scene, got {scene} for target {edit.target}")
    matched = _match(judgement.objects, scene)
    pairs = list(zip(scene.objects, matched))
    out = {
        "count": len(judgement.objects) == len(scene.objects),
        "color": all(r is not None and r.color == o.color for o, r in pairs),
        "shape": all(r is not None and r.shape == o.kind for o, r in pairs),
        "position": all(r is not None and r.position == o.position for o, r in pairs),
        "background": judgement.background == scene.background,
        "glyph": judgement.glyph == scene.glyph,
    }
    if edit is not None:
        changed = {"recolor": ("color",), "move": ("position",), "add_glyph": ("glyph",),
                   "remove_background": ("background",), "remove_object": ("count",)}[edit.kind]
        out["edit_applied"] = all(out[a] for a in changed)
        out["preserved"] = all(v for a, v in out.items() if a not in changed and a != "edit_applied")
    return out


def color_errors(judgement: Judgement, scene: data.Scene) -> list[float]:
    """Per expected object, the RGB distance from the median colour of the reading matched to it to
    its named palette colour; inf where no reading matched (a missing object has no colour)."""
    return [float(np.linalg.norm(np.subtract(r.rgb, data.COLORS[o.color]))) if r is not None else float("inf")
            for o, r in zip(scene.objects, _match(judgement.objects, scene))]


def accuracy(images, scenes, keys) -> dict[str, float]:
    """Share of ``images`` (RGBA arrays or PIL images) whose reading matches its scene, per key."""
    scores = [score(judge(np.asarray(im)), scene) for im, scene in zip(images, scenes)]
    return {k: float(np.mean([s[k] for s in scores])) for k in keys}
