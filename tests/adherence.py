"""Prompt adherence of the demo model and its student, measured against what ignoring the prompt scores.

A floor above nominal chance proves little: on ``data.heldout_prompts(12, 1000)`` 7 of 12 objects
are circles, so a model that always draws circles reads 58% shape accuracy. So the judge's readings
are scored against the right prompts and against two prompt-blind baselines on the same images,
and the tests assert a margin above the higher one:

- constant: the most common value of the attribute in the prompt set (the best constant answer);
- shuffled: each reading scored against every *other* image's prompt (the mean over all
  derangements of the prompts), i.e. what these very outputs score when unrelated to the prompt.

A model whose output ignores the prompt has expected accuracy sum_v P(draws v) * share(v), at most
the constant baseline, so the margin only has to cover sampling luck on 12 images.
"""

from __future__ import annotations

import numpy as np

from qwen_image2_ref.demo import WEIGHTS_DIR, caption_style, data, judge
from qwen_image2_ref.demo.captions import CaptionStyle, heldout_prompts

KEYS = ("color", "shape", "position", "background")

# (background, color, shape, position) of the fixed held-out prompt set. Shapes and backgrounds
# are 4/4/4; the only held-out squares are black (data.heldout_combos()), so black takes 4 of the
# 12 colors and no other color more than 2; no position more than 3 of 12. Constant baselines:
# color, shape, background 1/3, position 1/4.
BALANCED = (
    ("white", "black", "square", "left"), ("transparent", "black", "square", "left"),
    ("white", "black", "square", "top"), ("transparent", "black", "square", "top"),
    ("black", "green", "triangle", "bottom"), ("black", "purple", "triangle", "center"),
    ("white", "green", "triangle", "center"), ("transparent", "purple", "triangle", "bottom"),
    ("black", "red", "circle", "top"), ("black", "pink", "circle", "center"),
    ("transparent", "white", "circle", "right"), ("white", "pink", "circle", "bottom"),
)


def _values(scene: data.Scene) -> dict[str, str]:
    o = scene.objects[0]
    return {"color": o.color, "shape": o.kind, "position": o.position, "background": scene.background}


def balanced_heldout_prompts(seed: int = 1000, pool: int = 300, style: str | None = None,
                             background: bool = True) -> list[tuple[data.Scene, str]]:
    """The scenes of BALANCED, each the first of the held-out sampler's ``pool`` prompts (seed
    ``seed``) that matches, so size, jitter and caption wording come from the data module. Captions are
    in ``style`` (default: the language the shipped demo model records; v1 is exactly
    ``data.heldout_prompts``); ``background=False`` leaves the background phrase out."""
    style = CaptionStyle(style or caption_style(WEIGHTS_DIR))  # the shipped folder: v1 at least
    stream = heldout_prompts(pool, seed, style, background=background)
    out = []
    for spec in BALANCED:
        want = dict(zip(("background", "color", "shape", "position"), spec))
        out.append(next(p for p in stream if _values(p[0]) == want))
    return out


def scores(images, scenes) -> tuple[dict[str, float], dict[str, float]]:
    """(accuracy, prompt-blind baseline) per attribute of KEYS for images drawn from ``scenes``."""
    n = len(scenes)
    readings = [judge.judge(np.asarray(im)) for im in images]
    right = [judge.score(readings[i], scenes[i]) for i in range(n)]
    other = [judge.score(readings[i], scenes[j]) for i in range(n) for j in range(n) if i != j]
    acc, base = {}, {}
    for k in KEYS:
        values = [_values(s)[k] for s in scenes]
        constant = max(values.count(v) for v in set(values)) / n
        shuffled = float(np.mean([s[k] for s in other]))
        acc[k], base[k] = float(np.mean([s[k] for s in right])), max(constant, shuffled)
    return acc, base


def assert_follows_prompts(images, scenes, margins: dict[str, float]) -> None:
    acc, base = scores(images, scenes)
    short = [f"{k}: accuracy {acc[k]:.3f}, prompt-blind baseline {base[k]:.3f}, expected {margin} above it"
             for k, margin in margins.items() if not acc[k] >= base[k] + margin]
    assert not short, f"on {len(scenes)} held-out prompts: " + "; ".join(short)
