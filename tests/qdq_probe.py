"""Read a quantized transformer export one layer at a time (for tests/test_quant.py).

``qwen_image_edge.export.qdq`` writes, per quantized Linear ``name``::

    x -> [Mul pre_quant_scale] -> QuantizeLinear -> DequantizeLinear -> MatMul
                         transformer.<name>.weight_quantized -> DequantizeLinear -^

with every scale and zero point a ``Constant`` node (the TorchScript exporter's) or an initializer.
:func:`qdq_layers` finds that chain for every layer and cuts it out as a one-layer ONNX model, so
onnxruntime can run a single layer on a chosen float input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

U = 2.0 ** -24  # fp32 unit roundoff: one rounding moves a value by at most U of itself
QMAX = {"int8": 127, "fp8": 448}  # the grids' largest magnitude (int8 symmetric, E4M3)


def constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


@dataclass
class QdqLayer:
    name: str
    start: str  # the layer's float input tensor (before the smoothing Mul)
    pre_quant_scale: np.ndarray | None
    act_scale: np.ndarray
    act_zero_point: np.ndarray
    weight: np.ndarray  # stored values, [in, out] (int8 or float8e4m3fn)
    weight_scale: np.ndarray
    weight_zero_point: np.ndarray
    weight_axis: int | None
    nodes: list
    q_output: str
    output: str
    initializers: list

    def model(self, opset_import, ir_version: int, expose_quantized: bool = False) -> onnx.ModelProto:
        """The layer alone. ``expose_quantized`` adds the activation Q output (it stops onnxruntime
        fusing DQ -> MatMul into MatMulIntegerToFloat, so a probe, not the kernel under test)."""
        outputs = [helper.make_tensor_value_info(self.output, TensorProto.FLOAT, None)]
        if expose_quantized:
            dtype = TensorProto.INT8 if self.weight.dtype == np.int8 else TensorProto.FLOAT8E4M3FN
            outputs.append(helper.make_tensor_value_info(self.q_output, dtype, None))
        inputs = [helper.make_tensor_value_info(self.start, TensorProto.FLOAT, None)]
        graph = helper.make_graph(self.nodes, self.name, inputs, outputs, self.initializers)
        return helper.make_model(graph, opset_imports=opset_import, ir_version=ir_version)


def qdq_layers(model: onnx.ModelProto) -> dict[str, QdqLayer]:
    """Every quantized layer of an exported transformer graph, by module name."""
    consts = constants(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {i.name: i for i in model.graph.initializer}
    layers = {}
    for weight in (w for w in inits if w.endswith(".weight_quantized")):
        name = weight.removeprefix("transformer.").removesuffix(".weight_quantized")
        w_dq = consumers[weight][0]
        matmul = consumers[w_dq.output[0]][0]
        x_dq = producer[matmul.input[0]]
        q = producer[x_dq.input[0]]
        mul = producer.get(q.input[0])
        smooth = mul is not None and mul.op_type == "Mul" and mul.input[1] in consts
        chain = [n for n in (mul if smooth else None, q, x_dq, w_dq, matmul) if n is not None]  # no bias: see
        # qwen_image2_ref.transformer, every Linear is bias-free
        start = mul.input[0] if smooth else q.input[0]
        need = {i for n in chain for i in n.input} - {start} - {o for n in chain for o in n.output}
        axis = next((a.i for a in w_dq.attribute if a.name == "axis"), None)
        layers[name] = QdqLayer(
            name, start, consts[mul.input[1]] if smooth else None, consts[q.input[1]], consts[q.input[2]],
            consts[weight], consts[w_dq.input[1]], consts[w_dq.input[2]], axis,
            [producer[i] for i in sorted(need) if i in producer] + chain, q.output[0], chain[-1].output[0],
            [inits[i] for i in sorted(need) if i in inits])
    return layers


def as_float(values: np.ndarray) -> np.ndarray:
    """Stored int8 / float8e4m3fn values (onnxruntime returns float8 as its raw bytes) as float64."""
    if values.dtype == np.uint8:  # raw E4M3 bytes
        return torch.from_numpy(values).view(torch.float8_e4m3fn).double().numpy()
    return values.astype(np.float64)


def onnx_quantize(a: np.ndarray, scale: float, precision: str) -> np.ndarray:
    """ONNX QuantizeLinear, zero point 0, returned as the grid values (not yet times the scale)."""
    if precision == "int8":
        return np.clip(np.rint(a / scale), -128, 127)
    x = torch.from_numpy(np.asarray(a / scale, np.float64)).clamp(-448.0, 448.0)
    return x.to(torch.float8_e4m3fn).double().numpy()


def e4m3_spacing(v: np.ndarray) -> np.ndarray:
    """The E4M3 grid's spacing at |v| (in units of the scale): 3 mantissa bits, so 2^(e - 3) for a
    normal value in [2^e, 2^(e+1)), and the subnormal spacing 2^-9 below 2^-6."""
    e = np.floor(np.log2(np.maximum(np.abs(v), 2.0 ** -6)))
    return 2.0 ** (e - 3)


def weight_tie_flips(weight: np.ndarray, stored: np.ndarray, scale: np.ndarray, fake: np.ndarray,
                     precision: str) -> np.ndarray:
    """Where the graph's stored weight grid value (``stored`` ``[in, out]``, times ``scale`` per
    output column or per tensor) is not modelopt's (``fake``: its fake-quantized weight, ``[in, out]``):
    the mask of such elements, each checked to be a tie. Both sides round one quotient of the same
    fp32 weight (``weight`` ``[in, out]``): modelopt's ``w * fl(QMAX / amax)`` and the export's
    ``w / fl(amax / QMAX)`` differ by at most 4 U, so a grid value may differ only where a 4 U nudge
    of the weight changes it, and then it is one of the two neighbours either side of the tie. How
    often a weight lands that close to a tie depends on the SmoothQuant scales, which come from the
    calibration's fp32 sums, which depend on the CPU's instruction set (seen: one weight of the
    tiny model's INT8 layers on an AVX512-VNNI machine, quotient -23.4999988; none before)."""
    deq = as_float(stored) * scale
    flips = np.abs(deq - fake) > 4 * U * np.abs(fake)
    w = weight.astype(np.float64)
    below, above = (onnx_quantize(w * (1 + t), scale, precision) for t in (-4 * U, 4 * U))
    ours, theirs = deq / scale, fake / scale  # grid values (theirs: up to the few U of its scale)

    def on(v, grid):
        return np.abs(v - grid) <= 1e-6 * np.abs(grid) + 1e-12

    at_tie = (below != above) & (on(ours, below) | on(ours, above)) & (on(theirs, below) | on(theirs, above))
    assert at_tie[flips].all(), ("a weight's grid value differs away from a tie", np.argwhere(flips & ~at_tie)[:5])
    return flips
