"""Export time and peak memory per graph; prints a table.

    python bench/export.py [--layers 1 2] [--skip-full] [--skip-model]
    python bench/export.py --lean [--lean-layers 2 4] [--lean-32 trace|stream] [--lean-encoder] [--tmp DIR]
    python bench/export.py --quantize [--quant-layers 2 4] ...   (bench/memory_plan.py: quantize's peak
        memory and time at full width, and a memory plan per stage)

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
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on sys.path and its name shadows the package.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]


def _rss_gib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**30


def _peak_gib() -> float:
    """Peak RSS of this process image (VmHWM): ru_maxrss would carry the parent's peak across exec."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _child(args) -> None:
    import torch

    from qwen_image_edge.export.registry import example_inputs, graph_io, graph_module
    from qwen_image_edge.export.trace import export_graph

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
    from qwen_image_edge.export.graphs import TransformerGraph

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


# ----------------------------------------------------------------------------- lean vs plain


class LazyRandomState(Mapping):
    """A state dict whose tensors are drawn when read (one shard at a time in ``save_component``);
    ``items()`` hands out storage-less stand-ins of the right shape, which is all sharding reads."""

    def __init__(self, shapes: dict, dtype) -> None:
        self.shapes, self.dtype = shapes, dtype

    def __getitem__(self, key):
        import torch

        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        return (torch.randn(self.shapes[key], generator=g, dtype=self.dtype) * 0.02).to(self.dtype)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def items(self):
        import torch

        return [(k, torch.zeros((), dtype=self.dtype).expand(s)) for k, s in self.shapes.items()]


def _meta_shapes(build) -> dict:
    import torch

    with torch.device("meta"):
        module = build()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def write_transformer(model: Path, layers: int) -> int:
    """Replace ``model/transformer`` by a random full-width bf16 one in ~1 GB shards; returns its bytes."""
    import torch

    from qwen_image2_ref.checkpoint import save_component
    from qwen_image2_ref.config import TransformerConfig
    from qwen_image2_ref.transformer import QwenImageTransformer

    cfg = TransformerConfig(num_layers=layers)
    state = LazyRandomState(_meta_shapes(lambda: QwenImageTransformer(cfg)), torch.bfloat16)
    save_component(state, model / "transformer", cfg.to_diffusers(), max_shard_size="1GB", overwrite=True)
    return sum(2 * math.prod(s) for s in state.shapes.values())


def write_encoder(model: Path, **text) -> int:
    """Replace ``model/text_encoder`` by a random bf16 Qwen3-VL whose language model has the sizes
    ``text`` (the tiny vision tower and token ids are kept, so the tiny processor still fits)."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from qwen_image2_ref.checkpoint import TRANSFORMERS_WEIGHTS_NAME, read_config, save_component
    from qwen_image2_ref.encoder import build_qwen3vl_config, encoder_config_from_hf

    tiny = encoder_config_from_hf(read_config(model / "text_encoder"))
    hf = build_qwen3vl_config(dataclasses.replace(tiny, **text))
    state = LazyRandomState(_meta_shapes(lambda: Qwen3VLForConditionalGeneration(hf)), torch.bfloat16)
    save_component(state, model / "text_encoder", hf.to_dict(), max_shard_size="1GB", overwrite=True,
                   weights_name=TRANSFORMERS_WEIGHTS_NAME)
    return sum(2 * math.prod(s) for s in state.shapes.values())


ENCODER_4096 = dict(hidden_size=4096, num_layers=1, num_heads=32, num_kv_heads=8, head_dim=128,
                    intermediate_size=256, mrope_section=(24, 20, 20))  # matches the transformer's context
ENCODER_8B_2L = dict(vocab_size=151936, hidden_size=4096, num_layers=2, num_heads=32, num_kv_heads=8,
                     head_dim=128, intermediate_size=12288, mrope_section=(24, 20, 20))


def _child_export(model: str, graph: str, lean: str, keep: str | None = None, *, threads: int) -> None:
    import torch

    from qwen_image_edge.export.onnx_export import export_model

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(dir=Path(model).parent) as tmp:
        out = Path(keep) if keep else Path(tmp) / "out"
        start = time.perf_counter()
        export_model(model, out, graphs=[graph], lean=lean == "1", overwrite=True)
        seconds = time.perf_counter() - start
        size = sum(p.stat().st_size for p in (out / graph).rglob("*") if p.is_file())
    print(json.dumps({"seconds": seconds, "peak_gib": _peak_gib(), "file_gib": size / 2**30}))


def _child_compare(model: str, graph: str, a: str, b: str, *, threads: int) -> None:
    """Run two exports of ``graph`` (one session at a time) at two shapes; max relative L2 between them."""
    import numpy as np
    import onnxruntime as ort

    from qwen_image2_ref.model_folder import load_lazy_model
    from qwen_image_edge.export.graphs import text_encoder_inputs, transformer_inputs
    from qwen_image_edge.export.registry import example_inputs
    from qwen_image_edge.runtime.manifest import load_manifest

    cfg = load_lazy_model(model).config
    if graph == "transformer":
        cases = [example_inputs(graph, cfg), transformer_inputs(cfg, 1, 5, (3, 2), ())]  # N_c = 0
    else:
        cases = [example_inputs(graph, cfg), text_encoder_inputs(cfg, 1, 6, 0)]  # N_vis = 0
    outs = []
    for folder in (a, b):
        spec = load_manifest(folder, verify_hashes=False).graph(graph)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        session = ort.InferenceSession(str(Path(folder) / spec.file), opts, providers=["CPUExecutionProvider"])
        outs.append([session.run(None, {t.name: x.numpy() for t, x in zip(spec.inputs, c)})[0] for c in cases])
        del session
    rel = max(float(np.linalg.norm(x - y) / np.linalg.norm(x)) for x, y in zip(*outs))
    print(json.dumps({"rel_l2": rel}))


def _child_trace(layers: int, threads: int) -> None:
    """The full-width transformer graph traced under fake tensors, no checkpoint, no weights."""
    import torch

    from qwen_image2_ref.config import QWEN_IMAGE_21, TransformerConfig
    from qwen_image2_ref.transformer import QwenImageTransformer
    from qwen_image_edge.export.graphs import TransformerGraph
    from qwen_image_edge.export.lean import trace_without_weights
    from qwen_image_edge.export.registry import example_inputs, graph_io

    torch.set_num_threads(threads)
    cfg = dataclasses.replace(QWEN_IMAGE_21, transformer=TransformerConfig(num_layers=layers))
    with torch.device("meta"):
        module = TransformerGraph(QwenImageTransformer(cfg.transformer)).eval()
    start = time.perf_counter()
    proto, weights, _ = trace_without_weights(module, example_inputs("transformer", cfg),
                                              graph_io("transformer", cfg, cfg.pipeline.output_resolution), 19)
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_gib": _peak_gib(), "file_gib": 0.0,
                      "nodes": len(proto.graph.node), "weights": len(weights)}))


def _run_child(argv: list[str], threads: int, cap_gib: float = 10.0) -> dict | str:
    """A child run; stopped (and reported as such) once its RSS passes ``cap_gib``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *argv, "--threads", str(threads)]
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=REPO, env=env)
        rss = 0.0
        while proc.poll() is None:
            time.sleep(0.5)
            try:
                with open(f"/proc/{proc.pid}/status") as fh:
                    rss = next((int(x.split()[1]) / 2**20 for x in fh if x.startswith("VmRSS:")), rss)
            except OSError:
                continue
            if rss > cap_gib:
                proc.kill()
                proc.wait()
                return f"stopped at {rss:.1f} GiB RSS (cap {cap_gib:.0f} GiB)"
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            return "failed: " + err.read()[-300:].strip().splitlines()[-1]
        return json.loads(out.read().strip().splitlines()[-1])


def lean_main(args) -> None:
    from tests.tiny_model import build_tiny_model

    def avail_gib() -> float:
        from qwen_image_edge.export.lean import available_memory

        return available_memory() / 2**30

    def export_row(label: str, model: Path, graph: str, weight_bytes: int, plain_fp32_bytes: int,
                   compare: bool = False) -> None:
        kept = [str(model.parent / "lean-export"), str(model.parent / "plain-export")] if compare else ["", ""]
        r = _run_child(["--child-export", str(model), graph, "1", *kept[:1]], args.threads, args.max_rss_gib)
        add((f"{label}, lean", weight_bytes, r))
        # plain peak per fp32 weight byte: measured on the first plain run, 1.6 (notes §11) before
        estimate = factor[0] * plain_fp32_bytes / 2**30
        cap = min(args.max_rss_gib, 0.7 * avail_gib())
        if estimate > cap:
            add((f"{label}, plain", weight_bytes, f"skipped: needs ~{estimate:.1f} GiB "
                                                          f"({factor[0]:.1f} x fp32 weights) > {cap:.1f} GiB"))
            return
        p = _run_child(["--child-export", str(model), graph, "0", *kept[1:]], args.threads, cap)
        add((f"{label}, plain", weight_bytes, p))
        if isinstance(p, dict):
            factor[0] = p["peak_gib"] * 2**30 / plain_fp32_bytes
        if compare and isinstance(p, dict) and isinstance(r, dict):
            c = _run_child(["--child-compare", str(model), graph, *kept], args.threads, args.max_rss_gib)
            add((f"{label}: lean vs plain in onnxruntime", 0,
                         f"max rel L2 {c['rel_l2']:.1e} (2 shapes, N_c = 0 included)" if isinstance(c, dict) else c))
        for k in kept:
            if k:
                shutil.rmtree(k, ignore_errors=True)

    def add(row: tuple) -> None:  # (name, checkpoint bytes, result); printed as it comes
        name, nbytes, r = row
        if isinstance(r, str):
            print(f"{name:<52} {nbytes / 1e9:>8.2f}  {r}", flush=True)
        else:
            extra = f"  ({r['nodes']} nodes, {r['weights']} weights)" if "nodes" in r else ""
            print(f"{name:<52} {nbytes / 1e9:>8.2f} {r['seconds']:>9.1f} {r['peak_gib']:>9.2f} "
                  f"{r['file_gib']:>9.2f}{extra}", flush=True)

    print(f"{'target':<52} {'ckpt GB':>8} {'export s':>9} {'peak GiB':>9} {'file GiB':>9}", flush=True)
    factor = [1.6]
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        _, model = build_tiny_model(Path(tmp))
        enc_bytes = write_encoder(model, **ENCODER_4096)
        for n in args.lean_layers:
            t_bytes = write_transformer(model, n)
            export_row(f"transformer 4096, {n} layers", model, "transformer", t_bytes, 2 * (t_bytes + enc_bytes),
                       compare=n == min(args.lean_layers))
        if not args.skip_encoder:
            write_transformer(model, 1)  # the plain path loads every component
            e_bytes = write_encoder(model, **ENCODER_8B_2L)
            export_row("Qwen3-VL-8B-width text encoder, 2 layers", model, "text_encoder", e_bytes, 2 * e_bytes)
        if args.lean_32 != "skip":
            add(("transformer 4096, 32 layers: graph trace only", 0,
                         _run_child(["--child-trace", "32"], args.threads, args.max_rss_gib)))
        if args.lean_32 == "stream":
            free = shutil.disk_usage(model).free
            if free < 50e9:
                add(("transformer 4096, 32 layers, lean", 14.2e9,
                             f"skipped: {free / 1e9:.0f} GB free on disk, needs ~50 GB (14 GB bf16 + 28 GB fp32)"))
            else:
                t_bytes = write_transformer(model, 32)
                add(("transformer 4096, 32 layers, lean", t_bytes,
                             _run_child(["--child-export", str(model), "transformer", "1"], args.threads,
                                        args.max_rss_gib)))
                add(("transformer 4096, 32 layers, plain", t_bytes,
                             f"skipped: needs ~{factor[0] * 2 * t_bytes / 2**30:.0f} GiB"))


def main() -> None:
    if "--quantize" in sys.argv[1:]:
        from bench.memory_plan import main as memory_plan

        return memory_plan([a for a in sys.argv[1:] if a != "--quantize"])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--graph", default="transformer", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, nargs="*", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tmp", default=None, help="scratch directory for the exported files")
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--lean", action="store_true", help="lean vs plain export from bf16 sharded checkpoints")
    parser.add_argument("--quantize", action="store_true",
                        help="quantize's peak memory and time at full width + a memory plan per stage "
                             "(bench/memory_plan.py; see its --help)")
    parser.add_argument("--lean-layers", type=int, nargs="*", default=[2, 4])
    parser.add_argument("--lean-32", choices=["skip", "trace", "stream"], default="stream",
                        help="32-layer transformer: graph trace only, or also its weights streamed (~42 GB disk)")
    parser.add_argument("--skip-encoder", action="store_true", help="no Qwen3-VL-8B-width text encoder row")
    parser.add_argument("--max-rss-gib", type=float, default=10.0, help="skip plain runs estimated above this")
    parser.add_argument("--child-export", nargs="+", help=argparse.SUPPRESS)  # MODEL GRAPH LEAN [KEEP]
    parser.add_argument("--child-compare", nargs=4, help=argparse.SUPPRESS)  # MODEL GRAPH DIR_A DIR_B
    parser.add_argument("--child-trace", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_export:
        return _child_export(*args.child_export, threads=args.threads)
    if args.child_compare:
        return _child_compare(*args.child_compare, threads=args.threads)
    if args.child_trace:
        return _child_trace(args.child_trace, threads=args.threads)
    if args.lean:
        return lean_main(args)
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
