"""A precision per component (calib/components.py, calib/component_export.py, export/half.py)."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwen_image_edge.calib.components import PRESETS, ComponentPolicy, parse_component_policy
from qwen_image_edge.cli import main
from qwen_image_edge.runtime.errors import ConfigError
from qwen_image_edge.runtime.manifest import Precision, load_manifest

pytest.importorskip("modelopt.torch.quantization")

P = Precision


@pytest.mark.parametrize("text, expected", [
    ("int8", dict(transformer=P.INT8)),
    ("fp8", dict(transformer=P.FP8)),
    ("transformer=fp8,text_encoder=int4,vae=fp16", dict(transformer=P.FP8, text_encoder=P.INT4, vae=P.FP16)),
    (" text_encoder = int8 , vision_encoder=fp16 ", dict(text_encoder=P.INT8, vision_encoder=P.FP16)),
    ("edge", dict(transformer=P.INT4, text_encoder=P.INT4, vision_encoder=P.FP16, vae=P.FP16)),
])
def test_policy_parses(text, expected):
    policy = parse_component_policy(text)
    for part in ("transformer", "text_encoder", "vision_encoder", "vae"):
        assert policy.precision(part) is expected.get(part, P.FP32)
    assert policy.transformer_only is (set(expected) == {"transformer"})


def test_policy_file(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"text_encoder": "int4", "vae": "fp16"}))
    assert parse_component_policy(str(path)) == ComponentPolicy(text_encoder=P.INT4, vae=P.FP16, name="mine")
    assert PRESETS["edge"].graph_precision("vae_encoder") is P.FP16
    assert PRESETS["edge"].graph_precision("transformer_step") is P.INT4


BAD = [
    ("unet=int8", "unknown component 'unet'"),
    ("vae=int4", "the vae cannot take int4"),
    ("text_encoder=fp8", "the text_encoder cannot take fp8"),
    ("transformer=fp16", "the transformer cannot take fp16"),  # int4 it takes (tests/test_transformer_int4.py)
    ("vision_encoder=int8", "the vision_encoder cannot take int8"),
    ("vae=fp64", "unknown precision"),
    ("transformer=int8,transformer=fp8", "transformer given twice"),
    ("transformer=", "expected part=precision"),
    ("int4", "expected one of ['int8', 'fp8'] (the transformer), a preset"),
    ("nothing.json", "expected a readable JSON object"),
]


@pytest.mark.parametrize("text, match", BAD)
def test_bad_policy_is_one_line_and_writes_nothing(text, match, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=re.escape(match)):
        parse_component_policy(text)
    out = tmp_path / "q"
    rc = main(["quantize", "--model", "demo", "--precision", text, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and match in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_lean_with_other_parts_is_refused(tmp_path, capsys):
    rc = main(["quantize", "--model", "demo", "--precision", "edge", "--lean", "--out", str(tmp_path / "q")])
    assert rc == 2 and "--lean" in capsys.readouterr().err and not (tmp_path / "q").exists()


# ----------------------------------------------------------------------------- fp16 conversion


def _overflowing_graph() -> onnx.ModelProto:
    """x -> *3e4 -> *3 -> /900 -> /100 -> y: h2 reaches 9e4 > 65504 (an fp16 overflow)."""
    consts = [numpy_helper.from_array(np.array(v, np.float32), n)
              for n, v in (("a", 3e4), ("b", 3.0), ("c", 900.0), ("d", 100.0))]
    nodes = [helper.make_node("Mul", ["x", "a"], ["h1"], name="big"),
             helper.make_node("Mul", ["h1", "b"], ["h2"], name="bigger"),
             helper.make_node("Div", ["h2", "c"], ["h3"], name="back"),
             helper.make_node("Div", ["h3", "d"], ["y"], name="small")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], consts)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_half_keeps_fp32_where_fp16_would_overflow():
    from onnxconverter_common import float16

    from qwen_image_edge.export.half import to_half

    model, x = _overflowing_graph(), np.array([0.5, -1.0, 0.25, 1.0], np.float32)
    half, record = to_half(model, [{"x": x}])
    assert record.max_activation == pytest.approx(9e4)
    assert set(record.fp32_nodes) == {"big", "bigger", "back"}  # they read or write 3e4 / 9e4 > 65504 / 4
    small = next(n for n in half.graph.node if n.name == "small")
    assert {i.name: i.data_type for i in half.graph.initializer}[small.input[1]] == TensorProto.FLOAT16
    np.testing.assert_allclose(_run(half, x), x, rtol=1e-3)
    # the control: in fp16 the measured tensor is not representable. (onnxruntime's CPU provider runs
    # fp16 Mul/Div through inserted fp32 casts, so an all-fp16 graph does not overflow there; TensorRT does.)
    assert np.isinf(np.float16(record.max_activation))
    naive = float16.convert_float_to_float16(model, keep_io_types=True)  # its default clips constants to 1e4
    assert not np.allclose(_run(naive, x), x, rtol=1e-2)


# ----------------------------------------------------------------------------- mixed exports


@pytest.fixture(scope="module")
def mixed(tiny_model_dir, tmp_path_factory):
    from qwen_image_edge.calib.component_export import quantize_components

    out = tmp_path_factory.mktemp("mixed") / "export"
    quantize_components(tiny_model_dir, "text_encoder=int4,vision_encoder=fp16,vae=fp16", out, calib_size=4,
                        max_resolution=128, progress=False, gate=False)
    return out


def test_a_mixed_manifest_records_each_graph_and_loads(mixed):
    from qwen_image_edge.runtime.pipeline import Pipeline

    manifest = load_manifest(mixed)
    want = {"text_encoder": P.INT4, "vision_encoder": P.FP16, "vae_decoder": P.FP16, "vae_encoder": P.FP16,
            "transformer": P.FP32}
    assert {n: manifest.graph(n).precision for n in want} == want
    record = manifest.provenance.calibration["components"]
    assert record["graphs"]["text_encoder"] == "int4" and record["policy"]["vae"] == "fp16"
    decoder = record["fp16"]["vae_decoder"]
    assert 0 < decoder["max_activation"] < decoder["bound"] and decoder["fp32_ops"] == ["ReduceL2"]
    image = Pipeline.load(mixed, threads=1).generate("a red cat", steps=2, seed=0, output="np")
    assert np.isfinite(image).all() and image.std() > 0


def test_validate_applies_each_graphs_own_bound(mixed, tiny_model_dir):
    from qwen_image_edge.export.validate import THRESHOLDS, validate

    report = validate(mixed, tiny_model_dir, end_to_end_prompts=0)
    by_graph = {g.graph: g for g in report.graphs}
    for name in ("text_encoder", "vae_decoder", "transformer"):
        g = by_graph[name]
        assert g.threshold == THRESHOLDS[Precision(g.precision)] and g.passed
    assert by_graph["text_encoder"].threshold != by_graph["vae_decoder"].threshold
    worst = max(c.rel_l2 for c in by_graph["vae_decoder"].cases)
    assert 0 < worst < THRESHOLDS[P.FP16].max_rel_l2  # fp16 rounding, not fp32 equality


def test_cli_quantizes_a_mixed_policy(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    rc = main(["quantize", "--model", str(tiny_model_dir), "--precision", "text_encoder=int8,vae=fp16",
               "--calib-size", "2", "--max-resolution", "128", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    manifest = load_manifest(out)
    assert manifest.graph("text_encoder").precision is P.INT8 and manifest.graph("vae_decoder").precision is P.FP16
    assert json.loads((out / "validation.json").read_text())["passed"]  # quantize's own gate ran


def test_footprint_reads_the_bytes_per_parameter_the_export_wrote(mixed):
    """bench/footprint.py projects full-size bytes from these rates: int4 codes (half a byte) plus one
    fp32 scale per block, fp16 at 2 bytes, fp32 at 4."""
    from bench.footprint import group_rates

    rates = group_rates(mixed)
    assert 0.5 + 4 / 32 <= rates["text_encoder"]["quantized"] <= 0.5 + 4 / 16  # blocks of 16..32 on the tiny model
    assert rates["text_encoder"]["rest"] == 4.0  # norms; the int8 table is its own group (test_edge_int8_embedding)
    assert (rates["transformer"]["quantized"], rates["transformer"]["rest"]) == (0.0, 4.0)
    for name in ("vae_decoder", "vae_encoder", "vision_encoder"):
        assert 2.0 <= rates[name]["rest"] < 2.2 and rates[name]["quantized"] == 0.0
