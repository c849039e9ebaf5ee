"""The reference and calibration in bf16 (and fp16) on the CPU match fp32 within the dtype's rounding.

Unit roundoff: bf16 keeps 8 significant bits, u = 2^-8 = 3.9e-3 (fp16: 11 bits, 2^-11 = 4.9e-4).
Where the error comes from, and why it does not grow with the number of steps:
- the pipeline keeps the latent state and the sigma fed to the timestep sinusoids in fp32 (the
  sinusoids take 1000 * sigma: a bf16 sigma would move their phases by up to ~2 rad), so only the
  transformer's and the VAE's internal arithmetic is in the low dtype;
- a velocity carries a few u of relative error (a handful of rounded ops per block: norm,
  modulation, matmul outputs, attention, residual add; matmuls accumulate in fp32 on the CPU);
- the Euler updates add dt * v with sum(dt) = 1, so the latent error is a weighted mean of the
  velocity errors, not a sum over steps; the VAE decoder adds its own rounding chain once.
Images: relative L2 of the pixels within 4u. Measured on this CPU (2 cores, torch 2.x): tiny model
pixels 1.0u (latents 0.75u); demo model 2.0u (20 steps, 6 held-out prompts); fp16 on tiny 1.0u_16.
Calibration ranges: per layer and step, the abs-max of a layer input (exact in any dtype: a max
rounds nothing) differs only through the input's own error: bound 8u, from the deepest input of the
tiny model (block 1's MLP output) sitting after 2 blocks x ~6 rounded ops = 12 roundings of u/2
(worst case, linear) plus its own rounding, 7u, rounded up; measured 3.2u (per step), 2.5u (per layer).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen_image2_ref.model_folder import load_model

U_BF16 = 2.0**-8
U_FP16 = 2.0**-11
IMAGE_BOUND = 4  # x u, pixels' relative L2 (see the module docstring)
RANGE_BOUND = 8  # x u, per-layer per-step abs-max of a calibrated input


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def tiny_runs(tiny_model_dir):
    """fp32 / bf16 / fp16 reference runs of the tiny model: (pixels, latents, transformer dtype)."""
    out = {}
    for name in ("fp32", "bf16", "fp16"):
        model = load_model(tiny_model_dir, dtype=name)
        pipe = model.pipeline()
        kw = dict(seed=1, width=64, height=64, progress=False)
        prompts = ["a red circle", "a blue square"]
        out[name] = (pipe.generate(prompts, output="np", **kw), pipe.generate(prompts, output="latent", **kw),
                     {p.dtype for p in model.transformer.parameters()} | {p.dtype for p in model.vae.parameters()})
    return out


@pytest.mark.parametrize(("name", "u"), [("bf16", U_BF16), ("fp16", U_FP16)])
def test_tiny_reference_matches_fp32_within_rounding(tiny_runs, name, u):
    pixels, latents, dtypes = tiny_runs[name]
    ref_pixels, ref_latents, _ = tiny_runs["fp32"]
    assert dtypes == {getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[name])}  # it really ran in it
    assert pixels.dtype == np.float32 and latents.dtype == np.float32  # outputs stay fp32
    assert 0 < _rel(latents, ref_latents) <= IMAGE_BOUND * u
    assert 0 < _rel(pixels, ref_pixels) <= IMAGE_BOUND * u


VERDICTS = ("count", "color", "shape", "position", "background")


def _verdicts(image: np.ndarray, scene) -> dict[str, bool]:
    """The demo judge's verdicts on an image against the scene its prompt asks for."""
    from qwen_image2_ref.demo import judge

    reading = judge.judge((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    return {k: v for k, v in judge.score(reading, scene).items() if k in VERDICTS}


def test_demo_bf16_reads_the_same_attributes_as_fp32():
    """Six held-out prompts (every other one of tests/adherence.py's balanced set: all shapes and
    backgrounds) at 20 steps instead of the model's 40, to keep the test short: bf16 gets each
    prompt's count, colour, shape, position and background right or wrong exactly where fp32 does.
    Verdicts, not the raw readings: the v1 model draws a stray second blob for one of these prompts,
    whose shape sits on the judge's circle/square boundary, and on an AVX512 CPU bf16's rounding
    tipped that reading (session 13; the image itself stayed within the pixel bound)."""
    from tests.adherence import balanced_heldout_prompts

    chosen = balanced_heldout_prompts()[::2]  # 6 of the 12
    prompts = [caption for _, caption in chosen]
    images = {}
    for name in ("fp32", "bf16"):
        pipe = load_model("demo", dtype=name).pipeline()
        images[name] = pipe.generate(prompts, seed=3, steps=20, output="np", progress=False)
    assert _rel(images["bf16"], images["fp32"]) <= IMAGE_BOUND * U_BF16
    fp32 = [_verdicts(images["fp32"][i], scene) for i, (scene, _) in enumerate(chosen)]
    for i, (scene, prompt) in enumerate(chosen):
        assert _verdicts(images["bf16"][i], scene) == fp32[i], prompt
    assert sum(v["color"] and v["position"] for v in fp32) >= 4  # the readings are of a model that follows them


def test_calibration_ranges_are_fp32_and_match_within_bf16_rounding(tiny_model_dir):
    from qwen_image_edge.calib.collect import CalibrationSettings, RangeRecorder, run_calibration
    from qwen_image_edge.calib.policy import QuantPolicy

    ranges = {}
    for name in ("fp32", "bf16"):
        model = load_model(tiny_model_dir, dtype=name)
        layers = QuantPolicy(precision="int8").select(model.transformer)
        recorder = RangeRecorder(model.transformer, layers)
        settings = CalibrationSettings(batch_size=3, steps=8)
        run_calibration(model.pipeline(), ["a red circle", "a blue square", "a green triangle"], settings, recorder,
                        progress=False)
        ranges[name] = recorder.ranges()
    assert len(ranges["fp32"]) >= 10
    worst = 0.0
    for layer, want in ranges["fp32"].items():
        got = ranges["bf16"][layer]
        assert got.step_max.dtype == np.float32 and got.step_sum.dtype == np.float32, layer
        per_step, ref = got.step_max.max(axis=1), want.step_max.max(axis=1)  # [S] per-layer amax per step
        worst = max(worst, float(np.max(np.abs(per_step - ref) / ref)))
    assert 0 < worst <= RANGE_BOUND * U_BF16, worst


def test_quantize_in_bf16_records_fp32_amax_within_rounding(tiny_model_dir):
    """modelopt's calibration in bf16: SmoothQuant scales and input ranges close to the fp32 ones
    (the smoothing scale is amax_x^a / amax_w^(1-a): its error is at most the range's)."""
    pytest.importorskip("modelopt.torch.quantization")
    from qwen_image_edge.calib.collect import CalibrationSettings
    from qwen_image_edge.calib.policy import QuantPolicy
    from qwen_image_edge.calib.quantize import quantize_transformer

    amax = {}
    for name in ("fp32", "bf16"):
        q = quantize_transformer(load_model(tiny_model_dir, dtype=name), QuantPolicy(precision="int8"),
                                 ["a red circle", "a blue square"], CalibrationSettings(batch_size=2), progress=False)
        assert q.summary["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[name]
        assert all(m.input_quantizer.amax.dtype == torch.float32
                   for m in (q.module.get_submodule(n) for n in q.layers))
        amax[name] = q.summary["input_amax"]
    rel = [abs(amax["bf16"][k] - v) / v for k, v in amax["fp32"].items()]
    assert 0 < max(rel) <= RANGE_BOUND * U_BF16, max(rel)


def _rounded_tensors(graph_file) -> tuple[int, int]:
    """(fp32 initializers of >= 64 values, how many of them hold bf16 values only: low 16 bits zero).
    SmoothQuant's scales are left out: calibration products, computed by modelopt in its dtype."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph_file))
    arrays = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
              and not t.name.endswith("pre_quant_scale")]
    arrays = [np.ascontiguousarray(a, np.float32) for a in arrays if a.size >= 64]
    return len(arrays), sum(not np.any(a.view(np.uint32) & 0xFFFF) for a in arrays)


@pytest.mark.parametrize("route", ["int8", "transformer=int8,vae=fp16"])
def test_a_bf16_calibration_exports_the_checkpoints_weights(tiny_model_dir, tmp_path, route):
    """Calibrated in bf16, the export still holds the checkpoint's fp32 weights: every graph that
    calibration does not touch is byte for byte the fp32 calibration's, and the transformer's fp32
    tensors are not bf16-rounded (a bf16 model upcast for the trace would hold nothing else).
    ``int8``: quantize_model (lean by default in bf16); the other: the per-component path."""
    pytest.importorskip("modelopt.torch.quantization")
    from qwen_image_edge.calib.collect import CalibrationSettings
    from qwen_image_edge.calib.component_export import quantize_components
    from qwen_image_edge.runtime.manifest import load_manifest

    settings = CalibrationSettings(batch_size=2, steps=2)
    digests, rounded = {}, {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / dtype
        quantize_components(tiny_model_dir, route, out, calib_size=2, settings=settings, max_resolution=64,
                            prompts="general", device="cpu", dtype=dtype, progress=False,
                            lean=True if route == "int8" and dtype == "fp32" else None)  # the bf16 default's writer
        manifest = load_manifest(out)  # the export's own sha256 of each graph file and its weights
        digests[dtype] = {g: (manifest.graph(g).sha256, manifest.graph(g).external_data) for g in manifest.graphs}
        rounded[dtype] = _rounded_tensors(out / "transformer" / "model.onnx")
    for name in ("vae_decoder", "vae_encoder", "text_encoder", "vision_encoder"):
        assert digests["bf16"][name] == digests["fp32"][name], name
    total, bf16_only = rounded["bf16"]
    assert total > 0 and bf16_only == rounded["fp32"][1] < total, (rounded, route)
