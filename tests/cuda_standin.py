"""The CUDA runtime half of the TensorRT stand-in (tests/trt_standin.py): cuda-python's ``cudart``
as ``qwen_image_edge.runtime.backends.cuda`` calls it, with device memory, streams and graphs modelled
and checked the way compute-sanitizer would (see tests/trt_standin.py's docstring for the rules).
"""

from __future__ import annotations

import ctypes
import enum
import types

import numpy as np

GPU = {"name": b"NVIDIA Stand-in GPU", "major": 9, "minor": 0}


class MisuseError(AssertionError):
    """The code under test used the API in a way the real one rejects."""


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise MisuseError(msg)


def _overlap(a, b) -> bool:
    (pa, na), (pb, nb) = a, b
    return na > 0 and nb > 0 and pa < pb + nb and pb < pa + na


# ----------------------------------------------------------------------------- cudart


class _Handle:
    def __init__(self, value):
        self.value = value

    def __int__(self):
        return self.value


class FakeCudart(types.SimpleNamespace):
    cudaError_t = enum.IntEnum("cudaError_t", {"cudaSuccess": 0, "cudaErrorInvalidValue": 1,
                                               "cudaErrorStreamCaptureInvalidated": 901,
                                               "cudaErrorInsufficientDriver": 35})
    __version__ = "12.9.0"  # the cuda-python binding's version (its CUDA major: what the driver must support)
    cudaMemcpyKind = enum.IntEnum("cudaMemcpyKind", {"cudaMemcpyHostToDevice": 1, "cudaMemcpyDeviceToHost": 2,
                                                     "cudaMemcpyDeviceToDevice": 3})
    cudaStreamCaptureMode = enum.IntEnum("cudaStreamCaptureMode", {"cudaStreamCaptureModeGlobal": 0,
                                                                   "cudaStreamCaptureModeThreadLocal": 1})

    def reset(self):
        self.memory: dict[int, ctypes.Array] = {}  # live allocations by base address
        self.written: dict[int, np.ndarray] = {}  # per allocation, which bytes something wrote
        self.freed: dict[int, ctypes.Array] = {}  # kept alive, so a freed address is never handed out again
        self.streams: dict[int, list] = {}  # queued (kind, run, reads, writes); reads/writes: (ptr, nbytes, what)
        self.capturing: dict[int, list] = {}
        self.graphs: dict[int, list] = {}
        self.calls: list[str] = []
        self._next = 1
        self.driver = 12080  # cudaDriverGetVersion: CUDA 12.8
        self.fail_capture = False  # a captured kernel that cannot be captured: EndCapture reports invalidation

    def _ok(self, *rest):
        return (self.cudaError_t.cudaSuccess, *rest)

    def check_device(self, ptr, nbytes, what=""):
        """The base of the live allocation holding ``nbytes`` at ``ptr``; raises otherwise."""
        for base, buf in self.memory.items():
            if base <= ptr and ptr + nbytes <= base + ctypes.sizeof(buf):
                return base
        if self._in(self.freed, ptr):
            raise MisuseError(f"{what}: {ptr:#x} is in device memory that was freed (use after cudaFree)")
        raise MisuseError(f"{what}: {nbytes} bytes at {ptr:#x} are not inside a live device allocation")

    @staticmethod
    def _in(pool, ptr):
        return any(base <= ptr < base + ctypes.sizeof(buf) for base, buf in pool.items())

    def _is_device(self, ptr):
        return self._in(self.memory, ptr) or self._in(self.freed, ptr)

    def _run_op(self, op):
        """Run a queued operation as the device would, checking what it touches first."""
        kind, run, reads, writes = op
        for ptr, nbytes, what in writes:
            self.check_device(ptr, nbytes, what)
        for ptr, nbytes, what in reads:
            base = self.check_device(ptr, nbytes, what)
            unwritten = int(np.count_nonzero(~self.written[base][ptr - base:ptr - base + nbytes]))
            _need(not unwritten, f"{what}: reads {unwritten} of {nbytes} bytes at {ptr:#x} that nothing wrote "
                                 "(uninitialised device memory)")
        run()
        for ptr, nbytes, _ in writes:
            base = self.check_device(ptr, nbytes)
            self.written[base][ptr - base:ptr - base + nbytes] = True

    def read(self, ptr, shape, dtype):
        n = int(np.prod(shape)) * dtype.itemsize
        return np.frombuffer(ctypes.string_at(ptr, n), dtype=dtype).reshape(shape).copy()

    def write(self, ptr, arr):
        ctypes.memmove(ptr, arr.ctypes.data, arr.nbytes)

    def enqueue(self, stream, op):
        _need(stream in self.streams, f"unknown stream {stream:#x}")
        (self.capturing[stream] if stream in self.capturing else self.streams[stream]).append(op)

    # the cudart functions used by qwen_image_edge.runtime.backends.cuda
    def cudaGetErrorString(self, err):
        return self._ok(f"stand-in error {int(err)}".encode())

    def cudaDriverGetVersion(self):
        return self._ok(self.driver)

    def cudaGetDeviceCount(self):
        if self.driver // 1000 < int(self.__version__.split(".")[0]):
            return (self.cudaError_t.cudaErrorInsufficientDriver, 0)

        return self._ok(1)

    def cudaGetDevice(self):
        return self._ok(0)

    def cudaGetDeviceProperties(self, device):
        return self._ok(types.SimpleNamespace(**GPU))

    def cudaMalloc(self, size):
        self.calls.append("cudaMalloc")
        buf = ctypes.create_string_buffer(size)
        ctypes.memset(buf, 0xFF, size)  # what was there before: NaN as any float, -1 as a signed int
        self.memory[ctypes.addressof(buf)] = buf
        self.written[ctypes.addressof(buf)] = np.zeros(size, bool)
        return self._ok(ctypes.addressof(buf))

    def cudaFree(self, ptr):
        self.calls.append("cudaFree")
        _need(ptr not in self.freed, f"cudaFree of {ptr:#x}: freed twice")
        _need(ptr in self.memory, f"cudaFree of {ptr:#x}: not an allocation")
        span = (ptr, ctypes.sizeof(self.memory[ptr]))
        queued = [f"{kind} on stream {s:#x}" for s, ops in self.streams.items() for kind, _, reads, writes in ops
                  if any(_overlap(span, (p, n)) for p, n, _ in (*reads, *writes))]
        _need(not queued, f"cudaFree of {ptr:#x} while queued work still uses it ({queued}): synchronize first")
        self.freed[ptr] = self.memory.pop(ptr)
        del self.written[ptr]
        return self._ok()

    def cudaStreamCreate(self):
        handle = 0x5000 + self._next
        self._next += 1
        self.streams[handle] = []
        return self._ok(_Handle(handle))

    def cudaStreamDestroy(self, stream):
        self.streams.pop(int(stream))
        return self._ok()

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        s = int(stream)
        self.calls.append(f"cudaMemcpyAsync:{kind.name}")
        _need(s not in self.capturing, "memcpy inside a CUDA graph capture would bake host pointers into the graph")
        d_dev, s_dev = kind in (self.cudaMemcpyKind.cudaMemcpyHostToDevice, self.cudaMemcpyKind.cudaMemcpyDeviceToDevice), \
            kind in (self.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.cudaMemcpyKind.cudaMemcpyDeviceToDevice)
        _need(self._is_device(dst) == d_dev and self._is_device(src) == s_dev, f"memcpy {kind.name}: pointer kinds")
        if d_dev:
            self.check_device(dst, count, "memcpy destination")
        if s_dev:
            self.check_device(src, count, "memcpy source")
        reads = [(src, count, f"{kind.name} source")] if s_dev else []
        writes = [(dst, count, f"{kind.name} destination")] if d_dev else []
        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:  # pageable source: staged at the call
            data = ctypes.string_at(src, count)
            self.enqueue(s, ("h2d", lambda: ctypes.memmove(dst, data, count), reads, writes))
        else:
            self.enqueue(s, ("copy", lambda: ctypes.memmove(dst, src, count), reads, writes))
        return self._ok()

    def cudaStreamSynchronize(self, stream):
        s = int(stream)
        _need(s not in self.capturing, "synchronize during capture")
        ops, self.streams[s] = self.streams[s], []
        for op in ops:
            self._run_op(op)
        return self._ok()

    def cudaStreamBeginCapture(self, stream, mode):
        self.calls.append("cudaStreamBeginCapture")
        _need(isinstance(mode, self.cudaStreamCaptureMode), "capture mode")
        self.capturing[int(stream)] = []
        return self._ok()

    def cudaStreamEndCapture(self, stream):
        self.calls.append("cudaStreamEndCapture")
        ops = self.capturing.pop(int(stream))
        if self.fail_capture:  # the capture ends, nothing was run, no graph exists
            return (self.cudaError_t.cudaErrorStreamCaptureInvalidated, None)
        _need(ops and all(op[0] == "execute" for op in ops), f"captured {[op[0] for op in ops]}")
        self.graphs[id(ops)] = ops
        return self._ok(_Handle(id(ops)))

    def cudaGraphInstantiate(self, graph, flags):
        return self._ok(_Handle(int(graph)))

    def cudaGraphLaunch(self, graph_exec, stream):
        self.calls.append("cudaGraphLaunch")
        for op in self.graphs[int(graph_exec)]:
            self.enqueue(int(stream), op)
        return self._ok()

    def cudaGraphExecDestroy(self, graph_exec):
        return self._ok()

    def cudaGraphDestroy(self, graph):
        self.graphs.pop(int(graph), None)
        return self._ok()


CUDART = FakeCudart()
CUDART.reset()
