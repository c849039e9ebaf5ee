"""A thin, import-guarded wrapper over cuda-python's runtime API (``cudart``): memory, streams, graphs.

Followed: cuda-python 12.x / 13.x, where the module is ``cuda.bindings.runtime`` (older releases:
``cuda.cudart``). Every call returns a tuple whose first item is a ``cudaError_t``; :func:`call`
turns a failure into a :class:`BackendError` naming the call. Pointers are plain ``int`` device
addresses, which is what TensorRT's ``set_tensor_address`` takes. No torch, no pycuda.

Tests replace the module with a stand-in through :func:`set_cudart` (see ``tests/trt_standin.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from qwen_image_edge.runtime.errors import BackendError

log = logging.getLogger(__name__)

INSTALL_HINT = ("pip install 'cuda-python>=12.6,<13' (the 'trt' extra: pip install 'qwen-image-edge[trt]'; "
                "cuda-python 13.x needs an R580+ driver)")
_CUDART = None


def set_cudart(module) -> None:
    """Use ``module`` as the CUDA runtime binding (``None``: import cuda-python again)."""
    global _CUDART
    _CUDART = module


def cudart():
    global _CUDART
    if _CUDART is None:
        try:
            from cuda.bindings import runtime as module
        except ImportError:
            try:
                from cuda import cudart as module  # cuda-python < 12.6
            except ImportError:
                raise BackendError(f"CUDA: cuda-python is not installed; {INSTALL_HINT}") from None
        _CUDART = module
    return _CUDART


def binding_major(module) -> int | None:
    """The CUDA major version a cuda-python binding was built for (12 or 13), when it says."""
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            import cuda.bindings as bindings

            version = bindings.__version__
        except (ImportError, AttributeError):
            return None
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def check_driver() -> int:
    """The driver's CUDA version (e.g. 12040 for 12.4); a BackendError when it is older than the
    cuda-python binding needs (13.x on a 12.x driver fails every call with an opaque error)."""
    rt = cudart()
    err, version = rt.cudaDriverGetVersion()
    if err != rt.cudaError_t.cudaSuccess or not version:
        raise BackendError(f"CUDA: no usable NVIDIA driver (cudaDriverGetVersion: {getattr(err, 'name', err)})")
    need = binding_major(rt)
    if need is not None and int(version) // 1000 < need:
        raise BackendError(f"CUDA: cuda-python {need}.x needs a driver for CUDA {need}.0 or newer; this driver supports "
                           f"CUDA {int(version) // 1000}.{int(version) % 1000 // 10}: {INSTALL_HINT}")
    return int(version)


def call(name: str, *args):
    """``cudart.<name>(*args)``; raises on an error code, returns the remaining results."""
    rt = cudart()
    result = getattr(rt, name)(*args)
    err, rest = result[0], result[1:]
    if err != rt.cudaError_t.cudaSuccess:
        _, msg = rt.cudaGetErrorString(err)
        raise BackendError(f"CUDA {name} failed: {getattr(err, 'name', err)}: {msg.decode(errors='replace')}")
    return rest[0] if len(rest) == 1 else rest


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]

    def __str__(self) -> str:
        return f"{self.name} (sm {self.compute_capability[0]}.{self.compute_capability[1]})"


def device_count() -> int:
    return int(call("cudaGetDeviceCount"))


def device_info(device: int | None = None) -> GpuInfo:
    if device is None:
        device = int(call("cudaGetDevice"))
    props = call("cudaGetDeviceProperties", device)
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(name.rstrip("\x00").strip(), (int(props.major), int(props.minor)))


class DeviceBuffer:
    """``cudaMalloc``'d bytes; grows (reallocates) only when a larger size is needed."""

    def __init__(self, nbytes: int):
        self.capacity = 0
        self.ptr = 0
        self.ensure(nbytes)

    def ensure(self, nbytes: int) -> bool:
        """Make room for ``nbytes``; True when the address changed."""
        nbytes = max(int(nbytes), 256)  # zero-sized tensors still get a valid, aligned address
        if nbytes <= self.capacity:
            return False
        self.free()
        self.ptr = int(call("cudaMalloc", nbytes))
        self.capacity = nbytes
        return True

    def free(self) -> None:
        if self.ptr:
            call("cudaFree", self.ptr)
        self.ptr, self.capacity = 0, 0


class Stream:
    def __init__(self):
        self._stream = call("cudaStreamCreate")
        self.handle = int(self._stream)

    def synchronize(self) -> None:
        if self._stream is not None:  # a destroyed stream has nothing left to wait for
            call("cudaStreamSynchronize", self._stream)

    def destroy(self) -> None:
        if self._stream is not None:
            call("cudaStreamDestroy", self._stream)
            self._stream = None


def copy_to_device(dst: int, src: np.ndarray, stream: Stream) -> None:
    rt = cudart()
    src = np.ascontiguousarray(src)
    if src.nbytes:
        call("cudaMemcpyAsync", dst, src.ctypes.data, src.nbytes,
             rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream._stream)


def copy_to_host(dst: np.ndarray, src: int, stream: Stream) -> None:
    rt = cudart()
    if dst.nbytes:
        call("cudaMemcpyAsync", dst.ctypes.data, src, dst.nbytes,
             rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream._stream)


def copy_on_device(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    rt = cudart()
    if nbytes:
        call("cudaMemcpyAsync", dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream._stream)


class CudaGraph:
    """Stream capture of a sequence of launches, replayed with ``cudaGraphLaunch``."""

    def __init__(self, stream: Stream):
        self.stream = stream
        self._graph = None
        self._exec = None

    def begin(self) -> None:
        rt = cudart()
        call("cudaStreamBeginCapture", self.stream._stream,
             rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)

    def end(self) -> None:
        self._graph = call("cudaStreamEndCapture", self.stream._stream)
        self._exec = call("cudaGraphInstantiate", self._graph, 0)

    def launch(self) -> None:
        call("cudaGraphLaunch", self._exec, self.stream._stream)

    def destroy(self) -> None:
        if self._exec is not None:
            call("cudaGraphExecDestroy", self._exec)
        if self._graph is not None:
            call("cudaGraphDestroy", self._graph)
        self._graph = self._exec = None
