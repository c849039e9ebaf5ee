"""onnxruntime backend: CPU here; CUDA / TensorRT execution providers where onnxruntime-gpu is installed.

On a GPU provider the session runs through IO binding: inputs are copied to the device once per
call and outputs are bound to device memory, so onnxruntime does not allocate and copy through
host staging buffers on every step. ``InferenceSession.run`` is thread-safe; a binding is not,
so each call makes its own.

On a GPU provider the backend also has a device (``device_ops()``, ``Session.run_bound``): the
device loop keeps ``OrtValue`` s on ``cuda`` across calls and binds outputs to preallocated ones.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from qwen_image_edge.runtime.backends.base import check_feeds, check_outputs
from qwen_image_edge.runtime.backends.device import OrtDeviceOps, run_io_binding
from qwen_image_edge.runtime.errors import BackendError, InputError
from qwen_image_edge.runtime.manifest import GraphSpec, Precision

log = logging.getLogger(__name__)

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendError(
            "backend 'onnxruntime': the onnxruntime package is not installed; "
            "install the 'runtime' extra (CPU) or 'runtime-gpu' (CUDA / TensorRT)"
        ) from None
    return onnxruntime


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, as a container or taskset limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def check_threads(threads) -> int | None:
    """``threads`` as an int in 1..cores (None: the library's default), else an InputError.

    More threads than cores only makes workers wait for each other; a huge count made onnxruntime
    try to start that many threads (a hang), so it is refused with the core count instead.
    """
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise InputError(f"threads: expected a positive integer, got {threads!r}")
    cores = available_cores()
    if threads > cores:
        raise InputError(f"threads {threads}: this machine has {cores} CPU cores available to this process; "
                         f"expected 1..{cores}")
    return int(threads)


def available_providers() -> list[str]:
    return list(_ort().get_available_providers())


class OnnxRuntimeSession:
    def __init__(self, spec: GraphSpec, path: Path, providers: list[str], threads: int | None):
        ort = _ort()
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        # A pipeline holds several sessions, each with its own intra-op pool. Spinning workers of
        # the session that just ran keep the cores busy while the next one starts: on 2 cores the
        # demo's 4-step run took 149 ms with spinning, 49 ms with 1 thread (bench/distill.py).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # FP8 QDQ graphs: onnxruntime < 1.32 optimisers break them; BASIC is safe everywhere.
        if spec.precision is Precision.FP8:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(os.fspath(path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"{spec.name}: onnxruntime could not open {path.name}: {exc}") from None
        self.spec = spec
        self.providers = self.session.get_providers()
        self.on_gpu = self.providers[0] in GPU_PROVIDERS
        self._outputs = [t.name for t in spec.outputs]
        log.info("%s: opened %s on %s", spec.name, path.name, self.providers)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = check_feeds(self.spec, feeds)
        try:
            if self.on_gpu:
                values = self._run_bound(feeds)
            else:
                values = self.session.run(self._outputs, feeds)
        except Exception as exc:
            raise BackendError(f"{self.spec.name}: onnxruntime failed: {exc}") from None
        return check_outputs(self.spec, dict(zip(self._outputs, values)))

    def run_bound(self, feeds: dict, outputs: dict) -> None:
        """Device loop: ``OrtValue`` inputs bound as they are, numpy ones copied in, outputs written
        into the given ``OrtValue`` s (``qwen_image_edge.runtime.backends.device``)."""
        run_io_binding(self.session, self.spec, feeds, outputs)

    def _run_bound(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        ort = _ort()
        binding = self.session.io_binding()
        for name, arr in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0))
        for name in self._outputs:
            binding.bind_output(name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        return [v.numpy() for v in binding.get_outputs()]


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, providers: list[str] | None = None, threads: int | None = None):
        available = available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise BackendError(f"onnxruntime providers {unknown} are not available; available: {available}")
        self.providers = list(providers)
        self.threads = check_threads(threads)

    def open(self, spec: GraphSpec, path: Path) -> OnnxRuntimeSession:
        return OnnxRuntimeSession(spec, path, self.providers, self.threads)

    def device_ops(self) -> OrtDeviceOps | None:
        """``OrtValue`` s on the GPU when the first provider is a GPU one; None on the CPU (the
        host loop: there is no device to keep tensors on)."""
        return OrtDeviceOps("cuda", 0) if self.providers and self.providers[0] in GPU_PROVIDERS else None
