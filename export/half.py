"""fp32 ONNX graph -> fp16 graph with fp32 inputs and outputs, keeping fp32 where fp16 would overflow.

fp16 holds magnitudes up to 65504. A VAE decoder's late up-blocks and its norms' sums of squares
are where image models overflow (SD-XL's VAE is the known case), so before converting, every
float tensor of the fp32 graph is run in onnxruntime on sample feeds and its abs max recorded:
a node that reads or writes a tensor past ``FP16_MAX / HEADROOM`` stays fp32, and so do the reductions whose
internal sums grow as the square of their inputs (``ReduceL2``, ``ReduceSumSquare``, ``Pow``).
The rest runs in fp16 (onnxconverter-common's converter, inputs and outputs kept fp32 so the
runtime and the manifest's IOSpec do not change). What was kept, and the measured maximum, are
returned for the manifest's provenance.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qwen_image_edge.runtime.errors import ConfigError

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
HEADROOM = 4.0  # inputs outside the samples (other images, sizes) may run a few times larger
SQUARING_OPS = ("ReduceL2", "ReduceSumSquare", "Pow")


@dataclass(frozen=True)
class HalfRecord:
    max_activation: float  # over every float tensor of the fp32 graph, on the sample feeds
    bound: float  # FP16_MAX / HEADROOM
    fp32_nodes: tuple[str, ...]  # kept fp32 because their output passed the bound
    fp32_ops: tuple[str, ...]  # op types kept fp32 by rule
    samples: int

    def to_dict(self) -> dict:
        return {"precision": "fp16", "max_activation": self.max_activation, "bound": self.bound,
                "fp32_nodes": list(self.fp32_nodes), "fp32_ops": list(self.fp32_ops), "samples": self.samples}


def activation_maxima(model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
    """Abs max of every float node output of ``model`` over ``feeds`` (onnxruntime, CPU)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name and name not in known:
                probe.graph.output.append(helper.make_empty_tensor_value_info(name))  # type left to inference
                known.add(name)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph's own tensors
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    maxima: dict[str, float] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            value = np.asarray(value)
            finite = np.abs(value[np.isfinite(value)]) if value.dtype.kind == "f" else None
            if finite is not None and finite.size:  # -inf attention masks are by design (fp16 has inf too)
                m = float(finite.max())
                maxima[name] = max(maxima.get(name, 0.0), m)
    return maxima


def _fix_casts(model: onnx.ModelProto, original: set[str], kept: set[str]) -> None:
    """The converter retypes a graph's own ``Cast(to=float)`` outputs as fp16 but leaves the
    attribute (onnxruntime then refuses the graph): inside the fp16 region they cast to fp16."""
    for node in model.graph.node:
        if node.op_type == "Cast" and node.name in original and node.name not in kept:
            for attr in node.attribute:
                if attr.name == "to" and attr.i == TensorProto.FLOAT:
                    attr.i = TensorProto.FLOAT16


def to_half(model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]],
            headroom: float = HEADROOM) -> tuple[onnx.ModelProto, HalfRecord]:
    """An fp16 copy of ``model`` (fp32 IO), with the nodes that would overflow kept fp32."""
    from onnxconverter_common import float16

    if not feeds:
        raise ConfigError(f"fp16 conversion of {model.graph.name!r}: expected sample feeds to measure "
                          "activations, got none")
    maxima = activation_maxima(model, feeds)
    for init in model.graph.initializer:  # constants too: the converter would clip them
        values = numpy_helper.to_array(init)
        if values.dtype.kind == "f" and values.size:
            maxima[init.name] = float(np.abs(values[np.isfinite(values)]).max(initial=0.0))
    for feed in feeds:
        for name, value in feed.items():
            if np.asarray(value).dtype.kind == "f" and np.asarray(value).size:
                maxima[name] = max(maxima.get(name, 0.0), float(np.abs(value).max()))
    bound = FP16_MAX / headroom
    # a node reading or writing a tensor past the bound stays fp32 (a cast into fp16 would overflow too)
    hot = {node.name for node in model.graph.node
           if any(maxima.get(t, 0.0) > bound for t in list(node.input) + list(node.output))}
    squaring = {node.name for node in model.graph.node if node.op_type in SQUARING_OPS}
    kept = hot | squaring
    casts = {n.name for n in model.graph.node if n.op_type == "Cast"}
    # max_finite_val: the converter's default clips every constant to 1e4, well inside fp16's range
    with warnings.catch_warnings(record=True) as notes:  # constants it clips (e.g. -inf mask fills to -65504)
        warnings.simplefilter("always")
        half = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=sorted(kept),
                                                max_finite_val=FP16_MAX)
    for note in notes:
        log.info("fp16 converter: %s", note.message)
    _fix_casts(half, casts, kept)
    record = HalfRecord(max(maxima.values(), default=0.0), bound, tuple(sorted(hot)),
                        tuple(sorted({n.op_type for n in model.graph.node if n.name in squaring})), len(feeds))
    log.info("fp16: max activation %.1f (bound %.0f), %d nodes kept fp32 for range, %d by rule",
             record.max_activation, bound, len(hot), len(squaring))
    return half, record
