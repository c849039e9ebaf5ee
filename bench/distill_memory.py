"""Distillation memory: peak RSS per rank and a bytes-per-parameter projection to the 7.1B model.

    python bench/distill.py --memory [--layers 2] [--tmp DIR] [--skip-measure]

1. Measured: ``distill`` on a full-width (hidden 4096) transformer of ``--layers`` layers (random
   bf16 checkpoint, bench/export.py's writers) with a 4096-wide 1-layer text encoder, under gloo
   on the CPU (RSS is the proxy for device memory: the CPU placement trains in fp32, as a GPU
   would), 2 iterations, global batch 2. Per rank: VmHWM after the teacher is loaded and has
   sampled its pool, before the first checkpoint (training), and at the end (checkpoint written).
   Rows: DDP 1 process, FSDP 2 processes (fp32; bf16 + activation checkpointing), LoRA 16 / 64.
2. Projected: the bytes each rank holds per parameter, for the 7.1B transformer on 1, 2 and 8
   GPUs of 80 GB, and whether it fits (state <= 72 GB: 8 GB left for activations, the CUDA
   context and the allocator's slack). Activations are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPU_GB, HEADROOM_GB = 80.0, 8.0
# (row, processes, distill flags, the projection row that accounts for it)
ROWS = (("ddp, 1 process", 1, [], "ddp fp32 AdamW"),
        ("fsdp fp32, 2 processes", 2, ["--strategy", "fsdp"], "fsdp fp32"),
        ("fsdp bf16 + act. ckpt, 2 processes", 2, ["--strategy", "fsdp", "--mixed-precision", "bf16",
                                                    "--activation-checkpointing"], "fsdp bf16 mixed"),
        ("lora 16 (ddp), 1 process", 1, ["--lora", "16"], "lora 16 (fp32 base, as trained)"),
        ("lora 64 (ddp), 1 process", 1, ["--lora", "64"], "lora 64 (fp32 base, as trained)"))
RUN = ["--steps", "1", "--teacher-steps", "2", "--guidance", "1", "--pool", "2", "--batch", "2", "--iters", "2",
       "--lr", "1e-4", "--threads", "1", "--no-progress", "--device", "cpu", "--dtype", "fp32", "--stop-after", "2"]


def vm_hwm_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # KiB
    raise RuntimeError("VmHWM not in /proc/self/status")


# ----------------------------------------------------------------------------- the parameter counts

def param_counts(layers: int = 32, lora_ranks=(16, 64)) -> dict[str, int]:
    """Parameters of the full-width transformer with ``layers`` blocks (meta device, no memory):
    all, one block, and the trainable parameters of a LoRA of each rank on the default targets
    (``r * (in + out)`` per wrapped linear)."""
    import torch

    from qwen_image2_ref.config import TransformerConfig
    from qwen_image2_ref.transformer import QwenImageTransformer
    from qwen_image_edge.distill.lora_student import DEFAULT_TARGETS

    with torch.device("meta"):
        model = QwenImageTransformer(TransformerConfig(num_layers=layers))
    counts = {"all": sum(p.numel() for p in model.parameters()),
              "block": sum(p.numel() for p in model.transformer_blocks[0].parameters())}
    counts["root"] = counts["all"] - layers * counts["block"]  # embedders, modulation, output head
    wrapped = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and any(name == t or name.endswith("." + t) for t in DEFAULT_TARGETS)]
    for r in lora_ranks:
        counts[f"lora{r}"] = sum(r * (m.in_features + m.out_features) for m in wrapped)
    return counts


def projection(counts: dict[str, int], gpus: int) -> list[tuple[str, float, float, str]]:
    """(setting, load GB, training state GB, accounting) per rank on ``gpus`` GPUs.

    Load: what a rank holds while the teacher (bf16 on a GPU) samples the pool and becomes the
    student. Training: AdamW's fp32 weights, gradients and two moments (16 B/param) for what
    trains, plus the frozen or unsharded working set."""
    p, blk, root = counts["all"], counts["block"], counts["root"]
    gb = 1e-9
    rows = [("ddp fp32 AdamW", 4 * p * gb, 16 * p * gb, "16 B/param on every rank"),
            # fully_shard: 16 B/param / N, plus FSDP2's unsharded working set: two blocks' all-gathered
            # weights (running + prefetched), one block's gradient and its reduce-scatter input, and the
            # root's weights (the root is not resharded between forward and backward)
            ("fsdp fp32", (2 * p + 4 * blk) * gb, (16 * p / gpus + 16 * blk + 4 * root) * gb,
             f"16/{gpus} B/param + 16 B x block + 4 B x root"),
            # the same in bf16 (weights x2, gradient), the reduce-scatter input in fp32
            ("fsdp bf16 mixed", (2 * p + 4 * blk) * gb, (16 * p / gpus + 10 * blk + 2 * root) * gb,
             f"16/{gpus} B/param + 10 B x block + 2 B x root")]
    for key in sorted(k for k in counts if k.startswith("lora")):
        r, t = key[4:], counts[key]
        rows.append((f"lora {r} (fp32 base, as trained)", 4 * p * gb, (4 * p + 16 * t) * gb,
                     f"4 B/param frozen + 16 B x {t / 1e6:.0f} M"))
        rows.append((f"lora {r} (bf16 base, not implemented)", 2 * p * gb, (2 * p + 16 * t) * gb,
                     f"2 B/param frozen + 16 B x {t / 1e6:.0f} M"))
    return rows


def projection_table(counts: dict[str, int]) -> str:
    lines = [f"Projected per rank, 7.1B transformer ({counts['all'] / 1e9:.3f} B params), GPUs of {GPU_GB:.0f} GB; "
             f"fits: max(load, training) <= {GPU_GB - HEADROOM_GB:.0f} GB; activations not counted",
             f"{'setting':<38} {'load GB':>8} {'1 GPU':>12} {'2 GPUs':>12} {'8 GPUs':>12}  accounting (N GPUs)"]
    for i, (name, load, _, _) in enumerate(projection(counts, 1)):
        cells = []
        for n in (1, 2, 8):
            _, _, state, _ = projection(counts, n)[i]
            fits = "fits" if max(load, state) <= GPU_GB - HEADROOM_GB else "no"
            cells.append(f"{state:6.1f} {fits:>4}")
        how = projection(counts, 8)[i][3].replace("16/8 ", "16/N ")
        lines.append(f"{name:<38} {load:>8.1f} {cells[0]:>12} {cells[1]:>12} {cells[2]:>12}  {how}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- measured rows

def _child(argv: list[str]) -> None:
    """One rank of a measured run: VmHWM at the phases, one JSON line."""
    import torch

    from qwen_image_edge.distill import trainer
    from qwen_image_edge.distill.cli import main as distill_main

    marks: dict = {}
    real_open, real_save = trainer.open_student, trainer.save_any

    def open_student(pipe, *a, **k):
        marks["teacher_pool_gib"] = vm_hwm_gib()
        student, opt, start, losses = real_open(pipe, *a, **k)
        marks["trainable"] = sum(p.numel() for p in student.parameters() if p.requires_grad)
        return student, opt, start, losses

    def save_any(*a, **k):
        marks.setdefault("train_gib", vm_hwm_gib())
        return real_save(*a, **k)

    trainer.open_student, trainer.save_any = open_student, save_any
    torch.set_num_threads(1)
    code = distill_main(argv)
    print(json.dumps({"rank": int(os.environ.get("RANK", "0")), "code": code, **marks, "peak_gib": vm_hwm_gib()}),
          flush=True)


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def measure(model: Path, work: Path, counts: dict[str, int], only: str | None = None, port: int = 29541) -> list[str]:
    params = counts["all"]
    lines = [f"Measured, {params / 1e6:.0f} M params (full width), gloo on CPU, fp32 teacher, batch 2, VmHWM per "
             "rank (max over ranks), GiB; 'accounting': the projection's training state for this model",
             f"{'setting':<36} {'accounting':>10} {'teacher+pool':>13} {'training':>9} {'+checkpoint':>12} "
             f"{'trainable':>10}"]
    for name, world, flags, accounted in ROWS:
        if only and only not in name:
            continue
        state = next(r[2] for r in projection(counts, world) if r[0] == accounted) * 1e9 / 2**30
        # measured peaks (imports, pool and activations included) came within 0.1 GiB of the accounting
        # for fsdp and 1.4 GiB above it for ddp: skip a run that would not fit the memory free now
        need = state * world + 1.5
        if need > _available_gib():
            lines.append(f"{name:<36} skipped: needs ~{need:.1f} GiB, {_available_gib():.1f} available")
            continue
        out = work / "run"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", str(world), "--master-port",
               str(port), str(Path(__file__).resolve()), "--child", "--teacher", str(model), "--out", str(out), *RUN,
               *flags]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
        ranks = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode or len(ranks) != world or any(r["code"] for r in ranks):
            lines.append(f"{name:<36} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:120]}")
            continue
        top = {k: max(r[k] for r in ranks) for k in ("teacher_pool_gib", "train_gib", "peak_gib")}
        lines.append(f"{name:<36} {state:>10.2f} {top['teacher_pool_gib']:>13.2f} {top['train_gib']:>9.2f} "
                     f"{top['peak_gib']:>12.2f} {ranks[0]['trainable'] / 1e6:>9.1f}M")
        print(lines[-1], file=sys.stderr, flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--layers", type=int, default=2, help="transformer depth of the measured checkpoint")
    p.add_argument("--tmp", default=None, help="scratch folder (the checkpoint: ~1.2 GB per layer pair)")
    p.add_argument("--skip-measure", action="store_true", help="print the projection only")
    p.add_argument("--only", default=None, metavar="TEXT", help="measure only the rows whose name contains TEXT")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    if args.child:
        return _child(rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if not args.skip_measure:
        from bench.export import ENCODER_4096, write_encoder, write_transformer
        from tests.tiny_model import build_tiny_model

        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            _, model = build_tiny_model(Path(tmp) / "model")
            write_encoder(model, **ENCODER_4096)
            write_transformer(model, args.layers)
            print("\n".join(measure(model, Path(tmp), param_counts(args.layers), args.only)), flush=True)
        print()
    print(projection_table(param_counts(32)))


if __name__ == "__main__":
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path[0] = str(REPO)  # run as a script: bench/runtime.py would shadow the runtime package
    main()
