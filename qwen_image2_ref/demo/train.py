"""Train the embedded demo model: ``python -m qwen_image2_ref.demo.train [--out DIR] [--seed N] ...``.

Stages, each saved under ``--out`` so a later stage can run in another process (``--stages``):

1. ``vae``: the f16c64 RGBA VAE on rendered scenes (``train_vae``).
2. ``encoder``: the byte-level BPE tokenizer and a random-init small Qwen3-VL, frozen. Why frozen:
   the MMDiT trains on encoder states computed once up front, so each of its steps costs only its
   own forward/backward. Training the encoder would need an encoder forward and backward on every
   step (about halving the MMDiT's steps in the same 90 minutes) for little gain: a random LLM
   already maps every word to a distinct, context-mixed state, and ``txt_in`` plus the MMDiT's
   attention learn to read them (an earlier experiment got colors and positions 100% this way).
3. ``data``: renders text-to-image scenes and edit triples, encodes them once with the VAE (mode)
   and the encoder, and measures the latent statistics (``latents_mean/std``), which must be known
   before the MMDiT trains because it sees normalised latents.
4. ``dit``: the MMDiT with the flow-matching objective (``train_dit``).
5. ``save``: the checkpoint folder (``save_model``), the layout of the public Qwen-Image-2.1 one.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from qwen_image2_ref.config import DEMO, ModelConfig
from qwen_image2_ref.demo import train_dit
from qwen_image2_ref.demo.parts import build_encoder
from qwen_image2_ref.demo.stage_io import save_module
from qwen_image2_ref.demo.train_vae import VAESettings, evaluate_vae, train_vae

log = logging.getLogger(__name__)


STAGES = ("vae", "encoder", "data", "dit", "save")
DEFAULT_OUT = Path("/tmp/demo_train")


def stage_vae(out: Path, config: ModelConfig, seed: int, settings: VAESettings, fixed: bool, progress: bool) -> dict:
    vae, losses, stats = train_vae(config.vae, settings, seed, progress=progress, fixed_steps=fixed)
    stats["eval"] = evaluate_vae(vae) if not fixed else {}
    save_module(out / "vae", vae, config.vae, losses=losses, stats=stats)
    log.info("vae stage: %s", stats)
    return {"losses": losses, **stats}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m qwen_image2_ref.demo.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="work folder (stage outputs)")
    p.add_argument("--weights", type=Path, default=None, help="checkpoint folder to write (default OUT/weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    p.add_argument("--vae-minutes", type=float, default=9.0)
    p.add_argument("--vae-steps", type=int, default=900)
    p.add_argument("--dit-minutes", type=float, default=60.0)
    p.add_argument("--dit-steps", type=int, default=20000)
    p.add_argument("--fixed-steps", action="store_true",
                   help="run exactly the given step counts (no time budget): reproducible loss curves")
    p.add_argument("--small-data", action="store_true", help="tiny data pools (smoke tests)")
    p.add_argument("--guidance", type=float, default=1.0, help="default guidance saved in the checkpoint")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise SystemExit(f"--stages: unknown {sorted(unknown)}, expected a subset of {STAGES}")
    config = DEMO
    progress = not args.no_progress
    report: dict = {}
    timings: dict[str, float] = {}
    small = args.small_data
    for stage in stages:
        t0 = time.time()
        if stage == "vae":
            settings = VAESettings(steps=args.vae_steps, minutes=None if args.fixed_steps else args.vae_minutes,
                                   **({"pool_128": 64, "pool_other": 8, "batch": 4} if small else {}))
            report["vae"] = stage_vae(out, config, args.seed, settings, args.fixed_steps, progress)
        elif stage == "encoder":
            encoder = build_encoder(out, config, args.seed)
            save_module(out / "encoder", encoder.model)
        else:
            report[stage] = train_dit.run_stage(stage, out, config, args, progress)
        timings[stage] = round(time.time() - t0, 1)
        log.info("stage %s done in %.1f s", stage, timings[stage])
    report["timings_s"] = timings
    (out / f"report_{'_'.join(stages)}.json").write_text(json.dumps(
        {k: ({kk: vv for kk, vv in v.items() if kk != "losses"} if isinstance(v, dict) else v)
         for k, v in report.items()}, indent=2))
    return report


if __name__ == "__main__":
    main()
