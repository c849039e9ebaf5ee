"""Whether the real TensorRT and a CUDA GPU are here: the gate of the real-TensorRT tests, which skip
elsewhere (every other TensorRT test runs against tests/trt_standin.py)."""

from __future__ import annotations

import importlib.util

from qwen_image_edge.runtime.backends import cuda


def real_trt_and_gpu() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        import tensorrt  # noqa: F401

        return cuda.device_count() > 0
    except Exception:
        return False
