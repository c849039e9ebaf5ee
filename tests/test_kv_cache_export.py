"""The condition KV cache as exported graphs: transformer_prefill + transformer_step against the single
transformer graph (onnxruntime), the runtime with and without the pair, old exports, TensorRT stand-in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwen_image_edge.runtime.errors import ManifestError
from qwen_image_edge.runtime.manifest import KV_CACHE_GRAPHS, load_manifest
from qwen_image_edge.runtime.pipeline import Pipeline
from qwen_image_edge.runtime.stats import GenerationStats

STEPS = 3
RNG = np.random.default_rng(0)
RGBA = Image.fromarray(RNG.integers(0, 256, (80, 60, 4), dtype=np.uint8))
RGB = Image.fromarray(RNG.integers(0, 256, (50, 90, 3), dtype=np.uint8))
# fp32 graphs, the same math in another grouping (prefix keys computed apart from the target's):
# summation-order differences are ~1e-7 relative; the validation bound (1e-5) leaves 10x or more.
REL_L2 = 1e-5


@pytest.fixture(scope="module")
def exported(tiny_export):
    from qwen_image2_ref.model_folder import load_model

    return load_model(tiny_export[0]), tiny_export[1]


@pytest.fixture(scope="module")
def pipes(exported):
    return Pipeline.load(exported[1], threads=1), Pipeline.load(exported[1], threads=1, kv_cache=False)


@pytest.fixture(scope="module")
def reference(exported):
    from qwen_image2_ref.model_folder import load_pipeline

    return load_pipeline(exported[0].path)


def _rel(ref, got) -> float:
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


# ----------------------------------------------------------------------------- graphs


@pytest.mark.parametrize("batch, text, target, cond, pad", [
    (1, 7, (2, 3), (), 0),  # text-to-image
    (2, 9, (4, 4), ((2, 2),), 3),  # one condition image, padded text in row 0
    (2, 6, (2, 4), ((4, 2), (2, 4)), 2),  # edit with two condition images of different shapes
])
def test_pair_equals_the_single_graph_in_onnxruntime(exported, batch, text, target, cond, pad):
    import onnxruntime as ort

    from qwen_image_edge.export.graphs import pair_inputs, transformer_inputs

    model, out = exported
    m = load_manifest(out, verify_hashes=False)
    sess = {g: ort.InferenceSession(str(out / m.graphs[g].file), providers=["CPUExecutionProvider"])
            for g in ("transformer", *KV_CACHE_GRAPHS)}

    def run(g, args):
        return sess[g].run(None, {t.name: np.asarray(a) for t, a in zip(m.graphs[g].inputs, args)})[0]

    args = transformer_inputs(model.config, batch, text, target, cond, pad, seed=batch + len(cond))
    pre, step = pair_inputs(args)
    kv = run("transformer_prefill", pre)
    t = model.config.transformer
    assert kv.shape == (t.num_layers, 2, batch, pre[2].shape[0], t.num_heads, t.head_dim)
    single = run("transformer", args)
    velocity = run("transformer_step", (step[0], step[1], kv, *step[2:]))
    assert _rel(single, velocity) <= REL_L2
    # and the cache is the reference's prefill (its own parity with diffusers is tests/test_kv_cache.py)
    import torch

    with torch.no_grad():
        assert _rel(model.transformer.prefill(*pre).numpy(), kv) <= REL_L2
    # the step reads the cache: another cache gives another velocity (the check above is not vacuous)
    other = run("transformer_step", (step[0], step[1], kv[::-1].copy(), *step[2:]))
    assert _rel(single, other) > 1e-2


def test_validate_checks_the_pair_against_the_single_graph(exported, tmp_path):
    from qwen_image_edge.export.validate import validate

    model, out = exported
    report = validate(out, model, report=tmp_path / "v.json", graphs=list(KV_CACHE_GRAPHS), verify_hashes=False)
    assert report.passed, report.table()
    step = next(g for g in report.graphs if g.graph == "transformer_step")
    labels = [c.shape for c in step.cases]
    assert any("N_c=0" in s for s in labels) and any("N_c=12" in s for s in labels), labels  # t2i, two images
    assert all("exported prefill -> step vs single graph" in s for s in labels)
    assert max(c.rel_l2 for g in report.graphs for c in g.cases) <= REL_L2


def test_manifest_records_the_pair_with_consistent_symbols(exported):
    m = load_manifest(exported[1], verify_hashes=False)
    single, pre, step = (m.graphs[g] for g in ("transformer", *KV_CACHE_GRAPHS))
    assert [t.name for t in pre.outputs] == ["kv_cache"] and step.inputs[2] == pre.outputs[0]
    assert [t.name for t in step.inputs] == ["latents", "timestep", "kv_cache", "rope_cos", "rope_sin", "key_mask"]
    for sym in ("B", "L_prefix"):
        assert pre.dim_ranges[sym] == step.dim_ranges[sym] == single.dim_ranges[sym]
    assert step.dim_ranges["L"] == single.dim_ranges["L"] and step.dim_ranges["N_t"] == single.dim_ranges["N_t"]


# ----------------------------------------------------------------------------- runtime


@pytest.mark.parametrize("prompt, kw", [
    ("a red circle on the left", dict(width=96, height=64)),
    (["a blue square", "the green triangle is at the top right"], dict(width=64, height=64)),
    ("a red circle", dict(width=64, height=32, guidance=3.0, negative_prompt="blurry, a dark and noisy picture")),
])
def test_runtime_with_the_pair_equals_without_and_the_reference(pipes, reference, prompt, kw):
    cached, single = pipes
    assert cached.uses_kv_cache and "transformer" not in cached.sessions
    assert not single.uses_kv_cache and not set(KV_CACHE_GRAPHS) & set(single.sessions)
    kw = dict(steps=STEPS, seed=4, output="np", **kw)
    ours, stats = cached.generate(prompt, return_stats=True, **kw)
    assert stats.calls("transformer_prefill") == (2 if "guidance" in kw else 1)
    assert stats.calls("transformer_step") == STEPS * (2 if "guidance" in kw else 1)
    assert stats.calls("transformer") == 0
    plain = single.generate(prompt, **kw)
    # the graphs agree to ~1e-7 relative (above); pixels after 3 steps and the VAE to ~1e-6
    np.testing.assert_allclose(ours, plain, rtol=0, atol=2e-6)
    ref = reference.generate(prompt, progress=False, **kw)
    assert np.abs(ours - ref).max() <= 1e-4  # graphs vs eager torch, as tests/test_runtime.py


@pytest.mark.parametrize("images, kw", [
    ([RGBA, RGB], {}),
    ([RGB, RGBA], dict(guidance=3.0, negative_prompt="blurry")),
])
def test_edit_with_two_images_uses_the_pair(pipes, reference, images, kw):
    cached, single = pipes
    kw = dict(steps=STEPS, seed=3, output="np", **kw)
    ours = cached.edit(images, "make the circle blue", **kw)
    plain = single.edit(images, "make the circle blue", **kw)
    np.testing.assert_allclose(ours, plain, rtol=0, atol=2e-6)
    ref = reference.edit(images, "make the circle blue", progress=False, **kw)
    assert np.abs(ours - ref).max() <= 1e-4


def _without_pair(src: Path, dst: Path) -> Path:
    out = Path(shutil.copytree(src, dst))
    data = json.loads((out / "manifest.json").read_text())
    for g in KV_CACHE_GRAPHS:
        del data["graphs"][g]
        shutil.rmtree(out / g)
    (out / "manifest.json").write_text(json.dumps(data, indent=2))
    return out


def test_an_export_without_the_pair_still_works(exported, pipes, tmp_path):
    old = _without_pair(exported[1], tmp_path / "old")
    pipe = Pipeline.load(old, threads=1)
    assert not pipe.uses_kv_cache
    kw = dict(width=64, height=64, steps=2, seed=1, output="np")
    np.testing.assert_allclose(pipe.generate("a red circle", **kw), pipes[0].generate("a red circle", **kw),
                               rtol=0, atol=2e-6)
    with pytest.raises(ManifestError, match="kv_cache=True needs the graphs"):
        Pipeline.load(old, threads=1, kv_cache=True)


# ----------------------------------------------------------------------------- TensorRT (stand-in)


def test_tensorrt_builds_the_pair_and_keeps_the_cache_on_the_device(exported, tmp_path, trt, monkeypatch):
    from qwen_image_edge.export.tensorrt import build_engines
    from qwen_image_edge.export.trt_profiles import BuildRanges, input_profiles
    from qwen_image_edge.runtime import kv_cache
    from qwen_image_edge.runtime.backends import cuda

    out = Path(shutil.copytree(exported[1], tmp_path / "export"))
    graphs = [g for g in load_manifest(out, verify_hashes=False).graphs if g != "transformer"]
    built = build_engines(out, graphs=graphs, ranges=BuildRanges(max_res=64, max_prompt_tokens=40))
    m = load_manifest(out)
    engines = {e.graph: e for e in built.values()}
    step, pre = engines["transformer_step"], engines["transformer_prefill"]
    # the step's profile holds the cache length, consistent with the prefill's output
    assert step.dim_ranges["L_prefix"] == pre.dim_ranges["L_prefix"]
    l_enc_max = pre.dim_ranges["L_enc"][2]
    assert step.dim_ranges["L_prefix"][2] == l_enc_max + pre.dim_ranges["N_c"][2]
    assert step.dim_ranges["L"][2] == step.dim_ranges["L_prefix"][2] + step.dim_ranges["N_t"][2] == l_enc_max + 2 * 24 + 16
    # (two condition images of the largest area, 96x64 at the tiny model's 64 px: 24 tokens each, are
    # not narrowed by --max-res; the 64 px target is 16 tokens)
    kv = {p.name: p for p in input_profiles(m.graphs["transformer_step"], step.dim_ranges)}["kv_cache"]
    t = exported[0].config.transformer
    assert kv.max == (t.num_layers, 2, step.dim_ranges["B"][2], step.dim_ranges["L_prefix"][2], t.num_heads,
                      t.head_dim)

    uploads: list[int] = []
    real_copy = cuda.copy_to_device
    monkeypatch.setattr(cuda, "copy_to_device", lambda dst, src, stream: (uploads.append(src.nbytes),
                                                                          real_copy(dst, src, stream)))
    released = []
    real_release = kv_cache.KVCache.release
    monkeypatch.setattr(kv_cache.KVCache, "release", lambda self: (released.append(self.on_device),
                                                                   real_release(self)))
    kw = dict(width=64, height=32, steps=2, seed=3, output="np", guidance=3.0, negative_prompt="blurry")
    pipe = Pipeline.load(out, backend="tensorrt", device_loop=False)  # the numpy loop: the cache via run_kept
    assert pipe.uses_kv_cache and "transformer" not in pipe.sessions  # no engine needed for the single graph
    ours = pipe.generate("a red circle", **kw)
    ref = Pipeline.load(out, threads=1, kv_cache=False).generate("a red circle", **kw)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-6)
    # two caches (prompt, negative prompt), each copied once on the device, never uploaded per step
    assert trt.CUDART.calls.count("cudaMemcpyAsync:cudaMemcpyDeviceToDevice") == 2
    cache_bytes = {4 * np.prod(s) for s in _cache_shapes(pipe, kw)}
    assert not cache_bytes & set(uploads)
    assert released == [True, True]  # both device caches are freed after the loop
    # the device loop (runtime/device_loop.py) prefills straight into its own device buffers
    uploads.clear()
    device = Pipeline.load(out, backend="tensorrt")
    assert device.device is not None and device.uses_kv_cache
    np.testing.assert_allclose(device.generate("a red circle", **kw), ref, rtol=0, atol=2e-6)
    assert not cache_bytes & set(uploads) and device.device._owned == {}  # never uploaded; all freed


def _cache_shapes(pipe, kw):
    """The two caches' shapes (prompt and negative prompt), from the layouts the runtime builds."""
    t = pipe.manifest.model.transformer
    shapes = []
    for prompt in ("a red circle", kw["negative_prompt"]):
        f = pipe.manifest.vae_scale_factor
        cond = pipe._encode([prompt], (kw["height"] // f, kw["width"] // f), GenerationStats())
        shapes.append((t.num_layers, 2, 1, cond.layout.prefix_len, t.num_heads, t.head_dim))
    return shapes
