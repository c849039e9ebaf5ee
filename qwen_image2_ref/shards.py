"""safetensors files read by header and plain file reads, one tensor at a time.

``safe_open`` maps the whole file; every page a read touches then counts in the process's resident
memory until the file is closed, so loading a 5 GB shard shows as 5 GB on top of the tensors taken
from it. These helpers locate each tensor from the header (the format: an 8-byte little-endian
header length, a JSON header with ``dtype``, ``shape`` and ``data_offsets`` per tensor, then the
data) and read just its bytes into the tensor's own storage: the only copy alive is the one kept.
The lean export (``qwen_image_edge.export.external_data``) streams from the same entries.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen_image_edge.runtime.errors import CheckpointError

# safetensors dtype code -> torch dtype
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class ShardEntry:
    """Where one checkpoint tensor's bytes are: ``file`` from byte ``offset``, ``nbytes`` long."""

    key: str
    file: Path
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return ST_DTYPES[self.dtype]


def read_header(path: Path) -> dict[str, ShardEntry]:
    """The tensors of one safetensors file, from its header only."""
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > MAX_HEADER:
                raise CheckpointError(f"{path}: safetensors header of {size} bytes; expected < 100 MB")
            header = json.loads(fh.read(size))
        file_size = path.stat().st_size
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info.get("dtype") not in ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {info.get('dtype')!r}; expected one of "
                                  f"{sorted(ST_DTYPES)}")
        begin, end = info["data_offsets"]
        entry = ShardEntry(key, path, info["dtype"], tuple(info["shape"]), 8 + size + begin, end - begin)
        if entry.offset + entry.nbytes > file_size:
            raise CheckpointError(f"{path}: tensor {key!r} ends at byte {entry.offset + entry.nbytes}, "
                                  f"past the end of the file ({file_size} bytes); the shard is truncated")
        out[key] = entry
    return out


def read_tensor(entry: ShardEntry, dtype: torch.dtype | None = None, fh=None) -> torch.Tensor:
    """One tensor, read straight into its own storage (no mmap, no second copy of the bytes), then
    cast to ``dtype`` if it is floating. ``fh``: an open binary handle of ``entry.file`` to reuse."""
    t = torch.empty(entry.shape, dtype=entry.torch_dtype)
    if entry.nbytes != t.numel() * t.element_size():
        raise CheckpointError(f"{entry.file}: tensor {entry.key!r} holds {entry.nbytes} bytes; its dtype and "
                              f"shape need {t.numel() * t.element_size()}")
    if entry.nbytes:
        with (open(entry.file, "rb") if fh is None else _borrowed(fh)) as f:
            f.seek(entry.offset)
            view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            if f.readinto(view) != entry.nbytes:
                raise CheckpointError(f"{entry.file}: unexpected end of file reading {entry.key!r}")
    return t if dtype is None or not t.is_floating_point() or t.dtype == dtype else t.to(dtype)


class _borrowed:
    """A handle used in a ``with`` block without closing it."""

    def __init__(self, fh) -> None:
        self.fh = fh

    def __enter__(self):
        return self.fh

    def __exit__(self, *exc) -> None:
        return None
