"""Arguments of ``qwen-image-edge distill`` / ``torchrun -m qwen_image_edge.distill`` (torch is imported only to run)."""

from __future__ import annotations

import argparse

from qwen_image_edge.cli_args import add_lora_argument, add_placement_arguments, parse_lora_args

DESCRIPTION = """\
Distil a many-step teacher into a few-step student with guidance built in: the teacher samples a
pool of prompts (its full schedule, with guidance) and the student learns to jump between the
teacher's latents at its own fixed sigmas, one transformer call per step. Writes OUT/student, a
checkpoint folder whose model_index.json carries the schedule, so `export` + `run` use it by default.
Resumable: rerun the same command after an interruption. Several processes: torchrun
--nproc-per-node N -m qwen_image_edge.distill ... (gloo on CPU, nccl on GPUs; --batch must be a multiple of N).
--strategy fsdp shards the student (FSDP2: weights, gradients and AdamW state split over the processes;
--mixed-precision bf16 computes in bf16 over fp32 master weights); its checkpoints (torch.distributed.checkpoint)
resume on any number of processes."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher checkpoint folder, or 'demo'")
    add_lora_argument(p, "the teacher", flag="--teacher-lora")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="train a LoRA student of this rank (peft; the 'lora' extra) instead of every weight: the "
                        "student folder keeps the teacher's weights plus student_lora.safetensors (diffusers keys)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank, scale 1)")
    p.add_argument("--lora-targets", nargs="+", default=None, metavar="MODULE",
                   help="module names the adapters wrap (default: to_q to_k to_v to_out.0 img_mlp.proj "
                        "img_mlp.gate_layer img_mlp.out)")
    p.add_argument("--out", required=True, help="work folder: pool, checkpoint, student/")
    p.add_argument("--steps", default="4",
                   help="student step count, or a comma list trained together (the first is the default "
                        "schedule; each must divide --teacher-steps) (default: %(default)s)")
    p.add_argument("--iters", type=int, default=1000, help="training iterations (default: %(default)s)")
    p.add_argument("--batch", type=int, default=16, help="global batch over all processes (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-steps", type=int, default=40, help="teacher sampling steps (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=None,
                   help="teacher guidance (default: the teacher's own, or 4 when that is 1)")
    p.add_argument("--pool", type=int, default=512, help="teacher trajectories (prompts x noise) (default: %(default)s)")
    p.add_argument("--edits", type=int, default=0, help="edit trajectories too (a demo-trained teacher only) (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    add_placement_arguments(p, "the teacher's pool sampling (the student trains in fp32 on that device)")
    p.add_argument("--strategy", default="ddp",
                   help="ddp: a full fp32 replica per process; fsdp: FSDP2 shards (for models that do not fit one "
                        "device) (default: %(default)s)")
    p.add_argument("--mixed-precision", default="fp32", metavar="fp32|bf16",
                   help="with --strategy fsdp: bf16 compute over fp32 master weights and fp32 gradient reductions "
                        "(default: %(default)s)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each transformer block in the backward instead of keeping its activations")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N iterations of this call, checkpointed, without writing the student "
                        "(time-boxed jobs: rerun to continue)")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import torch

    from qwen_image_edge.distill.trainer import DistillSettings, distill
    from qwen_image_edge.runtime.errors import ConfigError

    try:
        steps = tuple(int(s) for s in str(args.steps).split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--steps: expected integers like 4 or 4,8, got {args.steps!r}") from None
    loras = parse_lora_args(args.teacher_lora)
    from qwen_image2_ref.devices import resolve_placement

    resolve_placement(args.device, args.dtype, stage="distill")  # before the out folder is made
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = DistillSettings(steps=steps, iters=args.iters, batch=args.batch, lr=args.lr, seed=args.seed,
                               teacher_steps=args.teacher_steps, guidance=args.guidance, pool_size=args.pool,
                               edit_size=args.edits, lora_rank=args.lora, lora_alpha=args.lora_alpha,
                               strategy=args.strategy, mixed_precision=args.mixed_precision,
                               activation_checkpointing=args.activation_checkpointing,
                               **({"lora_targets": tuple(args.lora_targets)} if args.lora_targets else {}))
    if args.stop_after is not None and args.stop_after < 1:
        raise ConfigError(f"--stop-after: expected >= 1, got {args.stop_after}")
    folder = distill(args.teacher, args.out, settings, progress=not args.no_progress, restart=args.restart,
                     device=args.device, dtype=args.dtype, loras=loras, stop_after=args.stop_after)
    if folder is not None:
        print(f"student ({steps[0]} steps, guidance distilled) written to {folder}")
    return 0


def main(argv=None) -> int:
    import logging
    import sys

    from qwen_image_edge.runtime.errors import QwenImageEdgeError

    p = argparse.ArgumentParser(prog="python -m qwen_image_edge.distill", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        return run(args)
    except QwenImageEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
