"""The condition encoder's hidden states under each text-encoder quantization method, against fp32.

    python bench/encoder_quant.py [--model demo | DIR] [--prompts demo] [--calib-size 32]
                                  [--held-out 64] [--outliers]

For a model folder (the shipped demo's encoder is random-init; a demo v2 folder written by
``python -m qwen_image2_ref.demo.train --stages save --weights DIR`` carries the trained one), each
method of ``calib.encoder_quant`` is calibrated on the first ``--calib-size`` prompts and measured
by the cosine of the encoder's hidden states against fp32 per prompt (valid tokens only; the issue's
bound is >= 0.99 over the calibration prompts), on those prompts and on ``--held-out`` further ones:

- naive int8: per-tensor weights and activations, no smoothing (the baseline);
- int8 SmoothQuant: per-channel weights, alpha 0.5 (``text_encoder=int8``);
- int4 AWQ-lite: blocks of 128, weight-only, with the int8 embedding table (``text_encoder=int4``,
  what ``edge`` uses), and without the table.

``--outliers`` also injects a trained LLM's outlier channels into the same encoder (the tests'
three channels, 60-100x; the fp32 function is unchanged), the stress case for an encoder that has
none of its own. The activation statistics themselves: ``bench/encoder_stats.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]

import numpy as np  # noqa: E402

from bench.quant import table  # noqa: E402 (after the path fix above)


def methods():
    from qwen_image_edge.calib.encoder_quant import EncoderQuantPolicy
    from qwen_image_edge.runtime.manifest import Precision

    int4 = EncoderQuantPolicy(Precision.INT4)
    return [("naive int8 (per-tensor)", EncoderQuantPolicy.naive()),
            ("int8 SmoothQuant", EncoderQuantPolicy(Precision.INT8)),
            ("int4 AWQ + int8 table (edge)", int4),
            ("int4 AWQ, fp32 table", dataclasses.replace(int4, int8_embedding=False))]


def measure(model, calib: list[str], held: list[str], label: str) -> list[list[str]]:
    from qwen_image_edge.calib.encoder_quant import hidden_state_cosines, quantize_text_encoder

    rows = []
    for name, policy in methods():
        start = time.perf_counter()
        q = quantize_text_encoder(model, policy, calib, progress=False)
        seconds = time.perf_counter() - start
        c = hidden_state_cosines(model, q.module, calib)
        h = hidden_state_cosines(model, q.module, held) if held else np.array([np.nan])
        rows.append([f"{label}: {name}", f"{c.min():.4f}", f"{c.mean():.4f}", f"{h.min():.4f}", f"{h.mean():.4f}",
                     "yes" if c.min() >= 0.99 else "NO", f"{seconds:.1f}"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="model folder or shipped name (default: demo)")
    p.add_argument("--prompts", default=None, help="prompt set or text file (default: the model's)")
    p.add_argument("--calib-size", type=int, default=32, help="calibration prompts (default: 32)")
    p.add_argument("--held-out", type=int, default=64, help="further prompts measured, not calibrated on")
    p.add_argument("--outliers", action="store_true", help="also with injected 60-100x outlier channels")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()

    import torch

    from qwen_image2_ref.model_folder import load_model, resolve_model_path
    from qwen_image_edge.calib.encoder_quant import STRESS_OUTLIERS, add_outlier_channels
    from qwen_image_edge.calib.prompts import default_prompt_set, load_prompts

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    texts = load_prompts(args.prompts or default_prompt_set(path), args.calib_size + args.held_out)
    calib, held = texts[:args.calib_size], texts[args.calib_size:]
    model = load_model(args.model)
    rows = [["encoder / method", "calib cos min", "calib cos mean", "held-out min", "held-out mean", ">= 0.99",
             "s"]]
    rows += measure(model, calib, held, "as trained")
    if args.outliers:
        add_outlier_channels(model.encoder.model, *STRESS_OUTLIERS)
        rows += measure(model, calib, held, "+outliers")
    print(f"model {path}: text encoder hidden states vs fp32, cosine per prompt ({len(calib)} calibration "
          f"prompts, {len(held)} held out)\n" + table(rows))


if __name__ == "__main__":
    main()
