"""One check of a GPU machine, in under 5 minutes; prints one table per part.

    python bench/gpu_check.py [--device cuda] [--dtype bf16] [--layers N]
    python bench/gpu_check.py --device cpu --quick        # tiny sizes: that the script runs

1. step: one reference transformer forward (random weights, std 0.02 as bench/export.py writes
   them) at the full width of qwen-image-2.1 (4096 = 32 heads x 128) at 1024x1024 (64x64 latent
   tokens, 128 text rows, batch 1), with as many layers as fit in the device's free memory (at
   most the preset's 32): ms per step and achieved TFLOP/s against the FLOPs counted from the
   config (:func:`step_flops`: projections, attention, MLP).
2. calibrate: INT8 calibration (quantize_transformer) of a full-width 2-layer bf16 checkpoint,
   loaded straight onto the device, over 2 prompts and 2 steps: wall time and peak device memory.
3. generate: the demo model in --dtype on --device against CPU fp32, same seeds and held-out
   prompts: PSNR per image and the judge's readings (qwen_image2_ref.demo.judge) of both.

--quick: the step at a 256-wide, 2-layer transformer at 128x128; calibration of the tiny
random model; 2 prompts of 4 steps. Each part reports its own failure and the script goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on sys.path and its names shadow the packages.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qwen_image2_ref.config import TransformerConfig, get_preset  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEXT_ROWS = 128


def step_flops(cfg: TransformerConfig, text_rows: int, n_cond: int, n_target: int, seq: int, batch: int = 1) -> int:
    """FLOPs (2 per multiply-add) of one transformer forward. Per token: txt_in (context -> D -> D)
    on the text rows, img_in on every image token, per layer q/k/v/out (4 D^2) and the SwiGLU
    (3 D x mlp_ratio D) on all ``seq`` tokens, proj_out on the targets. Attention: QK^T and AV
    over the full ``seq x seq`` (the mask is applied, not skipped): 4 seq^2 D per layer. The
    timestep MLP, modulation and norm_out's scale run per sample, not per token: counted too, though
    negligible."""
    d, ff = cfg.hidden_size, cfg.hidden_size * cfg.mlp_ratio
    per_layer = 2 * seq * (4 * d * d + 3 * d * ff) + 4 * seq * seq * d
    tokens = (2 * text_rows * (cfg.context_dim * d + d * d) + 2 * (n_cond + n_target) * cfg.in_channels * d
              + 2 * n_target * d * cfg.out_channels)
    # per sample: the timestep MLP and modulation run twice (the target's sigma and the condition
    # tokens' zero), norm_out's scale projection once
    per_sample = 2 * 2 * (cfg.timestep_dim * d + d * d + d * 4 * d) + 2 * d * d
    return batch * (cfg.num_layers * per_layer + tokens + per_sample)


def step_inputs(cfg: TransformerConfig, target: tuple[int, int], device, dtype, batch: int = 1) -> dict:
    """Random text-to-image inputs for one forward: ``TEXT_ROWS`` text rows, a ``target`` latent grid."""
    from qwen_image2_ref.transformer import layout_inputs
    from qwen_image_edge.runtime.layout import build_layout

    layout = build_layout(np.zeros(TEXT_ROWS, bool), np.ones((batch, TEXT_ROWS), bool), [], target)
    g = torch.Generator().manual_seed(0)
    n_t = target[0] * target[1]
    inputs = dict(latents=torch.randn(batch, n_t, cfg.in_channels, generator=g),
                  text_states=torch.randn(batch, TEXT_ROWS, cfg.context_dim, generator=g) * 0.03,
                  timestep=torch.full((batch,), 0.5), cond_latents=torch.zeros(batch, 0, cfg.in_channels),
                  **layout_inputs(layout, cfg))
    activations = ("latents", "text_states", "cond_latents")  # rope, mask and timestep keep their dtypes
    return {k: v.to(device, dtype) if k in activations else v.to(device) for k, v in inputs.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _layers_that_fit(cfg: TransformerConfig, device: torch.device, dtype: torch.dtype) -> int:
    """Layers whose weights fit in 70 % of the free device memory (the rest: activations at 4k tokens)."""
    if device.type != "cuda":
        return min(cfg.num_layers, 2)
    free, _ = torch.cuda.mem_get_info(device)
    d, ff = cfg.hidden_size, cfg.hidden_size * cfg.mlp_ratio
    per_layer = (4 * d * d + 3 * d * ff) * torch.finfo(dtype).bits // 8
    return max(1, min(cfg.num_layers, int(0.7 * free // per_layer)))


def part_step(args, device, dtype) -> list[tuple]:
    from qwen_image2_ref.transformer import QwenImageTransformer

    full = get_preset("qwen-image-2.1").transformer
    cfg = (TransformerConfig(num_layers=2, num_heads=4, head_dim=64, context_dim=256, axes_dims_rope=(8, 28, 28))
           if args.quick else full)
    layers = args.layers or _layers_that_fit(cfg, device, dtype)
    cfg = dataclasses.replace(cfg, num_layers=layers)
    side = 128 if args.quick else 1024
    f = get_preset("qwen-image-2.1").vae.scale_factor_spatial
    target = (side // f, side // f)
    with torch.device("meta"):
        model = QwenImageTransformer(cfg)
    model = model.to(dtype).to_empty(device=device)  # allocated once, in dtype: no fp32 copy
    with torch.no_grad():
        for name, p in model.named_parameters():  # random weights as the benches write them; norms at 1
            if p.dim() > 1:
                p.normal_(0, 0.02)
            else:  # the text norm's weight is zero-centred (its scale is 1 + w)
                p.fill_(0.0 if name.endswith("text_norm.weight") else 1.0)
    model.eval()
    inputs = step_inputs(cfg, target, device, dtype)
    seq = TEXT_ROWS + target[0] * target[1]
    flops = step_flops(cfg, TEXT_ROWS, 0, target[0] * target[1], seq)
    times = []
    with torch.inference_mode():
        for i in range(args.repeats + 1):
            _sync(device)
            start = time.perf_counter()
            model(**inputs)
            _sync(device)
            if i:  # the first call warms up
                times.append(time.perf_counter() - start)
    ms = statistics.median(times) * 1e3
    return [("layers", f"{layers} of {full.num_layers} at width {cfg.hidden_size}"),
            ("image", f"{side}x{side}: {target[0] * target[1]} target tokens + {TEXT_ROWS} text rows"),
            ("ms per step", f"{ms:.1f} (median of {len(times)})"),
            ("FLOPs per step", f"{flops / 1e9:.1f} G ({flops / 1e9 / layers:.1f} G per layer)"),
            ("achieved", f"{flops / (ms / 1e3) / 1e12:.2f} TFLOP/s")]


def part_calibrate(args, device, dtype) -> list[tuple]:
    from qwen_image2_ref.model_folder import open_model
    from qwen_image_edge.calib.collect import CalibrationSettings
    from qwen_image_edge.calib.policy import QuantPolicy
    from qwen_image_edge.calib.quantize import quantize_transformer
    from tests.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        _, path = build_tiny_model(Path(tmp), peer_init=False)  # the GPU machine has no diffusers
        what = "tiny random model"
        if not args.quick:
            sys.path.insert(0, str(REPO / "bench"))
            from export import ENCODER_4096, write_encoder, write_transformer  # bench/export.py

            write_encoder(path, **ENCODER_4096)
            write_transformer(path, 2)
            what = "full-width 2-layer bf16 checkpoint"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        model = open_model(str(path), device=device, dtype=dtype)
        loaded = time.perf_counter() - start
        settings = CalibrationSettings(batch_size=2, steps=2, resolution=64 if args.quick else 128)
        quantized = quantize_transformer(model, QuantPolicy(precision="int8"), ["a red circle", "a blue square"],
                                         settings, progress=False)
        took = time.perf_counter() - start - loaded
    rows = [("model", what), ("load", f"{loaded:.1f} s"), ("calibrate 2 prompts x 2 steps", f"{took:.1f} s"),
            ("quantized layers", str(len(quantized.layers)))]
    if device.type == "cuda":
        rows.append(("peak device memory", f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB"))
    return rows


def part_generate(args, device, dtype) -> list[tuple]:
    from qwen_image2_ref.demo import data, judge
    from qwen_image2_ref.model_folder import open_model
    from qwen_image_edge.export.endtoend import HELDOUT_SEED, JUDGE_KEYS, psnr

    pairs = data.heldout_prompts(2 if args.quick else 8, HELDOUT_SEED)
    steps = 4 if args.quick else None

    def images(dev, dt) -> list[np.ndarray]:
        pipe = open_model("demo", device=dev, dtype=dt).pipeline()
        out = []
        for i, (_, caption) in enumerate(pairs):
            with torch.no_grad():
                im = pipe.generate([caption], seed=i, steps=steps, output="np", progress=False)[0]
            out.append(np.asarray(im, np.float32))  # [H, W, 4] in [0, 1]
        return out

    start = time.perf_counter()
    got = images(device, dtype)
    took = time.perf_counter() - start
    ref = images(torch.device("cpu"), torch.float32)
    scenes = [s for s, _ in pairs]
    to8 = lambda ims: [np.clip(np.rint(im * 255), 0, 255).astype(np.uint8) for im in ims]  # noqa: E731
    acc_ref = judge.accuracy(to8(ref), scenes, JUDGE_KEYS)
    acc_got = judge.accuracy(to8(got), scenes, JUDGE_KEYS)
    values = [psnr(r, g) for r, g in zip(ref, got)]
    return [("prompts", f"{len(pairs)} held-out, {steps or 'default'} steps, {took:.1f} s on {device}"),
            ("PSNR vs CPU fp32", f"min {min(values):.1f} dB, mean {np.mean(values):.1f} dB")] + [
        (f"judge {k}", f"{100 * acc_got[k]:.1f} vs {100 * acc_ref[k]:.1f} points (CPU fp32)") for k in JUDGE_KEYS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: %(default)s)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="default: %(default)s")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a CPU (a few seconds)")
    parser.add_argument("--layers", type=int, help="transformer layers of the step (default: as many as fit)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--parts", nargs="+", default=["step", "calibrate", "generate"],
                        choices=["step", "calibrate", "generate"])
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: this machine has no CUDA device; use --device cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check on {name} ({device}), {args.dtype}, torch {torch.__version__}{', quick' if args.quick else ''}")
    failed = 0
    for part in args.parts:
        start = time.perf_counter()
        try:
            rows = globals()[f"part_{part}"](args, device, dtype)
        except Exception as e:  # one part failing must not hide the others' figures
            failed += 1
            rows = [("FAILED", f"{type(e).__name__}: {e}".splitlines()[0])]
            traceback.print_exc(file=sys.stderr)
        print(f"\n[{part}] {time.perf_counter() - start:.1f} s")
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"  {k.ljust(width)}  {v}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
