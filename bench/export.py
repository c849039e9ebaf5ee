"""Export time and peak memory per graph; prints a table.

    python bench/export.py [--layers 1 2] [--skip-full] [--skip-model]

Rows: every graph of the demo model (the tiny preset with random weights when the demo weights
are absent), then the full-width qwen-image-2.1 transformer (4096 = 32 heads x 128, random fp32
weights) at reduced depth, with a linear extrapolation to 32 layers. Each export runs in a fresh
child process, so its peak RSS (``ru_maxrss``) is its own; "base" is the RSS once the model is
in memory, before the export starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on sys.path and its name shadows the package.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]


def _rss_gib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**30


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _child(args) -> None:
    import torch

    from export.graphs import example_inputs, graph_module
    from export.iospec import graph_io
    from export.onnx_export import export_graph

    torch.set_num_threads(args.threads)
    if args.layers:
        from qwen_image2_ref.config import QWEN_IMAGE_21, TransformerConfig
        from qwen_image2_ref.transformer import QwenImageTransformer

        cfg = dataclasses.replace(QWEN_IMAGE_21, transformer=TransformerConfig(num_layers=args.layers))
        with torch.device("meta"):
            module = QwenImageTransformer(cfg.transformer)
        module = module.to_empty(device="cpu").eval()
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0.0, 0.02)
        graph = graph_module_for(module)
    else:
        from qwen_image2_ref.model_folder import load_model

        model = load_model(args.model)
        cfg = model.config
        graph = graph_module(args.graph, model)
    params = sum(p.numel() for p in graph.parameters())
    base = _rss_gib()
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        start = time.perf_counter()
        done = export_graph(args.graph, graph, example_inputs(args.graph, cfg),
                            graph_io(args.graph, cfg, cfg.pipeline.output_resolution), Path(tmp))
        seconds = time.perf_counter() - start
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
    print(json.dumps({"seconds": seconds, "base_gib": base, "peak_gib": _peak_gib(), "params": params,
                      "file_gib": size / 2**30, "nodes": [done.nodes_before, done.nodes_after],
                      "external": bool(done.spec.external_data)}))


def graph_module_for(transformer):
    from export.graphs import TransformerGraph

    return TransformerGraph(transformer).eval()


def _run(argv: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *argv]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO),
                                                                            "OMP_NUM_THREADS": "2",
                                                                            "PATH": "/usr/bin:/bin"})
    if res.returncode:
        raise SystemExit(f"child {argv} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _model_path(tmp: str) -> tuple[str, str]:
    try:
        from qwen_image2_ref.model_folder import resolve_model_path

        return str(resolve_model_path("demo")), "demo"
    except Exception:  # the demo weights are not there yet: a tiny random model instead
        from tests.tiny_model import build_tiny_model

        _, path = build_tiny_model(Path(tmp))
        return str(path), "tiny (demo weights absent)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--graph", default="transformer", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, nargs="*", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tmp", default=None, help="scratch directory for the exported files")
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args()
    if args.child:
        args.layers = args.layers[0] if args.layers else 0
        return _child(args)

    rows = []
    header = f"{'target':<40} {'params':>13} {'export s':>9} {'base GiB':>9} {'peak GiB':>9} {'file GiB':>9} nodes"
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        if not args.skip_model:
            path, label = _model_path(tmp)
            for graph in ("text_encoder", "transformer", "vae_decoder", "vae_encoder"):
                r = _run(["--graph", graph, "--model", path, "--threads", str(args.threads)])
                rows.append((f"{label}: {graph}", r))
    full = []
    if not args.skip_full:
        for n in args.layers or [1, 2]:
            r = _run(["--layers", str(n), "--threads", str(args.threads)] + (["--tmp", args.tmp] if args.tmp else []))
            rows.append((f"qwen-image-2.1 transformer, {n} layer(s)", r))
            full.append((n, r))
    print(header)
    for name, r in rows:
        ext = " (external data)" if r["external"] else ""
        print(f"{name:<40} {r['params']:>13,} {r['seconds']:>9.1f} {r['base_gib']:>9.2f} {r['peak_gib']:>9.2f} "
              f"{r['file_gib']:>9.2f} {r['nodes'][0]}->{r['nodes'][1]}{ext}")
    if len(full) >= 2:
        (n1, a), (n2, b) = full[0], full[-1]
        for key, unit in (("seconds", "s"), ("peak_gib", "GiB"), ("file_gib", "GiB"), ("params", "")):
            per_layer = (b[key] - a[key]) / (n2 - n1)
            at32 = a[key] + per_layer * (32 - n1)
            print(f"extrapolated to 32 layers: {key:<9} {at32:,.1f} {unit} ({per_layer:,.2f} per layer)")


if __name__ == "__main__":
    main()
