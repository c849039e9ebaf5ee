"""The quantized ``text_encoder`` graph: INT8 as standard QDQ, INT4 as block-wise DequantizeLinear.

- INT8 (W8A8, SmoothQuant): the fake-quantized module is traced with the TorchScript exporter (the
  path that carries modelopt's Q/DQ nodes) and rewritten by ``qwen_image_edge.export.qdq`` exactly as
  the transformer is: weights stored int8 and pre-transposed, activations ``Q -> DQ`` per tensor,
  SmoothQuant's scales a ``Mul`` before each activation Q.
- INT4 (weight-only): each quantized weight is stored as ``int4`` codes ``[in, out]`` with float32
  scales ``[in / block, out]`` and read through ``DequantizeLinear(axis=0, block_size=block)``
  (opset 21), feeding the unchanged ``MatMul``; AWQ's per-channel scale is a ``Mul`` on the input.
  Why this form: it is the ONNX standard's own 4-bit weight (no contrib op), TensorRT 10 parses it
  as its INT4 weight-only GEMM (block-quantized DQ on a constant, axis 0 or 1), and onnxruntime's
  CPU provider runs it (1.32, measured in tests/test_encoder_quant.py) and fuses ``DQ -> MatMul``
  into its ``MatMulNBits`` kernel. The alternative, the ``com.microsoft.MatMulNBits`` contrib op, is
  onnxruntime-only.

The INT4 graph is traced from a stand-in module whose linears hold the dequantized weights
(``codes * scales``); the traced fp32 initializers are then found by value and replaced by codes
and scales, so the graph computes exactly what modelopt's simulated quantization computes.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.nn import functional as F

from qwen_image_edge.export.cleanup import cleanup_graph
from qwen_image_edge.export.qdq import to_standard_qdq
from qwen_image_edge.export.registry import example_inputs, graph_io
from qwen_image_edge.export.trace import (
    DEFAULT_OPSET,
    ONNX_NAME,
    PROTOBUF_LIMIT,
    declare_outputs,
    save_graph_spec,
    trace_to_onnx,
)
from qwen_image_edge.runtime.errors import ConfigError
from qwen_image_edge.runtime.manifest import GraphSpec, Precision

log = logging.getLogger(__name__)

NAME = "text_encoder"
INT4_OPSET = 21  # int4 tensors and DequantizeLinear's block_size
INT4_MAX = 7  # symmetric signed 4 bit: codes -8..7, scale amax / 7 (modelopt's INT4 rule)


def int4_weights(layer: nn.Module) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A calibrated INT4 linear's ``(codes int8 [out, in] in -8..7, scales float32 [out, in / block],
    pre_quant_scale float32 [in] or None)``: ``W ~= codes * scales`` per block, input ``x * pqs``."""
    w = layer.weight.detach().float().cpu().numpy()  # [out, in] (AWQ already divided its scales out)
    amax = layer.weight_quantizer.amax.detach().float().cpu().numpy().reshape(w.shape[0], -1)  # [out, blocks]
    scales = np.maximum(amax, 1e-12) / INT4_MAX
    block = w.shape[1] // scales.shape[1]
    codes = np.clip(np.rint(w / np.repeat(scales, block, axis=1)), -INT4_MAX - 1, INT4_MAX).astype(np.int8)
    pqs = getattr(layer.input_quantizer, "pre_quant_scale", None)
    return codes, scales.astype(np.float32), None if pqs is None else pqs.detach().float().cpu().numpy()


class _DequantizedLinear(nn.Module):
    """``x -> (x * pqs) @ (codes * scales)^T``: what the INT4 graph computes, traced once in fp32."""

    def __init__(self, weight: np.ndarray, pqs: np.ndarray | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.from_numpy(weight), requires_grad=False)  # [out, in]
        self.pqs = None if pqs is None else nn.Parameter(torch.from_numpy(pqs), requires_grad=False)

    def forward(self, x):
        return F.linear(x if self.pqs is None else x * self.pqs, self.weight)


def _stand_in(quantized) -> tuple[nn.Module, dict[str, tuple]]:
    """A plain fp32 copy of the graph module with every INT4 linear replaced by its dequantized twin."""
    module = quantized.module
    weights = {}
    for name in quantized.layers:
        codes, scales, pqs = int4_weights(module.get_submodule(name))
        block = codes.shape[1] // scales.shape[1]
        dequantized = (codes.astype(np.float32) * np.repeat(scales, block, axis=1)).astype(np.float32)
        weights[name] = (codes, scales, pqs, dequantized)
    plain = copy.deepcopy(module)  # the other modules as they are (modelopt left them unquantized)
    for name, (_, _, pqs, dequantized) in weights.items():
        parent, _, child = name.rpartition(".")
        plain.get_submodule(parent).register_module(child, _DequantizedLinear(dequantized, pqs))
    return plain.eval(), weights


def _int4_tensor(name: str, codes: np.ndarray) -> onnx.TensorProto:
    """int4 codes as an ONNX INT4 tensor: two per byte, the first element in the low nibble."""
    flat = codes.astype(np.int8).ravel()
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    nibbles = flat.astype(np.uint8) & 0x0F
    packed = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)
    return helper.make_tensor(name, TensorProto.INT4, list(codes.shape), packed.tobytes(), raw=True)


def rewrite_int4(model: onnx.ModelProto, weights: dict[str, tuple]) -> int:
    """Replace each traced fp32 weight ``[in, out]`` (found by value) by int4 codes -> blocked DQ."""
    graph = model.graph
    by_shape: dict[tuple, list] = {}
    for init in graph.initializer:
        by_shape.setdefault(tuple(init.dims), []).append(init)
    done = 0
    for name, (codes, scales, _, dequantized) in weights.items():
        target = dequantized.T  # [in, out]: the MatMul's right operand
        match = [i for i in by_shape.get(target.shape, []) if np.array_equal(numpy_helper.to_array(i), target)]
        if len(match) != 1:
            raise ConfigError(f"INT4 export {NAME}: expected one traced weight of {name}, found {len(match)}")
        init = match[0]
        block = codes.shape[1] // scales.shape[1]
        stem = init.name
        graph.initializer.remove(init)
        graph.initializer.append(_int4_tensor(f"{stem}_int4", codes.T))  # [in, out]
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(scales.T), f"{stem}_scale"))  # [in/b, out]
        node = helper.make_node("DequantizeLinear", [f"{stem}_int4", f"{stem}_scale"], [stem],
                                name=f"{stem}_dequantize", axis=0, block_size=block)
        graph.node.insert(0, node)
        done += 1
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = max(op.version, INT4_OPSET)
    return done


def export_quantized_text_encoder(quantized, cfg, export_dir: Path, max_resolution: int,
                                  opset: int = DEFAULT_OPSET, external_threshold: int = PROTOBUF_LIMIT) -> GraphSpec:
    """Trace, rewrite and save the quantized ``text_encoder`` graph of ``quantized`` (a
    ``qwen_image_edge.calib.encoder_quant.QuantizedEncoder``: module, policy, layers) under ``export_dir``."""
    start = time.perf_counter()
    io = graph_io(NAME, cfg, max_resolution)
    path = export_dir / NAME / ONNX_NAME
    precision = quantized.policy.precision
    want = len(quantized.layers)
    if precision is Precision.INT8:
        model = trace_to_onnx(quantized.module, example_inputs(NAME, cfg), io, path, opset)
        model, stats = to_standard_qdq(model, Precision.INT8)
        found = stats.folded_weights
    else:
        plain, weights = _stand_in(quantized)
        model = trace_to_onnx(plain, example_inputs(NAME, cfg), io, path, opset)
        model, _ = cleanup_graph(model, NAME)
        found = rewrite_int4(model, weights)
    if found != want:
        raise ConfigError(f"{precision.value} export {NAME}: expected {want} quantized weights (one per layer), "
                          f"found {found}")
    declare_outputs(model, io)
    spec = save_graph_spec(model, io, export_dir, precision, external_threshold)
    log.info("%s (%s): exported in %.1f s", NAME, precision.value, time.perf_counter() - start)
    return spec
