"""Peak host memory and time of ``quantize`` at full width, and a memory plan per stage; prints tables.

    python bench/export.py --quantize [--quant-layers 2 4] [--precisions int8 fp8] [--no-plain] [--no-plan]
    python bench/memory_plan.py ...   (the same)

Checkpoints: the tiny model with a random full-width (4096) bf16 transformer of N layers and a
4096-wide one-layer text encoder (``bench/export.py``'s builders), sharded at 1 GB. Every run is a
fresh child process; "peak" is its VmHWM.

1. ``quantize`` by the lean path (``qwen_image_edge.export.qdq_lean``): calibration in bf16 on the
   CPU (2 prompts x 2 steps at the model's 64 px), then the export; against the bound of the full-size
   issue, 1.3 x the checkpoint's bf16 bytes + 1 GiB. Its ``validate`` gate is measured in part 3,
   not here (at full width it is a run of every graph on the CPU). Per layer slope, and 32 layers.
2. The TorchScript path on the same checkpoint and calibration (fp32 in memory, as before), and the
   two exports' onnxruntime outputs compared.
3. A memory plan per stage (export, quantize, validate, generate, distillation pool), host RSS
   measured at N layers and projected to 32. Device memory needs a GPU: ``bench/gpu_check.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]

from bench.export import _peak_gib  # noqa: E402 (after the path fix above)

GIB = 2**30
PROMPTS = ["a red circle on the left", "a blue square on a white background"]


def _settings():
    from qwen_image_edge.calib.collect import CalibrationSettings

    return CalibrationSettings(batch_size=2, steps=2)


def _prompt_file(folder: Path) -> str:
    path = folder / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


# ----------------------------------------------------------------------------- children (one stage each)


def child_quantize(model: str, precision: str, lean: str, out: str) -> dict:
    """quantize_model with its gate replaced by a no-op (measured separately)."""
    import qwen_image_edge.calib.quantize as cq

    gate = {}
    cq._gate = lambda out, loaded, precision: gate.setdefault("peak_before_gate_gib", _peak_gib())
    start = time.perf_counter()
    cq.quantize_model(model, precision, out, prompts=_prompt_file(Path(out).parent), calib_size=2,
                      settings=_settings(), device="cpu", dtype="bf16" if lean == "1" else "fp32",
                      lean=lean == "1", overwrite=True, progress=False)
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    return {"seconds": time.perf_counter() - start, "peak_gib": _peak_gib(), "file_gib": size / GIB, **gate}


def child_compare(model: str, out_plain: str, out_lean: str) -> dict:
    """One fp32 calibration, exported by both paths; max rel L2 of their transformer outputs."""
    import numpy as np
    import onnxruntime as ort

    from qwen_image2_ref.model_folder import load_lazy_model, load_model
    from qwen_image_edge.calib.policy import QuantPolicy
    from qwen_image_edge.calib.quantize import quantize_transformer
    from qwen_image_edge.export.qdq_lean import calibrated_scales
    from qwen_image_edge.export.quantized import export_quantized
    from qwen_image_edge.export.registry import example_inputs
    from qwen_image_edge.runtime.manifest import load_manifest

    loaded = load_model(model)
    q = quantize_transformer(loaded, QuantPolicy(precision="int8"), PROMPTS, _settings(), progress=False)
    start = time.perf_counter()
    export_quantized(loaded, q, out_plain, graphs=["transformer"], overwrite=True)
    plain_s = time.perf_counter() - start
    plain_peak = _peak_gib()
    scales = calibrated_scales(q)
    cfg = loaded.config
    del q, loaded
    export_quantized(load_lazy_model(model), scales, out_lean, graphs=["transformer"], overwrite=True)
    outs = []
    for folder in (out_plain, out_lean):
        spec = load_manifest(folder, verify_hashes=False).graph("transformer")
        session = ort.InferenceSession(str(Path(folder) / spec.file), providers=["CPUExecutionProvider"])
        outs.append(session.run(None, {t.name: x.numpy() for t, x in zip(spec.inputs, example_inputs("transformer",
                                                                                                      cfg))})[0])
        del session
    a, b = outs
    return {"seconds": plain_s, "peak_gib": plain_peak, "rel_l2": float(np.linalg.norm(a - b) / np.linalg.norm(a))}


def child_export(model: str, out: str) -> dict:
    from qwen_image_edge.export.onnx_export import export_model

    start = time.perf_counter()
    export_model(model, out, lean=True, overwrite=True)
    return {"seconds": time.perf_counter() - start, "peak_gib": _peak_gib()}


def child_validate(model: str, export: str) -> dict:
    from qwen_image2_ref.model_folder import open_model
    from qwen_image_edge.export.validate import validate

    start = time.perf_counter()
    loaded = open_model(model, device="cpu", dtype="bf16", stage="validate")
    report = validate(export, loaded, verify_hashes=False, end_to_end_prompts=1)
    return {"seconds": time.perf_counter() - start, "peak_gib": _peak_gib(), "passed": report.passed}


def child_generate(model: str) -> dict:
    from qwen_image2_ref.model_folder import load_pipeline

    start = time.perf_counter()
    pipe = load_pipeline(model, dtype="bf16", device="cpu")
    pipe.generate(PROMPTS[0], steps=2, seed=0, progress=False)
    return {"seconds": time.perf_counter() - start, "peak_gib": _peak_gib()}


def child_pool(model: str) -> dict:
    from qwen_image2_ref.model_folder import load_pipeline
    from qwen_image_edge.distill.pool import PoolSpec, build_pool

    start = time.perf_counter()
    pipe = load_pipeline(model, dtype="bf16", device="cpu")
    build_pool(pipe, PoolSpec(prompts=tuple(PROMPTS), teacher_steps=4, student_steps=(2,), batch=2), progress=False)
    return {"seconds": time.perf_counter() - start, "peak_gib": _peak_gib()}


CHILDREN = {"quantize": child_quantize, "compare": child_compare, "export": child_export,
            "validate": child_validate, "generate": child_generate, "pool": child_pool}


def run_child(name: str, *argv: str, threads: int) -> dict | str:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads), "--child", name, *argv]
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode:
        return "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][-200:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- tables


def checkpoint_bytes(model: Path) -> int:
    return sum(p.stat().st_size for p in model.rglob("*.safetensors"))


def build_model(root: Path, layers: int) -> Path:
    from bench.export import ENCODER_4096, write_encoder, write_transformer
    from tests.tiny_model import build_tiny_model

    marker = root / "ckpt" / "model-path"
    if not marker.exists():
        (root / "ckpt").mkdir()
        _, model = build_tiny_model(root / "ckpt")
        write_encoder(model, **ENCODER_4096)
        marker.write_text(str(model))
    model = Path(marker.read_text())
    if getattr(build_model, "layers", None) != layers:
        write_transformer(model, layers)
        build_model.layers = layers
    return model


def _cell(r: dict | str, key: str, fmt: str) -> str:
    return format(r[key], fmt) if isinstance(r, dict) and key in r else "-"


def _project(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """(slope per layer, value at 32 layers) from the first and last measured depth."""
    if len(points) < 2:
        return None
    (n1, a), (n2, b) = points[0], points[-1]
    slope = (b - a) / (n2 - n1)
    return slope, a + slope * (32 - n1)


def quantize_table(args, root: Path) -> None:
    print(f"\n1. quantize, lean path (calibration bf16 on the CPU, {len(PROMPTS)} prompts x 2 steps)")
    print(f"{'checkpoint':<26} {'prec':>5} {'ckpt GB':>8} {'seconds':>8} {'peak GiB':>9} {'bound GiB':>10} "
          f"{'within':>7} {'file GiB':>9}", flush=True)
    series: dict[str, list] = {p: [] for p in args.precisions}
    for n in args.quant_layers:
        model = build_model(root, n)
        ckpt = checkpoint_bytes(model)
        bound = 1.3 * ckpt / GIB + 1.0
        for precision in args.precisions:
            r = run_child("quantize", str(model), precision, "1", str(root / "out"), threads=args.threads)
            ok = "yes" if isinstance(r, dict) and r["peak_gib"] <= bound else "NO"
            print(f"{f'4096 x {n} layers':<26} {precision:>5} {ckpt / 1e9:>8.2f} {_cell(r, 'seconds', '.1f'):>8} "
                  f"{_cell(r, 'peak_gib', '.2f'):>9} {bound:>10.2f} {ok:>7} {_cell(r, 'file_gib', '.2f'):>9}"
                  + ("" if isinstance(r, dict) else f"  {r}"), flush=True)
            if isinstance(r, dict):
                series[precision].append((n, r["peak_gib"], r["seconds"], ckpt))
    for precision, pts in series.items():
        peak = _project([(n, p) for n, p, _, _ in pts])
        secs = _project([(n, s) for n, _, s, _ in pts])
        ckpt = _project([(n, c / GIB) for n, _, _, c in pts])
        if peak and secs and ckpt:
            print(f"{precision}: per layer {peak[0]:.2f} GiB peak, {secs[0]:.1f} s; at 32 layers: peak "
                  f"{peak[1]:.1f} GiB against a bound of {1.3 * ckpt[1] + 1:.1f} GiB "
                  f"(checkpoint {ckpt[1]:.1f} GiB), {secs[1] / 60:.0f} min on this CPU")


def plain_row(args, root: Path) -> None:
    n = args.quant_layers[0]
    model = build_model(root, n)
    print(f"\n2. the TorchScript path, same checkpoint (4096 x {n} layers), one fp32 calibration, int8", flush=True)
    r = run_child("compare", str(model), str(root / "plain"), str(root / "lean"), threads=args.threads)
    if isinstance(r, str):
        print(f"   {r}")
        return
    print(f"   TorchScript export: {r['seconds']:.1f} s, peak {r['peak_gib']:.2f} GiB (model held in fp32); "
          f"lean vs TorchScript outputs in onnxruntime: rel L2 {r['rel_l2']:.1e}")


def plan_table(args, root: Path) -> None:
    print("\n3. memory plan per stage: peak host RSS (GiB), bf16 on the CPU; device memory: bench/gpu_check.py")
    stages = ("export", "quantize", "validate", "generate", "pool")
    print(f"{'stage':<10}" + "".join(f"{f'{n} layers':>11}" for n in args.quant_layers) + f"{'per layer':>11}"
          f"{'32 layers':>11}", flush=True)
    measured: dict[str, list] = {s: [] for s in stages}
    for n in args.quant_layers:
        model = build_model(root, n)
        quant_out = root / "plan-int8"
        for stage in stages:
            argv = {"export": (str(model), str(root / "plan-fp32")),
                    "quantize": (str(model), "int8", "1", str(quant_out)),
                    "validate": (str(model), str(quant_out)),
                    "generate": (str(model),), "pool": (str(model),)}[stage]
            r = run_child(stage, *argv, threads=args.threads)
            measured[stage].append((n, r))
    for stage in stages:
        cells = [_cell(r, "peak_gib", ".2f") for _, r in measured[stage]]
        proj = _project([(n, r["peak_gib"]) for n, r in measured[stage] if isinstance(r, dict)])
        tail = f"{proj[0]:>11.2f}{proj[1]:>11.1f}" if proj else ""
        notes = "; ".join(r for _, r in measured[stage] if isinstance(r, str))
        print(f"{stage:<10}" + "".join(f"{c:>11}" for c in cells) + tail + (f"  {notes}" if notes else ""))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quant-layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--precisions", nargs="+", default=["int8", "fp8"], choices=["int8", "fp8"])
    parser.add_argument("--no-plain", action="store_true", help="skip the TorchScript comparison")
    parser.add_argument("--no-plan", action="store_true", help="skip the per-stage memory plan")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tmp", default=None, help="scratch directory (needs ~4x the largest checkpoint)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(CHILDREN[args.child[0]](*args.child[1:])))
        return
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root = Path(tmp)
        quantize_table(args, root)
        if not args.no_plain:
            plain_row(args, root)
        if not args.no_plan:
            plan_table(args, root)


if __name__ == "__main__":
    main()
