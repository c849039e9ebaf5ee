"""TensorRT build and backend: pure logic here, API use against tests/trt_standin.py, real engines where present."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from qwen_image_edge.export.trt_profiles import BuildRanges, graph_ranges, input_profiles, wanted_ranges
from qwen_image_edge.runtime.backends import cuda, make_backend
from qwen_image_edge.runtime.errors import BackendError, ConfigError, ShapeError
from qwen_image_edge.runtime.manifest import (
    MANIFEST_NAME,
    EngineSpec,
    Manifest,
    Precision,
    load_manifest,
    sha256_file,
)
from tests.real_trt import real_trt_and_gpu


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from qwen_image2_ref.model_folder import load_model
    from qwen_image_edge.export.onnx_export import export_model
    from tests.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("trt")
    _, path = build_tiny_model(root)
    export_model(load_model(path), root / "export", max_resolution=128)
    return root / "export"


@pytest.fixture
def export_copy(exported, tmp_path):
    return Path(shutil.copytree(exported, tmp_path / "export"))


# ----------------------------------------------------------------------------- profiles (pure)


def test_profile_ranges_follow_the_request_and_stay_consistent(exported):
    m = load_manifest(exported, verify_hashes=False)
    wanted = wanted_ranges(m, BuildRanges(min_res=64, opt_res=96, max_res=128, max_batch=2, max_prompt_tokens=100))
    tr = graph_ranges(m.graphs["transformer"], wanted)
    # by hand: f = 16, so h in (4, 6, 8); the export's template allowance on top of the prompt
    # tokens; N_c as exported, not narrowed by --max-res: two condition images of the largest
    # area at the tiny model's 64 px output resolution (3:2 -> 96x64 px, 24 tokens each)
    allowance = m.graphs["transformer"].dim_ranges["L_enc"][2] - m.prompt.max_prompt_tokens
    l_enc = 100 + allowance
    assert tr["N_t"] == (16, 36, 64)
    assert tr["B"] == (1, 2, 2)
    assert tr["L_enc"] == (1, 128, l_enc)
    assert tr["N_c"] == (0, 0, 48)
    assert tr["L_prefix"] == (1, 128, l_enc + 48)
    assert tr["L"] == (1 + 16, 128 + 36, l_enc + 48 + 64)
    vae = graph_ranges(m.graphs["vae_decoder"], wanted)
    assert vae == {"B": (1, 1, 2), "h": (4, 6, 8), "w": (4, 6, 8), "H": (64, 96, 128), "W": (64, 96, 128)}
    # condition images keep their own range: 1:4 .. 4:1 at about 64^2 pixels -> sides 32..128
    assert graph_ranges(m.graphs["vae_encoder"], wanted) == {
        "B": (1, 1, 2), "hc": (2, 4, 8), "wc": (2, 4, 8), "Hc": (32, 64, 128), "Wc": (32, 64, 128)}
    assert graph_ranges(m.graphs["text_encoder"], wanted)["L_tok"] == (1, 128, l_enc)
    shapes = {p.name: p for p in input_profiles(m.graphs["transformer"], tr)}
    l_max = l_enc + 48 + 64
    assert shapes["attn_mask"].min == (1, 17, 17) and shapes["attn_mask"].max == (2, l_max, l_max)
    assert shapes["latents"].opt == (2, 36, 64)  # the static channel dim is kept
    assert shapes["prefix_index"].max == (l_enc + 48,)


def test_default_profiles_are_the_exports_ranges(exported):
    m = load_manifest(exported, verify_hashes=False)
    wanted = wanted_ranges(m, BuildRanges())
    for g in m.graphs.values():
        got = graph_ranges(g, wanted)
        assert set(got) == set(g.dim_ranges)
        for sym, (lo, opt, hi) in got.items():
            d_lo, _, d_hi = g.dim_ranges[sym]
            assert d_lo <= lo <= opt <= hi <= d_hi, (g.name, sym)
            if sym not in ("L_prefix", "L"):  # joint lengths may be derived tighter than declared
                assert hi == d_hi, (g.name, sym)
    assert graph_ranges(m.graphs["vae_decoder"], wanted) == m.graphs["vae_decoder"].dim_ranges


@pytest.mark.parametrize("req, match", [
    (BuildRanges(max_res=256), "outside the exported range 32..128"),
    (BuildRanges(min_res=96, opt_res=64), "min <= opt <= max"),
    (BuildRanges(max_res=100), "multiple of 32"),
    (BuildRanges(max_batch=0), "expected >= 1"),
])
def test_profile_request_errors(exported, req, match):
    m = load_manifest(exported, verify_hashes=False)
    with pytest.raises(ConfigError, match=match):
        wanted_ranges(m, req)


@pytest.mark.parametrize("req, graph, match", [
    (BuildRanges(max_batch=8), "vae_decoder", r"B range \[1, 8\] is outside the exported \[1, 4\]"),
    (BuildRanges(max_prompt_tokens=2000), "text_encoder", r"L_tok range \[1, 20\d\d\] is outside"),
])
def test_ranges_beyond_the_export_are_refused(exported, req, graph, match):
    m = load_manifest(exported, verify_hashes=False)
    with pytest.raises(ConfigError, match=match):
        graph_ranges(m.graphs[graph], wanted_ranges(m, req))


def test_network_mode_per_precision():
    from qwen_image_edge.export.tensorrt import network_mode

    P = Precision
    assert network_mode(P.FP8, None, "10.13.0").strongly_typed
    assert network_mode(P.INT8, None, "11.4.0").flags == ()
    int4 = network_mode(P.INT4, None, "10.13.0")  # the edge transformer / text encoder: weight-only DQ blocks
    assert int4.strongly_typed and int4.flags == () and int4.precision is P.INT4
    with pytest.raises(ConfigError, match="a int4 \\(Q/DQ\\) graph"):
        network_mode(P.INT4, P.BF16, "10.13.0")
    with pytest.raises(ConfigError, match="needs a quantized"):
        network_mode(P.FP32, P.INT4, "10.13.0")
    with pytest.raises(ConfigError, match="fp32 graphs only"):
        network_mode(P.FP8, P.FP16, "10.13.0")
    fp16 = network_mode(P.FP32, P.FP16, "10.13.0")
    assert (fp16.strongly_typed, fp16.flags, fp16.precision) == (False, ("FP16",), P.FP16)
    assert network_mode(P.BF16, None, "10.13.0").flags == ("BF16",)
    assert network_mode(P.BF16, None, "11.4.0") == network_mode(P.FP32, None, "11.4.0").__class__(True, (), P.BF16)
    with pytest.raises(ConfigError, match="removed in 11.x"):
        network_mode(P.FP32, P.FP16, "11.4.0")
    with pytest.raises(ConfigError, match="strongly typed"):
        network_mode(P.FP32, P.FP16, "10.13.0", weight_streaming=True)
    assert network_mode(P.FP32, None, "10.13.0", weight_streaming=True).flags == ("WEIGHT_STREAMING",)


# ----------------------------------------------------------------------------- manifest + keys


def _engine(**kw) -> EngineSpec:
    base = dict(graph="transformer", file="engines/nvidia-h100-trt10.13.0/transformer.plan", sha256="ab" * 32,
                graph_sha256="cd" * 32, precision=Precision.FP16, tensorrt_version="10.13.0",
                gpu_name="NVIDIA H100", compute_capability=(9, 0), dim_ranges={"B": (1, 2, 2)})
    return EngineSpec(**{**base, **kw})


def test_manifest_engines_section_round_trips_and_is_optional(exported):
    m = load_manifest(exported, verify_hashes=False)
    assert "engines" not in m.to_dict()  # an unbuilt export is written exactly as before
    with_engine = dataclasses.replace(m, engines={"nvidia-h100-trt10.13.0/transformer": _engine()})
    back = Manifest.from_dict(json.loads(with_engine.to_json()))
    assert back.engines == with_engine.engines
    assert back.to_dict()["engines"]["nvidia-h100-trt10.13.0/transformer"]["gpu"] == {
        "name": "NVIDIA H100", "compute_capability": [9, 0]}


def test_engine_keys_and_refusals():
    from qwen_image_edge.runtime.backends.tensorrt import engine_dir, engine_key, select_engine

    gpu = cuda.GpuInfo("NVIDIA H100 80GB HBM3", (9, 0))
    assert engine_dir(gpu, "10.13.0.35") == "engines/nvidia-h100-80gb-hbm3-trt10.13.0.35"
    assert engine_key(gpu, "10.13.0.35", "vae_decoder") == "nvidia-h100-80gb-hbm3-trt10.13.0.35/vae_decoder"
    graph = type("G", (), {"name": "transformer", "sha256": "cd" * 32})()
    m = type("M", (), {"engines": {"k": _engine(gpu_name=gpu.name)}})()
    assert select_engine(m, graph, gpu, "10.13.0").gpu_name == gpu.name
    for other_gpu, version in ((cuda.GpuInfo("NVIDIA L40S", (8, 9)), "10.13.0"),
                               (cuda.GpuInfo(gpu.name, (9, 1)), "10.13.0"), (gpu, "10.12.0")):
        with pytest.raises(BackendError) as err:
            select_engine(m, graph, other_gpu, version)
        msg = str(err.value)
        assert f"for {other_gpu} with TensorRT {version}" in msg  # what is needed
        assert "transformer for NVIDIA H100 80GB HBM3 (sm 9.0) with TensorRT 10.13.0" in msg  # what was found
    stale = type("G", (), {"name": "transformer", "sha256": "ee" * 32})()
    with pytest.raises(BackendError, match="rebuild it"):
        select_engine(m, stale, gpu, "10.13.0")


def test_missing_tensorrt_says_how_to_install(exported, monkeypatch):
    from qwen_image_edge.export.tensorrt import build_engines

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(BackendError, match=r"TensorRT is not installed.*pip install .*tensorrt"):
        make_backend("tensorrt")
    with pytest.raises(BackendError, match="pypi.nvidia.com"):
        build_engines(exported)


# ----------------------------------------------------------------------------- build (stand-in)


def test_build_calls_tensorrt_in_order_and_records_engines(export_copy, trt):
    from qwen_image_edge.export.tensorrt import build_engines

    req = BuildRanges(max_res=64, max_batch=2)
    built = build_engines(export_copy, ranges=req)
    m = load_manifest(export_copy)  # still a valid export, hashes included
    assert set(m.engines) == set(built) and len(built) == len(m.graphs)
    for key, e in m.engines.items():
        assert key == f"nvidia-stand-in-gpu-trt{trt.__version__}/{e.graph}"
        assert e.file == f"engines/nvidia-stand-in-gpu-trt{trt.__version__}/{e.graph}.plan"
        assert sha256_file(export_copy / e.file) == e.sha256
        assert e.graph_sha256 == m.graphs[e.graph].sha256
        assert (e.gpu_name, e.compute_capability, e.precision) == ("NVIDIA Stand-in GPU", (9, 0), Precision.FP32)
        assert e.dim_ranges == graph_ranges(m.graphs[e.graph], wanted_ranges(m, req))
    per_graph = " ".join(trt.CALLS).split("create_network")[1:]
    assert len(per_graph) == len(m.graphs)
    for calls in per_graph:
        order = [c for c in calls.split() if c in ("parse_from_file", "add_optimization_profile",
                                                    "create_timing_cache", "set_timing_cache",
                                                    "build_serialized_network")]
        assert order == ["parse_from_file", "add_optimization_profile", "create_timing_cache", "set_timing_cache",
                         "build_serialized_network"]
    assert not [p for p in export_copy.rglob(".*tmp*")]
    # the timing cache is saved, then loaded by the next build (which appends to it)
    cache = export_copy / f"engines/nvidia-stand-in-gpu-trt{trt.__version__}/timing.cache"
    assert json.loads(cache.read_bytes()[len(b"standin-timing-cache"):]) == [trt.__version__, list(m.graphs)]
    trt.CALLS.clear()
    build_engines(export_copy, ranges=req, precision=Precision.FP16)
    assert len(json.loads(cache.read_bytes()[len(b"standin-timing-cache"):])[1]) == 2 * len(m.graphs)
    lowered = {"text_encoder", "vision_encoder", "transformer", "transformer_prefill",
               "transformer_step"} & set(m.graphs)  # the VAE stays fp32
    assert trt.CALLS.count("set_flag:FP16") == len(lowered) >= 2
    m = load_manifest(export_copy)
    assert {e.graph: e.precision.value for e in m.engines.values()} == {
        g: "fp16" if g in lowered else "fp32" for g in m.graphs}


def test_parse_failure_names_the_node_and_writes_nothing(export_copy, trt):
    from qwen_image_edge.export.tensorrt import build_engines

    before = (export_copy / "manifest.json").read_bytes()
    trt.FAIL_PARSE = {"node": 17, "name": "/blocks.0/attn/Einsum", "op": "Einsum", "desc": "unsupported equation"}
    with pytest.raises(BackendError, match=r"node 17 '/blocks.0/attn/Einsum' \(Einsum\): unsupported equation"):
        build_engines(export_copy, graphs=["transformer"])
    assert (export_copy / "manifest.json").read_bytes() == before
    assert not list(export_copy.rglob("*.plan"))


def test_build_failure_is_reported_with_trt_log_and_keeps_earlier_engines(export_copy, trt):
    from qwen_image_edge.export.tensorrt import build_engines

    build_engines(export_copy, graphs=["vae_decoder"])
    trt.FAIL_BUILD = True
    with pytest.raises(BackendError, match="engine build failed.*injected build failure"):
        build_engines(export_copy, graphs=["transformer"])
    m = load_manifest(export_copy)
    assert [e.graph for e in m.engines.values()] == ["vae_decoder"]
    assert [p.name for p in export_copy.rglob("*.plan")] == ["vae_decoder.plan"]


def test_tensorrt_11_builds_strongly_typed_and_refuses_builder_fp16(export_copy, trt):
    from qwen_image_edge.export.tensorrt import build_engines

    trt.reset("11.4.0.106")
    with pytest.raises(ConfigError, match="AutoCast"):
        build_engines(export_copy, graphs=["transformer"], precision=Precision.FP16)
    built = build_engines(export_copy, graphs=["transformer"], weight_streaming=True)
    (e,) = built.values()
    assert e.strongly_typed and e.weight_streaming and e.tensorrt_version == "11.4.0.106"
    assert "set_flag:WEIGHT_STREAMING" in trt.CALLS


# ----------------------------------------------------------------------------- runtime (stand-in)


@pytest.fixture
def built(export_copy, trt):
    from qwen_image_edge.export.tensorrt import build_engines

    build_engines(export_copy, ranges=BuildRanges(max_res=64))
    return export_copy


def test_pipeline_on_standin_engines_equals_onnxruntime(built, trt):
    from qwen_image_edge.runtime.pipeline import Pipeline

    kw = dict(width=64, height=32, steps=2, seed=3, output="np")
    pipe = Pipeline.load(built, backend="tensorrt")
    ours = pipe.generate(["a red circle", "a blue square"], **kw)
    ref = Pipeline.load(built, threads=1).generate(["a red circle", "a blue square"], **kw)
    # the stand-in's engines run the same ONNX graphs in onnxruntime: only the data path differs
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    # one engine per graph the pipeline uses (the single transformer graph or the KV-cache pair)
    assert trt.CALLS.count("deserialize_cuda_engine") == len(pipe.sessions)


def test_engines_for_another_gpu_or_version_are_refused(built, trt, monkeypatch):
    from qwen_image_edge.runtime.pipeline import Pipeline

    monkeypatch.setitem(trt.GPU, "name", b"NVIDIA L4")
    with pytest.raises(BackendError, match=r"no TensorRT engine for NVIDIA L4 \(sm 9.0\).*Stand-in GPU"):
        Pipeline.load(built, backend="tensorrt")
    monkeypatch.setitem(trt.GPU, "name", b"NVIDIA Stand-in GPU")
    trt.reset("10.14.1.2")
    with pytest.raises(BackendError, match="with TensorRT 10.14.1.2; engines in this export"):
        Pipeline.load(built, backend="tensorrt")


def _session(built, graph, **kw):
    from qwen_image_edge.runtime.backends.tensorrt import TensorRTBackend

    m = load_manifest(built, verify_hashes=False)
    return TensorRTBackend(built, m, **kw).open(m.graphs[graph], built / m.graphs[graph].file), m


def _ort(built, m, graph, feeds):
    import onnxruntime

    s = onnxruntime.InferenceSession(str(built / m.graphs[graph].file), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)[0]


def test_buffers_are_allocated_once_per_shape_and_ranges_enforced(built, trt):
    sess, m = _session(built, "vae_decoder")
    rng = np.random.default_rng(0)
    z = rng.standard_normal((1, 64, 2, 4), dtype=np.float32)
    out = sess.run({"latents": z})["image"]
    np.testing.assert_allclose(out, _ort(built, m, "vae_decoder", {"latents": z}), atol=1e-6)
    mallocs, shapes = trt.CUDART.calls.count("cudaMalloc"), trt.CALLS.count("set_input_shape")
    sess.run({"latents": 2 * z})
    assert (trt.CUDART.calls.count("cudaMalloc"), trt.CALLS.count("set_input_shape")) == (mallocs, shapes)
    sess.run({"latents": rng.standard_normal((1, 64, 4, 4), dtype=np.float32)})  # new shape: set, grow
    assert trt.CALLS.count("set_input_shape") == shapes + 1
    with pytest.raises(ShapeError, match=r"h=8 is outside the exported range \[2, 4\]"):  # engine built to 64 px
        sess.run({"latents": np.zeros((1, 64, 8, 8), np.float32)})
    sess.close()


def test_cuda_graph_replays_with_fresh_inputs(built, trt):
    sess, m = _session(built, "vae_decoder", cuda_graph=True)
    rng = np.random.default_rng(1)
    for _ in range(3):
        z = rng.standard_normal((1, 64, 4, 2), dtype=np.float32)
        np.testing.assert_allclose(sess.run({"latents": z})["image"], _ort(built, m, "vae_decoder", {"latents": z}),
                                   atol=1e-6)
    assert trt.CUDART.calls.count("cudaGraphLaunch") == 2 and trt.CUDART.calls.count("cudaStreamBeginCapture") == 1


def test_device_path_keeps_latents_on_the_device(built, trt):
    enc, m = _session(built, "vae_encoder")
    dec, _ = _session(built, "vae_decoder")
    img = np.random.default_rng(2).uniform(-1, 1, (1, 4, 64, 32)).astype(np.float32)
    latents = enc.run_device({"image": img})["latents"]
    assert latents.shape == (1, 64, 4, 2)
    copies = trt.CUDART.calls.count("cudaMemcpyAsync:cudaMemcpyHostToDevice")
    image = dec.run_device({"latents": latents})["image"]  # bound by address: no host round trip
    assert trt.CUDART.calls.count("cudaMemcpyAsync:cudaMemcpyHostToDevice") == copies
    expected = _ort(built, m, "vae_decoder", {"latents": _ort(built, m, "vae_encoder", {"image": img})})
    np.testing.assert_allclose(dec.to_host(image), expected, atol=1e-5)


def test_one_session_is_safe_across_threads(built, trt):
    sess, m = _session(built, "vae_decoder")
    inputs = [np.random.default_rng(i).standard_normal((1, 64, 2 + i % 2, 2), dtype=np.float32) for i in range(6)]
    results = [None] * len(inputs)

    def work(i):
        results[i] = sess.run({"latents": inputs[i]})["image"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for z, out in zip(inputs, results):
        np.testing.assert_allclose(out, _ort(built, m, "vae_decoder", {"latents": z}), atol=1e-6)


def test_weight_streaming_budget_is_set_before_the_context(export_copy, trt):
    from qwen_image_edge.export.tensorrt import build_engines

    build_engines(export_copy, graphs=["vae_decoder"], weight_streaming=True)
    sess, _ = _session(export_copy, "vae_decoder", weight_streaming_budget=0.5)
    assert sess.engine.weight_streaming_budget_v2 == (1 << 20) // 2
    assert trt.CALLS.index("weight_streaming_budget_v2") < trt.CALLS.index("create_execution_context")


def test_cli_build(export_copy, trt, capsys):
    from qwen_image_edge.cli import main

    assert main(["build", str(export_copy), "--graphs", "vae_decoder", "--max-res", "64"]) == 0
    assert "vae_decoder: engines/nvidia-stand-in-gpu-trt" in capsys.readouterr().out
    assert main(["build", str(export_copy), "--max-res", "512"]) == 2
    assert "outside the exported range" in capsys.readouterr().err


# ----------------------------------------------------------------------------- what the stand-in enforces


def test_standin_rounding_is_round_to_nearest_even(trt):
    ml_dtypes = pytest.importorskip("ml_dtypes")  # an independent bf16 conversion (onnx depends on it)

    one = np.float32(1)
    x = np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11, -2.5e-9, 65520, 3.4e38, np.inf, np.nan,
                  *np.random.default_rng(0).standard_normal(1000) * 10.0 ** np.arange(-20, 30, 0.05)], np.float32)
    np.testing.assert_array_equal(trt.round_to(x, "BF16"), x.astype(ml_dtypes.bfloat16).astype(np.float32))
    with np.errstate(over="ignore"):  # beyond fp16's 65504: inf, as TensorRT's fp16 layers give
        np.testing.assert_array_equal(trt.round_to(x, "FP16"), x.astype(np.float16).astype(np.float32))
    # ties go to the even neighbour: 1 + 2^-8 is halfway between bf16's 1 and 1 + 2^-7
    assert trt.round_to(x[:2], "BF16").tolist() == [one, 1 + 2**-6]
    assert trt.round_to(x[2:4], "FP16").tolist() == [one, 1 + 2**-9]
    assert trt.round_to(np.arange(3), "FP16").dtype == np.int64  # only float32 tensors are lowered


@pytest.mark.parametrize("precision, unit", [(Precision.FP16, 2.0**-11), (Precision.BF16, 2.0**-8)])
def test_fp16_and_bf16_engines_compute_in_reduced_precision(export_copy, trt, precision, unit):
    import onnx

    from qwen_image_edge.export.tensorrt import build_engines

    build_engines(export_copy, graphs=["vae_decoder"], ranges=BuildRanges(max_res=64), precision=precision,
                  precision_graphs=["vae_decoder"])
    sess, m = _session(export_copy, "vae_decoder")
    z = np.random.default_rng(0).standard_normal((1, 64, 2, 4), dtype=np.float32)
    out, ref = sess.run({"latents": z})["image"], _ort(export_copy, m, "vae_decoder", {"latents": z})
    np.testing.assert_array_equal(trt.round_to(out, precision.name), out)  # the output layer ran in fp16 / bf16
    # The fp32 engines' atol=1e-6 would fail here. Bound: rounding to nearest perturbs each rounded
    # tensor (the input, each Conv/MatMul weight, the output: n of them) by a relative error <= unit
    # (fp16 2^-11, bf16 2^-8); independent errors through the normalised blocks add in quadrature:
    # |out - ref| / |ref| <= sqrt(n) * unit, n = 38 here: fp16 3.0e-3, bf16 2.4e-2.
    graph = onnx.load(export_copy / m.graphs["vae_decoder"].file).graph
    n = 2 + sum(node.op_type in ("Conv", "MatMul", "Gemm") for node in graph.node)
    assert np.abs(out - ref).max() > 1e-6
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) <= np.sqrt(n) * unit


def test_fp16_standin_engines_pass_the_real_tests_bound(export_copy, trt):
    ours, ref, psnr = _fp16_pipeline_vs_onnxruntime(export_copy, trt)
    assert np.abs(ours - ref).max() > 1e-6  # rounded: the stand-in's fp32 comparisons (atol 1e-6) would fail
    assert psnr >= 35.0, f"PSNR {psnr:.1f} dB vs onnxruntime"


def test_device_memory_starts_as_garbage_and_reading_it_is_caught(built, trt, monkeypatch):
    buf = cuda.DeviceBuffer(64)
    assert np.isnan(trt.CUDART.read(buf.ptr, (16,), np.dtype(np.float32))).all()
    assert (trt.CUDART.read(buf.ptr, (8,), np.dtype(np.int64)) == -1).all()
    stream, host = cuda.Stream(), np.zeros(16, np.float32)
    cuda.copy_to_host(host, buf.ptr, stream)
    with pytest.raises(trt.MisuseError, match="reads 64 of 64 bytes .* that nothing wrote"):
        stream.synchronize()
    # through the backend: an input never uploaded (zeros, which zero-filled memory would have hidden)
    sess, _ = _session(built, "vae_decoder")
    monkeypatch.setattr(cuda, "copy_to_device", lambda dst, src, stream: None)
    with pytest.raises(trt.MisuseError, match="execute input 'latents': reads 1024 of 1024 bytes"):
        sess.run({"latents": np.zeros((1, 64, 2, 2), np.float32)})


def test_aliased_input_and_output_are_refused(built, trt):
    from qwen_image_edge.runtime.backends.tensorrt import DeviceArray

    sess, _ = _session(built, "vae_decoder")
    z = np.random.default_rng(0).standard_normal((1, 64, 2, 2), dtype=np.float32)
    image = sess.run_device({"latents": z})["image"]
    # TensorRT itself (the stand-in's enqueue): an input bound inside the output buffer
    assert sess.context.set_tensor_address("latents", image.ptr)
    assert sess.context.execute_async_v3(sess.stream.handle) is False
    assert "output 'image'" in sess._logger.errors[-1] and "overlaps 'latents'" in sess._logger.errors[-1]
    # the backend refuses it before TensorRT sees it (real TensorRT does not check)
    with pytest.raises(BackendError, match="input 'latents' lies in this session's output 'image'"):
        sess.run_device({"latents": DeviceArray(image.ptr, z.shape, "float32")})


def test_free_while_queued_and_use_after_free_are_caught(built, trt):
    stream, buf = cuda.Stream(), cuda.DeviceBuffer(256)
    cuda.copy_to_device(buf.ptr, np.ones(64, np.float32), stream)
    with pytest.raises(trt.MisuseError, match="while queued work still uses it"):
        buf.free()
    stream.synchronize()
    ptr = buf.ptr
    buf.free()
    with pytest.raises(trt.MisuseError, match="use after cudaFree"):
        cuda.copy_to_host(np.empty(64, np.float32), ptr, stream)
    # through the backend: a kept output whose owner was freed, then fed to the next graph
    enc, _ = _session(built, "vae_encoder")
    dec, _ = _session(built, "vae_decoder")
    img = np.random.default_rng(2).uniform(-1, 1, (1, 4, 64, 32)).astype(np.float32)
    latents, owner = enc.run_kept({"image": img}, "latents")
    owner.free()
    with pytest.raises(trt.MisuseError, match=r"latents: 0x[0-9a-f]+ is in device memory that was freed"):
        dec.run_device({"latents": latents})


def test_a_failed_enqueue_leaves_nothing_queued_on_freed_buffers(built, trt):
    sess, m = _session(built, "vae_decoder")
    rng = np.random.default_rng(3)
    sess.context.execute_async_v3 = lambda stream: False  # TensorRT refuses the enqueue after the upload
    with pytest.raises(BackendError, match="execute_async_v3 failed"):
        sess.run({"latents": rng.standard_normal((1, 64, 2, 2), dtype=np.float32)})
    del sess.context.execute_async_v3
    z = rng.standard_normal((1, 64, 4, 4), dtype=np.float32)  # a larger shape: the buffers are reallocated
    np.testing.assert_allclose(sess.run({"latents": z})["image"], _ort(built, m, "vae_decoder", {"latents": z}),
                               atol=1e-6)
    sess.context.execute_async_v3 = lambda stream: False
    with pytest.raises(BackendError, match="execute_async_v3 failed"):
        sess.run({"latents": z})
    sess.close()  # frees the buffers the refused call's upload still targets
    assert not any(trt.CUDART.streams.values()) and not trt.CUDART.memory


def _with_qdq(export_dir: Path, graph: str, precision: Precision) -> None:
    """Quantize-dequantize ``graph``'s input (int8 or fp8, as modelopt places activation Q/DQ) and
    record the graph as ``precision`` in the manifest."""
    import onnx
    from onnx import TensorProto, helper

    from qwen_image_edge.export.manifest_writer import write_text_atomic

    m = load_manifest(export_dir)
    spec = m.graphs[graph]
    model = onnx.load(export_dir / spec.file)
    x = spec.inputs[0].name
    for node in model.graph.node:
        node.input[:] = [f"{x}_dq" if i == x else i for i in node.input]
    zero = TensorProto.INT8 if precision is Precision.INT8 else TensorProto.FLOAT8E4M3FN
    model.graph.initializer.extend([helper.make_tensor("qdq_scale", TensorProto.FLOAT, [], [0.05]),
                                    helper.make_tensor("qdq_zero", zero, [], [0])])
    model.graph.node.insert(0, helper.make_node("QuantizeLinear", [x, "qdq_scale", "qdq_zero"], [f"{x}_q"]))
    model.graph.node.insert(1, helper.make_node("DequantizeLinear", [f"{x}_q", "qdq_scale", "qdq_zero"], [f"{x}_dq"]))
    onnx.save(model, export_dir / spec.file)
    spec = dataclasses.replace(spec, sha256=sha256_file(export_dir / spec.file), precision=precision)
    write_text_atomic(export_dir / MANIFEST_NAME, dataclasses.replace(m, graphs={**m.graphs, graph: spec}).to_json())


@pytest.mark.parametrize("precision", [Precision.INT8, Precision.FP8])
def test_qdq_graphs_build_strongly_typed_only(export_copy, trt, precision):
    from qwen_image_edge.export.tensorrt import NetworkMode, build_engine, build_engines

    _with_qdq(export_copy, "vae_decoder", precision)
    m = load_manifest(export_copy)
    spec, ranges = m.graphs["vae_decoder"], graph_ranges(m.graphs["vae_decoder"], wanted_ranges(m, BuildRanges()))
    for flags in ((), (precision.name,)):  # weakly typed, with or without the (deprecated) precision flag
        with pytest.raises(BackendError, match=r"engine build failed.*QuantizeLinear/DequantizeLinear.*weakly typed"):
            build_engine(trt, export_copy / spec.file, spec, ranges, NetworkMode(False, flags, precision))
    trt.CALLS.clear()
    (e,) = build_engines(export_copy, graphs=["vae_decoder"], ranges=BuildRanges(max_res=64)).values()
    assert e.strongly_typed and e.precision is precision and "set_flag" not in " ".join(trt.CALLS)
    if precision is Precision.INT8:  # the engine runs what the Q/DQ graph computes, unrounded
        sess, _ = _session(export_copy, "vae_decoder")
        z = np.random.default_rng(4).standard_normal((1, 64, 2, 4), dtype=np.float32)
        np.testing.assert_allclose(sess.run({"latents": z})["image"], _ort(export_copy, m, "vae_decoder",
                                                                            {"latents": z}), atol=1e-6)


# ----------------------------------------------------------------------------- real TensorRT


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not real_trt_and_gpu(), reason="needs TensorRT and a CUDA GPU")
def test_real_engines_match_onnxruntime(export_copy):
    import tensorrt

    _, _, psnr = _fp16_pipeline_vs_onnxruntime(export_copy, tensorrt)
    assert psnr >= 35.0, f"PSNR {psnr:.1f} dB vs onnxruntime"


def _fp16_pipeline_vs_onnxruntime(export_dir, tensorrt):
    """Engines built fp16 where TensorRT can (10.x), a pipeline run on them and on onnxruntime: (ours, ref, PSNR)."""
    from qwen_image_edge.export.tensorrt import build_engines
    from qwen_image_edge.runtime.pipeline import Pipeline

    fp16 = int(tensorrt.__version__.split(".")[0]) < 11  # 11.x has no builder-level fp16 (see qwen_image_edge.export.tensorrt)
    build_engines(export_dir, ranges=BuildRanges(max_res=64), precision=Precision.FP16 if fp16 else None)
    kw = dict(width=64, height=64, steps=3, seed=0, output="np")
    ours = Pipeline.load(export_dir, backend="tensorrt").generate("a red circle on the left", **kw)
    ref = Pipeline.load(export_dir, threads=1).generate("a red circle on the left", **kw)
    mse = float(np.mean((ours.astype(np.float64) - ref) ** 2))
    return ours, ref, 10 * np.log10(1.0 / max(mse, 1e-20))  # pixels in [0, 1]
