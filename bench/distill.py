"""Step distillation: the few-step student against its 40-step teacher; prints two tables.

    python bench/distill.py [--teacher demo] [--student demo-4step] [--n 64] [--guidance G]
                            [--timing-n 8] [--threads 2]
    python bench/distill.py --memory [--layers 2] [--skip-measure]   (bench/distill_memory.py: peak memory
        per rank for DDP / FSDP / LoRA students at full width, and the bytes-per-parameter projection
        to the 7.1B model on 1, 2 and 8 GPUs of 80 GB)

1. Quality, reference pipelines (torch, fp32), held-out prompts (``data.heldout_prompts``, the set
   of bench/demo_quality.py), the same initial noise for every row: the judge's adherence per
   attribute and the RMS distance of the final latents to the teacher's 40-step guided output.
   Rows: teacher 40 steps + guidance, teacher 4 steps + guidance (naive), student 4, student 8
   (its 8-step grid: ``default_sigmas(8)`` through the scheduler, as trained with --steps 4,8).
2. Speed, one image at a time, same machine, same run: transformer calls per image and wall time
   per image for the reference teacher (40 steps + guidance), the runtime on the teacher's export
   (same) and the runtime on the student's export (its default schedule); ratios to the first.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # run as a script: bench/runtime.py would shadow the runtime package

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qwen_image2_ref.demo import NEGATIVE_PROMPT, data, judge  # noqa: E402
from qwen_image2_ref.model_folder import load_pipeline  # noqa: E402

KEYS = ("color", "shape", "position", "background")


def with_steps(pipe, steps: int):
    """The same pipeline sampling on ``default_sigmas(steps)`` (a student's other trained grid)."""
    from qwen_image_edge.runtime import schedule

    pcfg = dataclasses.replace(pipe.config.pipeline, num_steps=steps,
                               sample_sigmas=tuple(float(s) for s in schedule.default_sigmas(steps)))
    other = dataclasses.replace(pipe.config, pipeline=pcfg)
    from qwen_image2_ref.pipeline import QwenImagePipeline

    return QwenImagePipeline(other, pipe.transformer, pipe.vae, pipe.encoder)


def count_calls(pipe, run) -> int:
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        run()
    finally:
        handle.remove()
    return len(calls)


def noise_for(pipe, n: int) -> np.ndarray:
    from qwen_image_edge.runtime.sampling import initial_noise

    res = pipe.config.pipeline.output_resolution
    return np.concatenate([initial_noise(i, 1, res, res, pipe.transformer.config.in_channels) for i in range(n)])


def quality(pipe, prompts, noise, steps: int | None, guidance: float, batch: int = 16) -> tuple[list[dict], np.ndarray]:
    """Judge scores and final packed latents for every prompt (batches of ``batch``)."""
    scores, latents = [], []
    neg = NEGATIVE_PROMPT if guidance > 1 else None
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        lat = pipe.generate([c for _, c in chunk], negative_prompt=neg, steps=steps, guidance=guidance,
                            latents=noise[start:start + len(chunk)], progress=False, output="latent")
        with torch.no_grad():
            pixels = pipe.decode_pixels(torch.from_numpy(lat), *pipe_size(pipe))
        from qwen_image_edge.runtime.sampling import to_images

        for (scene, _), im in zip(chunk, to_images(pixels)):
            scores.append(judge.score(judge.judge(np.asarray(im)), scene))
        latents.append(lat)
    return scores, np.concatenate(latents)


def pipe_size(pipe) -> tuple[int, int]:
    r = pipe.config.pipeline.output_resolution
    return r, r


def rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.rjust(w) if j else v.ljust(w) for j, (v, w) in enumerate(zip(r, widths)))
                     for r in rows)


def timed(fn, n: int) -> float:
    fn(0)  # warm-up (session creation, caches)
    start = time.perf_counter()
    for i in range(n):
        fn(i + 1)
    return (time.perf_counter() - start) / n


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if "--memory" in argv:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ as a package, tests/ for the model
        from bench.distill_memory import main as memory

        return memory([a for a in argv if a != "--memory"])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--memory", action="store_true",
                   help="the memory table instead (bench/distill_memory.py; see its --help)")
    p.add_argument("--teacher", default="demo")
    p.add_argument("--student", default="demo-4step", help="student folder (default: the shipped demo student)")
    p.add_argument("--n", type=int, default=64, help="held-out prompts for the quality table")
    p.add_argument("--guidance", type=float, default=None,
                   help="teacher guidance (default: the student's distillation guidance from its model_index)")
    p.add_argument("--timing-n", type=int, default=8, help="images per timing row")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-speed", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    teacher, student = load_pipeline(args.teacher), load_pipeline(args.student)
    guidance = args.guidance if args.guidance is not None else distill_guidance(args.student)
    prompts = data.heldout_prompts(args.n, 1000)
    noise = noise_for(teacher, args.n)
    rows_spec = [("teacher 40 + guidance", teacher, 40, guidance), ("teacher 4 + guidance", teacher, 4, guidance),
                 ("student 4", student, None, 1.0), ("student 8", with_steps(student, 8), None, 1.0)]
    results = {}
    ref_latents = None
    rows = [["sampler", "calls/image", *KEYS, "RMS to teacher-40"]]
    for name, pipe, steps, g in rows_spec:
        scores, lat = quality(pipe, prompts, noise, steps, g)
        if ref_latents is None:
            ref_latents = lat
        calls = count_calls(pipe, lambda p=pipe, s=steps, g=g: p.generate(
            "a red circle", negative_prompt=NEGATIVE_PROMPT if g > 1 else None, steps=s, guidance=g, seed=0,
            progress=False, output="latent"))
        acc = {k: float(np.mean([s[k] for s in scores])) for k in KEYS}
        results[name] = {"calls": calls, **acc, "rms": rms(lat, ref_latents)}
        rows.append([name, str(calls), *(f"{acc[k]:.1%}" for k in KEYS), f"{results[name]['rms']:.3f}"])
        print(f"  {name}: done", file=sys.stderr, flush=True)
    print(f"Quality: {args.n} held-out prompts, reference fp32, teacher guidance {guidance}, {args.threads} thread(s)")
    print(table(rows))
    if not args.skip_speed:
        results["speed"] = speed(args, teacher, guidance)
    return results


def distill_guidance(student: str) -> float:
    import json

    from qwen_image2_ref.model_folder import resolve_model_path

    index = json.loads((resolve_model_path(student) / "model_index.json").read_text())
    return float(index.get("qwen_image_edge", {}).get("distilled_from", {}).get("guidance", 4.0))


def speed(args, teacher, guidance: float) -> dict:
    from qwen_image_edge.export.demo import ensure_export
    from qwen_image_edge.runtime.pipeline import Pipeline

    prompts = [c for _, c in data.heldout_prompts(args.timing_n + 1, 5000)]
    t_exp, s_exp = ensure_export(args.teacher), ensure_export(args.student)
    rt_teacher = Pipeline.load(t_exp, threads=args.threads)
    rt_student = Pipeline.load(s_exp, threads=args.threads)
    ref = timed(lambda i: teacher.generate(prompts[i], negative_prompt=NEGATIVE_PROMPT, steps=40, guidance=guidance,
                                           seed=i, progress=False), args.timing_n)
    rt_t = timed(lambda i: rt_teacher.generate(prompts[i], negative_prompt=NEGATIVE_PROMPT, steps=40,
                                               guidance=guidance, seed=i), args.timing_n)
    rt_s = timed(lambda i: rt_student.generate(prompts[i], seed=i), args.timing_n)
    steps = rt_student.manifest.schedule.default_steps
    rows = [["path", "transformer calls/image", "s/image", "speed-up vs reference teacher"],
            ["reference teacher, 40 steps + guidance (torch)", "80", f"{ref:.3f}", "1.0x"],
            ["runtime teacher, 40 steps + guidance (onnxruntime)", "80", f"{rt_t:.3f}", f"{ref / rt_t:.1f}x"],
            [f"runtime student, {steps} steps (onnxruntime)", str(steps), f"{rt_s:.3f}", f"{ref / rt_s:.1f}x"]]
    print(f"\nSpeed: {args.timing_n} images each, batch 1, {args.threads} thread(s), CPU, one run")
    print(table(rows))
    return {"reference_teacher_s": ref, "runtime_teacher_s": rt_t, "runtime_student_s": rt_s,
            "speedup": ref / rt_s}


if __name__ == "__main__":
    main()
