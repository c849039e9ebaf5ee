"""Inference backends behind one small interface (see ``base``)."""

from __future__ import annotations

from qwen_image_edge.runtime.errors import BackendError

BACKENDS = ("onnxruntime", "tensorrt")


def make_backend(name: str, **options):
    """A backend by name; TensorRT needs engines built by ``qwen-image-edge build``."""
    if name == "onnxruntime":
        from qwen_image_edge.runtime.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(**options)
    if name == "tensorrt":
        from qwen_image_edge.runtime.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(**options)
    if name == "counting":  # tests and benchmarks: onnxruntime CPU modelled as a device, bytes counted
        from qwen_image_edge.runtime.backends.counting import CountingBackend

        return CountingBackend(**options)
    raise BackendError(
        f"backend {name!r} is not available; available backends: ['onnxruntime'], and 'tensorrt' "
        "with engines from `qwen-image-edge build`"
    )
