"""What the demo adherence tests measure, over several noise sets: the numbers their floors are set from.

    python bench/adherence_floors.py [--model demo] [--steps 20] [--sets 4] [--noise latents|seed]
                                     [--style v1|v2] [--no-background] [--threads 2]

``tests/test_demo_model.py`` and ``tests/test_demo_student.py`` assert, on the fixed balanced set of
12 held-out prompts (``tests/adherence.py``), a margin above what a prompt-blind model scores on the
same images. Each row here is one noise set: how many of the 12 images have the right colour,
shape, position and background, and the prompt-blind baseline of each (the higher of the best
constant answer and the shuffled-prompt score). Set 0 is the noise the test draws; the spread over
the other sets shows how far below the measurement a floor must sit to hold on other machines.

``--noise latents`` (the teacher test's): image i of set k starts from
``np.random.default_rng(12 k + i)``; ``--noise seed`` (the student test's): the batch is generated
with ``seed=k``. Guidance is the checkpoint's (the negative prompt " " when it is above 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # run as a script: bench/runtime.py would shadow the runtime package
sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests.adherence: the tests' own scoring

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qwen_image2_ref.demo import NEGATIVE_PROMPT  # noqa: E402
from qwen_image2_ref.model_folder import load_pipeline  # noqa: E402
from tests.adherence import KEYS, balanced_heldout_prompts, scores  # noqa: E402


def noise_set(k: int, n: int) -> np.ndarray:
    """The starting latents of set ``k``: image i from ``default_rng(n k + i)`` (128x128: [1, 64, 64])."""
    return np.concatenate([np.random.default_rng(n * k + i).standard_normal((1, 64, 64), dtype=np.float32)
                           for i in range(n)])


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Rows: one per noise set; columns: right of 12 (prompt-blind baseline).")
    p.add_argument("--model", default="demo", help="checkpoint folder, 'demo' or 'demo-4step' (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint's)")
    p.add_argument("--sets", type=int, default=4, help="noise sets, from 0 (default: %(default)s)")
    p.add_argument("--noise", choices=("latents", "seed"), default="latents",
                   help="how a set's noise is drawn: per-image latents (teacher test) or one seed (student test)")
    p.add_argument("--style", choices=("v1", "v2"), default=None,
                   help="caption language (default: the shipped demo model's)")
    p.add_argument("--no-background", action="store_true", help="captions without their background phrase")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.sets < 1:
        p.error(f"--sets: expected >= 1, got {args.sets}")
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    prompts = balanced_heldout_prompts(style=args.style, background=not args.no_background)
    texts, scenes = [c for _, c in prompts], [s for s, _ in prompts]
    guidance = pipe.config.pipeline.guidance_scale
    steps = args.steps or pipe.config.pipeline.num_steps
    neg = NEGATIVE_PROMPT if guidance > 1 else None
    n = len(prompts)
    print(f"model {args.model}, {steps} steps, guidance {guidance}, {n} balanced held-out prompts "
          f"({'no ' if args.no_background else ''}background phrase), noise: {args.noise}")
    print(f"{'set':>3} " + " ".join(f"{k:>16}" for k in KEYS))
    rows = []
    for k in range(args.sets):
        noise = {"latents": noise_set(k, n)} if args.noise == "latents" else {"seed": k}
        images = pipe.generate(texts, negative_prompt=neg, steps=steps, progress=False, **noise)
        acc, base = scores(images, scenes)
        rows.append({"set": k, "accuracy": acc, "baseline": base})
        print(f"{k:3d} " + " ".join(f"{round(acc[key] * n):>6d}/{n} ({base[key]:.2f})" for key in KEYS), flush=True)
    low = {key: min(round(r["accuracy"][key] * n) for r in rows) for key in KEYS}
    print("lowest over the sets: " + ", ".join(f"{key} {low[key]}/{n}" for key in KEYS))
    return rows


if __name__ == "__main__":
    main()
