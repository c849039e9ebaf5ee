"""Standard QDQ placed into a graph traced without weights: the quantized export at full size.

The TorchScript path (``qwen_image_edge.export.quantized``) traces modelopt's fake-quantized module,
so it holds the whole transformer in fp32 (and the exporter copies it: ~9 GiB for two full-width
layers). Here the calibration's result is reduced to numbers, :class:`CalibratedScales` (per layer:
the input range, the weight ranges, SmoothQuant's input multiplier; a few KB), the model is let
go, and the lean export (``qwen_image_edge.export.lean``) traces the *unquantized* transformer under
fake tensors. Each policy layer's ``W -> Transpose -> MatMul`` then becomes what
``qwen_image_edge.export.qdq`` makes of modelopt's export::

    x -> [Mul pre_quant_scale] -> QuantizeLinear -> DequantizeLinear -> MatMul <- DequantizeLinear <- W_q^T

and ``W_q^T`` (int8 or float8e4m3fn, pre-transposed ``[in, out]``) is computed one tensor at a time
while the weights stream from the checkpoint shards into external data: read in fp32, smoothed
(``W / pre_quant_scale``, modelopt's fold), quantized by the Q node's own formula
(in place, as ``qdq._quantize_weight`` computes it). The scales are modelopt's export formulas on the same fp32 ranges
(INT8 ``amax / 127``; FP8 ``1 / (448 / amax)`` in double, then fp32), so for an fp32 checkpoint the
graph stores the very bytes the TorchScript path stores.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from qwen_image_edge.export.external_data import WeightSource, read_tensor
from qwen_image_edge.runtime.errors import ConfigError
from qwen_image_edge.runtime.manifest import Precision

INT8_MAX = 127.0
FP8_MAX = 448.0


@dataclass(frozen=True)
class LayerScales:
    """One quantized Linear's calibrated numbers, fp32 on the host."""

    input_amax: float
    weight_amax: np.ndarray  # [] per tensor, or [out] per output channel
    pre_quant_scale: np.ndarray | None  # [in]: SmoothQuant's input multiplier (its inverse is folded into W)


@dataclass(frozen=True)
class CalibratedScales:
    """What the export needs of a calibration: the policy, its layers and their scales. It stands in
    for a ``QuantizedTransformer`` in ``export_quantized`` (same ``policy``/``layers``/``summary``)."""

    policy: Any  # a qwen_image_edge.calib.policy.QuantPolicy (export does not import the stages above it)
    layers: tuple[str, ...]
    summary: dict
    scales: dict[str, LayerScales]

    @property
    def precision(self) -> Precision:
        return self.policy.precision


def _host(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy().copy()


def calibrated_scales(quantized) -> CalibratedScales:
    """Read the scales out of a ``QuantizedTransformer`` (modelopt's quantizers), so that the module
    itself can be freed before the export."""
    scales = {}
    for name in quantized.layers:
        layer = quantized.module.get_submodule(name)
        iq, wq = layer.input_quantizer, layer.weight_quantizer
        if getattr(wq, "pre_quant_scale", None) is not None:
            raise ConfigError(f"{name}: a weight pre_quant_scale that modelopt did not fold into the weight; "
                              "the lean quantized export expects folded SmoothQuant scales")
        pqs = getattr(iq, "pre_quant_scale", None)
        scales[name] = LayerScales(
            input_amax=float(iq.amax.float()),
            weight_amax=_host(wq.amax).reshape(-1) if wq.amax.numel() > 1 else _host(wq.amax).reshape(()),
            pre_quant_scale=None if pqs is None else _host(pqs).reshape(-1),
        )
    return CalibratedScales(quantized.policy, tuple(quantized.layers), dict(quantized.summary), scales)


def _scale(amax: np.ndarray | float, precision: Precision) -> np.ndarray:
    """modelopt's export formula for a Q/DQ scale from an fp32 range (``export_onnx.export_int8`` /
    ``export_fp8``); a zero INT8 range gets scale 1 as there."""
    amax = np.asarray(amax, np.float32)
    if precision is Precision.INT8:
        scale = (amax / np.float32(INT8_MAX)).astype(np.float32)
        return np.where(scale == 0, np.float32(1.0), scale).astype(np.float32)
    return np.asarray([1.0 / (FP8_MAX / float(a)) for a in amax.reshape(-1)], np.float32).reshape(amax.shape)


def _zero_point(precision: Precision, shape: tuple[int, ...]) -> tuple[int, np.ndarray]:
    if precision is Precision.INT8:
        return TensorProto.INT8, np.zeros(shape, np.int8)
    return TensorProto.FLOAT8E4M3FN, np.zeros(shape, np.float32)  # written as float8 zeros


def _const(name: str, value: np.ndarray, onnx_type: int = TensorProto.FLOAT) -> TensorProto:
    if onnx_type == TensorProto.FLOAT8E4M3FN:
        return helper.make_tensor(name, onnx_type, list(value.shape), value.reshape(-1).tolist())
    return numpy_helper.from_array(np.asarray(value, helper.tensor_dtype_to_np_dtype(onnx_type)), name)


def quantized_weight(source: WeightSource, layer: LayerScales, precision: Precision) -> torch.Tensor:
    """``W_q^T`` of one layer, ``[in, out]`` int8 (or float8e4m3fn bytes as uint8), from its shard.

    The Q node's formula (``qdq._quantize_weight``: ``saturate(round_half_even(W / scale))``) done in
    place on the one fp32 copy: the largest full-width weight (16384 x 4096, 256 MiB in fp32) is
    read, smoothed, scaled, rounded and clipped without a second fp32 buffer."""
    # [out, in]; a LoRA-fused source computes its weight (qwen_image_edge.export.lean.fuse_sources)
    w = source.make().float() if source.make is not None else read_tensor(source.entry, torch.float32)
    if layer.pre_quant_scale is not None:
        w.mul_((1.0 / torch.from_numpy(layer.pre_quant_scale))[None, :])
    scale = torch.from_numpy(_scale(layer.weight_amax, precision))
    w.div_(scale[:, None] if scale.ndim else scale)
    if precision is Precision.INT8:
        q = w.round_().clamp_(-128, 127).to(torch.int8)
    else:
        q = w.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    del w
    return q.t().contiguous()


def insert_qdq(model: onnx.ModelProto, sources: list[WeightSource], scales: CalibratedScales,
               graph: str) -> tuple[list[WeightSource], int]:
    """Quantize every policy layer the graph holds (its weight input named by checkpoint key
    ``<layer>.weight``): rewrite the nodes in place and swap the layer's weight source for its
    streamed quantized bytes. Returns the new sources and the number of layers quantized."""
    precision = scales.precision
    by_name = {s.name: s for s in sources}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    zp_type, _ = _zero_point(precision, ())
    shared_zp = "qdq_zero_point"
    model.graph.initializer.append(_const(shared_zp, _zero_point(precision, ())[1], zp_type))
    replaced: dict[str, WeightSource] = {}
    for layer in scales.layers:
        key = f"{layer}.weight"
        if key not in by_name:
            continue  # this graph does not hold the layer (one half of the KV-cache pair)
        transpose = _single(consumers.get(key, []), "Transpose", key, graph)
        matmul = _single(consumers.get(transpose.output[0], []), "MatMul", key, graph)
        if list(matmul.input).index(transpose.output[0]) != 1:
            raise ConfigError(f"QDQ export {graph}: {key} is not the right-hand side of its MatMul")
        ls, src = scales.scales[layer], by_name[key]
        new_nodes, new_inits = _layer_nodes(layer, matmul, ls, precision, shared_zp)
        model.graph.initializer.extend(new_inits)
        at = list(model.graph.node).index(matmul)
        for offset, node in enumerate(new_nodes):
            model.graph.node.insert(at + offset, node)
        model.graph.node.remove(transpose)
        out, inp = src.shape
        dtype = TensorProto.INT8 if precision is Precision.INT8 else TensorProto.FLOAT8E4M3FN
        replaced[key] = WeightSource(f"{layer}.weight_quantized", dtype, (inp, out),
                                     make=functools.partial(quantized_weight, src, ls, precision))
    kept = [replaced.get(s.name, s) for s in sources]
    return kept, len(replaced)


def _single(nodes: list[onnx.NodeProto], op: str, key: str, graph: str) -> onnx.NodeProto:
    if len(nodes) != 1 or nodes[0].op_type != op:
        found = [n.op_type for n in nodes]
        raise ConfigError(f"QDQ export {graph}: expected {key} to feed one {op}, found {found or 'nothing'}")
    return nodes[0]


def _layer_nodes(layer: str, matmul: onnx.NodeProto, ls: LayerScales, precision: Precision,
                 shared_zp: str) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Nodes (in order, to go right before ``matmul``) and initializers of one quantized layer;
    rewires ``matmul``'s inputs to them."""
    zp_type, _ = _zero_point(precision, ())
    x = matmul.input[0]
    nodes, inits = [], []
    if ls.pre_quant_scale is not None:
        inits.append(_const(f"{layer}.pre_quant_scale", ls.pre_quant_scale))
        nodes.append(helper.make_node("Mul", [x, f"{layer}.pre_quant_scale"], [f"{layer}.smoothed"],
                                      name=f"{layer}.smooth"))
        x = f"{layer}.smoothed"
    inits.append(_const(f"{layer}.input_scale", _scale(ls.input_amax, precision)))
    nodes.append(helper.make_node("QuantizeLinear", [x, f"{layer}.input_scale", shared_zp], [f"{layer}.input_q"],
                                  name=f"{layer}.input_quantize"))
    nodes.append(helper.make_node("DequantizeLinear", [f"{layer}.input_q", f"{layer}.input_scale", shared_zp],
                                  [f"{layer}.input_dq"], name=f"{layer}.input_dequantize"))
    w_scale = _scale(ls.weight_amax, precision)
    inits.append(_const(f"{layer}.weight_scale", w_scale))
    w_zp = shared_zp
    if w_scale.ndim:
        w_zp = f"{layer}.weight_zero_point"
        inits.append(_const(w_zp, _zero_point(precision, w_scale.shape)[1], zp_type))
    dq = helper.make_node("DequantizeLinear", [f"{layer}.weight_quantized", f"{layer}.weight_scale", w_zp],
                          [f"{layer}.weight_dq"], name=f"{layer}.weight_dequantize")
    if w_scale.ndim:
        dq.attribute.append(helper.make_attribute("axis", 1))  # [in, out]: one scale per output column
    nodes.append(dq)
    matmul.input[0], matmul.input[1] = f"{layer}.input_dq", f"{layer}.weight_dq"
    return nodes, inits
