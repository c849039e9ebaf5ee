"""Step distillation on the tiny model: one process vs two (gloo), resume, the student's schedule."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qwen_image_edge.distill.trainer import DistillSettings, distill, segment_table
from qwen_image_edge.runtime.errors import ConfigError

# Tiny run: 4 teacher steps, students at 2 and 4 steps, 4 pool samples, global batch 4.
SETTINGS = DistillSettings(steps=(2, 4), iters=3, batch=4, lr=1e-3, teacher_steps=4, guidance=2.0,
                           pool_size=4, pool_batch=4)
ARGS = ["--steps", "2,4", "--iters", "3", "--batch", "4", "--lr", "1e-3", "--teacher-steps", "4",
        "--guidance", "2.0", "--pool", "4", "--no-progress"]
# Long enough to learn: a 4-step student of a 32-step teacher with guidance 2 (a few seconds on CPU).
# 4 steps, not 2: the tiny model's 2-step grid is [1, 0.02, 0] (shift_terminal), one real segment.
QUALITY = DistillSettings(steps=(4,), iters=30, batch=8, lr=1e-3, warmup=2, teacher_steps=32, guidance=2.0,
                          pool_size=8, pool_batch=8)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((folder / "transformer").glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("distill-1p")
    return out, distill(str(tiny_model_dir), out, SETTINGS, progress=False)


def test_student_moves_and_carries_its_schedule(single, tiny_model_dir):
    out, student = single
    index = json.loads((student / "model_index.json").read_text())
    assert index["sample_sigmas"] == pytest.approx([1.0, 0.5])
    assert index["qwen_image_edge"]["guidance_distilled"] is True
    assert index["qwen_image_edge"]["num_steps"] == 2 and index["qwen_image_edge"]["guidance_scale"] == 1.0
    teacher, trained = _weights(tiny_model_dir), _weights(student)
    moved = max(float((teacher[k].float() - trained[k].float()).abs().max()) for k in teacher)
    assert moved > 1e-4, "three iterations at lr 1e-3 must change the weights"
    losses = json.loads((out / "losses.json").read_text())["losses"]
    assert len(losses) == 3 and all(np.isfinite(losses))


def test_student_lands_nearer_the_many_step_teacher_than_the_few_step_teacher(tiny_model_dir, tmp_path):
    """The point of distillation: on the pool's prompts and noise, the 4-step student (guidance 1)
    ends nearer the teacher's 64-step guided output than the teacher itself does in 4 guided steps.

    RMS distance ratio student / naive teacher, measured with pool seeds 0, 1, 2: 0.30, 0.29, 0.28.
    With the target mis-scaled (seed 0): x0.8 0.55, x1.25 0.67, x0.5 1.29, x2 1.92, sign flipped
    2.65, divided by -s0 instead of s1 - s0 1.07. The bar 0.45 is 1.5x the measured ratio and below
    every mutant; float summation order moves the ratio by far less (fp32, 30 Adam steps)."""
    from qwen_image2_ref.model_folder import load_pipeline
    from qwen_image_edge.distill.trainer import pool_spec
    from qwen_image_edge.runtime.sampling import initial_noise

    torch.set_num_threads(1)
    student = load_pipeline(distill(str(tiny_model_dir), tmp_path, QUALITY, progress=False))
    teacher = load_pipeline(tiny_model_dir)
    pcfg = teacher.config.pipeline
    prompts = list(pool_spec(str(tiny_model_dir), teacher, QUALITY).prompts)
    noise = np.concatenate([initial_noise(QUALITY.seed + i, 1, pcfg.output_resolution, pcfg.output_resolution,
                                          teacher.transformer.config.in_channels) for i in range(len(prompts))])
    negative = pcfg.default_negative_prompt if pcfg.default_negative_prompt is not None else " "  # as the pool

    def teacher_at(steps):
        return teacher.generate(prompts, negative_prompt=negative, steps=steps, guidance=QUALITY.guidance,
                                latents=noise, progress=False, output="latent")

    many, naive = teacher_at(64), teacher_at(4)
    got = student.generate(prompts, latents=noise, progress=False, output="latent")  # its 4-step schedule
    ratio = float(np.linalg.norm(got - many) / np.linalg.norm(naive - many))
    assert ratio < 0.45, f"student / naive 4-step distance to the 64-step teacher: {ratio:.3f}"


def test_two_gloo_processes_match_one(single, tiny_model_dir, tmp_path):
    """Same global batch split over 2 ranks -> the same student as 1 process. Bound 2e-6: the
    same fp32 math with per-rank partial means and a gloo all-reduce (other summation order),
    3 Adam steps in warmup (lr up to 1.5e-4)."""
    out2 = tmp_path / "distill-2p"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", "29517", "-m", "qwen_image_edge.distill",
           "--teacher", str(tiny_model_dir), "--out", str(out2), "--threads", "1", *ARGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _weights(single[1]), _weights(out2 / "student")
    assert one.keys() == two.keys()
    worst = max(float((one[k].float() - two[k].float()).abs().max()) for k in one)
    assert worst < 2e-6, worst
    # and the run really split the batch: each rank logged its own process count
    assert "2 process(es)" in proc.stderr


def test_resume_continues_from_the_saved_iteration(single, tiny_model_dir, tmp_path):
    out = tmp_path / "resume"
    assert distill(str(tiny_model_dir), out, SETTINGS, progress=False, stop_after=2) is None
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["iteration"] == 2 and not (out / "student").exists()
    student = distill(str(tiny_model_dir), out, SETTINGS, progress=False)
    assert len(json.loads((out / "losses.json").read_text())["losses"]) == 3
    a, b = _weights(single[1]), _weights(student)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_checkpoint_of_another_run_is_refused(single, tiny_model_dir, tmp_path):
    out = tmp_path / "other"
    distill(str(tiny_model_dir), out, SETTINGS, progress=False, stop_after=1)
    other = DistillSettings(**{**SETTINGS.__dict__, "lr": 5e-4})
    with pytest.raises(ConfigError, match="another run"):
        distill(str(tiny_model_dir), out, other, progress=False)


def test_teacher_grid_holds_every_student_sigma(single):
    from qwen_image2_ref.config import DEMO
    from qwen_image_edge.distill.pool import load_pool, student_sigmas, teacher_grid

    sched = DEMO.pipeline.scheduler
    grid, points = teacher_grid((4, 8), 40, 64, sched)
    assert len(grid) == 41 and grid[0] == 1.0 and grid[-1] == 0.0 and np.all(np.diff(grid) < 0)
    for steps in (4, 8):
        assert np.isin(student_sigmas(steps, 64, sched), grid).all()
        assert np.isin(student_sigmas(steps, 64, sched), points).all()
    assert len(points) == 9 + 4 or len(points) <= 13  # 4 + 8 steps share 1, 0 and what coincides
    with pytest.raises(ConfigError, match="fewer"):
        teacher_grid((4, 8), 5, 64, sched)

    pool = load_pool(single[0] / "pool", json.loads((single[0] / "pool.json").read_text())["digest"])
    from qwen_image2_ref.model_folder import load_pipeline

    pcfg = load_pipeline(single[1]).config.pipeline
    n_tokens = (pcfg.output_resolution // 16) ** 2
    table = segment_table(pool, (2,), n_tokens, pcfg.scheduler)
    assert len(table) == 2 and table[0][0] == 0 and table[-1][1] == len(pool.sigmas) - 1
    # the student samples exactly at the sigmas its targets were recorded at
    student = schedule_of(pcfg, n_tokens)
    np.testing.assert_array_equal(student, pool.sigmas[[table[0][0], table[0][1], table[1][1]]])


def schedule_of(pcfg, n_tokens):
    from qwen_image_edge.runtime import schedule

    return schedule.make_sigmas(None, n_tokens, pcfg.scheduler, fixed_sigmas=pcfg.sample_sigmas)


def test_teacher_run_is_the_pipeline_loop(tiny_model_dir):
    """distill's recording loop on the default grid ends where pipe.generate ends (same noise)."""
    from qwen_image2_ref.model_folder import load_pipeline
    from qwen_image_edge.distill.pool import teacher_run
    from qwen_image_edge.runtime import schedule
    from qwen_image_edge.runtime.sampling import initial_noise

    pipe = load_pipeline(tiny_model_dir)
    res = pipe.config.pipeline.output_resolution
    noise = initial_noise(3, 1, res, res, pipe.transformer.config.in_channels)
    ref = pipe.generate("a red circle", negative_prompt=" ", steps=3, guidance=2.0, latents=noise,
                        progress=False, output="latent")
    grid = schedule.make_sigmas(3, (res // 16) ** 2, pipe.config.pipeline.scheduler)
    shape = (res // 16, res // 16)
    pos, neg = pipe._encode(["a red circle"], [], [], shape), pipe._encode([" "], [], [], shape)
    got = teacher_run(pipe, pos, neg, torch.zeros(1, 0, noise.shape[-1]), noise, grid, 2.0, grid[[0, -1]])
    np.testing.assert_array_equal(got[:, 0].numpy(), noise)
    np.testing.assert_allclose(got[:, 1].numpy(), ref, rtol=0, atol=1e-6)


def test_runtime_uses_the_student_schedule_by_default(single, tmp_path):
    from qwen_image_edge.export.onnx_export import export_model
    from qwen_image_edge.runtime.pipeline import Pipeline

    out = tmp_path / "export"
    export_model(str(single[1]), out, max_resolution=64)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schedule"]["sigmas"] == pytest.approx([1.0, 0.5])
    assert manifest["schedule"]["guidance_distilled"] is True
    assert manifest["provenance"]["distillation"]["guidance"] == 2.0
    assert manifest["provenance"]["distillation"]["trained_steps"] == [2, 4]
    pipe = Pipeline.load(out, threads=1)
    calls = []
    pipe.generate("a red circle", seed=0, callback=lambda i, n, x: calls.append(n))
    assert calls and set(calls) == {2} and len(calls) == 2


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="steps"):
        DistillSettings(steps=(0,))
    with pytest.raises(ConfigError, match="batch"):
        DistillSettings(batch=0)


def test_teacher_pool_is_not_reused_across_dtypes(tiny_model_dir, tmp_path, monkeypatch):
    """The pool cache (one per folder) keys on the teacher's dtype: a bf16 teacher does not reuse an
    fp32 teacher's trajectories, and a rerun in the same dtype reuses its own."""
    from qwen_image2_ref.model_folder import load_pipeline
    from qwen_image_edge.distill import trainer

    built = []
    real = trainer.build_pool
    monkeypatch.setattr(trainer, "build_pool", lambda pipe, *a, **k: built.append(pipe.dtype) or real(pipe, *a, **k))
    ranks = trainer.Ranks(0, 1, torch.device("cpu"))
    pools = {}
    for dtype in (torch.float32, torch.float32, torch.bfloat16, torch.bfloat16):
        pipe = load_pipeline(tiny_model_dir, dtype=dtype)
        pools.setdefault(dtype, []).append(
            trainer.teacher_pool(pipe, Path(tiny_model_dir), SETTINGS, tmp_path, "d" * 64, ranks, False))
    assert built == [torch.float32, torch.bfloat16]
    for runs in pools.values():  # the cached pool is the one built
        torch.testing.assert_close(runs[0].groups["t2i"].points, runs[1].groups["t2i"].points, rtol=0, atol=0)


def test_a_folder_the_demo_trainer_saved_distils_in_its_own_language(tiny_model_dir, tmp_path):
    """A demo-trained folder (its model_index.json records demo_caption_style) gets the demo prompt set
    of that language and edit trajectories, and its student records the same language; any other
    folder gets the general set and no edits."""
    import shutil

    from qwen_image2_ref.model_folder import load_pipeline
    from qwen_image_edge.calib.prompts import load_prompts
    from qwen_image_edge.distill import trainer

    settings = DistillSettings(steps=(2,), iters=1, batch=2, teacher_steps=4, guidance=2.0, pool_size=3, edit_size=2)
    with pytest.raises(ConfigError, match="demo-trained teacher"):
        trainer.pool_spec(tiny_model_dir, None, settings)
    plain = trainer.pool_spec(tiny_model_dir, None, dataclasses.replace(settings, edit_size=0))
    assert list(plain.prompts) == load_prompts("general")[:3] and plain.edits == ()

    folder = tmp_path / "v2"
    shutil.copytree(tiny_model_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["qwen_image_edge"]["demo_caption_style"] = "v2"
    (folder / "model_index.json").write_text(json.dumps(index))
    spec = trainer.pool_spec(folder, None, settings)
    assert list(spec.prompts) == load_prompts("demo-v2")[:3]
    assert len(spec.edits) == 2 and all(img.shape == (128, 128, 4) for img, _ in spec.edits)

    pipe = load_pipeline(folder)
    student = trainer.save_student(pipe, pipe.transformer, tmp_path / "student", 2, folder, {"note": "test"})
    edge = json.loads((student / "model_index.json").read_text())["qwen_image_edge"]
    assert edge["demo_caption_style"] == "v2" and edge["distilled_from"] == {"note": "test"}
    plain_student = trainer.save_student(load_pipeline(tiny_model_dir), pipe.transformer, tmp_path / "s2", 2,
                                         Path(tiny_model_dir), {})
    assert "demo_caption_style" not in json.loads((plain_student / "model_index.json").read_text())["qwen_image_edge"]
