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


def object_hits(found: judge.Judgement, ex: data.EditExample) -> tuple[bool, bool]:
    """(the named object has its new colour, shape and place; the other is there as it was)."""
    named = next(j for j, (a, b) in enumerate(zip(ex.source.objects, ex.target.objects)) if a != b)

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


def model_step(model: str) -> str:
    import json

    index = Path(resolve_model_path(model)) / "model_index.json"
    step = json.loads(index.read_text()).get("demo_dit_step") if index.is_file() else None
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
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    cases = {"heldout": heldout_cases(args.n), "train": train_cases(args.n)}
    rows = []
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
