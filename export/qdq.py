"""modelopt's TorchScript Q/DQ export -> a standard QDQ ONNX graph that onnxruntime and TensorRT run.

What the exporter writes, per quantized Linear (toolchain notes section 4 and 10)::

    x -> [Mul pre_quant_scale] -> Q -> DQ -> MatMul <- Transpose <- DQ <- Q <- W (fp32 initializer)

with FP8 as ``trt::TRT_FP8QuantizeLinear`` / ``TRT_FP8DequantizeLinear`` (no zero point). This
module rewrites it to::

    x -> [Mul] -> QuantizeLinear -> DequantizeLinear -> MatMul <- DequantizeLinear <- W^T (int8 / float8e4m3fn)

- FP8 ops become standard ``QuantizeLinear`` / ``DequantizeLinear`` with a float8e4m3fn zero point;
  the ``trt`` opset import goes and ``value_info`` (typed uint8 by the exporter) is cleared;
- weights are stored quantized and pre-transposed (``[in, out]``, the DQ axis moved to 1), so the
  file holds 1 byte per weight and no Transpose stays between DQ and MatMul: onnxruntime fuses
  the pattern into ``MatMulIntegerToFloat`` (INT8) and TensorRT into its 8-bit GEMMs;
- dead nodes and initializers (the fp32 weights, the weight Q nodes) are dropped.

The weight values are computed with the Q node's own formula, ``saturate(round_half_even(W /
scale) + zero_point)``, so the graph computes exactly what the replaced Q -> DQ computed.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qwen_image_edge.runtime.errors import ConfigError
from qwen_image_edge.runtime.manifest import Precision

log = logging.getLogger(__name__)

MIN_OPSET = 19  # float8 types in QuantizeLinear / DequantizeLinear
_TRT_OPS = {"TRT_FP8QuantizeLinear": "QuantizeLinear", "TRT_FP8DequantizeLinear": "DequantizeLinear"}
FP8_ZERO_POINT = "qdq_fp8_zero_point"


@dataclass(frozen=True)
class QDQStats:
    quantize: int
    dequantize: int
    folded_weights: int
    dropped_transposes: int


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def rename_trt_fp8(model: onnx.ModelProto) -> int:
    """``trt::TRT_FP8*`` -> standard Q/DQ with a float8e4m3fn zero point; returns nodes renamed."""
    renamed = 0
    for node in model.graph.node:
        if node.domain == "trt" and node.op_type in _TRT_OPS:
            node.op_type, node.domain = _TRT_OPS[node.op_type], ""
            del node.input[2:]
            node.input.append(FP8_ZERO_POINT)
            renamed += 1
    if renamed:
        zp = helper.make_tensor(FP8_ZERO_POINT, TensorProto.FLOAT8E4M3FN, [], [0.0])
        model.graph.initializer.append(zp)
    return renamed


def _quantize_weight(w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> tuple[bytes, int]:
    """The Q node's output for a constant weight: raw bytes and the ONNX element type."""
    w = w.astype(np.float32)
    if scale.ndim == 1 and scale.size > 1:  # per channel along ``axis``
        shape = [1] * w.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    if zero_point.dtype == np.int8:
        q = np.clip(np.rint(w / scale.astype(np.float32)) + zero_point.astype(np.float32), -128, 127)
        return q.astype(np.int8).tobytes(), TensorProto.INT8
    import torch  # float8 rounding (round-to-nearest-even, saturating) as onnxruntime does it

    x = torch.from_numpy(w / scale.astype(np.float32)).clamp(-448.0, 448.0)
    return x.to(torch.float8_e4m3fn).view(torch.uint8).numpy().tobytes(), TensorProto.FLOAT8E4M3FN


def fold_weights(model: onnx.ModelProto) -> tuple[int, int]:
    """Replace ``W -> Q -> DQ [-> Transpose]`` by a quantized, pre-transposed initializer -> DQ."""
    graph = model.graph
    consts = _constants(model)
    inits = {i.name for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    folded = dropped = 0
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in inits:
            continue
        weight = consts[q.input[0]]
        scale = consts[q.input[1]]
        zero_point = consts[q.input[2]] if len(q.input) > 2 else np.zeros((), np.int8)
        axis = next((a.i for a in q.attribute if a.name == "axis"), 1)
        axis = axis % weight.ndim
        raw, dtype = _quantize_weight(weight, scale, zero_point, axis)
        users = consumers.get(dq.output[0], [])
        transpose = users[0] if len(users) == 1 and users[0].op_type == "Transpose" else None
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None) if transpose else None
        dims = list(weight.shape)
        if transpose is not None and weight.ndim == 2 and perm == [1, 0]:
            np_dtype = np.int8 if dtype == TensorProto.INT8 else np.uint8
            raw = np.frombuffer(raw, np_dtype).reshape(dims).T.copy().tobytes()
            dims, axis = dims[::-1], 1 - axis
            out_name = transpose.output[0]
            graph.node.remove(transpose)
            dropped += 1
        else:
            out_name = dq.output[0]
        name = f"{q.input[0]}_quantized"
        tensor = helper.make_tensor(name, dtype, dims, raw, raw=True)
        graph.initializer.append(tensor)
        new_dq = helper.make_node("DequantizeLinear", [name, dq.input[1], dq.input[2]] if len(dq.input) > 2
                                  else [name, dq.input[1]], [out_name], name=f"{dq.name}_weight")
        if scale.size > 1:
            new_dq.attribute.append(helper.make_attribute("axis", axis))
        graph.node.insert(list(graph.node).index(dq), new_dq)
        graph.node.remove(dq)
        graph.node.remove(q)
        folded += 1
    return folded, dropped


def prune(model: onnx.ModelProto) -> None:
    """Drop nodes and initializers no graph output depends on (keeps node order)."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def check_quantized_count(graph: str, found: int, layers: int) -> None:
    """A quantized graph holds every policy layer (``transformer``) or, as one half of the KV-cache
    pair, some of them: anything else means a layer was missed or matched twice."""
    if (found != layers) if graph == "transformer" else not 0 < found <= layers:
        raise ConfigError(f"QDQ export {graph}: expected {layers} quantized weights (one per layer), found {found}")


def to_standard_qdq(model: onnx.ModelProto, precision: Precision) -> tuple[onnx.ModelProto, QDQStats]:
    """Rewrite a modelopt TorchScript export in place (see the module docstring) and check it."""
    if precision not in (Precision.INT8, Precision.FP8):
        raise ConfigError(f"QDQ rewrite: expected precision int8 or fp8, got {precision}")
    renamed = rename_trt_fp8(model)
    if precision is Precision.FP8 and not renamed:
        raise ConfigError("QDQ rewrite: an FP8 export holds no TRT_FP8 Q/DQ nodes; was the model quantized?")
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < MIN_OPSET:
            op.version = MIN_OPSET
    kept = [op for op in model.opset_import if op.domain != "trt"]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    del model.graph.value_info[:]
    folded, dropped = fold_weights(model)
    prune(model)
    ops = Counter(n.op_type for n in model.graph.node)
    leftover = [n.op_type for n in model.graph.node if n.domain == "trt"]
    if leftover:
        raise ConfigError(f"QDQ rewrite: custom trt ops {sorted(set(leftover))} remain; expected none")
    stats = QDQStats(ops["QuantizeLinear"], ops["DequantizeLinear"], folded, dropped)
    log.info("QDQ %s: %d Q, %d DQ, %d weights stored quantized, %d transposes dropped", precision.value,
             stats.quantize, stats.dequantize, stats.folded_weights, stats.dropped_transposes)
    return model, stats
