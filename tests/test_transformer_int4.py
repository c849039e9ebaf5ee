"""The transformer in 4-bit weight-only (calib/policy.py Int4Policy, calib/quantize.py, export/int4.py).

On the tiny model: modelopt's block-wise INT4 with AWQ-lite, calibrated through the pipeline
(2 prompts x 2 steps), exported as int4 codes through opset-21 blocked ``DequantizeLinear``, the
single graph and the KV-cache pair; each graph computes what the fake-quantized module computes.
Bad requests (int4 on the VAE, the lean streaming path) are one line and write nothing.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("modelopt.torch.quantization")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from qwen_image2_ref.model_folder import load_model  # noqa: E402
from qwen_image_edge.calib.collect import CalibrationSettings  # noqa: E402
from qwen_image_edge.calib.component_export import quantize_components  # noqa: E402
from qwen_image_edge.calib.components import parse_component_policy  # noqa: E402
from qwen_image_edge.calib.encoder_quant import block_size_for  # noqa: E402
from qwen_image_edge.calib.policy import Int4Policy  # noqa: E402
from qwen_image_edge.calib.quantize import quantize_transformer  # noqa: E402
from qwen_image_edge.export.int4 import export_int4_transformer, round_rest_to_half  # noqa: E402
from qwen_image_edge.export.registry import example_inputs, wrap  # noqa: E402
from qwen_image_edge.runtime.errors import ConfigError  # noqa: E402
from qwen_image_edge.runtime.manifest import Precision  # noqa: E402

PROMPTS = ["a red cat on a mat", "a small house by the sea"]
SETTINGS = CalibrationSettings(batch_size=2, steps=2)
GRAPHS = ("transformer", "transformer_prefill", "transformer_step")


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def int4(model):
    return quantize_transformer(model, Int4Policy(), PROMPTS, SETTINGS, progress=False)


@pytest.fixture(scope="module")
def graphs(model, int4, tmp_path_factory):
    out = tmp_path_factory.mktemp("int4-transformer")
    return {name: (export_int4_transformer(int4, model.config, out, 64, name), out) for name in GRAPHS}


def _session(path):
    options = ort.SessionOptions()  # fp32 activations in onnxruntime's int4 kernel: the simulation's math
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_weights_are_int4_blocks_the_rest_untouched(int4):
    assert int4.layers and int4.summary["method"].startswith("int4 weight-only")
    for name, module in int4.module.named_modules():
        if not hasattr(module, "weight_quantizer"):
            continue
        wq, iq = module.weight_quantizer, module.input_quantizer
        if name in int4.layers:
            assert wq.is_enabled and wq.num_bits == 4
            assert wq.block_sizes[-1] == block_size_for(Int4Policy(), module.in_features)
            assert not iq.is_enabled  # weight-only: activations stay float
        else:
            assert not wq.is_enabled  # embedders, modulation, output projection kept


@pytest.mark.parametrize("name", GRAPHS)
def test_graph_is_int4_blocked_dequantize_and_computes_the_module(graphs, int4, model, name):
    """Exact up to fp32 summation order (the stand-in holds the same codes * scales products and the
    same fp16-rounded weights elsewhere; measured below 1e-6 relative on the tiny model); bound 1e-5,
    as the text encoder's int4 graph."""
    spec, out = graphs[name]
    graph = onnx.load(str(out / spec.file))
    onnx.checker.check_model(graph)
    assert spec.precision is Precision.INT4
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 21
    int4_inits = {i.name for i in graph.graph.initializer if i.data_type == onnx.TensorProto.INT4}
    dq = [n for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int4_inits]
    assert len(dq) == len(int4_inits) > 0
    assert len(dq) == len(int4.layers) if name == "transformer" else len(dq) <= len(int4.layers)
    assert all({a.name for a in n.attribute} == {"axis", "block_size"} for n in dq)
    # the linears left unquantized are stored as fp16 weights widened by a Cast
    halves = {i.name for i in graph.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    casts = [n for n in graph.graph.node if n.op_type == "Cast" and n.input[0] in halves]
    assert halves and len(casts) == len(halves)
    fp32 = {i.name for i in graph.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert not [n.input[1] for n in graph.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in fp32]
    inputs = example_inputs(name, model.config)
    reference = copy.deepcopy(int4.module)
    round_rest_to_half(reference, int4.layers)  # what the graph stores: the same products exactly
    with torch.no_grad():
        ref = wrap(name, reference)(*inputs)
    ref = ref if isinstance(ref, tuple | list) else (ref,)
    got = _session(out / spec.file).run(None, {t.name: a.numpy() for t, a in zip(spec.inputs, inputs)})
    for r, g in zip(ref, got):
        r = r.numpy()
        assert np.linalg.norm(g - r) / np.linalg.norm(r) < 1e-5


def test_int4_on_the_vae_is_one_line_and_writes_nothing(tmp_path):
    with pytest.raises(ConfigError, match="the vae cannot take int4") as err:
        quantize_components("demo", "transformer=int4,vae=int4", tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_lean_int4_is_one_line_and_writes_nothing(tmp_path):
    assert parse_component_policy("transformer=int4").transformer is Precision.INT4
    with pytest.raises(ConfigError, match="--lean") as err:
        quantize_components("demo", "transformer=int4", tmp_path / "out", lean=True)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_bad_int4_policy_is_one_line():
    with pytest.raises(ConfigError, match="power of two") as err:
        Int4Policy(block_size=48)
    assert "\n" not in str(err.value)


def test_footprint_projects_int4_with_the_full_size_blocks():
    """The demo's narrow layers clip their blocks to two per row (more scales per weight); the
    projection charges the measured bytes per code and per scale at the full-size block count."""
    from bench.footprint import projected

    rate = {"quantized": 0.5 + 4 / 32, "blocked": True, "codes": 0.5, "scale": 4.0, "rest": 4.0}
    params = {"quantizable": 3072 * 12288, "blocks": 3072 * 12288 // 128, "all": 3072 * 12288 + 1000}
    assert projected(params, rate) == 3072 * 12288 * 0.5 + 3072 * 12288 // 128 * 4 + 1000 * 4


def test_int4_policy_file_sets_blocks_awq_and_keeps(tmp_path):
    """``quantize --policy FILE`` with ``"precision": "int4"`` is read as the INT4 policy (blocks, AWQ
    and kept blocks), not just its layer selection; a plain QuantPolicy file keeps only the selection."""
    from qwen_image_edge.calib.component_export import _transformer_policy

    path = tmp_path / "int4.json"
    path.write_text('{"precision": "int4", "block_size": 32, "awq": false, "keep_last": 1}')
    policy = _transformer_policy(str(path), Precision.INT4)
    assert (policy.block_size, policy.awq, policy.keep_last) == (32, False, 1)
    selection = tmp_path / "int8.json"
    selection.write_text('{"precision": "int8", "keep_first": 1}')
    policy = _transformer_policy(str(selection), Precision.INT4)
    assert (policy.block_size, policy.awq, policy.keep_first) == (32, True, 1)
    assert _transformer_policy(Int4Policy(block_size=128), Precision.INT4).block_size == 128


def test_bad_int4_policy_file_is_one_line(tmp_path):
    from qwen_image_edge.calib.component_export import _transformer_policy

    path = tmp_path / "int4.json"
    path.write_text('{"precision": "int4", "block": 32}')
    with pytest.raises(ConfigError, match=r"int4 policy keys \['block'\]") as err:
        _transformer_policy(str(path), Precision.INT4)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="int4 policy given for a fp8 transformer"):
        _transformer_policy(Int4Policy(), Precision.FP8)


def test_the_edge_preset_writes_int4_graphs_that_run_in_both_memory_modes(tiny_model_dir, tmp_path):
    """``--precision edge`` end to end on the tiny model: the transformer graphs int4 (with their other
    linears fp16), the text encoder int4, the vision tower and VAE fp16; the runtime loads the mixed
    manifest and the staged (low-memory) pipeline gives the default's image."""
    from qwen_image_edge.runtime.manifest import load_manifest
    from qwen_image_edge.runtime.pipeline import Pipeline

    out = tmp_path / "edge"
    quantize_components(tiny_model_dir, "edge", out, calib_size=2, settings=SETTINGS, max_resolution=64,
                        progress=False, gate=False)
    manifest = load_manifest(out)
    want = {"transformer": Precision.INT4, "transformer_prefill": Precision.INT4, "transformer_step": Precision.INT4,
            "text_encoder": Precision.INT4, "vision_encoder": Precision.FP16, "vae_decoder": Precision.FP16}
    assert {n: manifest.graph(n).precision for n in want} == want
    graph = onnx.load(str(out / manifest.graph("transformer").file))
    types = {i.data_type for i in graph.graph.initializer}
    assert onnx.TensorProto.INT4 in types and onnx.TensorProto.FLOAT16 in types
    default = Pipeline.load(out, threads=1).generate("a red cat", steps=2, seed=0, output="np")
    low = Pipeline.load(out, threads=1, memory="low").generate("a red cat", steps=2, seed=0, output="np")
    assert np.isfinite(default).all() and default.std() > 0
    np.testing.assert_array_equal(low, default)
