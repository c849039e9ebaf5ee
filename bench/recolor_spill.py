"""Where two-object recolours go wrong: each object judged on its own; prints a table.

    python bench/recolor_spill.py --model DIR [--model DIR2 ...] [--split heldout,train]
                                  [--guidance 4,1] [--n 40] [--steps 40] [--threads 2]

A two-object recolour ("make the square cyan" on a red circle and a green square) is applied when
the named object takes the new colour and the other keeps its own. The demo models so far fail it
by recolouring both (the spill), so the table counts the two halves apart, per model, split and
guidance:

- ``applied``: the judge's verdict (``judge.score``'s ``edit_applied``), as ``demo_quality.py``
  counts it;
- ``named``: the named object is there with its new colour, its shape and its place;
- ``kept``: the other object is there as it was.

Held-out edits are the two-object recolours among ``demo_quality.py``'s 160 held-out edits, each with
the noise seed it has there, so ``applied`` at the checkpoint's guidance is that bench's
``recolor/2`` count. Training-split edits are drawn from their own seed (the first ``--n``
two-object recolours of ``data.sample_edit(split="train")``). Several models in one run read the
same edits with the same noise: the A/B of two training runs at one step.

``--data OUT/data.safetensors`` (the trainer's data stage file; ``--seed`` its seed) adds the flow
loss of each model on the training-split two-object recolours of its edit group, at fixed noise
levels, against the right target and against "both recoloured" (the other object in the new colour
too), with one noise draw shared by both: a model that tells which object is meant has the lower
loss on the right target. It moves before the judged counts do.
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

from qwen_image2_ref.demo import NEGATIVE_PROMPT, data, judge  # noqa: E402
from qwen_image2_ref.model_folder import load_pipeline, resolve_model_path  # noqa: E402

HELDOUT_EDITS, HELDOUT_SEED = 160, 2000  # demo_quality.py --edits 160 (its default prompt-set seed)
TRAIN_SEED = 77


def is_two_object_recolor(ex: data.EditExample) -> bool:
    return ex.kind == "recolor" and len(ex.source.objects) == 2


def heldout_cases(n: int) -> list[tuple[int, data.EditExample]]:
    """(noise seed, edit): the first n two-object recolours of demo_quality.py's 160 held-out edits,
    each with its index there (that bench's noise seed for it)."""
    rng = np.random.default_rng(HELDOUT_SEED)
    edits = [data.sample_edit(rng, 128, 128, "heldout") for _ in range(HELDOUT_EDITS)]
    return [(i, ex) for i, ex in enumerate(edits) if is_two_object_recolor(ex)][:n]


def train_cases(n: int) -> list[tuple[int, data.EditExample]]:
    rng = np.random.default_rng(TRAIN_SEED)
    out = []
    while len(out) < n:
        ex = data.sample_edit(rng, 128, 128, "train", kinds=("recolor",))
        if is_two_object_recolor(ex):
            out.append((len(out), ex))
    return out


def named_index(ex: data.EditExample) -> int:
    """Which of the two objects the recolour names (the one that changes)."""
    return next(j for j, (a, b) in enumerate(zip(ex.source.objects, ex.target.objects)) if a != b)


def object_hits(found: judge.Judgement, ex: data.EditExample) -> tuple[bool, bool]:
    """(the named object has its new colour, shape and place; the other is there as it was)."""
    named = named_index(ex)

    def there(o: data.Shape) -> bool:
        return any(r.color == o.color and r.shape == o.kind and r.position == o.position for r in found.objects)

    return there(ex.target.objects[named]), there(ex.target.objects[1 - named])


def read(pipe, cases, steps: int, guidance: float) -> dict:
    applied = named = kept = 0
    t0 = time.perf_counter()
    for seed, ex in cases:
        im = pipe.edit(data.render(ex.source), ex.instruction, negative_prompt=NEGATIVE_PROMPT if guidance > 1 else None,
                       steps=steps, guidance=guidance, seed=seed, progress=False)
        found = judge.judge(np.asarray(im))
        applied += bool(judge.score(found, ex.target, ex)["edit_applied"])
        n_hit, k_hit = object_hits(found, ex)
        named += n_hit
        kept += k_hit
    return {"applied": applied, "named": named, "kept": kept, "n": len(cases),
            "s_per_image": (time.perf_counter() - t0) / max(1, len(cases))}


def flow_margin(model: str, data_path: Path, seed: int, n: int, levels: list[float]) -> list[dict]:
    """Per noise level s: the mean flow loss against the right target and against "both recoloured",
    and on how many examples the right one is lower (see the module doc)."""
    from qwen_image2_ref.demo import train_dit
    from qwen_image2_ref.demo.stage_io import load_groups
    from qwen_image2_ref.demo.train_vae import to_pixels
    from qwen_image2_ref.model_folder import load_model
    from qwen_image2_ref.vae import pack_latents

    groups, stats = load_groups(data_path, train_dit.Group)
    g = groups["edit_128"]
    picked = []
    for i, ex in enumerate(train_dit.train_edits(seed, len(g.latents))):
        if not is_two_object_recolor(ex):
            continue
        named = named_index(ex)
        both = data.replace_object(ex.target, 1 - named, color=ex.target.objects[named].color)
        if both != ex.target:
            picked.append((i, ex.target, both))
        if len(picked) == n:
            break
    m = load_model(model)
    transformer = m.transformer.eval()
    mean = torch.tensor(stats["latents_mean"])[None, :, None, None]
    std = torch.tensor(stats["latents_std"])[None, :, None, None]

    def latents(scenes) -> torch.Tensor:
        with torch.no_grad():
            z = m.vae.encode(to_pixels(np.stack([data.render(sc) for sc in scenes])))
        return pack_latents((z - mean) / std)

    idx = np.array([i for i, _, _ in picked])
    right, both = latents([t for _, t, _ in picked]), latents([b for _, _, b in picked])
    gap = float((right - g.latents[idx]).abs().max())
    if gap > 0.05:  # the stored targets were encoded by this VAE from these scenes, in float32
        raise SystemExit(f"--data {data_path}: its edits are not this --seed's ({seed}) training edits "
                         f"(stored target latents differ by {gap:.3f})")
    states, layout, cond = train_dit.make_batch(g, idx, np.zeros(len(idx), bool))
    extra = train_dit.layout_inputs(layout, m.config.transformer)
    noise = torch.randn(right.shape, generator=torch.Generator().manual_seed(seed + 1))
    rows = []
    for s_val in levels:
        s = torch.full((len(idx),), s_val)
        per = {}
        for name, x0 in (("right", right), ("both", both)):
            xt = (1 - s_val) * x0 + s_val * noise
            with torch.no_grad():
                pred = transformer(xt, states, s, cond, **extra)
            per[name] = (pred - (noise - x0)).square().mean(dim=(1, 2))
        rows.append({"s": s_val, "right": float(per["right"].mean()), "both": float(per["both"].mean()),
                     "right_lower": int((per["right"] < per["both"]).sum()), "n": len(idx)})
    return rows


def model_step(model: str) -> str:
    import json

    index = Path(resolve_model_path(model)) / "model_index.json"
    extra = json.loads(index.read_text()).get("qwen_image_edge", {}) if index.is_file() else {}
    step = extra.get("demo_dit_step")
    return "-" if step is None else str(step)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", required=True,
                   help="a model folder (or 'demo'); repeat to read several on the same edits and noise")
    p.add_argument("--split", default="heldout,train", help="comma-separated: heldout, train (default: both)")
    p.add_argument("--guidance", default="4", help="comma-separated guidance scales (default: 4)")
    p.add_argument("--n", type=int, default=40, help="edits per split (held-out: at most the 40 of the bench's 160)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=None, metavar="FILE",
                   help="the trainer's data stage file (OUT/data.safetensors): also print the flow-loss margin")
    p.add_argument("--seed", type=int, default=0, help="the trainer's --seed (for --data; default 0)")
    p.add_argument("--levels", default="1.0,0.9", help="noise levels of the flow-loss margin (default: 1.0,0.9)")
    args = p.parse_args(argv)
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    if not splits or set(splits) - {"heldout", "train"}:
        p.error(f"--split: expected heldout, train or both, got {args.split!r}")
    try:
        scales = [float(g) for g in args.guidance.split(",")]
    except ValueError:
        p.error(f"--guidance: expected comma-separated numbers, got {args.guidance!r}")
    if args.n < 1 or args.steps < 1 or any(not g >= 1 for g in scales):
        p.error("--n and --steps must be at least 1, guidance scales at least 1")
    try:
        levels = [float(v) for v in args.levels.split(",")]
    except ValueError:
        p.error(f"--levels: expected comma-separated numbers, got {args.levels!r}")
    if any(not 0 < v <= 1 for v in levels):
        p.error(f"--levels: noise levels must lie in (0, 1], got {args.levels!r}")
    if args.data is not None and not args.data.is_file():
        p.error(f"--data {args.data}: no such file")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    cases = {"heldout": heldout_cases(args.n), "train": train_cases(args.n)}
    rows = []
    if args.data is not None:
        print(f"flow loss on training-split two-object recolours ({args.data}), one noise draw for both targets")
        print(f"{'model':32} {'s':>5} {'right':>8} {'both':>8} {'right lower':>12}")
        for model in args.model:
            for r in flow_margin(model, args.data, args.seed, 48, levels):
                print(f"{model[-32:]:32} {r['s']:5.2f} {r['right']:8.4f} {r['both']:8.4f} "
                      f"{r['right_lower']:>5} / {r['n']:<4}", flush=True)
                rows.append({"model": model, "flow": r})
    print(f"two-object recolours at {args.steps} steps: applied / named object recoloured / other object kept")
    print(f"{'model':32} {'step':>6} {'split':8} {'guid':>5} {'applied':>9} {'named':>9} {'kept':>9} {'s/image':>8}")
    for model in args.model:
        pipe, step = load_pipeline(model), model_step(model)
        for split in splits:
            for g in scales:
                r = {"model": model, "step": step, "split": split, "guidance": g, **read(pipe, cases[split], args.steps, g)}
                rows.append(r)
                n = r["n"]
                print(f"{model[-32:]:32} {step:>6} {split:8} {g:5.1f} {r['applied']:>4} / {n:<2} {r['named']:>4} / {n:<2} "
                      f"{r['kept']:>4} / {n:<2} {r['s_per_image']:8.2f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
