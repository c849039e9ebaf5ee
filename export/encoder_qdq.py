"""The quantized ``text_encoder`` graph: INT8 as standard QDQ, INT4 as block-wise DequantizeLinear,
and in both the embedding table as int8 rows.

- INT8 (W8A8, SmoothQuant): the fake-quantized module is traced with the TorchScript exporter (the
  path that carries modelopt's Q/DQ nodes) and rewritten by ``qwen_image_edge.export.qdq`` exactly as
  the transformer is: weights stored int8 and pre-transposed, activations ``Q -> DQ`` per tensor,
  SmoothQuant's scales a ``Mul`` before each activation Q.
- INT4 (weight-only): ``qwen_image_edge.export.int4`` (int4 codes through opset-21 block-wise
  ``DequantizeLinear``; its docstring says why that form), measured in tests/test_encoder_quant.py.
- The embedding table ``[vocab, hidden]`` (0.6 B parameters at full size, 2.5 GB in fp32):
  int8 codes with one fp32 scale per row, read as ``Gather(codes, ids) -> Cast(float) ->
  Mul(Unsqueeze(Gather(scales, ids)))``. Why this form: the lookup reads only the prompt's rows,
  so memory stays int8 at run time. A ``DequantizeLinear`` before the ``Gather`` (the QDQ form)
  would compute the whole fp32 table ``[vocab, hidden]`` on every run in onnxruntime (its CPU
  provider keeps DQ nodes unfolded for its QDQ fusions and has no DQ -> Gather fusion), the very
  bytes this saves. TensorRT 10 takes this form as it is: its Gather layer accepts int8
  data (operator docs, T1 includes int8) and its Cast layer converts int8 to float32/float16, so
  the engine keeps the int8 table and does the multiply on the gathered rows only (an
  elementwise op on [B, L, D], no GEMM). The fake-quantized module holds ``codes * scale`` in fp32
  (``calib.encoder_quant``), which the graph reproduces bit for bit (one fp32 product per element).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qwen_image_edge.export.cleanup import cleanup_graph
from qwen_image_edge.export.int4 import rewrite_int4, stand_in
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
EMBED_MAX = 127  # symmetric int8 rows: codes -127..127, scale = row amax / 127


def int8_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An embedding table ``[vocab, hidden]`` as int8 codes ``[vocab, hidden]`` and one fp32 scale per
    row ``[vocab]`` (a token's row is all a lookup reads, so each row gets its own range)."""
    table = np.asarray(table, np.float32)
    scales = (np.maximum(np.abs(table).max(axis=1), 1e-12) / EMBED_MAX).astype(np.float32)  # [vocab]
    codes = np.clip(np.rint(table / scales[:, None]), -EMBED_MAX, EMBED_MAX).astype(np.int8)
    return codes, scales


def dequantized_rows(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``codes * scale`` per row in fp32: the table the fake-quantized module holds, and, one product
    per element, exactly what the graph's ``Cast -> Mul`` computes."""
    return codes.astype(np.float32) * scales[:, None]


def rewrite_int8_embedding(model: onnx.ModelProto, codes: np.ndarray, scales: np.ndarray) -> int:
    """Replace the traced fp32 table (found by value) feeding a ``Gather`` by int8 codes and row scales:
    ``Gather(codes, ids) -> Cast(float) -> Mul(Unsqueeze(Gather(scales, ids), -1))``; returns the
    number of lookups rewritten (one per Gather of the table)."""
    graph = model.graph
    target = dequantized_rows(codes, scales)
    match = [i for i in graph.initializer if tuple(i.dims) == target.shape and i.data_type == TensorProto.FLOAT
             and np.array_equal(numpy_helper.to_array(i), target)]
    if len(match) != 1:
        raise ConfigError(f"INT8 embedding {NAME}: expected one traced table {list(target.shape)}, found {len(match)}")
    stem = match[0].name
    lookups = [n for n in graph.node if n.op_type == "Gather" and n.input[0] == stem]
    readers = [n for n in graph.node if stem in n.input]
    if not lookups or len(readers) != len(lookups):
        raise ConfigError(f"INT8 embedding {NAME}: expected the table {stem} read by Gather nodes only, found "
                          f"{sorted({n.op_type for n in readers})}")
    graph.initializer.remove(match[0])
    graph.initializer.extend([numpy_helper.from_array(codes, f"{stem}_int8"),  # [vocab, hidden]
                              numpy_helper.from_array(scales, f"{stem}_row_scale"),  # [vocab]
                              numpy_helper.from_array(np.array([-1], np.int64), f"{stem}_last_axis")])
    for k, node in enumerate(lookups):
        ids, out, tag = node.input[1], node.output[0], f"{stem}_lookup{k}"
        at = list(graph.node).index(node)
        graph.node.remove(node)
        for j, new in enumerate([
            helper.make_node("Gather", [f"{stem}_int8", ids], [f"{tag}_codes"], name=f"{tag}_codes"),  # [B, L, D] int8
            helper.make_node("Cast", [f"{tag}_codes"], [f"{tag}_float"], name=f"{tag}_cast", to=TensorProto.FLOAT),
            helper.make_node("Gather", [f"{stem}_row_scale", ids], [f"{tag}_scale"], name=f"{tag}_scale"),  # [B, L]
            helper.make_node("Unsqueeze", [f"{tag}_scale", f"{stem}_last_axis"], [f"{tag}_scale_col"],
                             name=f"{tag}_unsqueeze"),  # [B, L, 1]
            helper.make_node("Mul", [f"{tag}_float", f"{tag}_scale_col"], [out], name=f"{tag}_mul"),  # [B, L, D]
        ]):
            graph.node.insert(at + j, new)
    return len(lookups)


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
        plain, weights = stand_in(quantized.module, quantized.layers)
        model = trace_to_onnx(plain, example_inputs(NAME, cfg), io, path, opset)
        model, _ = cleanup_graph(model, NAME)
        found = rewrite_int4(model, weights, NAME)
    if found != want:
        raise ConfigError(f"{precision.value} export {NAME}: expected {want} quantized weights (one per layer), "
                          f"found {found}")
    if quantized.embedding is not None:
        rewrite_int8_embedding(model, *quantized.embedding)
    declare_outputs(model, io)
    spec = save_graph_spec(model, io, export_dir, precision, external_threshold)
    log.info("%s (%s): exported in %.1f s", NAME, precision.value, time.perf_counter() - start)
    return spec
