"""modelopt INT8 / FP8 quantization of the tiny model, exported as standard QDQ ONNX and run in onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("modelopt.torch.quantization")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from calib.collect import CalibrationSettings  # noqa: E402
from calib.policy import QuantPolicy  # noqa: E402
from calib.quantize import quantize_model, quantize_transformer  # noqa: E402
from export.quantized import export_quantized  # noqa: E402
from qwen_image2_ref.model_folder import load_model  # noqa: E402
from qwen_image2_ref.pipeline import QwenImagePipeline  # noqa: E402
from runtime.errors import ConfigError, InputError  # noqa: E402
from runtime.manifest import Precision, load_manifest  # noqa: E402
from tests.tiny_model import build_tiny_model  # noqa: E402

PROMPTS = ["a red cat on a mat", "a small house by the sea"]
SETTINGS = CalibrationSettings(batch_size=2, steps=2)
INPUT_NAMES = ("latents", "text_states", "timestep", "cond_latents", "prefix_index", "rope_cos", "rope_sin",
                "attn_mask")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    _, path = build_tiny_model(root)
    return root, load_model(path)


@pytest.fixture(scope="module")
def int8(tiny):
    """INT8 SmoothQuant with block 0 kept in fp32 (an excluded block to check), exported."""
    root, model = tiny
    policy = QuantPolicy(precision="int8", keep_first=1)
    q = quantize_transformer(model, policy, PROMPTS, SETTINGS, progress=False)
    manifest = export_quantized(model, q, root / "int8", graphs=["transformer", "vae_decoder"])
    return q, root / "int8", manifest


@pytest.fixture(scope="module")
def fp8(tiny):
    root, model = tiny
    q = quantize_transformer(model, QuantPolicy(precision="fp8"), PROMPTS, SETTINGS, progress=False)
    manifest = export_quantized(model, q, root / "fp8", graphs=["transformer"])
    return q, root / "fp8", manifest


def _qdq_layers(path) -> tuple[onnx.ModelProto, dict[str, onnx.NodeProto], dict]:
    """The graph, and for every MatMul whose weight comes through a DequantizeLinear the layer name."""
    model = onnx.load(str(path / "transformer" / "model.onnx"))
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    layers = {}
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        w = producer.get(node.input[1])
        if w is not None and w.op_type == "DequantizeLinear" and w.input[0] in inits:
            name = w.input[0].removeprefix("transformer.").removesuffix(".weight_quantized")
            layers[name] = node
    return model, layers, (producer, inits)


@pytest.mark.parametrize("which", ["int8", "fp8"])
def test_qdq_graph_has_the_policy_layers_and_nothing_else(which, request) -> None:
    q, path, _ = request.getfixturevalue(which)
    model, layers, (producer, inits) = _qdq_layers(path)
    assert set(layers) == set(q.layers)
    ops = [n.op_type for n in model.graph.node]
    n = len(q.layers)
    assert ops.count("QuantizeLinear") == n  # activations only: weights are stored quantized
    assert ops.count("DequantizeLinear") == 2 * n
    assert not any(node.domain not in ("", "ai.onnx") for node in model.graph.node)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    want = onnx.TensorProto.INT8 if which == "int8" else onnx.TensorProto.FLOAT8E4M3FN
    for matmul in layers.values():
        dq_w = producer[matmul.input[1]]  # weight DQ feeds the MatMul directly: no Transpose between
        weight = inits[dq_w.input[0]]
        assert weight.data_type == want
        assert producer[dq_w.input[1]].op_type == "Constant" or dq_w.input[1] in inits
        dq_x = producer[matmul.input[0]]
        assert dq_x.op_type == "DequantizeLinear" and producer[dq_x.input[0]].op_type == "QuantizeLinear"
        assert list(weight.dims)[0] != 0
    # every other MatMul (excluded layers, attention) has no Q/DQ on either side
    for node in model.graph.node:
        if node.op_type == "MatMul" and node not in layers.values():
            assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in node.input)
    blocks = (1,) if which == "int8" else (0, 1)  # int8 keeps block 0 in fp32 (keep_first=1)
    per_block = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.proj", "img_mlp.gate_layer",
                 "img_mlp.out")
    assert set(layers) == {f"transformer_blocks.{b}.{n}" for b in blocks for n in per_block}


def test_int8_weights_are_stored_pre_transposed_and_small(int8) -> None:
    q, path, manifest = int8
    model, layers, (producer, inits) = _qdq_layers(path)
    assert manifest.graphs["transformer"].precision is Precision.INT8
    assert manifest.graphs["vae_decoder"].precision is Precision.FP32
    for name, matmul in layers.items():
        dq = producer[matmul.input[1]]
        w = inits[dq.input[0]]
        linear = q.module.get_submodule(name)
        assert list(w.dims) == [linear.in_features, linear.out_features]  # [in, out]: MatMul's layout
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        assert axis == 1  # per output channel after the transpose
        # the stored int8 values are modelopt's quantized weights; the 7-bit range keeps the
        # non-VNNI int16 pair sums exact: |w| <= 63
        ints = onnx.numpy_helper.to_array(w).astype(np.int32)
        assert np.abs(ints).max() <= 63 and np.abs(ints).max() >= 62
        scale = onnx.numpy_helper.to_array(inits[dq.input[1]]) if dq.input[1] in inits else None
        if scale is not None:
            with torch.no_grad():
                fake = linear.weight_quantizer(linear.weight).numpy().T  # [in, out]
            assert np.allclose(ints * scale[None, :], fake, rtol=0, atol=1e-7)


def test_onnxruntime_matches_modelopt_simulated_quantization(tiny, int8, fp8) -> None:
    """Both sides quantize onto the same grids (weights bit-identical, same scales), so a forward
    agrees to fp32 accumulation order (measured 4e-7 relative) unless an activation sits on a
    rounding boundary where modelopt's ``x * (127 / amax)`` and ONNX's ``x / (amax / 127)`` differ
    in the last ulp: then one element moves by one step, which moved this tiny model's output by
    1.0e-3 (measured). Bounds: most cases < 1e-5, every case < 5e-3 (a few such flips). A wrong
    scale, axis or layout, or onnxruntime's int16-saturating int8 kernel on full-range weights,
    gives > 1e-2 (measured 7e-2)."""
    _, model = tiny
    captured = []
    pipe = QwenImagePipeline(model.config, model.transformer, model.vae, model.encoder)
    handle = model.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: captured.append(tuple(args) + tuple(kwargs[n] for n in INPUT_NAMES[len(args):])),
        with_kwargs=True)
    try:  # the calibrated distribution: the calibration prompts, batched and alone, both steps
        pipe.generate(PROMPTS, steps=2, width=64, height=64, seed=0, progress=False, output="latent")
        pipe.generate(PROMPTS[1:], steps=2, width=64, height=64, seed=5, progress=False, output="latent")
    finally:
        handle.remove()
    for q, path, _ in (int8, fp8):
        session = ort.InferenceSession(str(path / "transformer" / "model.onnx"), providers=["CPUExecutionProvider"])
        errors, quant_effect = [], []
        for args in captured:
            got = session.run(None, {name: a.numpy() for name, a in zip(INPUT_NAMES, args)})[0]
            with torch.no_grad():
                ref = q.module(*args).numpy()
                fp32 = model.transformer(*args).numpy()
            errors.append(np.linalg.norm(got - ref) / np.linalg.norm(ref))
            quant_effect.append(np.linalg.norm(fp32 - ref) / np.linalg.norm(ref))
        errors = np.array(errors)
        assert (errors < 5e-3).all(), (q.policy.precision, errors)
        assert (errors < 1e-5).sum() >= len(errors) / 2, (q.policy.precision, errors)
        # and the comparison has teeth: quantization itself moved the output by far more
        assert np.median(quant_effect) > 100 * np.median(errors), (quant_effect, errors)


def test_int8_graph_fuses_to_integer_matmuls(int8, tmp_path) -> None:
    q, path, _ = int8
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path / "transformer" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("MatMulIntegerToFloat") == len(q.layers)


def test_manifest_records_policy_and_calibration(int8) -> None:
    q, path, _ = int8
    manifest = load_manifest(path)
    calib = manifest.provenance["calibration"]
    assert calib["precision"] == "int8"
    assert QuantPolicy.from_dict(calib["policy"]) == q.policy
    assert calib["layers"] == list(q.layers)
    summary = calib["summary"]
    assert summary["prompts"] == len(PROMPTS) and summary["steps"] == 2
    assert set(summary["input_amax"]) == set(q.layers)
    for name in q.layers:  # the recorded range is the one the quantizer uses
        iq = q.module.get_submodule(name).input_quantizer
        assert summary["input_amax"][name] == pytest.approx(float(iq.amax), rel=1e-6)


def test_quantize_errors_are_clear(tiny, tmp_path) -> None:
    _, model = tiny
    with pytest.raises(InputError, match="at least one prompt, got none"):
        quantize_transformer(model, QuantPolicy(), [], SETTINGS, progress=False)
    with pytest.raises(ConfigError, match="names no layer.*transformer_blocks"):
        quantize_transformer(model, QuantPolicy(include=("blocks.*.ff",)), PROMPTS, SETTINGS, progress=False)
    with pytest.raises(ConfigError, match="'int4': unknown; expected one of \\['int8', 'fp8'\\]"):
        quantize_model("does-not-matter", "int4", tmp_path / "x")
    with pytest.raises(InputError, match="expected >= 1 prompt"):
        quantize_model("does-not-matter", "int8", tmp_path / "x", calib_size=0)
    assert not (tmp_path / "x").exists()
    # the original transformer is untouched (quantization works on a copy)
    assert not any("quantizer" in n for n, _ in model.transformer.named_modules())


def test_cli_quantize_writes_a_runnable_export(tiny, tmp_path, capsys) -> None:
    from qwen_image_edge.cli import main
    from runtime.pipeline import Pipeline

    root, model = tiny
    out = tmp_path / "cli-int8"
    code = main(["quantize", "--model", str(model.path), "--precision", "int8", "--out", str(out),
                 "--calib-size", "2", "--batch-size", "2", "--steps", "2", "--prompts", "general"])
    assert code == 0 and out.is_dir()
    pipe = Pipeline.load(out)
    from export.quantized import TRANSFORMER_GRAPHS

    for name, spec in pipe.manifest.graphs.items():  # every graph with transformer math is quantized
        assert spec.precision is (Precision.INT8 if name in TRANSFORMER_GRAPHS else Precision.FP32), name
        if name in TRANSFORMER_GRAPHS:
            ops = [n.op_type for n in onnx.load(str(out / spec.file)).graph.node]
            assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") == 2 * ops.count("QuantizeLinear")
    image = pipe.generate("a red cat", steps=2, seed=1, width=64, height=64)
    assert image.size == (64, 64)
    assert main(["quantize", "--model", str(model.path), "--precision", "bf16", "--out", str(tmp_path / "y")]) == 2
    assert "expected one of ['int8', 'fp8']" in capsys.readouterr().err
