"""A stand-in for ``tensorrt`` (the TensorRT 10.x Python API, 10.8-10.13) and cuda-python's ``cudart``.

Tests inject it as ``sys.modules['tensorrt']`` and through ``qwen_image_edge.runtime.backends.cuda.set_cudart``.
It records every call in ``CALLS`` and raises :class:`MisuseError` where the real API would fail or
silently misbehave: wrong argument types, parse before build, a profile shape for every dynamic
input with min <= opt <= max and static dims kept, precision flags on a strongly typed network,
weight streaming on a weakly typed one, ``set_input_shape`` (inside the profile) before
``set_tensor_address`` before ``execute_async_v3``, addresses inside live allocations large enough
for the shapes, the weight budget set before any context exists, memcpy kinds matching the
pointers, no copies inside a stream capture.

Streams are modelled: H2D copies snapshot their source at the call, while kernels, D2H copies and
graph launches are queued and run at ``cudaStreamSynchronize``; a missing sync leaves outputs
unwritten. "Device memory" is host memory from ctypes, handed out filled with 0xFF bytes (NaN in
every float format, -1 in signed ints) and checked the way compute-sanitizer's memcheck and initcheck
would: an access outside a live allocation, a use after ``cudaFree`` (freed addresses are never
reused) and a read of bytes nothing wrote raise at the queued operation. ``cudaFree`` of a buffer
that queued work still uses raises too: real ``cudaFree`` happens to wait for the whole device
(CUDA programming guide, "Stream-Ordered Memory Allocator"), which hides the bug but is no contract a
``cudaFreeAsync`` or a graph replay would keep; the runtime drains its stream before freeing.

An engine executes its ONNX graph with onnxruntime. Strongly typed and fp32 engines give
onnxruntime's numbers (TF32, on by default for fp32 layers in real TensorRT, is not modelled). An
engine built weakly typed with ``BuilderFlag.FP16`` or ``BF16`` may run any layer in that precision,
so the stand-in rounds (round to nearest even) its float weights, its float inputs and its float
outputs to fp16 / bf16: a lower bound of the effect, intermediates stay fp32. ``execute_async_v3``
with an output overlapping another I/O tensor logs an error and returns False (TensorRT kernels
assume distinct buffers; real TensorRT does not check and computes garbage). A network with
QuantizeLinear / DequantizeLinear nodes must be strongly typed (see ``_qdq_refusal``).

``reset(version)`` clears the state; a version >= 11 drops the FP16/BF16/INT8/FP8 builder flags as
TensorRT 11 did. ``FAIL_PARSE`` / ``FAIL_BUILD`` inject parser and builder failures.

Also modelled (the TensorRT audit): TensorRT keeps ONE logger per process, the first a Builder or
Runtime was given; every later message goes there, whatever logger a later object got. A timing
cache written by another TensorRT version is refused (``set_timing_cache`` returns False and the
config keeps none). An ONNX input that no node reads is dropped from the engine's IO. bf16 / fp8
engine IO are ``ml_dtypes`` arrays. ``REFUSE_BUDGET`` makes the weight-streaming budget setter keep
its old value (the Python property cannot report a refusal). CUDA graph capture failure:
``CUDART.fail_capture`` (tests/cuda_standin.py).
"""

from __future__ import annotations

import base64
import enum
import io
import json
from pathlib import Path

import numpy as np

from qwen_image_edge.runtime.manifest import read_onnx_io
from tests.cuda_standin import CUDART, GPU, MisuseError, _need, _overlap  # noqa: F401 (GPU, MisuseError: API)
from tests.trt_precision import _as_float, _float_io, _rounded_model, round_to  # noqa: F401 (round_to: API)

_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")

__version__ = "10.13.0.35"
CALLS: list[str] = []
FAIL_PARSE: dict | None = None  # {"node": 3, "name": "/x/Mul", "op": "Mul", "desc": "..."}
FAIL_BUILD = False
REFUSE_BUDGET = False
_LOGGER = None  # the process's logger: the first one TensorRT was given


DataType = enum.Enum("DataType", "FLOAT HALF BF16 INT8 UINT8 INT32 INT64 BOOL FP8")
_NP_TO_TRT = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int8": "INT8", "uint8": "UINT8",
              "int32": "INT32", "int64": "INT64", "bool": "BOOL", "float8e4m3fn": "FP8"}
TensorIOMode = enum.Enum("TensorIOMode", "NONE INPUT OUTPUT")
MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1


_PRECISION_FLAGS = ("FP16", "BF16", "INT8", "FP8")
BuilderFlag = enum.Enum("BuilderFlag", "TF32 WEIGHT_STREAMING REFIT " + " ".join(_PRECISION_FLAGS))


def reset(version: str = "10.13.0.35") -> None:
    global __version__, FAIL_PARSE, FAIL_BUILD, BuilderFlag, REFUSE_BUDGET, _LOGGER
    __version__, FAIL_PARSE, FAIL_BUILD, REFUSE_BUDGET, _LOGGER = version, None, False, False, None
    names = "TF32 WEIGHT_STREAMING REFIT" + ("" if int(version.split(".")[0]) >= 11 else " " + " ".join(_PRECISION_FLAGS))
    BuilderFlag = enum.Enum("BuilderFlag", names)
    CALLS.clear()
    CUDART.reset()


class ILogger:
    Severity = enum.Enum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE")

    def __init__(self):
        pass


class Logger(ILogger):
    WARNING = ILogger.Severity.WARNING


def _logger_ok(logger) -> None:
    global _LOGGER
    _need(isinstance(logger, ILogger), f"expected a tensorrt.ILogger, got {type(logger).__name__}")
    if _LOGGER is None:
        _LOGGER = logger


def _error(logger, msg: str) -> None:
    (_LOGGER or logger).log(ILogger.Severity.ERROR, msg)  # TensorRT reports to its one logger


# ----------------------------------------------------------------------------- build


class ITensor:
    def __init__(self, name, dtype, shape):
        self.name, self.dtype, self.shape = name, dtype, shape


class INetworkDefinition:
    def __init__(self, flags: int):
        self.strongly_typed = bool(flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
        self.inputs: list[ITensor] = []
        self.outputs: list[ITensor] = []
        self.source: str | None = None
        self.symbols: dict[str, list] = {}
        self.qdq: set[str] = set()  # quantized types of the graph's Q/DQ nodes (INT8, FP8, ...)
        self.unread: set[str] = set()  # inputs no node reads

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return self.inputs[i]


class ParserError:
    def __init__(self, d):
        self._d = d

    def code(self):
        return "UNSUPPORTED_NODE"

    def desc(self):
        return self._d["desc"]

    def node(self):
        return self._d["node"]

    def node_name(self):
        return self._d["name"]

    def node_operator(self):
        return self._d["op"]


class OnnxParser:
    def __init__(self, network, logger):
        _need(isinstance(network, INetworkDefinition), "OnnxParser(network, logger): network first")
        _logger_ok(logger)
        self.network, self.logger, self._errors = network, logger, []

    @property
    def num_errors(self):
        return len(self._errors)

    def get_error(self, i):
        return self._errors[i]

    def parse_from_file(self, model: str) -> bool:
        CALLS.append("parse_from_file")
        _need(isinstance(model, str), f"parse_from_file takes a str path, got {type(model).__name__}")
        _need(self.network.source is None, "a network is parsed once")
        if FAIL_PARSE is not None:
            self._errors.append(ParserError(FAIL_PARSE))
            return False
        if not Path(model).is_file():
            self._errors.append(ParserError({"node": -1, "name": "", "op": "", "desc": f"cannot open {model}"}))
            return False
        inputs, outputs = read_onnx_io(model)
        for specs, dest in ((inputs, self.network.inputs), (outputs, self.network.outputs)):
            for t in specs:
                dest.append(ITensor(t.name, DataType[_NP_TO_TRT[t.dtype]],
                                    tuple(d if isinstance(d, int) else -1 for d in t.dims)))
                self.network.symbols[t.name] = list(t.dims)
        self.network.qdq = _qdq_types(model)
        self.network.unread = _unread_inputs(model)
        self.network.source = model
        return True


def _unread_inputs(model: str) -> set[str]:
    """Graph inputs no node reads: TensorRT drops them from the engine's IO."""
    import onnx

    graph = onnx.load(model, load_external_data=False).graph
    read = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    return {i.name for i in graph.input} - read


def _qdq_types(model: str) -> set[str]:
    """Quantized types of the Q/DQ nodes, named by their zero point (ONNX's default: uint8)."""
    import onnx

    graph = onnx.load(model, load_external_data=False).graph
    types = {t.name: t.data_type for t in graph.initializer}
    types.update({n.output[0]: a.t.data_type for n in graph.node if n.op_type == "Constant"
                  for a in n.attribute if a.name == "value"})
    found = set()
    for n in graph.node:
        if n.op_type in _QDQ_OPS:
            zero_point = types.get(n.input[2]) if len(n.input) > 2 and n.input[2] else onnx.TensorProto.UINT8
            found.add({onnx.TensorProto.INT8: "INT8", onnx.TensorProto.FLOAT8E4M3FN: "FP8"}.get(zero_point, str(zero_point)))
    return found


def _qdq_refusal(network, flags) -> str | None:
    """Why TensorRT 10 will not build this Q/DQ network weakly typed, or None.

    Facts relied on: TensorRT 10's explicit quantization guide says "Use explicit quantization with
    Strong Typing. Precision-control build flags are not required and should not be specified"
    (docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-quantization.html);
    weakly typed, Q/DQ layers build only with BuilderFlag.INT8 / FP8 set (the 8.x developer guide,
    "Working with INT8": "to enable any quantized operation, the INT8 flag must be set"; assumed
    kept by 10.x's weakly typed mode); implicit quantization (calibrators) is deprecated since 10.1
    ("superseded by explicit quantization", the C++ API's deprecated list) and 11.x removed the
    INT8 / FP8 flags for "explicit quantization with Q/DQ nodes" (10.x -> 11.x migration guide).
    This project builds Q/DQ graphs strongly typed only, so the stand-in refuses a weakly typed one
    with or without the flag.
    """
    if not network.qdq or network.strongly_typed:
        return None
    flagged = sorted(flags & {"INT8", "FP8"})
    why = f"with {flagged} set: the deprecated weakly typed path" if flagged else "without the INT8/FP8 flag"
    return (f"the network has {sorted(network.qdq)} QuantizeLinear/DequantizeLinear layers and is weakly typed ({why}); "
            "create it with 1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED")


class IOptimizationProfile:
    def __init__(self):
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, input, min, opt, max):  # noqa: A002 - TensorRT's own parameter names
        CALLS.append("set_shape")
        _need(isinstance(input, str), "set_shape(input: str, min, opt, max)")
        dims = [tuple(x) for x in (min, opt, max)]
        _need(all(all(isinstance(v, int) for v in d) for d in dims), f"{input}: dims must be ints, got {dims}")
        _need(len({len(d) for d in dims}) == 1, f"{input}: min/opt/max ranks differ: {dims}")
        _need(all(0 <= a <= b <= c for a, b, c in zip(*dims)), f"{input}: expected 0 <= min <= opt <= max, got {dims}")
        self.shapes[input] = tuple(dims)


class ITimingCache:
    def __init__(self, entries):
        self.entries = list(entries)

    def serialize(self):
        return IHostMemory(b"standin-timing-cache" + json.dumps([__version__, self.entries]).encode())


class IHostMemory(bytes):
    @property
    def nbytes(self):
        return len(self)


class IBuilderConfig:
    def __init__(self):
        self.flags: set = set()
        self.profiles: list[IOptimizationProfile] = []
        self.cache: ITimingCache | None = None
        self._level = 3

    @property
    def builder_optimization_level(self):
        return self._level

    @builder_optimization_level.setter
    def builder_optimization_level(self, value):
        _need(isinstance(value, int) and 0 <= value <= 5, f"builder_optimization_level must be 0..5, got {value!r}")
        self._level = value

    def set_flag(self, flag):
        CALLS.append(f"set_flag:{flag.name}")
        _need(isinstance(flag, BuilderFlag), f"set_flag takes a tensorrt.BuilderFlag, got {flag!r}")
        self.flags.add(flag.name)

    def set_memory_pool_limit(self, pool, size):
        _need(isinstance(pool, MemoryPoolType) and isinstance(size, int), "set_memory_pool_limit(pool, int)")

    def add_optimization_profile(self, profile):
        CALLS.append("add_optimization_profile")
        _need(isinstance(profile, IOptimizationProfile), "add_optimization_profile takes an IOptimizationProfile")
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache):
        CALLS.append("create_timing_cache")
        data = bytes(serialized_timing_cache)
        if not data:
            return ITimingCache([])
        _need(data.startswith(b"standin-timing-cache"), "not a timing cache")
        version, entries = json.loads(data[len(b"standin-timing-cache"):])
        cache = ITimingCache(entries)
        cache.version = version
        return cache

    def set_timing_cache(self, cache, ignore_mismatch):
        CALLS.append("set_timing_cache")
        _need(isinstance(cache, ITimingCache) and isinstance(ignore_mismatch, bool), "set_timing_cache(cache, bool)")
        if getattr(cache, "version", __version__) != __version__ and not ignore_mismatch:
            return False  # another TensorRT version's cache: refused, the config keeps none
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class Builder:
    def __init__(self, logger):
        _logger_ok(logger)
        self.logger = logger

    def create_network(self, flags=0):
        CALLS.append("create_network")
        _need(isinstance(flags, int), f"create_network takes int flags, got {flags!r}")
        return INetworkDefinition(flags)

    def create_builder_config(self):
        return IBuilderConfig()

    def create_optimization_profile(self):
        return IOptimizationProfile()

    def build_serialized_network(self, network, config):
        CALLS.append("build_serialized_network")
        _need(network.source is not None, "build before a successful parse")
        _need(len(config.profiles) == 1, f"expected one optimisation profile, got {len(config.profiles)}")
        profile = config.profiles[0].shapes
        for t in network.inputs:
            dynamic = -1 in t.shape
            _need(not dynamic or t.name in profile, f"dynamic input {t.name!r} has no profile shape")
            if t.name in profile:
                for shape in profile[t.name]:
                    _need(len(shape) == len(t.shape) and all(s == d for s, d in zip(shape, t.shape) if d >= 0),
                          f"{t.name}: profile shape {shape} does not fit the network's {t.shape}")
        precision = config.flags & set(_PRECISION_FLAGS)
        if network.strongly_typed and precision:
            _error(self.logger, f"precision flags {sorted(precision)} are not allowed on a strongly typed network")
            return None
        refusal = _qdq_refusal(network, config.flags)
        if refusal:
            _error(self.logger, refusal)
            return None
        if "WEIGHT_STREAMING" in config.flags and not network.strongly_typed:
            _error(self.logger, "weight streaming requires a strongly typed network")
            return None
        if FAIL_BUILD:
            _error(self.logger, "stand-in: injected build failure (out of memory)")
            return None
        if config.cache is not None:
            config.cache.entries.append(Path(network.source).parent.name)
        plan = {"standin": True, "source": network.source, "flags": sorted(config.flags),
                "inputs": [[t.name, t.dtype.name, network.symbols[t.name]] for t in network.inputs
                           if t.name not in network.unread],
                "dropped": [[t.name, t.dtype.name, network.symbols[t.name]] for t in network.inputs
                            if t.name in network.unread],
                "outputs": [[t.name, t.dtype.name, network.symbols[t.name]] for t in network.outputs],
                "profile": {k: [list(s) for s in v] for k, v in profile.items()},
                "weight_streaming": "WEIGHT_STREAMING" in config.flags, "version": __version__,
                "strongly_typed": network.strongly_typed, "refittable": "REFIT" in config.flags,
                "model": _embedded(network.source)}
        return IHostMemory(json.dumps(plan).encode())


def _embedded(path: str) -> str:
    """The graph with its weights, as the plan carries them (an engine never reads its ONNX file again)."""
    from tests.trt_standin_refit import load_with_data

    return base64.b64encode(load_with_data(path).SerializeToString()).decode()


# ----------------------------------------------------------------------------- run


class Runtime:
    def __init__(self, logger):
        _logger_ok(logger)
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine):
        CALLS.append("deserialize_cuda_engine")
        _need(isinstance(serialized_engine, (bytes, bytearray, memoryview)), "deserialize_cuda_engine takes bytes")
        try:
            plan = json.loads(bytes(serialized_engine))
        except ValueError:
            _error(self.logger, "not a serialized engine")
            return None
        if plan.get("version") != __version__:
            _error(self.logger, f"engine built with TensorRT {plan.get('version')}, this is {__version__}")
            return None
        return ICudaEngine(plan, self.logger)


class ICudaEngine:
    def __init__(self, plan, logger):
        self.plan, self.logger = plan, logger
        # weakly typed + FP16/BF16: TensorRT may run any layer in that precision (bf16 if both)
        lowered = [f for f in ("BF16", "FP16") if f in plan["flags"]]
        self.rounding = lowered[0] if lowered and not plan.get("strongly_typed") else None
        self.io = {n: (TensorIOMode.INPUT, DataType[d], s) for n, d, s in plan["inputs"]}
        self.io.update({n: (TensorIOMode.OUTPUT, DataType[d], s) for n, d, s in plan["outputs"]})
        self.names = list(self.io)
        self.contexts = 0
        self.streamable_weights_size = 1 << 20 if plan["weight_streaming"] else 0
        self._budget = -1
        self._ort = None
        self.model = base64.b64decode(plan["model"])  # the graph and its weights, as built (or refit)

    @property
    def refittable(self):
        return bool(self.plan.get("refittable"))

    def serialize(self):
        CALLS.append("serialize")
        return IHostMemory(json.dumps({**self.plan, "model": base64.b64encode(self.model).decode()}).encode())

    @property
    def num_io_tensors(self):
        return len(self.names)

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_mode(self, name):
        return self.io[name][0]

    def get_tensor_dtype(self, name):
        return self.io[name][1]

    def get_tensor_shape(self, name):
        return tuple(d if isinstance(d, int) else -1 for d in self.io[name][2])

    def get_tensor_profile_shape(self, name, profile_index):
        _need(profile_index == 0, "one profile")
        return [tuple(s) for s in self.plan["profile"][name]]

    @property
    def weight_streaming_budget_v2(self):
        return self._budget

    @weight_streaming_budget_v2.setter
    def weight_streaming_budget_v2(self, value):
        CALLS.append("weight_streaming_budget_v2")
        _need(self.plan["weight_streaming"], "weight streaming budget on an engine built without WEIGHT_STREAMING")
        _need(self.contexts == 0, "the weight streaming budget must be set before creating execution contexts")
        _need(isinstance(value, int) and 0 <= value <= self.streamable_weights_size, f"budget {value!r} out of range")
        if REFUSE_BUDGET:
            _error(self.logger, f"weight streaming budget {value} refused")
            return
        self._budget = value

    def create_execution_context(self):
        CALLS.append("create_execution_context")
        self.contexts += 1
        return IExecutionContext(self)

    def session(self):
        if self._ort is None:
            import onnxruntime

            opts = onnxruntime.SessionOptions()
            opts.intra_op_num_threads = 1
            model = self.model if self.rounding is None else _rounded_model(io.BytesIO(self.model), self.rounding)
            if {d for _, d, _ in self.io.values()} & {DataType.BF16, DataType.FP8}:
                model = _float_io(model)
            self._ort = onnxruntime.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        return self._ort


class IExecutionContext:
    def __init__(self, engine):
        self.engine = engine
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self._out_cache: dict = {}

    def _inputs(self):
        return [n for n in self.engine.names if self.engine.io[n][0] is TensorIOMode.INPUT]

    def set_input_shape(self, name, shape):
        CALLS.append("set_input_shape")
        _need(name in self._inputs(), f"set_input_shape: {name!r} is not an input")
        shape = tuple(shape)
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0) if name in self.engine.plan["profile"] else (
            self.engine.get_tensor_shape(name),) * 3
        if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = shape
        self.addresses.pop(name, None)  # TensorRT wants addresses again after a shape change
        return True

    def get_tensor_shape(self, name):
        if self.engine.io[name][0] is TensorIOMode.INPUT:
            return self.shapes.get(name, self.engine.get_tensor_shape(name))
        if any(n not in self.shapes for n in self._inputs()):
            return self.engine.get_tensor_shape(name)
        key = tuple(sorted(self.shapes.items()))
        if key not in self._out_cache:  # shape inference: the graph run on zeros
            feeds = {n: _as_float(np.zeros(self.shapes[n], _dtype(self.engine.io[n][1]))) for n in self._inputs()}
            feeds.update(self._dropped())
            outs = self.engine.session().run(None, feeds)
            names = [o.name for o in self.engine.session().get_outputs()]
            self._out_cache[key] = {n: tuple(o.shape) for n, o in zip(names, outs)}
        return self._out_cache[key][name]

    def _dropped(self) -> dict[str, np.ndarray]:
        """onnxruntime still wants the inputs the engine dropped: no node reads them, any value of their rank."""
        return {name: _as_float(np.zeros([d if isinstance(d, int) else 1 for d in dims], _dtype(DataType[dt])))
                for name, dt, dims in self.engine.plan.get("dropped", [])}

    def set_tensor_address(self, name, memory):
        CALLS.append("set_tensor_address")
        _need(name in self.engine.io, f"set_tensor_address: unknown tensor {name!r}")
        _need(isinstance(memory, int) and memory != 0, f"set_tensor_address({name!r}) takes a non-null int")
        missing = [n for n in self._inputs() if n not in self.shapes]
        _need(not missing, f"set_tensor_address before set_input_shape of {missing}")
        self.addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle):
        CALLS.append("execute_async_v3")
        _need(isinstance(stream_handle, int), "execute_async_v3 takes the stream handle as an int")
        missing = [n for n in self.engine.names if n not in self.addresses]
        _need(not missing, f"execute_async_v3 before set_tensor_address of {missing}")
        io, spans = {}, {}
        for name in self.engine.names:
            shape = tuple(self.get_tensor_shape(name))
            dtype = _dtype(self.engine.io[name][1])
            spans[name] = (self.addresses[name], int(np.prod(shape)) * dtype.itemsize)
            CUDART.check_device(*spans[name], name)
            io[name] = (self.addresses[name], shape, dtype)
        inputs = self._inputs()
        for out in (n for n in self.engine.names if n not in inputs):
            for other, span in spans.items():
                if other != out and _overlap(spans[out], span):
                    _error(self.engine.logger, f"enqueueV3: output {out!r} ({spans[out][1]} bytes at {spans[out][0]:#x}) "
                                               f"overlaps {other!r} ({span[1]} bytes at {span[0]:#x}); I/O buffers must "
                                               "not alias")
                    return False
        reads = [(*spans[n], f"execute input {n!r}") for n in inputs]
        writes = [(*spans[n], f"execute output {n!r}") for n in spans if n not in inputs]
        CUDART.enqueue(stream_handle, ("execute", lambda: self._run(io), reads, writes))
        return True

    def _run(self, io):
        rounding = self.engine.rounding
        feeds = {n: _as_float(round_to(CUDART.read(*io[n]), rounding)) for n in self._inputs()}
        feeds.update(self._dropped())
        sess = self.engine.session()
        for o, value in zip(sess.get_outputs(), sess.run(None, feeds)):
            CUDART.write(io[o.name][0], round_to(np.ascontiguousarray(value, dtype=io[o.name][2]), rounding))


from tests.trt_standin_refit import OnnxParserRefitter, Refitter  # noqa: E402, F401 (the API; imports this module)


def _dtype(dt) -> np.dtype:
    """numpy dtype of a TensorRT one; bf16 / fp8 through ml_dtypes (numpy has no such names)."""
    from qwen_image_edge.runtime.backends.base import numpy_dtype

    return numpy_dtype({v: k for k, v in _NP_TO_TRT.items()}[dt.name])


def nptype(dt):
    return _dtype(dt).type
