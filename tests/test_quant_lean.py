"""The lean quantized export (``qwen_image_edge.export.qdq_lean``) against the TorchScript one.

Both export the same calibration (one ``quantize_transformer`` run on an fp32 checkpoint): the
TorchScript path traces modelopt's fake-quantized module, the lean path traces the unquantized
transformer under fake tensors and places Q/DQ from the calibrated scales, quantizing the weights
as they stream from the shards. For an fp32 checkpoint the stored weights and scales must be the
same bytes, and the graphs must compute the same function.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("modelopt.torch.quantization")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import helper, numpy_helper  # noqa: E402

from qwen_image2_ref.model_folder import load_lazy_model, load_model  # noqa: E402
from qwen_image_edge.calib.collect import CalibrationSettings  # noqa: E402
from qwen_image_edge.calib.policy import QuantPolicy  # noqa: E402
from qwen_image_edge.calib.quantize import quantize_transformer  # noqa: E402
from qwen_image_edge.export.graphs import transformer_inputs  # noqa: E402
from qwen_image_edge.export.qdq_lean import calibrated_scales  # noqa: E402
from qwen_image_edge.export.quantized import export_quantized  # noqa: E402
from qwen_image_edge.export.registry import example_inputs, graph_module  # noqa: E402
from qwen_image_edge.runtime.errors import ConfigError  # noqa: E402
from qwen_image_edge.runtime.manifest import Precision, load_manifest  # noqa: E402
from tests.qdq_probe import as_float, e4m3_spacing  # noqa: E402

PROMPTS = ["a red cat on a mat", "a small house by the sea"]
SETTINGS = CalibrationSettings(batch_size=2, steps=2)
PAIR = ["transformer", "transformer_prefill", "transformer_step"]


class _Exports(dict):
    """Built on first use per precision: a run of some tests (a mutation's) builds only what they use."""

    def __init__(self, root, path) -> None:
        super().__init__()
        self.root, self.path, self.model = root, path, load_model(path)

    def __missing__(self, precision: str):
        graphs, keep = {"int8": (PAIR, 1), "fp8": (["transformer"], 0)}[precision]
        root, model = self.root, self.model
        q = quantize_transformer(model, QuantPolicy(precision=precision, keep_first=keep), PROMPTS, SETTINGS,
                                 progress=False)
        export_quantized(model, q, root / f"plain-{precision}", graphs=graphs)
        export_quantized(load_lazy_model(self.path), calibrated_scales(q), root / f"lean-{precision}", graphs=graphs)
        self[precision] = (q, root / f"plain-{precision}", root / f"lean-{precision}", model)
        return self[precision]


@pytest.fixture(scope="module")
def exports(tiny_model_dir, tmp_path_factory):
    """{precision: (quantized, plain export, lean export, fp32 model)}: INT8 SmoothQuant with block 0
    kept in fp32, over the single graph and the KV-cache pair; FP8 over the single graph."""
    return _Exports(tmp_path_factory.mktemp("quant-lean"), tiny_model_dir)


def _graph(export_dir, name) -> tuple[onnx.ModelProto, object]:
    spec = load_manifest(export_dir, verify_hashes=False).graph(name)
    return onnx.load(str(export_dir / spec.file)), spec


def _layer_tensors(model: onnx.ModelProto) -> dict[str, dict[str, np.ndarray]]:
    """Per quantized layer (by MatMul): its stored weight, weight scale, input scale and the
    SmoothQuant multiplier in front of its input Q, read off the graph whatever the names."""
    producer = {o: n for n in model.graph.node for o in n.output}
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    layers = {}
    for mm in (n for n in model.graph.node if n.op_type == "MatMul"):
        wdq, xdq = producer.get(mm.input[1]), producer.get(mm.input[0])
        if wdq is None or wdq.op_type != "DequantizeLinear" or wdq.input[0] not in values:
            continue
        name = wdq.input[0].removeprefix("transformer.").removesuffix(".weight_quantized")
        xq = producer[xdq.input[0]]
        smooth = producer.get(xq.input[0])
        layers[name] = {
            "weight": values[wdq.input[0]], "weight_scale": values[wdq.input[1]],
            "input_scale": values[xq.input[1]],
            "pre_quant_scale": values.get(smooth.input[1]) if smooth is not None and smooth.op_type == "Mul" else None,
        }
    return layers


@pytest.mark.parametrize("precision, name", [("int8", g) for g in PAIR] + [("fp8", "transformer")])
def test_lean_graph_stores_the_torchscript_paths_bytes(exports, precision, name) -> None:
    q, plain, lean, _ = exports[precision]
    a, b = _layer_tensors(_graph(plain, name)[0]), _layer_tensors(_graph(lean, name)[0])
    assert a.keys() == b.keys() and a.keys() <= set(q.layers) and a
    if name == "transformer":
        assert a.keys() == set(q.layers)
    for layer in a:
        for key, x in a[layer].items():
            y = b[layer][key]
            assert (x is None) == (y is None), (layer, key)
            if x is not None:
                assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), (layer, key)
    if precision == "int8":  # SmoothQuant: some layers carry a multiplier, and it is their own
        assert any(t["pre_quant_scale"] is not None for t in a.values())


def _quantized_inputs(model: onnx.ModelProto) -> dict[str, tuple[str, int]]:
    """Per quantized layer: the name and element type of its input QuantizeLinear's output (the grid
    values its input rounds to)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    types = {i.name: i.data_type for i in model.graph.initializer}
    types.update({n.output[0]: n.attribute[0].t.data_type for n in model.graph.node if n.op_type == "Constant"})
    found = {}
    for mm in (n for n in model.graph.node if n.op_type == "MatMul"):
        wdq, xdq = producer.get(mm.input[1]), producer.get(mm.input[0])
        if wdq is None or wdq.op_type != "DequantizeLinear" or xdq is None or xdq.op_type != "DequantizeLinear":
            continue
        layer = wdq.input[0].removeprefix("transformer.").removesuffix(".weight_quantized")
        xq = producer[xdq.input[0]]
        found[layer] = (xq.output[0], types[xq.input[2]])
    return found


def _run_exposing_quantized_inputs(export_dir, name, cases):
    """Each case's graph outputs, and per layer the grid values its input was rounded to."""
    model, spec = _graph(export_dir, name)
    layers = _quantized_inputs(model)
    model.graph.output.extend(helper.make_tensor_value_info(out, dtype, None) for out, dtype in layers.values())
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    n = len(spec.outputs)
    runs = []
    for c in cases:
        got = session.run(None, {t.name: x.numpy() for t, x in zip(spec.inputs, c)})
        runs.append((got[:n], {layer: as_float(v) for layer, v in zip(layers, got[n:])}))
    return runs


@pytest.mark.parametrize("precision, name", [("int8", g) for g in PAIR] + [("fp8", "transformer")])
def test_lean_graph_computes_what_the_torchscript_one_does(exports, precision, name) -> None:
    """Same quantized function: what may differ is fp32 summation order (~1e-7 per op) and, through
    it, a rare activation a few ulp from a rounding boundary that lands on the other grid point (a
    flip; how many a forward gets depends on the machine's instruction set, as in test_quant.py's
    per-layer test). So every layer's quantized input is compared: each difference must be one grid
    step and rare (at most 2, or 0.1% of a large input; a wrong scale or smoothing moves most of
    them, by many steps). With no flip, the
    outputs agree to 1e-5 relative L2; a flip moves the output by about 1e-3 (measured, test_quant.py),
    so with F flips they agree to 1e-5 + 2e-3 F. The quantization error itself (measured 1e-2 to
    1e-1 on this model) is asserted to be at least 1e-3 and 3x the first case's bound."""
    _, plain, lean, model = exports[precision]
    cfg = model.config
    cases = [example_inputs(name, cfg)]
    if name == "transformer":
        cases.append(transformer_inputs(cfg, 1, 5, (3, 2), ()))  # another size, no condition image
    runs = [_run_exposing_quantized_inputs(d, name, cases) for d in (plain, lean)]
    bounds = []
    for (outs_a, q_a), (outs_b, q_b) in zip(*runs):
        assert q_a.keys() == q_b.keys() and q_a
        flips = 0
        for layer in q_a:
            a, b = q_a[layer], q_b[layer]
            differ = a != b
            step = 1.0 if precision == "int8" else e4m3_spacing(np.maximum(np.abs(a), np.abs(b)))
            assert (np.abs(a - b) <= step * (1 + 1e-9))[differ].all(), (layer, "a quantized input moved by more than one step")
            assert differ.sum() <= max(2, differ.size // 1000), (layer, int(differ.sum()), differ.size)
            flips += int(differ.sum())
        bound = 1e-5 + 2e-3 * flips
        bounds.append(bound)
        for x, y in zip(outs_a, outs_b):
            assert np.linalg.norm(x - y) <= bound * np.linalg.norm(x), (flips, np.linalg.norm(x - y) / np.linalg.norm(x))
    with torch.no_grad():  # the same inputs in fp32: quantization moves the output far more
        ref = graph_module(name, model)(*cases[0])
    ref = ref if isinstance(ref, tuple) else (ref,)
    for r, x in zip(ref, runs[0][0][0]):
        effect = np.linalg.norm(x - r.numpy()) / np.linalg.norm(x)
        assert effect >= 1e-3 and effect >= 3 * bounds[0], (effect, bounds[0])


def test_lean_graph_holds_no_unquantized_copy(exports) -> None:
    q, _, lean, _ = exports["int8"]
    model, spec = _graph(lean, "transformer")
    names = {i.name for i in model.graph.initializer}
    assert not {f"{layer}.weight" for layer in q.layers} & names
    folder = lean / "transformer"
    assert not list(folder.glob("*.safetensors"))  # nothing linked from the checkpoint
    assert spec.precision is Precision.INT8
    stored = sum(int(np.prod(t.dims)) * (1 if t.data_type == onnx.TensorProto.INT8 else 4)
                 for t in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.initializer)
    on_disk = sum(p.stat().st_size for p in folder.iterdir())
    assert on_disk <= stored + 4096 * len(names) + (folder / "model.onnx").stat().st_size


def test_int8_lean_graph_fuses_to_integer_matmuls(exports, tmp_path) -> None:
    q, _, lean, _ = exports["int8"]
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(lean / "transformer" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx"), load_external_data=False).graph.node]
    assert ops.count("MatMulIntegerToFloat") == len(q.layers)


def test_lean_export_refuses_a_modelopt_module(exports, tmp_path) -> None:
    q, _, _, model = exports["fp8"]
    with pytest.raises(ConfigError, match="CalibratedScales"):
        export_quantized(load_lazy_model(model.path), q, tmp_path / "x", graphs=["transformer"])
    assert not (tmp_path / "x").exists()


def test_cli_quantize_lean_passes_its_gate_and_runs(exports, tmp_path, capsys) -> None:
    """`quantize --lean`: calibrated in place, exported lean, validated by its gate (a failure would
    exit non-zero), and the runtime generates from it."""
    from qwen_image_edge.cli import main
    from qwen_image_edge.runtime.pipeline import Pipeline

    model = exports["int8"][3]
    out = tmp_path / "lean-cli"
    code = main(["quantize", "--model", str(model.path), "--precision", "int8", "--out", str(out), "--lean",
                 "--calib-size", "2", "--batch-size", "2", "--steps", "2", "--prompts", "general",
                 "--device", "cpu", "--dtype", "bf16"])
    assert code == 0, capsys.readouterr().err
    pipe = Pipeline.load(out)
    assert pipe.manifest.provenance.exporter.startswith("lean")
    assert pipe.manifest.graph("transformer").precision is Precision.INT8
    assert pipe.manifest.provenance.calibration["summary"]["dtype"] == "bfloat16"
    assert np.asarray(pipe.generate("a red cat", steps=2, seed=1, width=64, height=64)).std() > 0
