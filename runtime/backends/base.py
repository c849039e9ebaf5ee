"""The backend interface: open a graph, run it with named arrays. Same tensor names everywhere.

A backend turns a :class:`~qwen_image_edge.runtime.manifest.GraphSpec` plus its verified file into a
:class:`Session`; the pipeline only ever calls ``Session.run(feeds) -> outputs`` with numpy
arrays keyed by the IOSpec names. Sessions must be safe to call from several threads at once.
A backend with a device also has ``device_ops()`` and its sessions ``run_bound`` (see ``device``).

Dtypes are numpy names; ``bfloat16`` and ``float8e4m3fn`` (engine IO of bf16 / fp8 TensorRT
engines) have no numpy dtype of their own and map to ``ml_dtypes``' (:func:`numpy_dtype`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from qwen_image_edge.runtime.errors import BackendError, ShapeError
from qwen_image_edge.runtime.manifest import GraphSpec, TensorSpec

# dtype names numpy lacks -> (ml_dtypes attribute, bytes per element)
EXTENDED_DTYPES = {"bfloat16": ("bfloat16", 2), "float8e4m3fn": ("float8_e4m3fn", 1)}


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a manifest / engine dtype name; ``ml_dtypes`` for bf16 and fp8."""
    if name in EXTENDED_DTYPES:
        try:
            import ml_dtypes
        except ImportError:
            raise BackendError(f"dtype {name}: numpy has no such dtype; pip install ml-dtypes "
                               "(the 'trt' extra installs it)") from None
        return np.dtype(getattr(ml_dtypes, EXTENDED_DTYPES[name][0]))
    try:
        return np.dtype(name)
    except TypeError:
        raise BackendError(f"dtype {name!r}: not a numpy dtype name nor one of {sorted(EXTENDED_DTYPES)}") from None


def dtype_name(dtype) -> str:
    """The manifest's name of a numpy dtype (``ml_dtypes``' ``float8_e4m3fn`` -> ``float8e4m3fn``)."""
    name = str(np.dtype(dtype))
    return {v[0]: k for k, v in EXTENDED_DTYPES.items()}.get(name, name)


def itemsize(name: str) -> int:
    """Bytes per element of a dtype name, without importing ml_dtypes for the extended ones."""
    return EXTENDED_DTYPES[name][1] if name in EXTENDED_DTYPES else numpy_dtype(name).itemsize


class Session(Protocol):
    spec: GraphSpec

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    name: str

    def open(self, spec: GraphSpec, path: Path) -> Session: ...


def check_feeds(spec: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every declared input present with its dtype and rank, inside the exported dim ranges.

    A feed may be a device tensor (an object with ``shape`` and a dtype *name*, see ``device``): it is
    checked the same way and passed through as it is.

    Symbols must be consistent across inputs (one value per symbol); a message names the graph,
    the input and what was expected, e.g. ``transformer input 'timestep': expected float32[B], got float16[2]``.
    """
    missing = [t.name for t in spec.inputs if t.name not in feeds]
    extra = sorted(set(feeds) - {t.name for t in spec.inputs})
    if missing or extra:
        raise ShapeError(f"{spec.name}: missing inputs {missing}, unexpected inputs {extra}")
    bound: dict[str, int] = {}
    out = {}
    for t in spec.inputs:
        arr = feeds[t.name]
        on_device = not isinstance(arr, np.ndarray) and isinstance(getattr(arr, "dtype", None), str)
        arr = arr if on_device else np.asarray(arr)  # a device tensor: its shape and dtype name only
        found = arr.dtype if on_device else dtype_name(arr.dtype)
        if found != t.dtype or len(arr.shape) != len(t.dims):
            raise ShapeError(f"{spec.name} input {t.name!r}: expected {_fmt(t)}, got {found}{list(arr.shape)}")
        for dim, size in zip(t.dims, arr.shape):
            if isinstance(dim, int):
                if size != dim:
                    raise ShapeError(f"{spec.name} input {t.name!r}: expected {_fmt(t)}, got {found}{list(arr.shape)}")
                continue
            if bound.setdefault(dim, size) != size:
                raise ShapeError(
                    f"{spec.name} input {t.name!r}: dim {dim} is {size} here but {bound[dim]} in another input"
                )
            lo, _, hi = spec.dim_ranges.get(dim, (0, 0, 2**62))
            if not lo <= size <= hi:
                raise ShapeError(
                    f"{spec.name} input {t.name!r}: {dim}={size} is outside the exported range [{lo}, {hi}]"
                )
        out[t.name] = arr if on_device else np.ascontiguousarray(arr)
    return out


def check_outputs(spec: GraphSpec, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for t in spec.outputs:
        if t.name not in outputs:
            raise BackendError(f"{spec.name}: the backend returned no output {t.name!r}")
    return outputs


def _fmt(t: TensorSpec) -> str:
    return f"{t.dtype}[{', '.join(str(d) for d in t.dims)}]"
