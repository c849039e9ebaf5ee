"""TensorRT backend: run the engines ``qwen-image-edge build`` recorded in the manifest.

API followed: the TensorRT 10.x Python API (10.8 to 10.13: ``Runtime.deserialize_cuda_engine``,
``ICudaEngine.num_io_tensors / get_tensor_name / get_tensor_mode / get_tensor_dtype``,
``weight_streaming_budget_v2``, ``IExecutionContext.set_input_shape / set_tensor_address /
execute_async_v3``), which TensorRT 11.x keeps unchanged for inference. Memory, streams and CUDA
graphs come from cuda-python (``qwen_image_edge.runtime.backends.cuda``); no torch.

Per graph, one engine is chosen from the manifest's ``engines`` section: the one built for this
GPU model (name and compute capability) and this exact TensorRT version, from this graph file
(its sha256); anything else is refused with a message listing what was found and what is needed.
Each session owns one execution context, one stream and its device buffers. Buffers are
allocated when the input shapes change and only grow; ``set_input_shape`` is called only then;
every call sets the tensor addresses and enqueues ``execute_async_v3`` on the session's stream.
A lock per context makes sessions safe to share between threads.

``Session.run`` is numpy in, numpy out, for the pipeline. ``Session.run_device`` takes numpy
arrays or :class:`DeviceArray` s (bound by address: no copy) and returns device arrays, so a loop
can keep latents on the GPU; ``Session.run_kept`` copies one output into memory the caller owns
(the condition KV cache, fed back by address at every step). With ``cuda_graph=True`` the first call at a new shape/address set
runs normally and captures ``execute_async_v3`` into a CUDA graph; later calls with the same
shapes and addresses replay it (host-to-device copies stay outside the graph); a capture that
fails (a kernel that cannot be captured) is logged once and the session runs without graphs.

``Session.run_bound`` writes every output into a buffer the caller owns, and ``device_ops()``
gives that memory: the device loop (``qwen_image_edge.runtime.device_loop``) runs on them.

Audit notes (each modelled by the stand-in, tests/trt_standin.py): TensorRT keeps one logger per
process, so every Builder / Runtime gets :func:`process_logger`; bf16 / fp8 engine IO uses
``ml_dtypes`` (numpy has no such dtype); an engine may drop an input only its shape was used for,
which is accepted (it is then never bound); the weight-streaming budget is read back after it
is set, since the property setter cannot report a refusal.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen_image_edge.runtime.backends import cuda
from qwen_image_edge.runtime.backends.base import check_outputs, dtype_name, itemsize, numpy_dtype
from qwen_image_edge.runtime.backends.device import check_bound
from qwen_image_edge.runtime.errors import BackendError, ShapeError
from qwen_image_edge.runtime.manifest import (
    MANIFEST_NAME,
    EngineSpec,
    GraphSpec,
    Manifest,
    load_manifest,
    resolve_path,
    sha256_file,
)

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "TensorRT is not installed. On a machine with an NVIDIA GPU and driver: "
    "pip install --extra-index-url https://pypi.nvidia.com 'tensorrt-cu12>=10.8' 'cuda-python>=12.6,<13' "
    "(or pip install 'qwen-image-edge[trt]'); PyPI's tensorrt-*-libs packages are stubs that fetch "
    "the real wheels from NVIDIA's index"
)
ENGINES_DIR = "engines"
_TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
               "INT32": "int32", "INT64": "int64", "BOOL": "bool", "FP8": "float8e4m3fn"}


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendError(f"backend 'tensorrt': {INSTALL_HINT} ({exc})") from None
    return tensorrt


def trt_major(version: str) -> int:
    return int(version.split(".")[0])


def numpy_dtype_name(trt, dtype) -> str:
    for name, np_name in _TRT_DTYPES.items():
        if getattr(trt.DataType, name, None) == dtype:
            return np_name
    raise BackendError(f"TensorRT data type {dtype} has no numpy equivalent here; expected one of {sorted(_TRT_DTYPES)}")


_LOGGERS: dict[int, object] = {}  # id(tensorrt module) -> its one logger


def process_logger(trt):
    """The process's one ``trt.ILogger``: TensorRT keeps the first logger a Builder or Runtime was
    given and sends every later message there, so a logger per engine would miss the errors of all
    but the first (messages here quote ``logger.errors``)."""
    logger = _LOGGERS.get(id(trt))
    if logger is None:
        logger = _LOGGERS[id(trt)] = make_logger(trt)
    return logger


def make_logger(trt, keep: int = 20):
    """A ``trt.ILogger`` that forwards to ``logging`` and keeps the last errors for messages
    (use :func:`process_logger`: one per process)."""

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            sev = trt.ILogger.Severity
            if severity in (sev.INTERNAL_ERROR, sev.ERROR):
                self.errors = [*self.errors[-(keep - 1):], str(msg)]
                log.error("TensorRT: %s", msg)
            elif severity == sev.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return _Logger()


# ----------------------------------------------------------------------------- engine cache keys


def gpu_slug(gpu_name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    if not slug:
        raise BackendError(f"GPU name {gpu_name!r}: cannot make a directory name from it")
    return slug


def engine_dir(gpu: cuda.GpuInfo, trt_version: str) -> str:
    """``engines/<gpu-slug>-trt<version>``, relative to the export directory."""
    return f"{ENGINES_DIR}/{gpu_slug(gpu.name)}-trt{trt_version}"


def engine_key(gpu: cuda.GpuInfo, trt_version: str, graph: str) -> str:
    return f"{gpu_slug(gpu.name)}-trt{trt_version}/{graph}"


def _describe(e: EngineSpec) -> str:
    cc = ".".join(str(x) for x in e.compute_capability)
    return f"{e.graph} for {e.gpu_name} (sm {cc}) with TensorRT {e.tensorrt_version}"


def select_engine(manifest: Manifest, graph: GraphSpec, gpu: cuda.GpuInfo, trt_version: str) -> EngineSpec:
    """The engine of ``graph`` built for this GPU and TensorRT version, or a BackendError saying why not."""
    found = [e for e in manifest.engines.values() if e.graph == graph.name]
    match = [e for e in found if e.gpu_name == gpu.name and tuple(e.compute_capability) == gpu.compute_capability
             and e.tensorrt_version == trt_version]
    if not match:
        have = [_describe(e) for e in found] or ["none"]
        raise BackendError(
            f"graph {graph.name!r}: no TensorRT engine for {gpu} with TensorRT {trt_version}; "
            f"engines in this export: {have}. Engines run only on the GPU model and TensorRT version "
            "they were built with: run `qwen-image-edge build <export dir>` on this machine"
        )
    engine = match[0]
    if engine.graph_sha256 != graph.sha256:
        raise BackendError(
            f"graph {graph.name!r}: engine {engine.file} was built from a graph with sha256 "
            f"{engine.graph_sha256[:16]}..., the manifest's graph has {graph.sha256[:16]}...; rebuild it"
        )
    return engine


# ----------------------------------------------------------------------------- sessions


@dataclass(frozen=True)
class DeviceArray:
    """A tensor in device memory: address, shape, dtype (numpy name). Does not own the memory."""

    ptr: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * itemsize(self.dtype)


class TensorRTSession:
    def __init__(self, spec: GraphSpec, engine_spec: EngineSpec, plan: bytes, trt, *, cuda_graph: bool = False,
                 weight_streaming_budget: float | None = None):
        self.spec = spec
        self.engine_spec = engine_spec
        # feeds are checked against the ranges the engine's profile accepts (narrower than the export's)
        self._check_spec = dataclasses.replace(spec, dim_ranges=dict(engine_spec.dim_ranges))
        self._trt = trt
        self._logger = process_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BackendError(f"{spec.name}: TensorRT could not deserialize {engine_spec.file}: {self._logger.errors}")
        if weight_streaming_budget is not None:
            self._set_weight_budget(weight_streaming_budget)
        self._dtypes = self._check_io()
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"{spec.name}: TensorRT could not create an execution context: {self._logger.errors}")
        self.stream = cuda.Stream()
        self._lock = threading.Lock()
        self._buffers = {name: cuda.DeviceBuffer(0) for name in self._dtypes}
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._out_shapes: dict[str, tuple[int, ...]] = {}
        self._use_graph = cuda_graph
        self._graph: cuda.CudaGraph | None = None
        self._graph_key = None

    def _set_weight_budget(self, fraction: float) -> None:
        if not self.engine_spec.weight_streaming:
            raise BackendError(f"{self.spec.name}: weight streaming needs an engine built with --weight-streaming")
        if not 0 < fraction <= 1:
            raise BackendError(f"weight_streaming_budget: expected a fraction in (0, 1], got {fraction}")
        want = int(fraction * self.engine.streamable_weights_size)
        self.engine.weight_streaming_budget_v2 = want
        got = self.engine.weight_streaming_budget_v2  # the setter cannot report a refusal: read it back
        if got != want:
            raise BackendError(f"{self.spec.name}: weight streaming budget {want} bytes ({fraction:.0%} of "
                               f"{self.engine.streamable_weights_size}) was not applied; the engine reports {got}: "
                               f"{self._logger.errors[-1:]}")

    def _check_io(self) -> dict[str, str]:
        trt, eng = self._trt, self.engine
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        declared = {t.name: (trt.TensorIOMode.INPUT, t) for t in self.spec.inputs}
        declared.update({t.name: (trt.TensorIOMode.OUTPUT, t) for t in self.spec.outputs})
        # TensorRT may drop an input whose values are never read (only its shape was): accepted, and
        # then neither shaped nor bound; a missing output or an undeclared tensor is a wrong engine
        dropped = [t.name for t in self.spec.inputs if t.name not in names]
        if set(names) - set(declared) or any(t.name not in names for t in self.spec.outputs):
            raise BackendError(f"{self.spec.name}: engine tensors {sorted(names)}, manifest declares {sorted(declared)}")
        if dropped:
            log.info("%s: the engine dropped inputs %s (their values are never read)", self.spec.name, dropped)
        self._inputs = [t for t in self.spec.inputs if t.name in names]
        dtypes = {}
        for name in names:
            mode, t = declared[name]
            found = numpy_dtype_name(trt, eng.get_tensor_dtype(name))
            if eng.get_tensor_mode(name) != mode or found != t.dtype:
                raise BackendError(f"{self.spec.name}: engine tensor {name!r} is {found}, manifest declares {t}")
            dtypes[name] = found
        return dtypes

    # -------------------------------------------------------------- running

    def run(self, feeds: dict[str, np.ndarray | DeviceArray]) -> dict[str, np.ndarray]:
        """Host outputs; inputs may be numpy or :class:`DeviceArray` (bound by address, no copy)."""
        feeds = self._checked(feeds)
        with self._lock:
            outs = self._execute(feeds)
            host = {name: np.empty(d.shape, dtype=numpy_dtype(d.dtype)) for name, d in outs.items()}
            for name, d in outs.items():
                cuda.copy_to_host(host[name], d.ptr, self.stream)
            self.stream.synchronize()
        return check_outputs(self.spec, host)

    def _checked(self, feeds: dict[str, np.ndarray | DeviceArray],
                 outputs: dict[str, DeviceArray] | None = None) -> dict[str, np.ndarray | DeviceArray]:
        outputs = outputs if outputs is not None else {t.name: None for t in self.spec.outputs}
        return check_bound(self._check_spec, feeds, outputs)

    def run_bound(self, feeds: dict[str, np.ndarray | DeviceArray], outputs: dict[str, DeviceArray]) -> None:
        """Every output written into the caller's device buffer (``device_ops()`` memory), e.g. the
        device loop's ping-pong latents; inputs as for :meth:`run_device`."""
        feeds = self._checked(feeds, outputs)
        with self._lock:
            self._execute(feeds, {name: out for name, out in outputs.items()})
            self.stream.synchronize()

    def run_device(self, feeds: dict[str, np.ndarray | DeviceArray]) -> dict[str, DeviceArray]:
        """Outputs stay on the device, in this session's buffers: valid until its next call."""
        feeds = self._checked(feeds)
        with self._lock:
            outs = self._execute(feeds)
            self.stream.synchronize()
        return outs

    def run_kept(self, feeds: dict[str, np.ndarray | DeviceArray], output: str) -> tuple[DeviceArray, cuda.DeviceBuffer]:
        """One output copied (device to device) into memory the caller owns and frees, e.g. a KV
        cache that must outlive this session's next call."""
        feeds = self._checked(feeds)
        with self._lock:
            out = self._execute(feeds)[output]
            buffer = cuda.DeviceBuffer(out.nbytes)
            cuda.copy_on_device(buffer.ptr, out.ptr, out.nbytes, self.stream)
            self.stream.synchronize()
        return DeviceArray(buffer.ptr, out.shape, out.dtype), buffer

    def to_host(self, arr: DeviceArray) -> np.ndarray:
        out = np.empty(arr.shape, dtype=numpy_dtype(arr.dtype))
        with self._lock:
            cuda.copy_to_host(out, arr.ptr, self.stream)
            self.stream.synchronize()
        return out

    def _set_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.stream.synchronize()  # a failed call may have left copies into the buffers about to be freed
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, shape):
                raise ShapeError(f"{self.spec.name} input {name!r}: TensorRT refused shape {list(shape)} "
                                 f"(engine ranges {self.engine_spec.dim_ranges}): {self._logger.errors[-1:]}")
        self._out_shapes = {t.name: tuple(int(d) for d in self.context.get_tensor_shape(t.name))
                            for t in self.spec.outputs}
        for name, shape in {**shapes, **self._out_shapes}.items():
            self._buffers[name].ensure(int(np.prod(shape, dtype=np.int64)) * itemsize(self._dtypes[name]))
        self._shapes = shapes
        self._drop_graph()

    def _execute(self, feeds: dict[str, np.ndarray | DeviceArray],
                 into: dict[str, DeviceArray] | None = None) -> dict[str, DeviceArray]:
        shapes = {t.name: tuple(feeds[t.name].shape) for t in self._inputs}
        if shapes != self._shapes:
            self._set_shapes(shapes)
        addresses = {}
        for t in self._inputs:
            value = feeds[t.name]
            if isinstance(value, DeviceArray):
                self._check_not_an_output(t.name, value)
                addresses[t.name] = value.ptr
            else:
                addresses[t.name] = self._buffers[t.name].ptr
                cuda.copy_to_device(addresses[t.name], value, self.stream)
        for t in self.spec.outputs:
            addresses[t.name] = self._buffers[t.name].ptr if into is None else self._caller_output(t.name, into)
        for name, ptr in addresses.items():
            if not self.context.set_tensor_address(name, ptr):
                raise BackendError(f"{self.spec.name}: TensorRT refused the address of {name!r}")
        key = (tuple(shapes.items()), tuple(addresses.items()))
        if self._use_graph and self._graph_key == key:
            self._graph.launch()
        else:
            self._enqueue()
            if self._use_graph:
                self._capture(key)
        return {t.name: DeviceArray(addresses[t.name], self._out_shapes[t.name], self._dtypes[t.name])
                for t in self.spec.outputs}

    def _caller_output(self, name: str, into: dict[str, DeviceArray]) -> int:
        out, shape = into[name], self._out_shapes[name]
        if tuple(out.shape) != shape or out.dtype != self._dtypes[name]:
            raise ShapeError(f"{self.spec.name} output {name!r}: the engine writes {self._dtypes[name]}{list(shape)}, "
                             f"the buffer given is {out.dtype}{list(out.shape)}")
        return out.ptr

    def _check_not_an_output(self, name: str, value: DeviceArray) -> None:
        """TensorRT's kernels assume distinct I/O buffers and do not check: an input inside an
        output this call writes (this session's ``run_device`` result fed back) would be garbage."""
        for t in self.spec.outputs:
            ptr = self._buffers[t.name].ptr
            nbytes = int(np.prod(self._out_shapes[t.name], dtype=np.int64)) * itemsize(self._dtypes[t.name])
            if value.nbytes and nbytes and value.ptr < ptr + nbytes and ptr < value.ptr + value.nbytes:
                raise BackendError(f"{self.spec.name}: input {name!r} lies in this session's output {t.name!r}, "
                                   "which this call overwrites (run_device results are valid until the next call); "
                                   "copy it first (run_kept)")

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.handle):
            raise BackendError(f"{self.spec.name}: TensorRT execute_async_v3 failed: {self._logger.errors[-3:]}")

    def _capture(self, key) -> None:
        """Record ``execute_async_v3`` (after a normal run at these shapes) for replay; a failed
        capture turns graphs off for this session (the normal run already computed the outputs)."""
        self._drop_graph()
        graph = cuda.CudaGraph(self.stream)
        try:
            graph.begin()
            try:
                self._enqueue()
            finally:
                graph.end()
        except BackendError as exc:
            graph.destroy()
            self._use_graph = False
            log.warning("%s: CUDA graph capture failed (%s); running without CUDA graphs", self.spec.name, exc)
            return
        self._graph, self._graph_key = graph, key

    def _drop_graph(self) -> None:
        if self._graph is not None:
            self._graph.destroy()
        self._graph, self._graph_key = None, None

    def close(self) -> None:
        with self._lock:
            self._drop_graph()
            self.stream.synchronize()  # nothing queued may still use the buffers freed below
            for buf in self._buffers.values():
                buf.free()
            self.stream.destroy()


class CudaDeviceOps:
    """Device memory for the device loop on TensorRT: ``cudaMalloc``'d buffers as :class:`DeviceArray` s,
    copied on a stream of their own and synchronised (sessions run on theirs)."""

    name = "tensorrt cuda"

    def __init__(self):
        self._stream: cuda.Stream | None = None
        self._owned: dict[int, cuda.DeviceBuffer] = {}
        self._lock = threading.Lock()

    def _copy_stream(self) -> cuda.Stream:
        if self._stream is None:
            self._stream = cuda.Stream()
        return self._stream

    def empty(self, shape: tuple[int, ...], dtype: str) -> DeviceArray:
        arr = DeviceArray(0, tuple(int(d) for d in shape), dtype)
        buffer = cuda.DeviceBuffer(arr.nbytes)
        with self._lock:
            self._owned[buffer.ptr] = buffer
        return dataclasses.replace(arr, ptr=buffer.ptr)

    def upload(self, arr: np.ndarray) -> DeviceArray:
        arr = np.ascontiguousarray(arr)
        out = self.empty(arr.shape, dtype_name(arr.dtype))
        with self._lock:
            cuda.copy_to_device(out.ptr, arr, self._copy_stream())
            self._stream.synchronize()
        return out

    def download(self, tensor: DeviceArray) -> np.ndarray:
        out = np.empty(tensor.shape, dtype=numpy_dtype(tensor.dtype))
        with self._lock:
            cuda.copy_to_host(out, tensor.ptr, self._copy_stream())
            self._stream.synchronize()
        return out

    def free(self, tensor: DeviceArray) -> None:
        with self._lock:
            buffer = self._owned.pop(tensor.ptr, None)
        if buffer is not None:
            buffer.free()


class TensorRTBackend:
    """Opens each graph's engine for this GPU and TensorRT version (see the module docstring).

    ``export_dir`` / ``manifest``: where the engines are listed; when omitted they are found from
    the graph path handed to :meth:`open` (the nearest folder above it holding ``manifest.json``).
    """

    name = "tensorrt"

    def __init__(self, export_dir: str | Path | None = None, manifest: Manifest | None = None, *,
                 cuda_graph: bool = False, weight_streaming_budget: float | None = None,
                 verify_hashes: bool = True, trt=None):
        self.trt = trt if trt is not None else import_tensorrt()
        self.version = str(self.trt.__version__)
        cuda.check_driver()
        if cuda.device_count() < 1:
            raise BackendError("backend 'tensorrt': no CUDA device found")
        self.gpu = cuda.device_info()
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self.manifest = manifest
        self.cuda_graph = cuda_graph
        self.weight_streaming_budget = weight_streaming_budget
        self.verify_hashes = verify_hashes

    def _export(self, graph_path: Path) -> tuple[Path, Manifest]:
        if self.export_dir is None:
            root = next((p for p in Path(graph_path).resolve().parents if (p / MANIFEST_NAME).is_file()), None)
            if root is None:
                raise BackendError(f"backend 'tensorrt': no {MANIFEST_NAME} above {graph_path}")
            self.export_dir = root
        if self.manifest is None:
            self.manifest = load_manifest(self.export_dir, verify_hashes=False)
        return self.export_dir, self.manifest

    def engine_for(self, spec: GraphSpec, graph_path: Path) -> tuple[EngineSpec, Path]:
        export_dir, manifest = self._export(graph_path)
        engine = select_engine(manifest, spec, self.gpu, self.version)
        path = resolve_path(export_dir, engine.file)
        if not path.is_file():
            raise BackendError(f"graph {spec.name!r}: engine file {engine.file} is listed but missing in {export_dir}")
        if self.verify_hashes and sha256_file(path) != engine.sha256:
            raise BackendError(f"graph {spec.name!r}: engine {engine.file} does not match its sha256 in the manifest")
        return engine, path

    def device_ops(self) -> CudaDeviceOps:
        return CudaDeviceOps()

    def open(self, spec: GraphSpec, path: Path) -> TensorRTSession:
        engine, plan_path = self.engine_for(spec, path)
        log.info("%s: opening %s", spec.name, engine.file)
        return TensorRTSession(spec, engine, plan_path.read_bytes(), self.trt, cuda_graph=self.cuda_graph,
                               weight_streaming_budget=self.weight_streaming_budget)
