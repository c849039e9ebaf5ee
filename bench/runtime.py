"""Runtime (onnxruntime) per-stage times vs the PyTorch reference, same prompt and seed, one run.

    python bench/runtime.py [--model demo] [--export DIR] [--steps 20] [--repeats 3] [--threads 2]

The runtime is measured in a child process that never imports torch (cold-load time and peak RSS
are its own); the reference runs in this process afterwards. Prints tables.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# `python bench/runtime.py` puts bench/ first on sys.path, where bench/export.py would shadow the
# `export` package.
sys.path.insert(0, str(REPO))


def child(args: argparse.Namespace) -> None:
    from qwen_image_edge.runtime.pipeline import Pipeline

    start = time.perf_counter()
    pipe = Pipeline.load(args.export, threads=args.threads)
    cold = time.perf_counter() - start
    kw = dict(steps=args.steps, seed=args.seed, width=args.size, height=args.size, output="np")
    pipe.generate(args.prompt, **kw)  # warm-up
    runs = []
    for _ in range(args.repeats):
        image, stats = pipe.generate(args.prompt, return_stats=True, **kw)  # each call's own timings
        runs.append({"wall": stats.wall, "stages": stats.stages})
    np_path = Path(args.child_out).with_suffix(".npy")
    import numpy as np

    np.save(np_path, image)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.child_out).write_text(json.dumps({"cold_load": cold, "runs": runs, "peak_rss_mb": peak_mb,
                                                "image": str(np_path)}))


def reference_time(args: argparse.Namespace):
    import torch

    from qwen_image2_ref.model_folder import load_pipeline

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    kw = dict(steps=args.steps, seed=args.seed, width=args.size, height=args.size, output="np", progress=False)
    pipe.generate(args.prompt, **kw)
    walls = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        image = pipe.generate(args.prompt, **kw)
        walls.append(time.perf_counter() - start)
    return statistics.median(walls), image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--export", default=None, help="export dir (default: exported once into the cache)")
    parser.add_argument("--prompt", default="a red circle on the left on a white background")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_out:
        child(args)
        return

    from qwen_image_edge.export.demo import ensure_export

    args.export = str(ensure_export(args.model, args.export))  # reused when it verifies
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-runtime-{os.getpid()}.json"
    cmd = [sys.executable, __file__, "--export", args.export, "--prompt", args.prompt, "--steps", str(args.steps),
           "--size", str(args.size), "--seed", str(args.seed), "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--child-out", str(out)]
    subprocess.run(cmd, check=True, cwd=REPO)
    data = json.loads(out.read_text())

    import numpy as np

    runs = data["runs"]
    wall = statistics.median(r["wall"] for r in runs)
    stage_names = sorted({k for r in runs for k in r["stages"]})
    backend = {"text_encoder", "vision_encoder", "transformer", "transformer_prefill", "transformer_step",
               "vae_decoder", "vae_encoder"}
    print(f"runtime: {args.export}\n{args.steps} steps, {args.size}x{args.size}, {args.threads} threads, "
          f"median of {args.repeats}\n")
    print(f"{'stage':<14} {'calls':>5} {'total ms':>10} {'per call ms':>12} {'share':>7}")
    in_backend = 0.0
    for name in stage_names:
        totals = [sum(r["stages"].get(name, [])) for r in runs]
        calls = len(runs[0]["stages"].get(name, []))
        total = statistics.median(totals)
        in_backend += total if name in backend else 0.0
        print(f"{name:<14} {calls:>5} {total * 1e3:>10.2f} {total / max(calls, 1) * 1e3:>12.3f} "
              f"{total / wall:>6.1%}")
    outside = wall - in_backend
    print(f"{'wall':<14} {'':>5} {wall * 1e3:>10.2f}")
    print(f"\noutside backend calls: {outside * 1e3:.2f} ms = {outside / wall:.2%} of wall time")
    print(f"cold load (manifest + hashes + sessions): {data['cold_load']:.3f} s; peak RSS {data['peak_rss_mb']:.0f} MB")

    ref_wall, ref_image = reference_time(args)
    image = np.load(data["image"])
    mse = float(np.mean((image.astype(np.float64) - ref_image) ** 2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)
    print(f"\n{'pipeline':<22} {'median s':>9} {'ratio':>7}")
    print(f"{'reference (torch)':<22} {ref_wall:>9.3f} {1.0:>7.2f}")
    print(f"{'runtime (onnxruntime)':<22} {wall:>9.3f} {ref_wall / wall:>7.2f}x faster")
    print(f"image agreement: PSNR {psnr:.1f} dB")
    out.unlink(missing_ok=True)
    Path(data["image"]).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
