"""Seeded synthetic captioned scenes and edit triples for the embedded demo model.

A scene is one or two large flat shapes (circle, square, triangle) in named colors at named
positions, on a white, black or transparent background, optionally with a big stroke-drawn
glyph (A B C 1 2 3). Images are RGBA uint8; "transparent" means alpha 0 outside the shapes.

Why these choices:
- shapes are large (radius ~26-34 px per 128 px of the short side) and never overlap, because a
  small f16 VAE loses small shapes (see reference/demo-model-notes.md);
- colors are saturated and far apart in RGB so a blurry model output still reads back to the
  right name; white/black shapes only appear where they contrast with the background;
- glyphs are drawn from thick strokes on a 4x supersampled canvas instead of a font, so they are
  big, crisp and identical on every machine and Pillow version;
- a glyph sits in the half opposite its scene's single object, so scenes stay unambiguous;
- held-out (color, shape, position) combinations come from a fixed crc32 rule, so the split is
  the same in every process and no training sample ever contains one.

Everything is deterministic given a ``numpy.random.Generator``.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from qwen_image_edge.runtime.errors import InputError

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 30),
    "green": (40, 180, 60),
    "cyan": (30, 200, 220),
    "blue": (30, 70, 220),
    "purple": (140, 50, 200),
    "pink": (245, 120, 190),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
BACKGROUNDS: tuple[str, ...] = ("white", "black", "transparent")
GLYPHS: tuple[str, ...] = ("A", "B", "C", "1", "2", "3")
SIZES: tuple[tuple[int, int], ...] = ((128, 128), (192, 128), (128, 192))  # (width, height)
OPPOSITE: dict[str, str] = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
EDIT_KINDS: tuple[str, ...] = ("recolor", "move", "add_glyph", "remove_background", "remove_object")
HELDOUT_MODULUS = 8  # about 1/8 of the (color, shape, position) combinations are held out

_SS = 4  # supersampling factor for anti-aliased edges
_STROKES: dict[str, tuple[tuple, ...]] = {  # unit box, y down; ("l", pts) polyline, ("a", cx, cy, rx, ry, start, end)
    "A": (("l", ((0.0, 1.0), (0.5, 0.0), (1.0, 1.0))), ("l", ((0.22, 0.64), (0.78, 0.64)))),
    "B": (
        ("l", ((0.6, 0.0), (0.0, 0.0), (0.0, 1.0), (0.6, 1.0))),
        ("l", ((0.0, 0.48), (0.6, 0.48))),
        ("a", 0.58, 0.24, 0.36, 0.24, 270, 90),
        ("a", 0.58, 0.74, 0.42, 0.26, 270, 90),
    ),
    "C": (("a", 0.5, 0.5, 0.5, 0.5, 45, 315),),
    "1": (("l", ((0.22, 0.24), (0.58, 0.0), (0.58, 1.0))), ("l", ((0.2, 1.0), (0.95, 1.0)))),
    "2": (("a", 0.5, 0.3, 0.5, 0.3, 180, 30), ("l", ((0.9, 0.45), (0.0, 1.0), (1.0, 1.0)))),
    "3": (("a", 0.5, 0.26, 0.42, 0.26, 200, 90), ("a", 0.5, 0.73, 0.48, 0.27, 270, 160)),
}


@dataclass(frozen=True)
class Shape:
    """One object. ``radius`` 0 means the default size; ``dx``/``dy`` nudge it off its slot."""

    kind: str
    color: str
    position: str
    radius: float = 0.0
    dx: float = 0.0
    dy: float = 0.0


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Shape, ...]
    glyph: str | None = None
    width: int = 128
    height: int = 128


@dataclass(frozen=True)
class EditExample:
    source: Scene
    instruction: str
    target: Scene
    kind: str


@dataclass(frozen=True)
class Dataset:
    scenes: tuple[Scene, ...]
    captions: tuple[str, ...]
    images: np.ndarray  # [N, H, W, 4] uint8


# ----------------------------------------------------------------------------------- geometry


def slot_center(position: str, width: int, height: int) -> tuple[float, float]:
    fx, fy = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25),
              "bottom": (0.5, 0.75), "center": (0.5, 0.5)}[position]
    return fx * width, fy * height


def radius_range(position: str, width: int, height: int) -> tuple[float, float]:
    """Default radius range: 26-34 px per 128 px of the short side, capped to fit the slot with
    4 px to spare, so opposite objects stay >= 8 px apart and do not merge when blurred."""
    s = min(width, height) / 128
    cap = {"left": min(width / 4, height / 2), "right": min(width / 4, height / 2),
           "top": min(width / 2, height / 4), "bottom": min(width / 2, height / 4),
           "center": min(width, height) / 2}[position] - 4
    return min(26 * s, cap), min(34 * s, cap)


def glyph_ink(background: str) -> str:
    return "white" if background == "black" else "black"


def glyph_position(scene: Scene) -> str | None:
    return OPPOSITE[scene.objects[0].position] if scene.glyph is not None else None


def validate_scene(scene: Scene) -> None:
    where = f"scene {scene}"
    if scene.background not in BACKGROUNDS:
        raise InputError(f"background: expected one of {BACKGROUNDS}, got {scene.background!r} in {where}")
    if not 1 <= len(scene.objects) <= 2:
        raise InputError(f"objects: expected 1 or 2, got {len(scene.objects)} in {where}")
    for o in scene.objects:
        if o.kind not in SHAPES or o.color not in COLORS or o.position not in POSITIONS:
            raise InputError(f"object: expected kind in {SHAPES}, color in COLORS, position in {POSITIONS}, got {o}")
        if o.color == scene.background:
            raise InputError(f"object color {o.color!r} equals the background in {where}")
    if len(scene.objects) == 2 and OPPOSITE.get(scene.objects[0].position) != scene.objects[1].position:
        raise InputError(f"two objects: expected opposite positions (left/right, top/bottom) in {where}")
    if scene.glyph is not None:
        if scene.glyph not in GLYPHS:
            raise InputError(f"glyph: expected one of {GLYPHS}, got {scene.glyph!r} in {where}")
        if len(scene.objects) != 1 or scene.objects[0].position == "center":
            raise InputError(f"glyph: expected exactly one object off-center, got {where}")
        if scene.objects[0].color == glyph_ink(scene.background):
            raise InputError(f"glyph: object color equals the glyph ink in {where}")


# ---------------------------------------------------------------------------------- rendering


def _coverage(width: int, height: int, draw_fn) -> np.ndarray:
    canvas = Image.new("L", (width * _SS, height * _SS), 0)
    draw_fn(ImageDraw.Draw(canvas), _SS)
    return np.asarray(canvas.reduce(_SS), dtype=np.float32) / 255.0  # [H, W] in [0, 1]


def _draw_shape(obj: Shape, width: int, height: int):
    cx, cy = slot_center(obj.position, width, height)
    cx, cy = cx + obj.dx, cy + obj.dy
    r = obj.radius or sum(radius_range(obj.position, width, height)) / 2

    def fn(d: ImageDraw.ImageDraw, k: int) -> None:
        box = ((cx - r) * k, (cy - r) * k, (cx + r) * k, (cy + r) * k)
        if obj.kind == "circle":
            d.ellipse(box, fill=255)
        elif obj.kind == "square":
            d.rectangle(box, fill=255)
        else:  # upward triangle filling its bounding box: fill ratio 0.5
            d.polygon([(cx * k, box[1]), (box[2], box[3]), (box[0], box[3])], fill=255)

    return fn


def object_coverage(obj: Shape, width: int, height: int) -> np.ndarray:
    """The object's anti-aliased coverage float32 [H, W] in [0, 1], as ``render`` draws it."""
    return _coverage(width, height, _draw_shape(obj, width, height))


def glyph_box(position: str, width: int, height: int) -> tuple[float, float, float, float]:
    """Glyph cell (x0, y0, x1, y1): 0.8 of the free half, with a 3:4 aspect."""
    cx, cy = slot_center(position, width, height)
    bw, bh = (width / 2, height) if position in ("left", "right") else (width, height / 2)
    gh = 0.8 * min(bh, bw / 0.75)
    gw = 0.75 * gh
    return cx - gw / 2, cy - gh / 2, cx + gw / 2, cy + gh / 2


def _draw_glyph(glyph: str, box: tuple[float, float, float, float]):
    x0, y0, x1, y1 = box
    stroke = 0.16 * (y1 - y0)
    ix0, iy0, iw, ih = x0 + stroke / 2, y0 + stroke / 2, x1 - x0 - stroke, y1 - y0 - stroke

    def fn(d: ImageDraw.ImageDraw, k: int) -> None:
        w = max(1, round(stroke * k))
        for part in _STROKES[glyph]:
            if part[0] == "l":
                pts = [((ix0 + u * iw) * k, (iy0 + v * ih) * k) for u, v in part[1]]
                d.line(pts, fill=255, width=w, joint="curve")
                for px, py in (pts[0], pts[-1]):  # round caps keep stroke ends from looking notched
                    d.ellipse((px - w / 2, py - w / 2, px + w / 2, py + w / 2), fill=255)
            else:
                _, ucx, ucy, urx, ury, a0, a1 = part
                # Pillow draws an arc's width inside its box: grow the box so the stroke is centred
                bx = ((ix0 + (ucx - urx) * iw) * k - w / 2, (iy0 + (ucy - ury) * ih) * k - w / 2,
                      (ix0 + (ucx + urx) * iw) * k + w / 2, (iy0 + (ucy + ury) * ih) * k + w / 2)
                d.arc(bx, a0, a1, fill=255, width=w)

    return fn


def glyph_coverage(glyph: str, height: int = 96) -> np.ndarray:
    """The glyph alone on a canvas just larger than its cell: coverage float32 [H, W] in [0, 1]."""
    if glyph not in GLYPHS:
        raise InputError(f"glyph: expected one of {GLYPHS}, got {glyph!r}")
    pad = height // 8
    box = (pad, pad, pad + 0.75 * height, pad + height)
    return _coverage(round(0.75 * height) + 2 * pad, height + 2 * pad, _draw_glyph(glyph, box))


def render(scene: Scene) -> np.ndarray:
    """The scene as RGBA uint8 [H, W, 4] (straight alpha; RGB 0 where alpha is 0)."""
    validate_scene(scene)
    w, h = scene.width, scene.height
    layers = [(COLORS[o.color], object_coverage(o, w, h)) for o in scene.objects]
    if scene.glyph is not None:
        box = glyph_box(glyph_position(scene), w, h)
        layers.append((COLORS[glyph_ink(scene.background)], _coverage(w, h, _draw_glyph(scene.glyph, box))))
    if scene.background == "transparent":
        prem, alpha = np.zeros((h, w, 3), np.float32), np.zeros((h, w), np.float32)
    else:
        prem = np.broadcast_to(np.float32(COLORS[scene.background]), (h, w, 3)).copy()
        alpha = np.ones((h, w), np.float32)
    for rgb, cov in layers:  # "over" compositing in premultiplied space
        prem = prem * (1 - cov[..., None]) + np.float32(rgb) * cov[..., None]
        alpha = alpha * (1 - cov) + cov
    rgb = np.where(alpha[..., None] > 0, prem / np.maximum(alpha, 1e-6)[..., None], 0.0)
    out = np.concatenate([rgb, alpha[..., None] * 255], axis=-1)  # [H, W, 4]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- split, sampling


def is_heldout(color: str, shape: str, position: str) -> bool:
    return zlib.crc32(f"{color}|{shape}|{position}".encode()) % HELDOUT_MODULUS == 0


def heldout_combos() -> tuple[tuple[str, str, str], ...]:
    return tuple((c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS if is_heldout(c, s, p))


def scene_split(scene: Scene) -> str:
    """'heldout' if any object is a held-out (color, shape, position) combination, else 'train'."""
    return "heldout" if any(is_heldout(o.color, o.kind, o.position) for o in scene.objects) else "train"


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _jitter(rng: np.random.Generator, position: str, r: float, width: int, height: int) -> tuple[float, float]:
    """A nudge along the slot's free axis only (both, a little, at the center): slots never overlap."""
    room_x, room_y, fx, fy = {"left": (width / 4, height / 2, 0.0, 0.06), "right": (width / 4, height / 2, 0.0, 0.06),
                              "top": (width / 2, height / 4, 0.06, 0.0), "bottom": (width / 2, height / 4, 0.06, 0.0),
                              "center": (width / 2, height / 2, 0.03, 0.03)}[position]
    jx = max(0.0, min(room_x - r - 4, fx * width))
    jy = max(0.0, min(room_y - r - 4, fy * height))
    return round(float(rng.uniform(-jx, jx)), 2), round(float(rng.uniform(-jy, jy)), 2)


def sample_shape(rng: np.random.Generator, position: str, width: int, height: int,
                 exclude_colors: tuple[str, ...] = ()) -> Shape:
    colors = tuple(c for c in COLORS if c not in exclude_colors)
    lo, hi = radius_range(position, width, height)
    r = float(rng.uniform(lo, hi))
    dx, dy = _jitter(rng, position, r, width, height)
    return Shape(_pick(rng, SHAPES), _pick(rng, colors), position, round(r, 2), dx, dy)


def _sample_any(rng: np.random.Generator, width: int, height: int, n_objects: int | None,
                glyph_prob: float) -> Scene:
    background = _pick(rng, BACKGROUNDS)
    n = n_objects or (1 if rng.random() < 0.6 else 2)
    if n == 1:
        position = _pick(rng, POSITIONS)
        glyph = _pick(rng, GLYPHS) if position != "center" and rng.random() < glyph_prob else None
        excl = (background, glyph_ink(background)) if glyph else (background,)
        return Scene(background, (sample_shape(rng, position, width, height, excl),), glyph, width, height)
    first = _pick(rng, ("left", "right", "top", "bottom"))
    objs = tuple(sample_shape(rng, p, width, height, (background,)) for p in (first, OPPOSITE[first]))
    return Scene(background, objs, None, width, height)


def sample_scene(rng: np.random.Generator, width: int = 128, height: int = 128, split: str = "train",
                 n_objects: int | None = None, glyph_prob: float = 0.25) -> Scene:
    """A random scene of the given split ('train', 'heldout' or 'any'), by rejection."""
    if split not in ("train", "heldout", "any"):
        raise InputError(f"split: expected 'train', 'heldout' or 'any', got {split!r}")
    if width % 32 or height % 32:
        raise InputError(f"image size: expected multiples of 32, got {width}x{height}")
    for _ in range(1000):
        scene = _sample_any(rng, width, height, n_objects, glyph_prob)
        if split == "any" or scene_split(scene) == split:
            return scene
    raise InputError(f"could not sample a {split!r} scene in 1000 tries")


def make_dataset(n: int, seed: int, width: int = 128, height: int = 128, split: str = "train",
                 **kwargs) -> Dataset:
    """n rendered scenes with one caption each; identical for the same arguments."""
    rng = np.random.default_rng(seed)
    scenes = tuple(sample_scene(rng, width, height, split, **kwargs) for _ in range(n))
    captions = tuple(caption(s, rng) for s in scenes)
    images = np.stack([render(s) for s in scenes]) if scenes else np.zeros((0, height, width, 4), np.uint8)
    return Dataset(scenes, captions, images)


def replace_object(scene: Scene, index: int, **changes) -> Scene:
    objs = list(scene.objects)
    objs[index] = dataclasses.replace(objs[index], **changes)
    return dataclasses.replace(scene, objects=tuple(objs))


# ------------------------------------------------------------------------------------ language

POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "at the left side", "on the left side", "to the left"),
    "right": ("on the right", "at the right side", "on the right side", "to the right"),
    "top": ("at the top", "near the top", "at the top side", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom side", "in the lower part"),
    "center": ("in the center", "in the middle", "at the center", "centered"),
}
BACKGROUND_PHRASES: dict[str, tuple[str, ...]] = {
    "white": ("on a white background", "against a white background", "with a white background"),
    "black": ("on a black background", "against a black background", "with a black background"),
    "transparent": ("on a transparent background", "with a transparent background", "with no background"),
}
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{objects} {bg}",
    "{objects}, {bgword} background",
    "{layout}; {bgword} background",
    "a {bgword} background with {objects}",
    "an image of {objects} {bg}",
)
INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "recolor": ("make the {ref} {color}", "change the color of the {ref} to {color}", "turn the {ref} {color}",
                "recolor the {ref} {color}", "paint the {ref} {color}"),
    "move": ("move the {ref} to the {pos}", "put the {ref} {posphrase}", "shift the {ref} to the {pos}",
             "place the {ref} {posphrase}"),
    "add_glyph": ("add the {glyph}", "write the {glyph}", "add a big {glyph}", "draw the {glyph} next to it",
                  "put the {glyph} in the empty space"),
    "remove_background": ("remove the background", "make the background transparent", "delete the background",
                          "erase the background", "cut out the shapes"),
    "remove_object": ("remove the {ref}", "delete the {ref}", "erase the {ref}", "take away the {ref}"),
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def glyph_phrase(glyph: str, rng: np.random.Generator) -> str:
    kind = "letter" if glyph.isalpha() else _pick(rng, ("digit", "number"))
    return f"{kind} {glyph}"


def _object_phrase(o: Shape, rng: np.random.Generator) -> str:
    if rng.random() < 0.8:
        return f"{_article(o.color)} {o.color} {o.kind}"
    return f"{_article(o.kind)} {o.kind} in {o.color}"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One of several paraphrased captions; every caption names every attribute the judge reads."""
    template = _pick(rng, CAPTION_TEMPLATES)
    phrases = [(_object_phrase(o, rng), o.position) for o in scene.objects]
    if scene.glyph is not None:
        phrases.append((f"the {glyph_phrase(scene.glyph, rng)}", glyph_position(scene)))
    objects = " and ".join(f"{p} {_pick(rng, POSITION_PHRASES[pos])}" for p, pos in phrases)
    layout = "; ".join(f"{pos}: {p}" for p, pos in phrases)
    return template.format(objects=objects, layout=layout, bg=_pick(rng, BACKGROUND_PHRASES[scene.background]),
                           bgword=scene.background)


def _reference(scene: Scene, index: int, rng: np.random.Generator) -> str:
    """How an instruction names object ``index``: its kind, plus its position if the kind repeats."""
    o = scene.objects[index]
    if sum(x.kind == o.kind for x in scene.objects) > 1:
        return f"{o.kind} {_pick(rng, POSITION_PHRASES[o.position])}"
    return o.kind


# --------------------------------------------------------------------------------------- edits


def _edit_target(source: Scene, kind: str, rng: np.random.Generator) -> tuple[Scene, dict] | None:
    """The edited scene and the words of the instruction, or None if ``kind`` does not apply."""
    i = int(rng.integers(len(source.objects)))
    w, h = source.width, source.height
    if kind == "recolor":
        excl = {source.background, source.objects[i].color} | ({glyph_ink(source.background)} if source.glyph else set())
        color = _pick(rng, tuple(c for c in COLORS if c not in excl))
        return replace_object(source, i, color=color), {"ref": _reference(source, i, rng), "color": color}
    if kind == "move":
        if len(source.objects) != 1 or source.glyph is not None:
            return None
        o = source.objects[0]
        pos = _pick(rng, tuple(p for p in POSITIONS if p != o.position))
        r = min(o.radius, radius_range(pos, w, h)[1])
        dx, dy = _jitter(rng, pos, r, w, h)
        target = replace_object(source, 0, position=pos, radius=r, dx=dx, dy=dy)
        return target, {"ref": o.kind, "pos": pos, "posphrase": _pick(rng, POSITION_PHRASES[pos])}
    if kind == "add_glyph":
        o = source.objects[0]
        if len(source.objects) != 1 or source.glyph is not None or o.position == "center":
            return None
        if o.color == glyph_ink(source.background):
            return None
        glyph = _pick(rng, GLYPHS)
        return dataclasses.replace(source, glyph=glyph), {"glyph": glyph_phrase(glyph, rng)}
    if kind == "remove_background":
        if source.background == "transparent" or (
            source.glyph is not None and glyph_ink(source.background) != glyph_ink("transparent")):
            return None
        return dataclasses.replace(source, background="transparent"), {}
    if kind == "remove_object":
        if len(source.objects) != 2:
            return None
        kept = tuple(o for j, o in enumerate(source.objects) if j != i)
        return dataclasses.replace(source, objects=kept), {"ref": _reference(source, i, rng)}
    raise InputError(f"edit kind: expected one of {EDIT_KINDS}, got {kind!r}")


def sample_edit(rng: np.random.Generator, width: int = 128, height: int = 128, split: str = "train",
                kinds: tuple[str, ...] = EDIT_KINDS) -> EditExample:
    """A (source, instruction, target) triple. 'train': neither scene holds a held-out combination;
    'heldout': the target does."""
    for _ in range(1000):
        kind = _pick(rng, kinds)
        source = sample_scene(rng, width, height, "train" if split == "train" else "any")
        edited = _edit_target(source, kind, rng)
        if edited is None:
            continue
        target, words = edited
        if split != "any" and scene_split(target) != split:
            continue
        return EditExample(source, _pick(rng, INSTRUCTIONS[kind]).format(**words), target, kind)
    raise InputError(f"could not sample a {split!r} edit of kinds {kinds} in 1000 tries")


def heldout_prompts(n: int, seed: int, width: int = 128, height: int = 128) -> list[tuple[Scene, str]]:
    """n held-out single-object scenes (no glyph) with captions, for prompt-adherence evaluation."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, width, height, "heldout", n_objects=1, glyph_prob=0.0) for _ in range(n)]
    return [(s, caption(s, rng)) for s in scenes]
