"""Device memory for a denoising loop that keeps its tensors on the device.

A backend with a device gives a :class:`DeviceOps` (``Backend.device_ops()``): upload a host array
once, allocate an output buffer, read a result back, free. Its sessions take
``run_bound(feeds, outputs)``: ``feeds`` mixes device tensors (bound, no copy) and small numpy
arrays (the per-step schedule scalars, copied in), and every output is written into the
preallocated device tensor given for it. ``qwen_image_edge.runtime.device_loop`` drives it.

Here: onnxruntime through IO binding (:class:`OrtDeviceOps`, ``OrtValue`` s on ``cuda`` for the
CUDA / TensorRT providers; on ``cpu`` it is the same code over host memory, which is how the
counting backend and the tests run it). TensorRT's own lives in ``trt_device``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from qwen_image_edge.runtime.backends.base import check_feeds, itemsize, numpy_dtype
from qwen_image_edge.runtime.errors import BackendError, ShapeError
from qwen_image_edge.runtime.manifest import GraphSpec


class DeviceTensor(Protocol):
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int: ...


class DeviceOps(Protocol):
    name: str

    def upload(self, arr: np.ndarray) -> DeviceTensor: ...

    def empty(self, shape: tuple[int, ...], dtype: str) -> DeviceTensor: ...

    def download(self, tensor: DeviceTensor) -> np.ndarray: ...

    def free(self, tensor: DeviceTensor) -> None: ...


def nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * itemsize(dtype)


def check_bound(spec: GraphSpec, feeds: dict[str, Any], outputs: dict[str, Any], ranges: dict | None = None) -> dict:
    """``check_feeds`` for mixed host/device feeds, plus: every declared output has a buffer, and no
    input is one of them (kernels assume distinct buffers: an output written while read is garbage)."""
    checked = check_feeds(spec if ranges is None else dataclasses.replace(spec, dim_ranges=dict(ranges)), feeds)
    names = [t.name for t in spec.outputs]
    if sorted(outputs) != sorted(names):
        raise ShapeError(f"{spec.name}: output buffers for {sorted(outputs)}, expected {names}")
    for name, value in feeds.items():
        if any(value is out for out in outputs.values()):
            raise BackendError(f"{spec.name}: input {name!r} is also an output buffer of this call; "
                               "use two buffers (ping-pong)")
    return checked


# ----------------------------------------------------------------------------- onnxruntime


@dataclass(frozen=True, eq=False)
class OrtTensor:
    """An ``OrtValue`` with its shape and dtype (numpy name)."""

    value: Any  # onnxruntime.OrtValue
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)


class OrtDeviceOps:
    """``OrtValue`` s on ``device_type`` (``cuda`` for onnxruntime-gpu; ``cpu`` runs the same
    binding code over host memory)."""

    def __init__(self, device_type: str = "cuda", device_id: int = 0):
        from qwen_image_edge.runtime.backends.onnxruntime import _ort

        self._ort = _ort()
        self.device_type, self.device_id = device_type, device_id
        self.name = f"onnxruntime {device_type}:{device_id}"

    def upload(self, arr: np.ndarray) -> OrtTensor:
        # on the CPU the OrtValue is backed by the array itself: a private copy, so the caller's
        # array can change afterwards as a host-to-device copy would allow
        arr = np.array(arr, copy=True, order="C")
        value = self._ort.OrtValue.ortvalue_from_numpy(arr, self.device_type, self.device_id)
        return OrtTensor(value, tuple(arr.shape), str(arr.dtype))

    def empty(self, shape: tuple[int, ...], dtype: str) -> OrtTensor:
        value = self._ort.OrtValue.ortvalue_from_shape_and_type(list(shape), numpy_dtype(dtype).type, self.device_type,
                                                                self.device_id)
        return OrtTensor(value, tuple(int(d) for d in shape), dtype)

    def download(self, tensor: OrtTensor) -> np.ndarray:
        return np.array(tensor.value.numpy(), copy=True)

    def free(self, tensor: OrtTensor) -> None:
        pass  # OrtValues free their memory when collected


def run_io_binding(session, spec: GraphSpec, feeds: dict[str, Any], outputs: dict[str, OrtTensor]) -> None:
    """One onnxruntime call through IO binding: device inputs bound as they are, numpy ones copied
    in by onnxruntime, every output written into its preallocated ``OrtValue``."""
    feeds = check_bound(spec, feeds, outputs)
    binding = session.io_binding()
    for name, value in feeds.items():
        if isinstance(value, np.ndarray):
            binding.bind_cpu_input(name, value)
        else:
            binding.bind_ortvalue_input(name, value.value)
    for name, out in outputs.items():
        binding.bind_ortvalue_output(name, out.value)
    try:
        session.run_with_iobinding(binding)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BackendError(f"{spec.name}: onnxruntime failed: {exc}") from None
