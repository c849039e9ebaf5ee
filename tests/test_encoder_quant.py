"""Condition-encoder quantization (calib/encoder_quant.py, export/encoder_qdq.py) on the demo encoder.

The demo encoder is random and frozen: it has none of a trained LLM's outlier channels, so every
method looks safe on it. Here it gets them (``add_outlier_channels``: three channels 60-100x, the
fp32 function unchanged), and the comparisons are measured in the test: SmoothQuant INT8 and AWQ
INT4 keep the hidden states' cosine >= 0.99 against fp32 over the calibration prompts, where naive
per-tensor INT8 (and round-to-nearest INT4, against AWQ) fall below it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("modelopt.torch.quantization")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from qwen_image2_ref.model_folder import load_model  # noqa: E402
from qwen_image_edge.calib.encoder_quant import (  # noqa: E402
    STRESS_OUTLIERS,
    EncoderQuantPolicy,
    add_outlier_channels,
    graph_inputs,
    hidden_state_cosines,
    quantize_text_encoder,
)
from qwen_image_edge.calib.prompts import load_prompts  # noqa: E402
from qwen_image_edge.export.encoder_qdq import export_quantized_text_encoder  # noqa: E402
from qwen_image_edge.export.graphs import TextEncoderGraph  # noqa: E402
from qwen_image_edge.runtime.errors import ConfigError  # noqa: E402
from qwen_image_edge.runtime.manifest import Precision  # noqa: E402

OUTLIERS = STRESS_OUTLIERS  # three channels 60-100x
CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def prompts():
    return load_prompts("demo", 32)  # the calibration set the demo model's quantize uses


@pytest.fixture(scope="module")
def model():
    m = load_model("demo")
    add_outlier_channels(m.encoder.model, *OUTLIERS)
    return m


@pytest.fixture(scope="module")
def quantized(model, prompts):
    policies = {"smoothquant": EncoderQuantPolicy(), "naive": EncoderQuantPolicy.naive(),
                "awq": EncoderQuantPolicy("int4", block_size=32),
                "rtn": EncoderQuantPolicy("int4", block_size=32, awq=False)}
    return {k: quantize_text_encoder(model, p, prompts, progress=False) for k, p in policies.items()}


@pytest.fixture(scope="module")
def cosines(model, quantized, prompts):
    return {k: hidden_state_cosines(model, q.module, prompts) for k, q in quantized.items()}


def _linear_inputs(qwen, args) -> dict[str, torch.Tensor]:
    """Per-channel abs max of the input of every q_proj and gate_proj."""
    seen = {}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].abs().flatten(0, -2).amax(0)))
               for n, m in qwen.named_modules() if n.endswith(("q_proj", "gate_proj"))]
    try:
        with torch.no_grad():
            out = TextEncoderGraph(qwen)(*args)
    finally:
        for h in handles:
            h.remove()
    return seen, out


def test_outlier_channels_keep_the_fp32_function(prompts):
    plain, stressed = load_model("demo"), load_model("demo")
    add_outlier_channels(stressed.encoder.model, *OUTLIERS)
    args = graph_inputs(plain, prompts[:8])
    before, ref = _linear_inputs(plain.encoder.model, args)
    after, got = _linear_inputs(stressed.encoder.model, args)
    valid = args[1].bool()
    rel = float((got - ref)[valid].norm() / ref[valid].norm())
    assert rel < 1e-5  # fp32 rounding of the rescaled weights only
    channels, factors = (list(v) for v in OUTLIERS)
    for name, amax in after.items():
        ratio = (amax[channels] / before[name][channels]).numpy()
        np.testing.assert_allclose(ratio, factors, rtol=1e-3)  # the outliers are exactly where injected
        assert float(amax[channels].min() / amax.median()) > 20  # and far above the typical channel


def test_smoothquant_int8_holds_where_naive_per_tensor_fails(cosines):
    sq, naive = cosines["smoothquant"], cosines["naive"]
    assert sq.min() >= 0.99
    assert naive.min() < 0.99 and naive.mean() < sq.mean()


def test_awq_int4_holds_and_beats_round_to_nearest(cosines):
    awq, rtn = cosines["awq"], cosines["rtn"]
    assert awq.min() >= 0.99
    assert rtn.mean() < awq.mean()


def test_without_outliers_every_int8_method_is_fine(prompts):
    """The trap the issue names: on the random encoder alone, naive INT8 looks as good as SmoothQuant."""
    plain = load_model("demo")
    naive = quantize_text_encoder(plain, EncoderQuantPolicy.naive(), prompts, progress=False)
    assert hidden_state_cosines(plain, naive.module, prompts).min() >= 0.99


def _session(path, accuracy_level: int | None = None):
    options = ort.SessionOptions()
    if accuracy_level is not None:  # MatMulNBits' activation precision (4: int8 activations, ORT's CPU default)
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    return ort.InferenceSession(str(path), options, providers=CPU)


def _rel(model, spec, session, module, prompts) -> float:
    args = graph_inputs(model, prompts)
    feeds = {t.name: a.numpy() for t, a in zip(spec.inputs, args)}
    got = session.run(None, feeds)[0]
    with torch.no_grad():
        ref = module(*args).numpy()
    valid = args[1].numpy().astype(bool)
    return float(np.linalg.norm(got[valid] - ref[valid]) / np.linalg.norm(ref[valid]))


def test_int8_export_is_standard_qdq_and_computes_the_simulation(model, quantized, prompts, tmp_path):
    q = quantized["smoothquant"]
    spec = export_quantized_text_encoder(q, model.config, tmp_path, 128)
    path = tmp_path / spec.file
    graph = onnx.load(str(path))
    assert spec.precision is Precision.INT8
    assert not [n for n in graph.graph.node if n.domain not in ("", "ai.onnx")]
    int8 = [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert len(int8) == len(q.layers) + 1  # every weight and the embedding table (int8 rows) as 1 byte
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Mul"} <= ops
    for batch in (prompts[:1], prompts[4:9]):  # two batch sizes, two lengths
        assert _rel(model, spec, _session(path), q.module, batch) < 1e-5


def test_int4_export_is_blockwise_dequantize_linear_in_opset_21(model, quantized, prompts, tmp_path):
    q = quantized["awq"]
    spec = export_quantized_text_encoder(q, model.config, tmp_path, 128)
    path = tmp_path / spec.file
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert spec.precision is Precision.INT4
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 21
    int4 = {i.name: i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.INT4}
    assert len(int4) == len(q.layers)
    for t in int4.values():  # two codes per byte
        assert len(t.raw_data) == int(np.prod(t.dims)) // 2
    dq = [n for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int4]
    assert len(dq) == len(q.layers)
    for node in dq:
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs == {"axis": 0, "block_size": 32}
    floats = {i.name for i in graph.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    matmuls = [n for n in graph.graph.node if n.op_type == "MatMul"]
    assert matmuls and not [n.name for n in matmuls if n.input[1] in floats]  # no fp32 weight left
    for batch in (prompts[:1], prompts[4:9]):
        # the graph itself: exactly the simulation (fp32 activations)
        assert _rel(model, spec, _session(path, accuracy_level=0), q.module, batch) < 1e-5
        # onnxruntime's default CPU kernel quantizes activations to int8 per block: ~u8 rounding, 0.6 %
        assert _rel(model, spec, _session(path), q.module, batch) < 2e-2


@pytest.mark.parametrize("kwargs, match", [
    ({"precision": "fp8"}, "expected one of"),
    ({"precision": "int4", "block_size": 48}, "power of two"),
    ({"smoothquant_alpha": 1.5}, "smoothquant_alpha"),
])
def test_bad_policy_is_one_line(kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        EncoderQuantPolicy(**kwargs)
    assert "\n" not in str(err.value)


def test_calibration_batches_carry_condition_images(model, prompts):
    """With condition images, a second pass feeds the graph's visual rows (the vision path)."""
    from qwen_image_edge.calib.encoder_quant import calibration_batches, demo_condition_images

    batches = calibration_batches(model, prompts[:16], 8, demo_condition_images(2))
    assert len(batches) == 4
    for args in batches[:2]:
        assert args[3].shape[0] == 0 and int(args[5].max()) == 0  # text only
    for args in batches[2:]:
        n_vis = args[3].shape[0]
        assert n_vis > 0 and int(args[5].max()) == n_vis and args[4].shape[1] == n_vis
        assert torch.isfinite(TextEncoderGraph(model.encoder.model)(*args)).all()
