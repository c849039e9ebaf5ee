"""4-bit weight-only linears in ONNX: int4 codes read through block-wise ``DequantizeLinear`` (opset 21).

Shared by the text encoder's language model (``qwen_image_edge.export.encoder_qdq``) and the
transformer (``qwen_image_edge.export.quantized``). Each quantized weight is stored as ``int4``
codes ``[in, out]`` (two per byte) with float32 scales ``[in / block, out]`` and read through
``DequantizeLinear(axis=0, block_size=block)`` feeding the unchanged ``MatMul``; AWQ's per-channel
scale is a ``Mul`` on the input. Why this form: it is the ONNX standard's own 4-bit weight (no
contrib op), TensorRT 10 parses it as its INT4 weight-only GEMM (block-quantized DQ on a
constant, axis 0 or 1), and onnxruntime's CPU provider runs it and fuses ``DQ -> MatMul`` into
its ``MatMulNBits`` kernel. The alternative, ``com.microsoft.MatMulNBits``, is onnxruntime-only.

A graph is traced from a stand-in module whose linears hold the dequantized weights
(``codes * scales``, :func:`stand_in`); the traced fp32 initializers are then found by value and
replaced by codes and scales (:func:`rewrite_int4`), so the graph computes exactly what modelopt's
simulated quantization computes. The transformer's linears left unquantized are stored as float16
weights widened by a ``Cast`` (:func:`store_half_weights`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.nn import functional as F

from qwen_image_edge.export.cleanup import cleanup_graph
from qwen_image_edge.export.qdq import check_quantized_count
from qwen_image_edge.export.registry import example_inputs, graph_io, wrap
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


class DequantizedLinear(nn.Module):
    """``x -> (x * pqs) @ (codes * scales)^T + b``: what the INT4 graph computes, traced once in fp32."""

    def __init__(self, weight: np.ndarray, pqs: np.ndarray | None, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.from_numpy(weight), requires_grad=False)  # [out, in]
        self.pqs = None if pqs is None else nn.Parameter(torch.from_numpy(pqs), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x):
        return F.linear(x if self.pqs is None else x * self.pqs, self.weight, self.bias)


def stand_in(module: nn.Module, layers: Sequence[str]) -> tuple[nn.Module, dict[str, tuple]]:
    """A plain fp32 copy of ``module`` with every INT4 linear of ``layers`` replaced by its dequantized
    twin, and per layer ``(codes, scales, pqs, dequantized [out, in])`` for :func:`rewrite_int4`."""
    weights = {}
    for name in layers:
        layer = module.get_submodule(name)
        codes, scales, pqs = int4_weights(layer)
        block = codes.shape[1] // scales.shape[1]
        dequantized = (codes.astype(np.float32) * np.repeat(scales, block, axis=1)).astype(np.float32)
        weights[name] = (codes, scales, pqs, dequantized, layer.bias)
    plain = copy.deepcopy(module)  # the other modules as they are (modelopt left them unquantized)
    for name, (_, _, pqs, dequantized, bias) in weights.items():
        parent, _, child = name.rpartition(".")
        plain.get_submodule(parent).register_module(child, DequantizedLinear(dequantized, pqs, bias))
    return plain.eval(), {n: w[:4] for n, w in weights.items()}


def round_rest_to_half(module: nn.Module, layers: Sequence[str]) -> None:
    """In place: the weight of every ``nn.Linear`` not in ``layers`` rounded to float16 (and back to
    float32): what the int4 transformer graph computes after :func:`store_half_weights`."""
    skip = set(layers)
    with torch.no_grad():
        for name, sub in module.named_modules():
            if isinstance(sub, nn.Linear) and name not in skip:
                sub.weight.copy_(sub.weight.half().float())


def int4_tensor(name: str, codes: np.ndarray) -> onnx.TensorProto:
    """int4 codes as an ONNX INT4 tensor: two per byte, the first element in the low nibble."""
    flat = codes.astype(np.int8).ravel()
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    nibbles = flat.astype(np.uint8) & 0x0F
    packed = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)
    return helper.make_tensor(name, TensorProto.INT4, list(codes.shape), packed.tobytes(), raw=True)


def rewrite_int4(model: onnx.ModelProto, weights: dict[str, tuple], graph: str, require_all: bool = True) -> int:
    """Replace each traced fp32 weight ``[in, out]`` (found by value) by int4 codes -> blocked DQ;
    returns how many. ``require_all=False`` (one half of the KV-cache pair) lets a layer be absent."""
    by_shape: dict[tuple, list] = {}
    for init in model.graph.initializer:
        by_shape.setdefault(tuple(init.dims), []).append(init)
    done = 0
    for name, (codes, scales, _, dequantized) in weights.items():
        target = dequantized.T  # [in, out]: the MatMul's right operand
        match = [i for i in by_shape.get(target.shape, []) if np.array_equal(numpy_helper.to_array(i), target)]
        if len(match) > 1 or (require_all and not match):
            raise ConfigError(f"INT4 export {graph}: expected one traced weight of {name}, found {len(match)}")
        if not match:
            continue
        init = match[0]
        block = codes.shape[1] // scales.shape[1]
        stem = init.name
        model.graph.initializer.remove(init)
        model.graph.initializer.append(int4_tensor(f"{stem}_int4", codes.T))  # [in, out]
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(scales.T), f"{stem}_scale"))
        node = helper.make_node("DequantizeLinear", [f"{stem}_int4", f"{stem}_scale"], [stem],
                                name=f"{stem}_dequantize", axis=0, block_size=block)  # [in/b, out] scales
        model.graph.node.insert(0, node)
        done += 1
    raise_opset(model, INT4_OPSET)
    return done


def store_half_weights(model: onnx.ModelProto) -> int:
    """The linears left unquantized (embedders, modulation, output projection: weights read only as
    a ``MatMul`` / ``Gemm`` right operand) stored as float16 and widened by a ``Cast`` to float32:
    a weight-only rounding of 2^-11 relative (nothing overflows: |w| is checked), half their bytes,
    activations untouched. Biases, norms and the int4 scales stay float32. Returns how many."""
    uses: dict[str, list[tuple[str, int]]] = {}
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            uses.setdefault(name, []).append((node.op_type, k))
    done = 0
    for init in list(model.graph.initializer):
        readers = uses.get(init.name, [])
        if init.data_type != TensorProto.FLOAT or len(init.dims) != 2 or not readers \
                or any(op not in ("MatMul", "Gemm") or k != 1 for op, k in readers):
            continue
        weight = numpy_helper.to_array(init)
        if not np.isfinite(weight).all() or np.abs(weight).max() > np.finfo(np.float16).max:
            continue
        stem = init.name
        model.graph.initializer.remove(init)
        model.graph.initializer.append(numpy_helper.from_array(weight.astype(np.float16), f"{stem}_fp16"))
        model.graph.node.insert(0, helper.make_node("Cast", [f"{stem}_fp16"], [stem], name=f"{stem}_widen",
                                                    to=TensorProto.FLOAT))
        done += 1
    return done


def raise_opset(model: onnx.ModelProto, version: int) -> None:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = max(op.version, version)


def export_int4_transformer(quantized, cfg, export_dir, max_resolution: int, name: str = "transformer",
                            opset: int = DEFAULT_OPSET, external_threshold: int = PROTOBUF_LIMIT) -> GraphSpec:
    """Graph ``name`` (``transformer`` or one half of the KV-cache pair) of an INT4
    ``QuantizedTransformer``: traced from its dequantized stand-in, weights rewritten to int4 codes."""
    start = time.perf_counter()
    io = graph_io(name, cfg, max_resolution)
    plain, weights = stand_in(quantized.module, quantized.layers)
    model = trace_to_onnx(wrap(name, plain), example_inputs(name, cfg), io, export_dir / name / ONNX_NAME, opset)
    model, _ = cleanup_graph(model, name)
    # each half of the pair holds some of the layers (the condition's K/V or the image's step)
    found = rewrite_int4(model, weights, name, require_all=name == "transformer")
    check_quantized_count(name, found, len(quantized.layers))
    halved = store_half_weights(model)
    declare_outputs(model, io)
    spec = save_graph_spec(model, io, export_dir, Precision.INT4, external_threshold)
    log.info("%s (int4): exported in %.1f s; %d unquantized linear weights stored as fp16", name,
             time.perf_counter() - start, halved)
    return spec
