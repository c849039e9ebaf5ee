"""The TensorRT audit's findings (issue 22), each against the stand-in that models it
(tests/trt_standin.py, tests/cuda_standin.py), and the device loop on TensorRT engines."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from qwen_image_edge.export.trt_profiles import BuildRanges
from qwen_image_edge.runtime.backends import cuda
from qwen_image_edge.runtime.errors import BackendError
from qwen_image_edge.runtime.manifest import load_manifest, sha256_file


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    from qwen_image2_ref.model_folder import load_model
    from qwen_image_edge.export.onnx_export import export_model

    root = tmp_path_factory.mktemp("trt-audit")
    export_model(load_model(tiny_model_dir), root / "export", max_resolution=64)
    return root / "export"


@pytest.fixture
def export_copy(exported, tmp_path):
    return Path(shutil.copytree(exported, tmp_path / "export"))


def _build(export_dir, **kw):
    from qwen_image_edge.export.tensorrt import build_engines

    return build_engines(export_dir, ranges=BuildRanges(max_res=64), **kw)


def _session(export_dir, graph, **kw):
    from qwen_image_edge.runtime.backends.tensorrt import TensorRTBackend

    m = load_manifest(export_dir, verify_hashes=False)
    return TensorRTBackend(export_dir, m, **kw).open(m.graphs[graph], export_dir / m.graphs[graph].file)


def _ort(export_dir, graph, feeds):
    import onnxruntime

    m = load_manifest(export_dir, verify_hashes=False)
    s = onnxruntime.InferenceSession(str(export_dir / m.graphs[graph].file), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)[0]


def _rewrite_graph(export_dir: Path, graph: str, edit_model, edit_spec) -> None:
    """Change one graph's ONNX file and its manifest entry together (IO and sha256)."""
    path = export_dir / graph / "model.onnx"
    model = onnx.load(str(path))
    edit_model(model)
    onnx.save(model, str(path))
    raw = json.loads((export_dir / "manifest.json").read_text())
    edit_spec(raw["graphs"][graph])
    raw["graphs"][graph]["sha256"] = sha256_file(path)
    (export_dir / "manifest.json").write_text(json.dumps(raw))


Z = np.random.default_rng(4).standard_normal((1, 64, 2, 4), dtype=np.float32)


# ----------------------------------------------------------------------------- one logger


def test_one_logger_for_the_process_keeps_later_errors(export_copy, trt):
    """TensorRT reports to the first logger it was given: a second build's failure text must still
    reach the message (a logger per build would hold nothing and say 'no error logged')."""
    _build(export_copy, graphs=["vae_decoder"])
    _session(export_copy, "vae_decoder")  # a Runtime too: still the same logger
    trt.FAIL_BUILD = True
    with pytest.raises(BackendError, match="injected build failure"):
        _build(export_copy, graphs=["vae_encoder"])
    from qwen_image_edge.runtime.backends.tensorrt import process_logger

    assert trt._LOGGER is process_logger(trt)


# ----------------------------------------------------------------------------- timing cache


def test_a_refused_timing_cache_builds_with_a_fresh_one(export_copy, trt, caplog):
    _build(export_copy, graphs=["vae_decoder"])
    old = next(export_copy.rglob("timing.cache"))
    saved = export_copy / "old.cache"
    shutil.copy(old, saved)
    trt.reset("10.14.1.2")  # another TensorRT: the saved cache is refused
    with caplog.at_level(logging.WARNING):
        _build(export_copy, graphs=["vae_decoder"], timing_cache=saved)
    assert "timing cache refused" in caplog.text
    version, entries = json.loads(saved.read_bytes()[len(b"standin-timing-cache"):])
    assert (version, entries) == ("10.14.1.2", ["vae_decoder"])  # replaced by this version's


# ----------------------------------------------------------------------------- CUDA graphs


def test_a_failed_capture_falls_back_to_normal_execution(export_copy, trt, caplog):
    _build(export_copy, graphs=["vae_decoder"])
    sess = _session(export_copy, "vae_decoder", cuda_graph=True)
    trt.CUDART.fail_capture = True
    with caplog.at_level(logging.WARNING):
        for k in range(3):
            out = sess.run({"latents": Z * (k + 1)})["image"]
            np.testing.assert_allclose(out, _ort(export_copy, "vae_decoder", {"latents": Z * (k + 1)}), atol=1e-6)
    assert caplog.text.count("CUDA graph capture failed") == 1  # logged once, then graphs are off
    assert trt.CUDART.calls.count("cudaStreamBeginCapture") == 1 and "cudaGraphLaunch" not in trt.CUDART.calls
    sess.close()


# ----------------------------------------------------------------------------- engine IO


def test_an_engine_that_drops_an_unread_input_is_accepted(export_copy, trt):
    """An input no node reads is dropped from the engine's IO; the runtime still takes and checks
    the feed, and binds only what the engine has."""
    def add_input(model):
        model.graph.input.append(onnx.helper.make_tensor_value_info("shape_hint", onnx.TensorProto.BOOL, ["B", "h"]))

    def add_spec(spec):
        spec["inputs"].append({"name": "shape_hint", "dtype": "bool", "dims": ["B", "h"]})

    _rewrite_graph(export_copy, "vae_decoder", add_input, add_spec)
    _build(export_copy, graphs=["vae_decoder"])
    sess = _session(export_copy, "vae_decoder")
    hint = np.zeros((1, 2), bool)
    out = sess.run({"latents": Z, "shape_hint": hint})["image"]
    np.testing.assert_allclose(out, _ort(export_copy, "vae_decoder", {"latents": Z, "shape_hint": hint}), atol=1e-6)
    assert "shape_hint" not in sess.engine.names
    sess.close()


def test_bf16_engine_io_uses_ml_dtypes(export_copy, trt):
    """An engine whose output is bf16: the host array is ml_dtypes' bfloat16 (numpy has no
    'bfloat16' dtype name), holding the fp32 result rounded to bf16."""
    import ml_dtypes

    def cast_output(model):
        out = model.graph.output[0]
        model.graph.node.append(onnx.helper.make_node("Cast", [out.name], ["image_bf16"], to=onnx.TensorProto.BFLOAT16))
        dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
        model.graph.output.pop()
        model.graph.output.append(onnx.helper.make_tensor_value_info("image_bf16", onnx.TensorProto.BFLOAT16, dims))

    def bf16_spec(spec):
        spec["outputs"] = [{**spec["outputs"][0], "name": "image_bf16", "dtype": "bfloat16"}]

    reference = _ort(export_copy, "vae_decoder", {"latents": Z})
    _rewrite_graph(export_copy, "vae_decoder", cast_output, bf16_spec)
    _build(export_copy, graphs=["vae_decoder"])
    sess = _session(export_copy, "vae_decoder")
    out = sess.run({"latents": Z})["image_bf16"]
    assert out.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(out, reference.astype(ml_dtypes.bfloat16))
    sess.close()


# ----------------------------------------------------------------------------- weight streaming, driver


def test_a_refused_weight_streaming_budget_is_reported(export_copy, trt):
    _build(export_copy, graphs=["vae_decoder"], weight_streaming=True)
    trt.REFUSE_BUDGET = True
    with pytest.raises(BackendError, match=r"weight streaming budget 524288 bytes \(50% of 1048576\) was not "
                                           r"applied; the engine reports -1"):
        _session(export_copy, "vae_decoder", weight_streaming_budget=0.5)


def test_a_driver_older_than_cuda_python_is_named(export_copy, trt, monkeypatch):
    monkeypatch.setattr(type(trt.CUDART), "__version__", "13.0.1")
    trt.CUDART.driver = 12040
    with pytest.raises(BackendError, match=r"cuda-python 13.x needs a driver for CUDA 13.0 or newer; this driver "
                                           r"supports CUDA 12.4: pip install 'cuda-python>=12.6,<13'"):
        _session(export_copy, "vae_decoder")
    trt.CUDART.driver = 13000
    assert cuda.check_driver() == 13000


# ----------------------------------------------------------------------------- the device loop on engines


def test_device_loop_on_engines_copies_only_scalars_per_step(export_copy, trt):
    """The pipeline over stand-in engines runs the device loop (sampler_step engine included):
    same images as the host loop over onnxruntime, and one more step adds only the scalar copies
    (timestep per transformer call, guidance/sigma/sigma_next): no latents, cache or masks."""
    from qwen_image_edge.runtime.pipeline import Pipeline

    _build(export_copy)
    pipe = Pipeline.load(export_copy, backend="tensorrt")
    assert pipe.device is not None and "sampler_step" in pipe.sessions
    ref = Pipeline.load(export_copy, threads=1)
    h2d = "cudaMemcpyAsync:cudaMemcpyHostToDevice"
    counts = []
    for steps in (2, 3):
        kw = dict(width=64, height=32, steps=steps, seed=3, output="np", negative_prompt="blurry", guidance=3.0)
        before = trt.CUDART.calls.count(h2d)
        ours = pipe.generate("a red circle", **kw)
        counts.append(trt.CUDART.calls.count(h2d) - before)
        # the stand-in's engines run the same ONNX graphs in onnxruntime: only the data path differs
        np.testing.assert_allclose(ours, ref.generate("a red circle", **kw), rtol=0, atol=1e-6)
    assert counts[1] - counts[0] == 2 + 3
    assert pipe.device._owned == {}  # every buffer of the generations freed
