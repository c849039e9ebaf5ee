"""A backend that models a device on the CPU and counts the bytes crossing host and device.

It wraps onnxruntime on the CPU and treats onnxruntime's memory as "the device": a numpy array
handed to a graph (``Session.run`` feeds, the numpy feeds of ``run_bound``) or uploaded
(``DeviceOps.upload``) crosses host -> device; an output returned as numpy or downloaded crosses
device -> host; tensors bound by ``run_bound`` stay where they are. The device loop runs over it
through the same IO-binding code as onnxruntime's CUDA provider (``OrtDeviceOps`` on ``cpu``), so
the claim "only scalars cross per step" is measured here without a GPU. Tests and
``bench/runtime.py`` use it: ``Pipeline.load(export, backend="counting")``, then ``pipe.backend.traffic``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwen_image_edge.runtime.backends.device import OrtDeviceOps, OrtTensor
from qwen_image_edge.runtime.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeSession
from qwen_image_edge.runtime.manifest import GraphSpec


@dataclass
class Traffic:
    """Bytes host -> device and device -> host, in total and per call (``(what, h2d, d2h)``)."""

    h2d: int = 0
    d2h: int = 0
    calls: list[tuple[str, int, int]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, what: str, h2d: int = 0, d2h: int = 0) -> None:
        with self._lock:
            self.h2d += h2d
            self.d2h += d2h
            self.calls.append((what, h2d, d2h))

    @property
    def total(self) -> int:
        return self.h2d + self.d2h

    def reset(self) -> None:
        with self._lock:
            self.h2d = self.d2h = 0
            self.calls = []


def _host_bytes(values) -> int:
    return sum(v.nbytes for v in values if isinstance(v, np.ndarray))


class CountingSession:
    def __init__(self, inner: OnnxRuntimeSession, traffic: Traffic):
        self.inner, self.traffic, self.spec = inner, traffic, inner.spec

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The host loop's call: every feed goes in, every output comes back."""
        out = self.inner.run(feeds)
        self.traffic.add(self.spec.name, _host_bytes(np.asarray(v) for v in feeds.values()), _host_bytes(out.values()))
        return out

    def run_bound(self, feeds: dict, outputs: dict[str, OrtTensor]) -> None:
        """The device loop's call: only the numpy feeds cross."""
        self.inner.run_bound(feeds, outputs)
        self.traffic.add(self.spec.name, _host_bytes(feeds.values()))


class CountingDeviceOps(OrtDeviceOps):
    def __init__(self, traffic: Traffic):
        super().__init__("cpu", 0)
        self.traffic = traffic
        self.name = "counting (onnxruntime cpu as a device)"

    def upload(self, arr: np.ndarray) -> OrtTensor:
        tensor = super().upload(arr)
        self.traffic.add("upload", h2d=tensor.nbytes)
        return tensor

    def download(self, tensor: OrtTensor) -> np.ndarray:
        out = super().download(tensor)
        self.traffic.add("download", d2h=out.nbytes)
        return out


class CountingBackend:
    name = "counting"

    def __init__(self, providers: list[str] | None = None, threads: int | None = None):
        del providers  # always the CPU: that is the point
        self.inner = OnnxRuntimeBackend(["CPUExecutionProvider"], threads)
        self.traffic = Traffic()

    def open(self, spec: GraphSpec, path: Path) -> CountingSession:
        return CountingSession(self.inner.open(spec, path), self.traffic)

    def device_ops(self) -> CountingDeviceOps:
        return CountingDeviceOps(self.traffic)
