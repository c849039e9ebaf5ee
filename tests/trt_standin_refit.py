"""The stand-in's refit API (``trt.Refitter``, ``trt.OnnxParserRefitter``), re-exported by tests/trt_standin.py.

Modelled on TensorRT 10.x (Python API ``Refitter``: ``get_all_weights``, ``set_named_weights``,
``get_missing_weights``, ``refit_cuda_engine``; ``OnnxParserRefitter(refitter, logger).refit_from_file``
with ``num_errors`` / ``get_error``) and on onnx-tensorrt's ``ModelRefitter``, which walks the file's
initializers, sets every one the engine lists as refittable (by its ONNX name), skips the others,
and fails with "Only successfully refitted N weights out of M" when the file lacks some.

What the stand-in enforces:

- a Refitter needs an engine built with ``BuilderFlag.REFIT`` (``engine.refittable``); on another one
  it raises :class:`MisuseError` (real TensorRT logs an error and its binding raises TypeError, the
  factory having returned nullptr: callers check ``engine.refittable`` first);
- the refittable weights are the engine's float initializers; integer ones (shapes, indices) are
  folded into the engine and cannot be refit;
- ``set_named_weights`` returns False (and logs) for an unknown name or a different element count
  or type, as TensorRT's "wrong weights name or a change in the weights count";
- weights are combined: once one is set, every other is missing until set too (stricter than
  TensorRT, which asks only for what its optimisations combined), and ``refit_cuda_engine``
  returns False while any is missing. Weights take effect only through ``refit_cuda_engine``, and
  reach a plan only through ``engine.serialize()`` afterwards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests import trt_standin as _trt  # partly initialised when this module loads: used at call time only
from tests.cuda_standin import MisuseError

_FLOAT_TYPES = (1, 10, 16)  # onnx.TensorProto FLOAT, FLOAT16, BFLOAT16


def _model(engine):
    import onnx

    return onnx.load_from_string(engine.model)


def load_with_data(path: str):
    """The ONNX model with its external data read in, as TensorRT's parser reads it (next to the file).
    By hand: onnx.load refuses data files with several hard links, which the lean export's linked
    checkpoint shards are."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    folder = Path(path).parent
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        where = {e.key: e.value for e in t.external_data}
        with open(folder / where["location"], "rb") as fh:
            fh.seek(int(where.get("offset", 0)))
            t.raw_data = fh.read(int(where["length"]))
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
    return model


def engine_weights(engine) -> dict[str, tuple[int, tuple[int, ...]]]:
    """name -> (ONNX element type, shape) of the engine's refittable weights."""
    return {t.name: (t.data_type, tuple(t.dims)) for t in _model(engine).graph.initializer
            if t.data_type in _FLOAT_TYPES}


class Refitter:
    def __init__(self, engine, logger):
        _trt._logger_ok(logger)
        if not isinstance(engine, _trt.ICudaEngine):
            raise MisuseError(f"Refitter(engine, logger): expected an ICudaEngine, got {type(engine).__name__}")
        if not engine.refittable:
            _trt._error(logger, "Refitter: the engine was not built with BuilderFlag.REFIT")
            raise MisuseError("a Refitter needs an engine built with BuilderFlag.REFIT (check engine.refittable)")
        _trt.CALLS.append("Refitter")
        self.engine, self.logger = engine, logger
        self._weights = engine_weights(engine)
        self._pending: dict = {}  # name -> onnx TensorProto

    def get_all_weights(self) -> list[str]:
        return list(self._weights)

    def set_named_weights(self, name, weights) -> bool:
        from onnx import helper, numpy_helper

        _trt._need(isinstance(name, str), f"set_named_weights takes a str name, got {name!r}")
        _trt._need(isinstance(weights, np.ndarray), f"set_named_weights({name!r}): expected weights as a numpy array")
        if name not in self._weights:
            _trt._error(self.logger, f"Refitter: no refittable weights named {name!r}")
            return False
        kind, shape = self._weights[name]
        found = helper.np_dtype_to_tensor_dtype(weights.dtype)
        if weights.size != int(np.prod(shape, dtype=np.int64)) or found != kind:
            _trt._error(self.logger, f"Refitter: weights {name!r}: expected {int(np.prod(shape))} values of type "
                                     f"{kind}, got {weights.size} of type {found}")
            return False
        self._pending[name] = numpy_helper.from_array(np.ascontiguousarray(weights).reshape(shape), name)
        return True

    def get_missing_weights(self) -> list[str]:
        if not self._pending:
            return []
        return [n for n in self._weights if n not in self._pending]

    def refit_cuda_engine(self) -> bool:
        _trt.CALLS.append("refit_cuda_engine")
        missing = self.get_missing_weights()
        if missing:
            _trt._error(self.logger, f"Refitter: {len(missing)} weights missing, e.g. {missing[:3]}")
            return False
        model = _model(self.engine)
        for t in model.graph.initializer:
            if t.name in self._pending:
                t.CopyFrom(self._pending[t.name])
        self.engine.model = model.SerializeToString()
        self.engine._ort = None  # the next run uses the new weights
        self._pending = {}
        return True


class OnnxParserRefitter:
    def __init__(self, refitter, logger):
        _trt._need(isinstance(refitter, Refitter), "OnnxParserRefitter(refitter, logger): a tensorrt.Refitter first")
        _trt._logger_ok(logger)
        self.refitter, self.logger, self._errors = refitter, logger, []

    @property
    def num_errors(self):
        return len(self._errors)

    def get_error(self, i):
        return self._errors[i]

    def _fail(self, desc: str) -> bool:
        self._errors.append(_trt.ParserError({"node": -1, "name": "", "op": "", "desc": desc}))
        _trt._error(self.logger, desc)
        return False

    def refit_from_file(self, model: str) -> bool:
        from onnx import numpy_helper

        _trt.CALLS.append("refit_from_file")
        _trt._need(isinstance(model, str), f"refit_from_file takes a str path, got {type(model).__name__}")
        if not Path(model).is_file():
            return self._fail(f"Failed to parse the ONNX model: {model}")
        graph = load_with_data(model).graph
        wanted = set(self.refitter.get_all_weights())
        done = 0
        for t in graph.initializer:
            if t.name not in wanted:
                continue  # not a refittable weight of this engine: skipped
            wanted.discard(t.name)
            if not self.refitter.set_named_weights(t.name, numpy_helper.to_array(t)):
                return self._fail(f"Failed to set named weights {t.name!r}")
            done += 1
        if wanted:
            return self._fail(f"Only successfully refitted {done} weights out of {done + len(wanted)}")
        return True
