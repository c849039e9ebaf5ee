"""What the TensorRT stand-in (``tests/trt_standin.py``) runs in place of a reduced-precision engine:
fp16 / bf16 rounding of float32 values and graphs, and float32 edges for bf16 / fp8 engine IO."""

from __future__ import annotations

import numpy as np


def _as_float(x: np.ndarray) -> np.ndarray:
    """bf16 / fp8 (ml_dtypes) feeds as float32, exactly: what ``_float_io`` graphs take."""
    return x.astype(np.float32) if x.dtype.name in ("bfloat16", "float8_e4m3fn") else x


def round_to(x: np.ndarray, precision: str | None) -> np.ndarray:
    """float32 values rounded to nearest even in fp16 or bf16, kept float32; other dtypes unchanged."""
    if precision is None or x.dtype != np.float32:
        return x
    if precision == "FP16":
        with np.errstate(over="ignore"):  # numpy rounds to nearest even; beyond 65504 gives inf, as fp16 does
            return x.astype(np.float16).astype(np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # bf16 = the top 16 bits, rounded to nearest even
    return np.where(np.isnan(x), x, bits.astype(np.uint32).view(np.float32))


def _rounded_model(path: str, precision: str) -> bytes:
    """The ONNX graph with its float32 initializers and Constant tensors rounded to ``precision``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    for t in tensors:
        if t.data_type == onnx.TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(round_to(numpy_helper.to_array(t), precision), t.name))
    return model.SerializeToString()


def _float_io(model) -> bytes:
    """The graph with its bf16 / fp8 inputs and outputs as float32 (exact Casts at the edges):
    onnxruntime's Python API has no numpy type for them, the engine's IO is ml_dtypes arrays."""
    import onnx

    model = onnx.load(model) if isinstance(model, str) else onnx.load_from_string(model)
    narrow = {onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT8E4M3FN}
    g = model.graph
    for values, is_input in ((g.input, True), (g.output, False)):
        for vi in values:
            t = vi.type.tensor_type
            if t.elem_type not in narrow:
                continue
            inner = f"{vi.name}__narrow"
            for node in g.node:
                ends = node.input if is_input else node.output
                ends[:] = [inner if x == vi.name else x for x in ends]
            if is_input:
                g.node.insert(0, onnx.helper.make_node("Cast", [vi.name], [inner], to=t.elem_type))
            else:
                g.node.append(onnx.helper.make_node("Cast", [inner], [vi.name], to=onnx.TensorProto.FLOAT))
            t.elem_type = onnx.TensorProto.FLOAT
    return model.SerializeToString()
