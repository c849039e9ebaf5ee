"""Prompt adherence of the demo model on held-out prompts, read back by the demo judge; prints a table.

    python bench/demo_quality.py [--model demo] [--style v1] [--n 64] [--edits 64] [--pairs 64]
                                 [--tasks t2i,t2i-nb,t2i-2,edit] [--steps 4,8,20,40] [--guidance 1]
                                 [--threads 2] [--grid out.png] [--json rows.json]

Text-to-image prompts are held-out scenes: (color, shape, position) combinations that no
training scene contains, captioned in the model's caption language (``--style``: v1 for the
shipped model, v2 for the next; ``captions.py``). Rows:

- ``t2i``: one object, the caption names the background (v1: exactly ``data.heldout_prompts``);
- ``t2i-nb``: the same scenes and noise, the caption without a background phrase ("a red circle
  on the left"); the model chooses the background, so that column is not a goal;
- ``t2i-2``: two-object held-out scenes (an attribute is right only when it is right for both
  objects: ``color`` is "both colours right");
- ``edit``: ``data.sample_edit(split="heldout")`` (the edited scene holds a held-out combination),
  followed by the edits applied per kind (recolor split by the number of objects in the source).

Chance: color 1/10, shape 1/3, position 1/5. The ``colErr`` column is the median colour error:
the RGB distance from each expected object's median colour (as the judge reads it) to its named
palette colour, over all objects (a missing object counts as infinitely wrong). After the table,
the issue-23 goals at the largest step count, each with its measured value.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # run as a script: bench/runtime.py would shadow the runtime package

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from qwen_image2_ref.demo import NEGATIVE_PROMPT, data, judge  # noqa: E402
from qwen_image2_ref.demo.captions import CaptionStyle, heldout_prompts  # noqa: E402
from qwen_image2_ref.model_folder import load_pipeline  # noqa: E402

TASKS = ("t2i", "t2i-nb", "t2i-2", "edit")
T2I_KEYS = ("color", "shape", "position", "background", "glyph")
EDIT_KEYS = ("edit_applied", "preserved", "color", "shape", "position", "background")


def t2i_scores(pipe, prompts: list[tuple[data.Scene, str]], steps: int, guidance: float, seed: int = 0,
               batch: int = 16) -> tuple[list[dict], list[np.ndarray]]:
    """Judge scores (plus ``color_errors``, one per object) and RGBA uint8 images for each
    (scene, caption); seeds ``seed + i``."""
    scores, images = [], []
    neg = NEGATIVE_PROMPT if guidance > 1 else None
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        noise = np.concatenate([data_noise(pipe, seed + start + j) for j in range(len(chunk))])
        out = pipe.generate([c for _, c in chunk], negative_prompt=neg, steps=steps, guidance=guidance,
                            latents=noise, progress=False)
        for (scene, _), im in zip(chunk, out):
            arr = np.asarray(im)
            images.append(arr)
            reading = judge.judge(arr)
            scores.append({**judge.score(reading, scene), "color_errors": judge.color_errors(reading, scene)})
    return scores, images


def data_noise(pipe, seed: int) -> np.ndarray:
    from qwen_image_edge.runtime.sampling import initial_noise

    res = pipe.config.pipeline.output_resolution
    return initial_noise(seed, 1, res, res, pipe.transformer.config.in_channels)


def heldout_pairs(n: int, seed: int, style: CaptionStyle = CaptionStyle.V1) -> list[tuple[data.Scene, str]]:
    """n two-object scenes (no glyph) holding a held-out combination, with captions."""
    return heldout_prompts(n, seed, style, n_objects=2)


def heldout_edits(n: int, seed: int) -> list[data.EditExample]:
    rng = np.random.default_rng(seed)
    return [data.sample_edit(rng, 128, 128, "heldout") for _ in range(n)]


def edit_scores(pipe, edits: list[data.EditExample], steps: int, guidance: float, seed: int = 0) -> list[dict]:
    neg = NEGATIVE_PROMPT if guidance > 1 else None
    out = []
    for i, ex in enumerate(edits):
        im = pipe.edit(data.render(ex.source), ex.instruction, negative_prompt=neg, steps=steps, guidance=guidance,
                       seed=seed + i, progress=False)  # one instruction string: one image
        out.append(judge.score(judge.judge(np.asarray(im)), ex.target, ex))
    return out


def by_kind(edits: list[data.EditExample], scores: list[dict]) -> str:
    """Edits applied per kind (recolor split by the source's object count): 'recolor/2 1/18, ...'."""
    counts: dict[str, list[int]] = {}
    for ex, s in zip(edits, scores):
        kind = f"{ex.kind}/{len(ex.source.objects)}" if ex.kind == "recolor" else ex.kind
        counts.setdefault(kind, [0, 0])
        counts[kind][0] += bool(s["edit_applied"])
        counts[kind][1] += 1
    return ", ".join(f"{k} {a}/{n}" for k, (a, n) in sorted(counts.items()))


def mean(scores: list[dict], key: str) -> float:
    return float(np.mean([s[key] for s in scores])) if scores else float("nan")


def model_style(model: str) -> str:
    """The caption language a demo trainer's folder records (``demo_caption_style``), else "v1"."""
    from qwen_image2_ref.demo import caption_style
    from qwen_image2_ref.model_folder import resolve_model_path

    return caption_style(resolve_model_path(model)) or "v1"


def median_color_error(scores: list[dict]) -> float:
    errors = [e for s in scores for e in s.get("color_errors", ())]
    return float(np.median(errors)) if errors else float("nan")


def recolor_two(edits: list[data.EditExample], scores: list[dict]) -> tuple[int, int]:
    """(applied, count) of the recolours of one object in a two-object scene."""
    hits = [bool(s["edit_applied"]) for ex, s in zip(edits, scores)
            if ex.kind == "recolor" and len(ex.source.objects) == 2]
    return sum(hits), len(hits)


# Issue 23's must-show: (label, row task, key, goal, at least). Read at the largest step count.
GOALS = (
    ("one object, background named: color", "t2i", "color", 0.90, True),
    ("one object, background named: shape", "t2i", "shape", 0.90, True),
    ("one object, background named: position", "t2i", "position", 0.90, True),
    ("one object, no background: color", "t2i-nb", "color", 0.90, True),
    ("one object, no background: shape", "t2i-nb", "shape", 0.90, True),
    ("one object, no background: position", "t2i-nb", "position", 0.90, True),
    ("two objects: both colours right", "t2i-2", "color", 0.60, True),
    ("edits applied", "edit", "edit_applied", 0.75, True),
    ("two-object recolours applied", "edit", "recolor_two", 0.50, True),
    ("median colour error, one object (RGB distance)", "t2i+t2i-nb", "color_error", 40.0, False),
)


def goal_lines(rows: list[dict]) -> list[str]:
    """One line per goal at the largest step count: the value, the goal, met or not."""
    top = max((r["steps"] for r in rows), default=None)
    at = {r["task"]: r for r in rows if r["steps"] == top}
    lines = []
    for label, task, key, goal, at_least in GOALS:
        if key == "color_error":
            found = [at[t] for t in task.split("+") if t in at]
            value = median_color_error([s for r in found for s in r["_scores"]]) if found else None
        else:
            value = at[task].get(key) if task in at else None
        if value is None or value != value:  # not measured in this run (NaN: no such edit)
            lines.append(f"  {label:48} not measured")
            continue
        met = value >= goal if at_least else value <= goal
        shown, want = (f"{value:6.1%}", f"{'>=' if at_least else '<='} {goal:.0%}") if goal <= 1 else (
            f"{value:6.1f}", f"<= {goal:.0f}")
        lines.append(f"  {label:48} {shown}  goal {want:7} {'met' if met else 'NOT met'}")
    return [f"issue-23 goals at {top} steps:", *lines] if top is not None else []


def save_grid(images: list[np.ndarray], path: str, cols: int = 4) -> None:
    """RGBA images on a checkerboard-free grey canvas, ``cols`` per row."""
    h, w = images[0].shape[:2]
    rows = -(-len(images) // cols)
    canvas = Image.new("RGBA", (cols * (w + 4), rows * (h + 4)), (128, 128, 128, 255))
    for i, arr in enumerate(images):
        canvas.alpha_composite(Image.fromarray(arr), ((i % cols) * (w + 4) + 2, (i // cols) * (h + 4) + 2))
    canvas.save(path)


def _print_t2i(row: dict) -> None:
    print(f"{row['task']:6} {row['steps']:5d} {'':>12} {'':>12} " + " ".join(f"{row[k]:12.1%}" for k in T2I_KEYS)
          + f" {row['color_error']:8.1f} {row['s_per_image']:8.2f}", flush=True)


def _t2i_row(pipe, task: str, prompts, steps: int, guidance: float) -> tuple[dict, list[np.ndarray]]:
    t0 = time.perf_counter()
    scores, images = t2i_scores(pipe, prompts, steps, guidance)
    row = {"task": task, "steps": steps, **{k: mean(scores, k) for k in T2I_KEYS},
           "color_error": median_color_error(scores), "s_per_image": (time.perf_counter() - t0) / len(prompts),
           "_scores": scores}
    _print_t2i(row)
    return row, images


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--style", default=None, choices=[s.value for s in CaptionStyle],
                   help="the caption language of the prompts (default: the one the model folder records, "
                        "else v1, the shipped demo model's)")
    p.add_argument("--n", type=int, default=64, help="held-out one-object prompts (t2i and t2i-nb rows)")
    p.add_argument("--edits", type=int, default=None, help="held-out edits (default: --n)")
    p.add_argument("--pairs", type=int, default=None, help="two-object held-out prompts (t2i-2 row; default: --n)")
    p.add_argument("--no-background-row", action=argparse.BooleanOptionalAction, default=True,
                   help="the t2i-nb row (the t2i prompts without their background phrase)")
    p.add_argument("--tasks", default=",".join(TASKS),
                   help=f"comma-separated rows to run, of {','.join(TASKS)} (default: all)")
    p.add_argument("--steps", default="4,8,20,40")
    p.add_argument("--guidance", type=float, default=None, help="default: the checkpoint's")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="prompt set seed (noise seeds follow the prompt index)")
    p.add_argument("--grid", default=None, help="save the first 16 text-to-image outputs at the largest step count "
                   "(8 with and 8 without a background phrase when the t2i-nb row runs)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    tasks = {t.strip() for t in args.tasks.split(",") if t.strip()}
    if not tasks or tasks - set(TASKS):
        p.error(f"--tasks: expected a comma-separated subset of {','.join(TASKS)}, got {args.tasks!r}")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    style = CaptionStyle(args.style or model_style(args.model))
    guidance = args.guidance if args.guidance is not None else pipe.config.pipeline.guidance_scale
    prompts = heldout_prompts(args.n, 1000 + args.seed, style, background=True) if "t2i" in tasks else []
    bare = (heldout_prompts(args.n, 1000 + args.seed, style, background=False)
            if args.no_background_row and "t2i-nb" in tasks else [])
    edits = heldout_edits(args.n if args.edits is None else args.edits, 2000 + args.seed) if "edit" in tasks else []
    pairs = heldout_pairs(args.n if args.pairs is None else args.pairs, 3000 + args.seed, style) if (
        "t2i-2" in tasks) else []
    rows = []
    print(f"model {args.model} ({style.value} captions), guidance {guidance}, {len(prompts)} held-out prompts "
          f"(+{len(bare)} without background), {len(pairs)} two-object prompts, {len(edits)} held-out edits")
    print(f"{'task':6} {'steps':>5} " + " ".join(f"{k:>12}" for k in EDIT_KEYS[:2] + T2I_KEYS)
          + f" {'colErr':>8} {'s/image':>8}")
    step_counts = [int(s) for s in args.steps.split(",")]
    for steps in step_counts:
        images = []
        if prompts:
            row, images = _t2i_row(pipe, "t2i", prompts, steps, guidance)
            rows.append(row)
        if bare:
            row, bare_images = _t2i_row(pipe, "t2i-nb", bare, steps, guidance)
            rows.append(row)
            images = images[:8] + bare_images[:8]
        if pairs:
            rows.append(_t2i_row(pipe, "t2i-2", pairs, steps, guidance)[0])
        if args.grid and images and steps == max(step_counts):
            save_grid(images[:16], args.grid)
        if edits:
            t0 = time.perf_counter()
            es = edit_scores(pipe, edits, steps, guidance)
            dt = (time.perf_counter() - t0) / len(edits)
            hit, count = recolor_two(edits, es)
            row = {"task": "edit", "steps": steps, **{k: mean(es, k) for k in EDIT_KEYS}, "glyph": mean(es, "glyph"),
                   "s_per_image": dt, "recolor_two": hit / count if count else float("nan")}
            rows.append(row)
            print(f"{'edit':6} {steps:5d} " + " ".join(f"{row[k]:12.1%}" for k in EDIT_KEYS + ("glyph",))
                  + f" {'':>8} {dt:8.2f}", flush=True)
            row["applied_by_kind"] = by_kind(edits, es)
            print(f"       edits applied by kind: {row['applied_by_kind']}", flush=True)
    for line in goal_lines(rows):
        print(line)
    for row in rows:
        row.pop("_scores", None)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
