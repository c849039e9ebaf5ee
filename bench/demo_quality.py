"""Prompt adherence of the demo model on held-out prompts, read back by the demo judge; prints a table.

    python bench/demo_quality.py [--model demo] [--n 64] [--edits 64] [--steps 4,8,20,40]
                                 [--guidance 1] [--threads 2] [--grid out.png]

Text-to-image prompts are ``data.heldout_prompts``: (color, shape, position) combinations that
no training scene contains. Edits are ``data.sample_edit(split="heldout")``: the edited scene
holds such a combination. Chance: color 1/10, shape 1/3, position 1/5. Each edit row is followed
by the edits applied per kind (recolor split by the number of objects in the source scene).

``--pairs N`` adds a ``t2i-2`` row: two-object held-out scenes (an attribute is right only when it
is right for both objects). Not one of the issue's goals; it measures attribute binding, which
two-object recolors need too.
"""

from __future__ import annotations

import argparse
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
from qwen_image2_ref.model_folder import load_pipeline  # noqa: E402

T2I_KEYS = ("color", "shape", "position", "background", "glyph")
EDIT_KEYS = ("edit_applied", "preserved", "color", "shape", "position", "background")


def t2i_scores(pipe, prompts: list[tuple[data.Scene, str]], steps: int, guidance: float, seed: int = 0,
               batch: int = 16) -> tuple[list[dict], list[np.ndarray]]:
    """Judge scores and RGBA uint8 images for each (scene, caption); seeds ``seed + i``."""
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
            scores.append(judge.score(judge.judge(arr), scene))
    return scores, images


def data_noise(pipe, seed: int) -> np.ndarray:
    from qwen_image_edge.runtime.sampling import initial_noise

    res = pipe.config.pipeline.output_resolution
    return initial_noise(seed, 1, res, res, pipe.transformer.config.in_channels)


def heldout_pairs(n: int, seed: int) -> list[tuple[data.Scene, str]]:
    """n two-object scenes (no glyph) holding a held-out combination, with captions."""
    rng = np.random.default_rng(seed)
    scenes = [data.sample_scene(rng, 128, 128, "heldout", n_objects=2, glyph_prob=0.0) for _ in range(n)]
    return [(s, data.caption(s, rng)) for s in scenes]


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


def save_grid(images: list[np.ndarray], path: str, cols: int = 4) -> None:
    """RGBA images on a checkerboard-free grey canvas, ``cols`` per row."""
    h, w = images[0].shape[:2]
    rows = -(-len(images) // cols)
    canvas = Image.new("RGBA", (cols * (w + 4), rows * (h + 4)), (128, 128, 128, 255))
    for i, arr in enumerate(images):
        canvas.alpha_composite(Image.fromarray(arr), ((i % cols) * (w + 4) + 2, (i // cols) * (h + 4) + 2))
    canvas.save(path)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--n", type=int, default=64, help="held-out text-to-image prompts")
    p.add_argument("--edits", type=int, default=None, help="held-out edits (default: --n)")
    p.add_argument("--steps", default="4,8,20,40")
    p.add_argument("--guidance", type=float, default=None, help="default: the checkpoint's")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="prompt set seed (noise seeds follow the prompt index)")
    p.add_argument("--pairs", type=int, default=0, help="two-object held-out prompts (t2i-2 row; default none)")
    p.add_argument("--grid", default=None, help="save the first 16 text-to-image outputs at the largest step count")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    guidance = args.guidance if args.guidance is not None else pipe.config.pipeline.guidance_scale
    prompts = data.heldout_prompts(args.n, 1000 + args.seed)
    edits = heldout_edits(args.n if args.edits is None else args.edits, 2000 + args.seed)
    pairs = heldout_pairs(args.pairs, 3000 + args.seed)
    rows = []
    print(f"model {args.model}, guidance {guidance}, {len(prompts)} held-out prompts, {len(edits)} held-out edits")
    print(f"{'task':5} {'steps':>5} " + " ".join(f"{k:>12}" for k in EDIT_KEYS[:2] + T2I_KEYS) + f" {'s/image':>8}")
    for steps in [int(s) for s in args.steps.split(",")]:
        t0 = time.perf_counter()
        scores, images = t2i_scores(pipe, prompts, steps, guidance)
        dt = (time.perf_counter() - t0) / max(1, len(prompts))
        row = {"task": "t2i", "steps": steps, **{k: mean(scores, k) for k in T2I_KEYS}, "s_per_image": dt}
        rows.append(row)
        print(f"{'t2i':5} {steps:5d} {'':>12} {'':>12} " + " ".join(f"{row[k]:12.1%}" for k in T2I_KEYS)
              + f" {dt:8.2f}", flush=True)
        if pairs:
            t0 = time.perf_counter()
            pscores, _ = t2i_scores(pipe, pairs, steps, guidance)
            dt = (time.perf_counter() - t0) / len(pairs)
            row = {"task": "t2i-2", "steps": steps, **{k: mean(pscores, k) for k in T2I_KEYS}, "s_per_image": dt}
            rows.append(row)
            print(f"{'t2i-2':5} {steps:5d} {'':>12} {'':>12} " + " ".join(f"{row[k]:12.1%}" for k in T2I_KEYS)
                  + f" {dt:8.2f}", flush=True)
        if args.grid and steps == max(int(s) for s in args.steps.split(",")):
            save_grid(images[:16], args.grid)
        if edits:
            t0 = time.perf_counter()
            es = edit_scores(pipe, edits, steps, guidance)
            dt = (time.perf_counter() - t0) / len(edits)
            row = {"task": "edit", "steps": steps, **{k: mean(es, k) for k in EDIT_KEYS}, "glyph": mean(es, "glyph"),
                   "s_per_image": dt}
            rows.append(row)
            print(f"{'edit':5} {steps:5d} " + " ".join(f"{row[k]:12.1%}" for k in EDIT_KEYS + ("glyph",))
                  + f" {dt:8.2f}", flush=True)
            row["applied_by_kind"] = by_kind(edits, es)
            print(f"      edits applied by kind: {row['applied_by_kind']}", flush=True)
    return rows


if __name__ == "__main__":
    main()
