"""What the demo model can follow: its prompt language, written down, and a check that says why a
prompt falls outside it. Torch-free (numpy only, through ``data``), so ``qwen-image-edge demo`` can
call it before the runtime starts.

The demo model learned from captions that ``data.caption`` writes and instructions that
``data.sample_edit`` writes, and nothing else: one or two shapes in named colours at named
positions, always with a background phrase, sometimes a big glyph. Words outside that language
reach the model as byte pieces it never saw in training, so it draws something unrelated.

That is caption language "v1" (``captions.CaptionStyle``), the shipped model's; ``vocabulary`` and
``prompt_warnings`` also take "v2", the language of the next model (background phrase optional,
more paraphrases), which therefore never warns about a missing background.
"""

from __future__ import annotations

import functools
import re

# Static (``demo --help`` is built without numpy); tests/test_images_hardening.py checks it against data.py.
LANGUAGE = """\
The demo model follows a small caption language (it was trained on nothing else):
  shapes       circle, square, triangle (one, or two at opposite positions)
  colours      red, orange, yellow, green, cyan, blue, purple, pink, white, black
  positions    on the left, on the right, at the top, at the bottom, in the center
               (also: to the left, near the top, in the lower part, in the middle, ...)
  backgrounds  on a white / black / transparent background (always give one: every
               training caption had one; without it the shape lands in the wrong place)
  glyphs       the letter A, B or C; the digit (number) 1, 2 or 3 (with one object,
               drawn in the opposite half)
  examples     "a red circle on the left on a white background"
               "a blue square at the top and a yellow triangle at the bottom, black background"
               "a green triangle on the right and the letter A on the left on a white background"
  edit instructions (with --image in `run`/`edit`): "make the circle blue", "move the square
               to the left", "add the letter B", "remove the background", "remove the triangle"
Words are lower case (glyphs upper case); other words are outside its vocabulary."""

_WORD = re.compile(r"[A-Za-z]+|\d")
_BACKGROUND = re.compile(r"\b(white|black|transparent)\s+background\b|\bno background\b")
_SAMPLES = 400  # captions and instructions drawn to collect the words the generators hard-code


@functools.lru_cache(maxsize=2)
def vocabulary(style: str = "v1") -> frozenset[str]:
    """Every word of the demo captions (language ``style``, a ``captions.CaptionStyle`` value) and
    edit instructions: the phrase tables plus the words the caption and instruction writers add
    (articles, 'letter', 'digit', ...)."""
    import numpy as np

    from qwen_image2_ref.demo import captions, data

    style = captions.CaptionStyle(style)
    texts = [*data.COLORS, *data.SHAPES, *data.POSITIONS, *data.BACKGROUNDS, *data.GLYPHS, *data.CAPTION_TEMPLATES]
    tables = [data.POSITION_PHRASES, data.BACKGROUND_PHRASES, data.INSTRUCTIONS]
    if style is captions.CaptionStyle.V2:
        tables += [captions.POSITION_PHRASES_V2, captions.BACKGROUND_PHRASES_V2]
        texts.extend(captions.TEMPLATES_V2)
    for table in tables:
        for phrases in table.values():
            texts.extend(phrases)
    rng = np.random.default_rng(0)
    for _ in range(_SAMPLES):
        texts.append(captions.caption(data.sample_scene(rng, split="any"), rng, style))
        texts.append(data.sample_edit(rng, split="any").instruction)
    words = {w for t in texts for w in _WORD.findall(re.sub(r"\{\w+\}", " ", t))}
    return frozenset(words)


def prompt_warnings(prompt: str, style: str = "v1") -> list[str]:
    """Why the demo model trained on caption language ``style`` (the shipped one: "v1") may not follow
    the text-to-image ``prompt`` (empty when nothing is wrong), one line each. (Edit instructions are
    a different language: no background phrase, maybe no shape.)"""
    from qwen_image2_ref.demo import data

    known = vocabulary(style)
    words = _WORD.findall(prompt)
    unknown = list(dict.fromkeys(w for w in words if w not in known))
    notes = []
    if unknown:
        shown = ", ".join(f"{w!r} (write {w.lower()!r})" if w.lower() in known else repr(w) for w in unknown)
        notes.append(f"words outside the demo model's vocabulary: {shown}; it knows only the shapes, colours, "
                     "positions, backgrounds and glyphs listed in `qwen-image-edge demo --help`")
    if not any(w in data.SHAPES for w in words) and not any(w in data.GLYPHS for w in words):
        notes.append(f"no shape: name one of {', '.join(data.SHAPES)} (or a glyph)")
    if style == "v1" and not _BACKGROUND.search(prompt):
        notes.append("no background phrase: every caption the demo model was trained on had one, and without it "
                     "shapes land in the wrong place; add e.g. 'on a white background'")
    return notes
