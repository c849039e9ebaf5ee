"""The demo caption languages, by version. ``V1`` is what the shipped model learned
(``data.caption``: always a background phrase, five templates); ``V2`` is closer to how people
write, for the next model (issue 23):

- the background phrase is optional (``BACKGROUND_SHARE`` of captions name it): without one, the
  model has to choose a background itself, so "a red circle on the left" means something;
- more paraphrases of objects, positions and backgrounds, and several word orders: position before
  or after the object ("on the left, a red circle"), background first or last;
- every template takes one or two objects (and a glyph), so no sentence form is tied to a count.

Captions still name every attribute the judge reads (colour, shape, position of every object, the
glyph; the background when named), and they are written from a scene, so the held-out split of
``data`` (by scene) stays held out whatever the wording. Deterministic given the generator.
"""

from __future__ import annotations

import enum

import numpy as np

from qwen_image2_ref.demo import data


class CaptionStyle(enum.Enum):
    V1 = "v1"  # the shipped model's language
    V2 = "v2"


BACKGROUND_SHARE = 0.5  # V2 captions that name the background
POSITION_PHRASES_V2: dict[str, tuple[str, ...]] = {
    pos: (*data.POSITION_PHRASES[pos], *extra) for pos, extra in {
        "left": ("on the left-hand side", "in the left half", "at the left"),
        "right": ("on the right-hand side", "in the right half", "at the right"),
        "top": ("in the top half", "at the top of the image", "up top"),
        "bottom": ("in the bottom half", "at the bottom of the image", "down at the bottom"),
        "center": ("in the centre", "in the middle of the image", "right in the middle"),
    }.items()
}
BACKGROUND_PHRASES_V2: dict[str, tuple[str, ...]] = {
    bg: (*data.BACKGROUND_PHRASES[bg], *extra) for bg, extra in {
        "white": ("on white", "over a plain white background"),
        "black": ("on black", "over a plain black background"),
        "transparent": ("on a clear background", "with a see-through background"),
    }.items()
}
# A background sentence that stands before or after the objects: "{bgword} background".
BACKGROUND_LEADS: tuple[str, ...] = ("{bg}, ", "{bgword} background: ", "on a {bgword} background, ")
BACKGROUND_TAILS: tuple[str, ...] = (" {bg}", ", {bgword} background", "; the background is {bgword}",
                                     ". {Bgword} background")
BACKGROUND_WORDS = {"white": ("white",), "black": ("black",), "transparent": ("transparent", "clear")}
# {objects}: the object list; every template reads naturally with one object or two.
TEMPLATES_V2: tuple[str, ...] = (
    "{objects}",
    "an image of {objects}",
    "a picture of {objects}",
    "a simple drawing of {objects}",
    "there is {objects}",
    "draw {objects}",
    "show {objects}",
)
JOINERS: tuple[str, ...] = (" and ", ", ", " and also ", "; ")


def _object_words(o: data.Shape, rng: np.random.Generator) -> str:
    art = data._article
    return data._pick(rng, (
        f"{art(o.color)} {o.color} {o.kind}",
        f"{art(o.color)} {o.color} {o.kind}",
        f"{art(o.kind)} {o.kind} in {o.color}",
        f"{art(o.kind)} {o.kind} colored {o.color}",
        f"one {o.color} {o.kind}",
        f"{art(o.color)} {o.color} {o.kind} shape",
    ))


def _glyph_words(glyph: str, rng: np.random.Generator) -> str:
    return data._pick(rng, ("the", "a big", "a large")) + " " + data.glyph_phrase(glyph, rng)


def _placed(words: str, position: str, rng: np.random.Generator, lead: bool) -> str:
    """'a red circle on the left', or with ``lead`` 'on the left, a red circle'."""
    where = data._pick(rng, POSITION_PHRASES_V2[position])
    return f"{where}, {words}" if lead else f"{words} {where}"


def caption_v2(scene: data.Scene, rng: np.random.Generator, background: bool | None = None) -> str:
    """A V2 caption. ``background``: name it (True), leave it out (False), or draw (None)."""
    parts = [(_object_words(o, rng), o.position) for o in scene.objects]
    if scene.glyph is not None:
        parts.append((_glyph_words(scene.glyph, rng), data.glyph_position(scene)))
    if len(parts) > 1 and rng.random() < 0.5:
        parts = parts[::-1]  # either object may be named first
    template = data._pick(rng, TEMPLATES_V2)
    # position first ("on the left, a red circle") only where it reads: at the start of the
    # sentence, and joined by "and" (a comma would run two objects' phrases together)
    lead = template == "{objects}" and rng.random() < 0.4
    placed = [_placed(w, pos, rng, lead) for w, pos in parts]
    text = template.format(objects=(" and " if lead else data._pick(rng, JOINERS)).join(placed))
    if background is None:
        background = bool(rng.random() < BACKGROUND_SHARE)
    if not background:
        return text
    bgword = data._pick(rng, BACKGROUND_WORDS[scene.background])
    words = {"bg": data._pick(rng, BACKGROUND_PHRASES_V2[scene.background]), "bgword": bgword,
             "Bgword": bgword.capitalize()}
    if rng.random() < 0.3:
        return data._pick(rng, BACKGROUND_LEADS).format(**words) + text
    return text + data._pick(rng, BACKGROUND_TAILS).format(**words)


def v1_without_background(scene: data.Scene, rng: np.random.Generator) -> str:
    """V1's words with the background left out, "a red circle on the left": what a new user types to
    the shipped model, which never saw such a caption (measured, not trained on)."""
    parts = [(data._object_phrase(o, rng), o.position) for o in scene.objects]
    if scene.glyph is not None:
        parts.append((f"the {data.glyph_phrase(scene.glyph, rng)}", data.glyph_position(scene)))
    return " and ".join(f"{w} {data._pick(rng, data.POSITION_PHRASES[pos])}" for w, pos in parts)


def caption(scene: data.Scene, rng: np.random.Generator, style: CaptionStyle = CaptionStyle.V1,
            background: bool | None = None) -> str:
    """A caption of ``scene`` in ``style``. V1 names the background (``background`` None or True) or,
    with False, is ``v1_without_background``; V2 draws whether to name it unless ``background`` says."""
    if style is CaptionStyle.V1:
        return v1_without_background(scene, rng) if background is False else data.caption(scene, rng)
    return caption_v2(scene, rng, background)


def heldout_prompts(n: int, seed: int, style: CaptionStyle = CaptionStyle.V1, background: bool | None = None,
                    n_objects: int = 1, width: int = 128, height: int = 128) -> list[tuple[data.Scene, str]]:
    """n held-out scenes (no glyph) of ``n_objects`` objects, captioned in ``style``. V1 with one
    object is exactly ``data.heldout_prompts`` (same scenes, same captions)."""
    if style is CaptionStyle.V1 and n_objects == 1 and background is not False:
        return data.heldout_prompts(n, seed, width, height)
    rng = np.random.default_rng(seed)
    scenes = [data.sample_scene(rng, width, height, "heldout", n_objects=n_objects, glyph_prob=0.0)
              for _ in range(n)]
    return [(s, caption(s, rng, style, background)) for s in scenes]


def calibration_captions(n: int, seed: int, style: CaptionStyle = CaptionStyle.V2) -> list[str]:
    """n distinct captions of training-split scenes (one or two objects, sometimes a glyph) in
    ``style``: the demo's calibration and distillation prompt set (``calib/data/demo_captions_v2.txt``
    is ``calibration_captions(512, 20261126)``). Never a held-out combination."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    seen: set[str] = set()
    for _ in range(100 * n):
        text = caption(data.sample_scene(rng, 128, 128, "train"), rng, style)
        if text not in seen:
            seen.add(text)
            out.append(text)
            if len(out) == n:
                return out
    raise data.InputError(f"calibration captions: only {len(out)} distinct of {n} in {100 * n} draws")
