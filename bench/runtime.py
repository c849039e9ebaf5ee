"""Runtime (onnxruntime) per-stage times vs the PyTorch reference, and the loop's data path.

    python bench/runtime.py [--model demo] [--export DIR] [--steps 20] [--repeats 3] [--threads 2]
                            [--data-path-only] [--full-width-layers 2]

1. Per-stage times: the runtime is measured in a child process that never imports torch (cold-load
   time and peak RSS are its own); the reference runs in this process afterwards.
2. Data path (issue 22): bytes crossing host and device per step and per image, for the host
   (numpy) loop and the device loop, under the counting backend (onnxruntime CPU modelled as a
   device, ``qwen_image_edge.runtime.backends.counting``), on the demo (text-to-image, short and long
   prompt, with guidance; an edit) and, with ``--full-width-layers N`` (default 2; 0 skips), on a
   random qwen-image-2.1 transformer at full width (4096) with N layers behind a 4096-wide 1-layer
   text encoder (bench/export.py's builders), text-to-image at 128 px. A step's bytes are the
   difference between a run of ``steps`` and one of ``steps - 1``: measured, not computed. Also the
   loop's time outside graph calls as a share of wall time (the host loop's numpy update counts as
   outside; the device loop's update is the ``sampler_step`` graph).
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


# ----------------------------------------------------------------------------- data path


def _demo_cases(model: str):
    """(label, call(pipe, steps) -> (out, stats)) for the demo: short and long prompt, guidance, an edit."""
    import numpy as np

    from qwen_image2_ref.demo import data

    short = "a red circle on the left on a white background"
    long = ", ".join([short, "a small blue square at the top", "a green triangle at the bottom right"] * 6)
    edit = data.sample_edit(np.random.default_rng(7))
    source = data.render(edit.source)
    kw = dict(seed=0, output="np", negative_prompt="blurry", guidance=4.0, return_stats=True)
    return [
        (f"text, {len(short.split())}-word prompt", lambda p, n: p.generate(short, steps=n, **kw)),
        (f"text, {len(long.split())}-word prompt", lambda p, n: p.generate(long, steps=n, **kw)),
        ("edit, 1 image", lambda p, n: p.edit([source], edit.instruction, steps=n, **kw)),
    ]


def _text_cases(size: int):
    short = "a red circle on the left of a white background"
    long = " ".join([short, "the blue square is at the top right, next to a green triangle"] * 12)
    kw = dict(seed=0, output="np", width=size, height=size, negative_prompt="blurry", guidance=4.0,
              return_stats=True)
    return [(f"text, {len(short.split())}-word prompt", lambda p, n: p.generate(short, steps=n, **kw)),
            (f"text, {len(long.split())}-word prompt", lambda p, n: p.generate(long, steps=n, **kw))]


def data_path(export_dir: str, cases, steps: int, threads: int, repeats: int = 3) -> list[dict]:
    """Per case and loop: bytes per step and per image, and (median of ``repeats`` runs) the wall
    time and its share outside graph calls."""
    from qwen_image_edge.runtime.pipeline import Pipeline

    device = Pipeline.load(export_dir, backend="counting", threads=threads)
    # the same sessions with the numpy loop (the counting backend counts its calls as a device's)
    host = Pipeline(device.export_dir, device.manifest, device.sessions, device.tokenizer, backend=device.backend)
    graphs = set(device.sessions)
    traffic, rows = device.backend.traffic, []
    for label, call in cases:
        for loop, pipe in (("host", host), ("device", device)):
            if repeats > 1:
                call(pipe, steps)  # warm-up (with one run, the shorter run before the measured one warms up)
            totals = []
            for n in (steps - 1, steps):
                traffic.reset()
                _, stats = call(pipe, n)
                totals.append(traffic.total)
            runs = [stats] + [call(pipe, steps)[1] for _ in range(repeats - 1)]
            walls = [r.wall for r in runs]
            outside = [(r.wall - sum(sum(t) for k, t in r.stages.items() if k in graphs)) / r.wall for r in runs]
            rows.append(dict(case=label, loop=loop, per_step=totals[1] - totals[0], per_image=totals[1],
                             wall=statistics.median(walls), outside=statistics.median(outside)))
    return rows


def print_data_path(title: str, rows: list[dict], steps: int) -> None:
    print(f"\n{title}: bytes crossing host <-> device (counting backend), guidance 4, {steps} steps; wall time "
          "and its share outside graph calls: median of the runs")
    print(f"{'case':<24} {'loop':<7} {'per step':>12} {'per image':>12} {'wall s':>8} {'outside graphs':>15}")
    for r in rows:
        print(f"{r['case']:<24} {r['loop']:<7} {_size(r['per_step']):>12} {_size(r['per_image']):>12} "
              f"{r['wall']:>8.3f} {r['outside']:>14.1%}")


def _size(n: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


FULL_WIDTH_GRAPHS = ("text_encoder", "transformer", "transformer_prefill", "transformer_step", "vae_decoder",
                     "sampler_step")


def full_width_export(layers: int, size: int) -> Path:
    """A model folder with a random full-width transformer (``layers`` layers) and a 4096-wide
    1-layer text encoder (bench/export.py's builders over the tiny test model), exported for
    text-to-image up to ``size`` px, kept in the cache: the export takes ~6.5 min on 2 busy cores
    (three 1.6 GB transformer graphs), a rerun reuses it."""
    import tempfile

    from bench.export import ENCODER_4096, write_encoder, write_transformer
    from qwen_image_edge.export.demo import cache_dir
    from qwen_image_edge.export.onnx_export import export_model
    from qwen_image_edge.runtime.errors import ManifestError
    from qwen_image_edge.runtime.manifest import load_manifest
    from tests.tiny_model import build_tiny_model

    out = cache_dir() / f"bench-full-width-{layers}l-{size}px"
    try:
        if set(FULL_WIDTH_GRAPHS) <= set(load_manifest(out, verify_hashes=False).graphs):
            print(f"full-width export: reusing {out}")
            return out
    except ManifestError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        _, model = build_tiny_model(Path(tmp) / "tiny", output_resolution=size)
        write_transformer(model, layers)
        write_encoder(model, **ENCODER_4096)
        start = time.perf_counter()
        export_model(model, out, graphs=list(FULL_WIDTH_GRAPHS), max_resolution=size, overwrite=True)
    print(f"full-width export ({layers} layers): {time.perf_counter() - start:.0f} s -> {out}")
    return out


def run_data_path(args: argparse.Namespace) -> None:
    steps = max(2, min(args.steps, 4))
    print_data_path(f"demo ({args.export})",
                    data_path(args.export, _demo_cases(args.model), steps, args.threads, args.repeats), steps)
    if args.full_width_layers:
        out = full_width_export(args.full_width_layers, 128)
        rows = data_path(str(out), _text_cases(128), 2, args.threads, repeats=1)
        print_data_path(f"qwen-image-2.1 transformer at full width, {args.full_width_layers} layers, random "
                        "weights, 128 px", rows, 2)


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
    parser.add_argument("--data-path-only", action="store_true", help="only the data-path tables (part 2)")
    parser.add_argument("--full-width-layers", type=int, default=2,
                        help="layers of the full-width model of the data-path table (0: skip it)")
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_out:
        child(args)
        return

    from qwen_image_edge.export.demo import ensure_export

    args.export = str(ensure_export(args.model, args.export))  # reused when it verifies
    if args.data_path_only:
        run_data_path(args)
        return
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
    run_data_path(args)


if __name__ == "__main__":
    main()
