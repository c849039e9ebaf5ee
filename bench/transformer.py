"""Reference transformer forward time at two (or more) sequence lengths; prints a table.

    python bench/transformer.py [--preset tiny] [--threads 2] [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # run as a script: bench/runtime.py would shadow the runtime package

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qwen_image2_ref.config import get_preset  # noqa: E402
from qwen_image2_ref.transformer import QwenImageTransformer, layout_inputs  # noqa: E402
from qwen_image_edge.runtime.layout import build_layout  # noqa: E402


def time_forward(model, cfg, text_len: int, target: tuple[int, int], batch: int, repeats: int) -> list[float]:
    rng = np.random.default_rng(0)
    layout = build_layout(np.zeros(text_len, bool), np.ones((batch, text_len), bool), [], target)
    n_t = target[0] * target[1]
    inputs = dict(
        latents=torch.from_numpy(rng.standard_normal((batch, n_t, cfg.in_channels), dtype=np.float32)),
        text_states=torch.from_numpy(rng.standard_normal((batch, text_len, cfg.context_dim), dtype=np.float32)),
        timestep=torch.full((batch,), 0.5),
        cond_latents=torch.zeros(batch, 0, cfg.in_channels),
        **layout_inputs(layout, cfg),
    )
    times = []
    with torch.inference_mode():
        model(**inputs)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset).transformer
    torch.manual_seed(0)
    model = QwenImageTransformer(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"preset {args.preset}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {params / 1e6:.2f}M params, "
          f"batch {args.batch}, {args.threads} threads, fp32, torch {torch.__version__}")
    print(f"{'text':>6} {'image':>6} {'total':>6} | {'median ms':>10} {'min ms':>8} {'tokens/s':>10}")
    for text_len, target in ((32, (8, 8)), (64, (32, 32))):
        times = time_forward(model, cfg, text_len, target, args.batch, args.repeats)
        n_img = target[0] * target[1]
        med = statistics.median(times)
        total = text_len + n_img
        print(f"{text_len:>6} {n_img:>6} {total:>6} | {med * 1e3:>10.2f} {min(times) * 1e3:>8.2f} "
              f"{args.batch * total / med:>10.0f}")


if __name__ == "__main__":
    main()
