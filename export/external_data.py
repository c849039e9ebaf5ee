"""ONNX initializers whose bytes live in files: checkpoint shards read from their headers, no tensors.

A safetensors file is an 8-byte little-endian header length, a JSON header
(``{key: {"dtype", "shape", "data_offsets": [begin, end]}}``, offsets counted from the end of the
header) and the raw little-endian bytes. ``checkpoint_entries`` reads only the headers; a graph's
initializer can then either point at a tensor's bytes inside a shard (same dtype: ONNX external
data ``location``/``offset``/``length``) or be streamed, a chunk of rows at a time and converted to
the graph's dtype, into one data file. Neither path holds a whole tensor in memory.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from qwen_image2_ref.checkpoint import find_weight_files
from qwen_image2_ref.shards import ShardEntry, read_header, read_tensor  # noqa: F401 (re-exported)
from qwen_image_edge.runtime.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20  # bytes of source data converted at once
ALIGN = 4096  # streamed tensors start on a page boundary (ORT may mmap the data file)

# safetensors dtype code -> (torch dtype, ONNX TensorProto data type)
_ST_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, onnx.TensorProto.DOUBLE),
    "F32": (torch.float32, onnx.TensorProto.FLOAT),
    "F16": (torch.float16, onnx.TensorProto.FLOAT16),
    "BF16": (torch.bfloat16, onnx.TensorProto.BFLOAT16),
    "F8_E4M3": (torch.float8_e4m3fn, onnx.TensorProto.FLOAT8E4M3FN),
    "F8_E5M2": (torch.float8_e5m2, onnx.TensorProto.FLOAT8E5M2),
    "I64": (torch.int64, onnx.TensorProto.INT64),
    "I32": (torch.int32, onnx.TensorProto.INT32),
    "I16": (torch.int16, onnx.TensorProto.INT16),
    "I8": (torch.int8, onnx.TensorProto.INT8),
    "U8": (torch.uint8, onnx.TensorProto.UINT8),
    "BOOL": (torch.bool, onnx.TensorProto.BOOL),
}
_ONNX_TO_TORCH = {o: t for t, o in _ST_DTYPES.values()}
_TORCH_TO_ONNX = {t: o for t, o in _ST_DTYPES.values()}


def torch_dtype(onnx_type: int) -> torch.dtype:
    return _ONNX_TO_TORCH[onnx_type]


def onnx_dtype(dtype: torch.dtype) -> int:
    """The ONNX TensorProto data type of a torch dtype."""
    if dtype not in _TORCH_TO_ONNX:
        raise ConfigError(f"dtype {dtype}: no ONNX tensor type; expected one of {sorted(map(str, _TORCH_TO_ONNX))}")
    return _TORCH_TO_ONNX[dtype]


def checkpoint_entries(folder: Path) -> dict[str, ShardEntry]:
    """Every tensor of a component folder (single file or shards with an index), from the headers."""
    files, weight_map = find_weight_files(folder)
    entries: dict[str, ShardEntry] = {}
    for path in files:
        for key, entry in read_header(path).items():
            if key in entries:
                raise CheckpointError(f"key {key!r} is stored twice: in {entries[key].file.name} and {path.name}")
            entries[key] = entry
    if weight_map is not None:
        wrong = sorted(k for k, name in weight_map.items() if k not in entries or entries[k].file.name != name)
        if wrong:
            raise CheckpointError(f"{folder}: the index lists {len(wrong)} keys its shards do not hold: "
                                  f"{', '.join(wrong[:10])}")
    return entries


def checkpoint_bytes(folder: Path, itemsize: int | None = None) -> int:
    """Bytes of a component's tensors as stored, or at ``itemsize`` bytes per element."""
    entries = checkpoint_entries(folder).values()
    if itemsize is None:
        return sum(e.nbytes for e in entries)
    return sum(int(np.prod(e.shape, dtype=np.int64)) * itemsize for e in entries)


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class WeightSource:
    """One graph initializer and where its data comes from: a checkpoint entry or a computed tensor."""

    name: str  # initializer name in the graph
    onnx_dtype: int
    shape: tuple[int, ...]
    entry: ShardEntry | None = None
    computed: torch.Tensor | None = None
    # computed when written (a quantized or LoRA-fused weight), in its dtype; ``entry`` is then its base
    make: Callable[[], torch.Tensor] | None = None

    @property
    def direct(self) -> bool:
        """True when the checkpoint bytes are the initializer's bytes (same dtype)."""
        return self.entry is not None and self.make is None and _ST_DTYPES[self.entry.dtype][1] == self.onnx_dtype

    @property
    def nbytes(self) -> int:
        n = int(np.prod(self.shape, dtype=np.int64))
        return n * _ONNX_TO_TORCH[self.onnx_dtype].itemsize


def convertible(src: str, onnx_dtype: int) -> bool:
    """Same dtype, or floating to floating (the only conversions a precision asks for)."""
    if src not in _ST_DTYPES or onnx_dtype not in _ONNX_TO_TORCH:
        return False
    s, d = _ST_DTYPES[src][0], _ONNX_TO_TORCH[onnx_dtype]
    return s == d or (s.is_floating_point and d.is_floating_point)


def plan_sources(
    initializers: Iterable[tuple[str, int, tuple[int, ...]]],
    keys: dict[str, str],
    entries: dict[str, ShardEntry],
    computed: dict[str, torch.Tensor],
    where: str,
) -> list[WeightSource]:
    """Match every initializer (name, ONNX dtype, shape) to its checkpoint tensor or computed buffer.

    ``keys`` maps initializer names to checkpoint keys; ``computed`` holds buffers the checkpoint
    does not store. Every problem is collected and raised at once, before anything is written.
    """
    sources, missing, shapes, dtypes, unknown = [], [], [], [], []
    for name, dtype, shape in initializers:
        if name in computed:
            sources.append(WeightSource(name, dtype, shape, computed=computed[name]))
            continue
        key = keys.get(name)
        if key is None:
            unknown.append(name)
            continue
        entry = entries.get(key)
        if entry is None:
            missing.append(key)
        elif entry.shape != tuple(shape):
            shapes.append(f"{key}: graph {list(shape)}, checkpoint {list(entry.shape)}")
        elif not convertible(entry.dtype, dtype):
            dtypes.append(f"{key}: {entry.dtype} -> {onnx.helper.tensor_dtype_to_np_dtype(dtype)}")
        else:
            sources.append(WeightSource(name, dtype, shape, entry=entry))
    if unknown:
        raise ConfigError(f"{where}: graph initializers with no checkpoint key and no computed value: "
                          f"{', '.join(unknown[:10])}")
    if missing or shapes:
        parts = [f"{len(missing)} missing keys: {', '.join(missing[:10])}"] if missing else []
        parts += [f"{len(shapes)} shape mismatches: {'; '.join(shapes[:10])}"] if shapes else []
        raise CheckpointError(f"{where}: the checkpoint shards do not hold the graph's weights; " + "; ".join(parts))
    if dtypes:
        raise CheckpointError(f"{where}: checkpoint dtypes cannot be converted to the graph's: {'; '.join(dtypes[:10])}")
    return sources


# ----------------------------------------------------------------------------- writing


def external_tensor(name: str, onnx_dtype: int, shape: tuple[int, ...], location: str, offset: int,
                    length: int) -> onnx.TensorProto:
    """An initializer whose bytes are ``length`` bytes at ``offset`` of ``location`` (relative path)."""
    t = onnx.TensorProto(name=name, data_type=onnx_dtype, dims=list(shape))
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=k, value=v)
    return t


def link_or_copy(src: Path, dst: Path) -> str:
    """Hard-link ``src`` to ``dst`` (no bytes copied), or copy it across file systems."""
    try:
        os.link(src, dst)
        return "linked"
    except OSError:
        shutil.copyfile(src, dst)
        return "copied"


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a CPU tensor of any dtype (bf16 and float8 included)."""
    return _byte_view(t).tobytes()


def _byte_view(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()  # no copy for a contiguous tensor


def _copy_converted(fh_in, fh_out, entry: ShardEntry, dst: torch.dtype) -> None:
    """Stream one tensor's bytes, ``CHUNK_BYTES`` at a time, converting each chunk to ``dst``."""
    src = entry.torch_dtype
    step = max(src.itemsize, CHUNK_BYTES // src.itemsize * src.itemsize)
    fh_in.seek(entry.offset)
    left = entry.nbytes
    while left:
        raw = bytearray(fh_in.read(min(step, left)))
        if not raw:
            raise CheckpointError(f"{entry.file}: unexpected end of file reading {entry.key!r}")
        left -= len(raw)
        if src == dst:
            fh_out.write(raw)
        else:
            fh_out.write(_byte_view(torch.frombuffer(raw, dtype=src).to(dst)))  # one chunk at a time


def stream_tensors(sources: list[WeightSource], data_path: Path, location: str,
                   progress: Callable[[int], None] | None = None) -> list[onnx.TensorProto]:
    """Write the data of ``sources`` into ``data_path`` tensor by tensor; return their initializers."""
    protos = []
    handles: dict[Path, object] = {}
    try:
        with open(data_path, "wb") as out:
            for s in sources:
                pad = -out.tell() % ALIGN
                out.write(b"\0" * pad)
                offset = out.tell()
                dst = _ONNX_TO_TORCH[s.onnx_dtype]
                if s.make is not None:
                    out.write(_byte_view(s.make()))  # made here, one tensor at a time
                elif s.computed is not None:
                    out.write(_byte_view(s.computed.detach().to(dst)))
                else:
                    if s.entry.file not in handles:
                        handles[s.entry.file] = open(s.entry.file, "rb")  # noqa: SIM115 (closed below)
                    _copy_converted(handles[s.entry.file], out, s.entry, dst)
                length = out.tell() - offset
                if length != s.nbytes:
                    raise CheckpointError(f"{s.name}: wrote {length} bytes, expected {s.nbytes}")
                protos.append(external_tensor(s.name, s.onnx_dtype, s.shape, location, offset, length))
                if progress is not None:
                    progress(s.nbytes)
    finally:
        for fh in handles.values():
            fh.close()
    return protos
