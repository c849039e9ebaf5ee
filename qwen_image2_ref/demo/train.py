"""Train the embedded demo model: ``python -m qwen_image2_ref.demo.train [--out DIR] [--resume] ...``.

Stages, each saved under ``--out`` so a later stage can run in another process (``--stages``):

1. ``vae``: the f16c64 RGBA VAE on rendered scenes (``train_vae``).
2. ``encoder``: the byte-level BPE tokenizer on the caption language (``--style``), and the small
   Qwen3-VL: pre-trained as a causal LM on captions for ``--encoder-steps`` (``train_encoder`` says
   why), or left at its random init with 0 (how the shipped v1 model was made), then frozen. With
   ``--encoder-edit-loss`` its last token also learns to name what an edit instruction asks of its
   source image (vision tower included); ``--encoder-init`` starts it from another run's encoder.
3. ``data``: renders text-to-image scenes and edit triples, encodes them once with the VAE (mode)
   and the encoder, and measures the latent statistics (``latents_mean/std``), which must be known
   before the MMDiT trains because it sees normalised latents.
4. ``dit``: the MMDiT with the flow-matching objective (``train_dit``).
5. ``save``: the checkpoint folder (``save_model``), the layout of the public Qwen-Image-2.1 one;
   during a ``dit`` run it saves the EMA of the last checkpoint.

Budgets are step counts, never minutes: a time budget would make the learning-rate schedule
depend on the machine's speed, and a resumed run could not continue bit for bit. The training
stages (vae, encoder, dit) checkpoint every ``--checkpoint-minutes`` into ``OUT/ckpt_<stage>.safetensors``
(atomically) and on SIGTERM; ``--resume`` continues each from its checkpoint, skipping finished
stages, exactly as if it had never stopped (same options and thread count).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import signal
import time
from pathlib import Path

import torch

from qwen_image2_ref.config import DEMO, ModelConfig
from qwen_image2_ref.demo import resume, train_dit
from qwen_image2_ref.demo.captions import CaptionStyle
from qwen_image2_ref.demo.parts import build_encoder
from qwen_image2_ref.demo.stage_io import load_stage, save_module
from qwen_image2_ref.demo.train_encoder import EncoderSettings, train_encoder
from qwen_image2_ref.demo.train_vae import VAESettings, evaluate_vae, train_vae
from qwen_image_edge.runtime.errors import ConfigError

log = logging.getLogger(__name__)


STAGES = ("vae", "encoder", "data", "dit", "save")
DEFAULT_OUT = Path("/tmp/demo_train")


def stage_vae(out: Path, config: ModelConfig, args, progress: bool) -> dict:
    settings = VAESettings(steps=args.vae_steps,
                           **({"pool_128": 64, "pool_other": 8, "batch": 4} if args.small_data else {}))
    vae, losses, stats = train_vae(config.vae, settings, args.seed, progress, out / train_dit.CHECKPOINTS["vae"],
                                   args.resume, args.checkpoint_minutes * 60)
    stats["eval"] = evaluate_vae(vae) if not args.small_data else {}
    save_module(out / "vae", vae, config.vae, losses=losses, stats=stats)
    log.info("vae stage: %s", stats)
    return {"losses": losses, **stats}


def stage_encoder(out: Path, config: ModelConfig, args, progress: bool) -> dict:
    encoder = build_encoder(out, config, args.seed, CaptionStyle(args.style))
    extra = {}
    if args.encoder_init is not None:
        extra["init_from"] = init_encoder_from(encoder, out, args.encoder_init)
    losses, stats = [], {"steps": 0}
    if args.encoder_steps:
        settings = EncoderSettings(steps=args.encoder_steps, style=args.style, token_loss=args.encoder_token_loss,
                                   edit_loss=args.encoder_edit_loss,
                                   **({"lr": args.encoder_lr} if args.encoder_lr is not None else {}),
                                   **({"batch": 4, "edit_batch": 2} if args.small_data else {}))
        losses, stats = train_encoder(encoder, settings, args.seed, progress,
                                      out / train_dit.CHECKPOINTS["encoder"], args.resume,
                                      args.checkpoint_minutes * 60, extra)
    save_module(out / "encoder", encoder.model, losses=losses, stats=stats)
    return {"losses": losses, **stats}


def init_encoder_from(encoder, out: Path, parent: Path) -> dict:
    """Load another run's encoder stage (PARENT/encoder.safetensors) into ``encoder``: the stage then
    continues from those weights, with a fresh optimizer and this run's options. The tokenizers must
    be the same file (same seed and caption style). Returns what the checkpoint records."""
    stage = parent / "encoder.safetensors"  # main() refused a PARENT without one before any stage ran
    mine, theirs = out / "tokenizer" / "tokenizer.json", parent / "tokenizer" / "tokenizer.json"
    if not theirs.is_file() or theirs.read_bytes() != mine.read_bytes():
        raise ConfigError(f"--encoder-init {parent}: its tokenizer differs from this run's (use the same --seed "
                          "and --style)")
    encoder.model.load_state_dict(load_stage(parent / "encoder")[0])
    return {"path": str(parent), "sha256": hashlib.sha256(stage.read_bytes()).hexdigest()}


def stage_done(out: Path, stage: str) -> bool:
    """Whether a resumed run can skip ``stage``: its output exists and its checkpoint (if it has
    one) is marked done. The vae and encoder stages write their output only when they end, so
    without a checkpoint (a kept run state: ``qwen_image2_ref/demo/train_state/`` holds the stage
    outputs and the dit checkpoint, not the vae and encoder ones) the output alone says done; the
    dit stage writes its file at every checkpoint, so it needs its checkpoint's word."""
    outputs = {"vae": "vae", "encoder": "encoder", "data": "data", "dit": "dit"}
    if stage not in outputs or not all((out / f"{outputs[stage]}.{ext}").is_file() for ext in ("safetensors", "json")):
        return False
    ckpt = train_dit.CHECKPOINTS.get(stage)
    if ckpt is None:
        return True
    if not (out / ckpt).is_file():
        return stage in ("vae", "encoder")  # also a random-init encoder (--encoder-steps 0)
    return bool(resume.read_checkpoint(out / ckpt)[1]["done"])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m qwen_image2_ref.demo.train", description=__doc__.split("\n")[0],
                                epilog="Resume an interrupted run with the same command plus --resume.")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="work folder (stage outputs and checkpoints)")
    p.add_argument("--weights", type=Path, default=None, help="checkpoint folder to write (default OUT/weights)")
    p.add_argument("--resume", action="store_true",
                   help="continue the stages' checkpoints in OUT and skip finished stages (same options)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu",
                   help="where the data stage encodes and the dit stage trains: cpu, cuda or cuda:N (default: "
                        "%(default)s; a dit checkpoint resumes on any device; the vae and encoder stages run on the CPU)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    p.add_argument("--style", default=CaptionStyle.V2.value, choices=[s.value for s in CaptionStyle],
                   help="caption language (v1: the shipped model's, always naming the background)")
    p.add_argument("--vae-steps", type=int, default=900)
    p.add_argument("--encoder-steps", type=int, default=3000, help="causal-LM pre-training steps (0: random init)")
    p.add_argument("--encoder-token-loss", type=float, default=0.0,
                   help="weight of a current-token term in the encoder's pre-training, which keeps each word's "
                   "own identity in its last hidden state (next-token loss alone drops the colour, shape and "
                   "position words; see train_encoder); default 0")
    p.add_argument("--encoder-edit-loss", type=float, default=0.0,
                   help="weight of an edit readout from the encoder's last token: an instruction read with its "
                   "source image must tell the edit's kind, the position it acts on and the new colour; trains "
                   "the vision tower too (see train_encoder); default 0")
    p.add_argument("--encoder-lr", type=float, default=None, help="encoder stage peak learning rate (default 3e-3)")
    p.add_argument("--encoder-init", type=Path, default=None, metavar="DIR",
                   help="encoder stage: start from the encoder stage of another work folder DIR (same --seed "
                   "and --style) instead of a random init; its --encoder-steps then train on top")
    p.add_argument("--dit-steps", type=int, default=20000)
    p.add_argument("--edit-weight", action="append", default=[], metavar="KIND[/N]=W",
                   help="dit stage: draw the edits of this kind (and source object count N) W times as often "
                   "within the edit group, e.g. recolor/2=4; repeatable (default: all 1)")
    p.add_argument("--edit-kept-weight", type=float, default=1.0, metavar="W",
                   help="dit stage: weigh the flow loss of an edit W times as much on the tokens of the objects "
                   "it keeps as they were (in a two-object recolour or removal, the object the instruction does "
                   "not name) as on the others (default: %(default)s, a plain mean)")
    p.add_argument("--branch-from", type=Path, default=None, metavar="CKPT",
                   help="dit stage: start from another run's dit checkpoint (its weights, optimizer, random "
                   "streams and step) with this run's options, instead of step 0; for changing the data "
                   "sampling mid-run. Ignored once OUT has a dit checkpoint of its own")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0, help="checkpoint interval of training stages")
    p.add_argument("--small-data", action="store_true", help="tiny data pools (smoke tests)")
    p.add_argument("--guidance", type=float, default=1.0, help="default guidance saved in the checkpoint")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


TRAINING_STAGES = {"vae", "encoder", "data", "dit"}


def _lock(out: Path, stages: list[str]):
    """An exclusive lock on OUT/train.lock while training stages run (two trainers on one folder would
    overwrite each other's checkpoints); ``--stages save`` alone only reads, and takes none."""
    if not TRAINING_STAGES & set(stages):
        return None
    handle = open(out / "train.lock", "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SystemExit(f"{out}: another trainer is running there (it holds {out / 'train.lock'}); "
                         "stop it first or use another --out") from None
    return handle


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
    if args.device != "cpu":
        _check_device(args.device)
    try:  # parsed once, here, so a bad weight stops the run before any stage
        args.edit_weights = train_dit.parse_edit_weights(args.edit_weight)
        train_dit.check_kept_weight(args.edit_kept_weight)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    if args.encoder_init is not None and not (args.encoder_init / "encoder.safetensors").is_file():
        raise SystemExit(f"--encoder-init {args.encoder_init}: no encoder stage there (expected "
                         f"{args.encoder_init / 'encoder.safetensors'})")
    if args.branch_from is not None and not args.branch_from.is_file():
        raise SystemExit(f"--branch-from {args.branch_from}: no such checkpoint file")
    lock = _lock(out, stages)
    try:
        return _run(args, stages)
    finally:
        if lock is not None:
            lock.close()


def _check_device(name: str) -> None:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device: expected cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: this machine has no CUDA device; use --device cpu")
    if device.type == "cuda":
        # fp32 as on the CPU: no TF32 in the VAE's convolutions (cuDNN's default) or in matmuls
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def _run(args, stages: list[str]) -> dict:
    out, config = args.out, DEMO
    resume.STOP.clear()
    progress = not args.no_progress
    report: dict = {}
    timings: dict[str, float] = {}
    for stage in stages:
        if resume.STOP.is_set():  # SIGTERM during a stage without steps (data, save)
            raise resume.Interrupted(f"stopped before stage {stage}")
        if args.resume and stage_done(out, stage):
            log.info("stage %s: already done in %s, skipped", stage, out)
            continue
        t0 = time.time()
        if stage == "vae":
            report["vae"] = stage_vae(out, config, args, progress)
        elif stage == "encoder":
            report["encoder"] = stage_encoder(out, config, args, progress)
        else:
            report[stage] = train_dit.run_stage(stage, out, config, args, progress)
        timings[stage] = round(time.time() - t0, 1)
        log.info("stage %s done in %.1f s", stage, timings[stage])
    report["timings_s"] = timings
    (out / f"report_{'_'.join(stages)}.json").write_text(json.dumps(
        {k: ({kk: vv for kk, vv in v.items() if kk != "losses"} if isinstance(v, dict) else v)
         for k, v in report.items()}, indent=2))
    return report


def _on_sigterm(signum, frame) -> None:
    """In a training loop: checkpoint after this step, then stop. Elsewhere (rendering and encoding
    the data, saving): stop now; those stages write atomically, so nothing half-written is kept,
    and a resumed run redoes the stage."""
    resume.STOP.set()
    if not resume.IN_STEPS.is_set():
        raise resume.Interrupted("stopped by SIGTERM outside a training loop (the stage will run again)")


def cli(argv=None) -> None:
    """``main`` with SIGTERM turned into a prompt stop that loses at most the current step (exit 3)."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        main(argv)
    except resume.Interrupted as exc:
        logging.getLogger(__name__).warning("%s; continue with the same command plus --resume", exc)
        raise SystemExit(3) from None
    except ConfigError as exc:  # a resume or --encoder-init that does not fit: one line, no traceback
        raise SystemExit(f"error: {exc}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    cli()
