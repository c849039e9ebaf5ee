"""Does a demo MMDiT read its prompt? Flow-matching loss with the right captions against shuffled
ones, per noise level, on the training data; prints a table.

    python bench/prompt_reading.py --model build/v2_mid --data build/demo_v2/data.safetensors
                                   [--n 48] [--levels 1.0,0.99,0.95,0.8,0.5]

``--model``: a model folder (the demo trainer's ``--stages save --weights DIR`` writes one mid-run);
``--data``: the trainer's data stage file (``OUT/data.safetensors``) it was trained on. The same
``--n`` text-to-image training latents, the same noise, at each noise level ``s``: the loss with
each image's own caption, and with the captions permuted among the images. A model that reads its
prompt at ``s`` has a clearly lower loss with the right captions there. The sampler decides the
composition in its first steps (``s`` close to 1), so a gap that appears only at mid noise means
the model copies what the noisy image already shows and ignores the prompt when sampling.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # run as a script: bench/runtime.py would shadow the runtime package

import numpy as np  # noqa: E402


def losses(model, cfg, group, idx: np.ndarray, perm: np.ndarray, s_val: float, seed: int) -> float:
    import torch

    from qwen_image2_ref.demo import train_dit

    states, layout, cond = train_dit.make_batch(group, perm, np.zeros(len(idx), bool))
    x0 = group.latents[idx]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    s = torch.full((len(idx),), s_val)
    xt = (1 - s[:, None, None]) * x0 + s[:, None, None] * noise
    with torch.no_grad():
        pred = model(xt, states, s, cond, **train_dit.layout_inputs(layout, cfg))
    return float((pred - (noise - x0)).square().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder of a demo MMDiT")
    p.add_argument("--data", required=True, help="the demo trainer's data stage file (OUT/data.safetensors)")
    p.add_argument("--group", default="t2i_128", help="data group (default: t2i_128)")
    p.add_argument("--n", type=int, default=48, help="training images (default: 48)")
    p.add_argument("--levels", default="1.0,0.99,0.975,0.95,0.9,0.8,0.5", help="noise levels s, comma-separated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()

    import torch

    from qwen_image2_ref.demo import train_dit
    from qwen_image2_ref.demo.stage_io import load_groups
    from qwen_image2_ref.model_folder import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    groups, _ = load_groups(Path(args.data), train_dit.Group)
    if args.group not in groups:
        raise SystemExit(f"prompt_reading: no group {args.group!r} in {args.data}; it has {sorted(groups)}")
    group = groups[args.group]
    model = load_model(args.model)
    transformer, cfg = model.transformer.eval(), model.config.transformer
    rng = np.random.default_rng(args.seed)
    idx = rng.choice(len(group.latents), min(args.n, len(group.latents)), replace=False)
    shuffled = np.roll(idx, len(idx) // 2)  # every image gets another image's caption
    print(f"model {args.model}, {len(idx)} {args.group} training images, same noise per level "
          "(flow-matching MSE)")
    print(f"{'s':>6}  {'right':>8}  {'shuffled':>8}  {'gap':>7}")
    for s_val in (float(v) for v in args.levels.split(",")):
        right = losses(transformer, cfg, group, idx, idx, s_val, args.seed + 1)
        wrong = losses(transformer, cfg, group, idx, shuffled, s_val, args.seed + 1)
        print(f"{s_val:6.3f}  {right:8.4f}  {wrong:8.4f}  {wrong - right:7.4f}")


if __name__ == "__main__":
    main()
