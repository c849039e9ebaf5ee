"""ModelProto.graph.{input, output} of an ONNX file without onnx: a small protobuf walker.

The runtime checks each graph file's IO against the manifest; initializers are skipped with
seek(), so this costs a few reads per graph however large the weights are.
"""

from __future__ import annotations

import os

from qwen_image_edge.runtime.errors import ManifestError

IO = tuple[str, str, tuple[str | int, ...]]  # name, numpy dtype name, dims (int or symbol)


_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
                10: "float16", 11: "float64", 16: "bfloat16", 17: "float8e4m3fn"}


def _varint(read) -> int | None:
    shift = result = 0
    while True:
        b = read(1)
        if not b:
            return None
        result |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return result
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of an in-memory message; value is bytes or int."""
    pos, n = 0, len(buf)

    def read(k):
        nonlocal pos
        out = buf[pos : pos + k]
        pos += k
        return out

    while pos < n:
        tag = _varint(read)
        num, wire = tag >> 3, tag & 7
        if wire == 0:
            yield num, wire, _varint(read)
        elif wire == 2:
            yield num, wire, read(_varint(read))
        else:
            read({1: 8, 5: 4}[wire])


def _value_info(buf: bytes) -> tuple[str, str, tuple[str | int, ...]]:
    name, dtype, dims = "", "undefined", []
    for num, _, val in _fields(buf):
        if num == 1:
            name = val.decode()
        elif num == 2:  # TypeProto
            for tnum, _, tval in _fields(val):
                if tnum != 1:  # tensor_type
                    continue
                for f, _, v in _fields(tval):
                    if f == 1:
                        dtype = _ONNX_DTYPES.get(v, f"onnx-type-{v}")
                    elif f == 2:  # shape
                        for _, _, dim in _fields(v):
                            parts = {k: x for k, _, x in _fields(dim)}
                            dims.append(parts[2].decode() if 2 in parts else int(parts.get(1, -1)))
    return name, dtype, tuple(dims)


def read_io(path: str | os.PathLike) -> tuple[list[IO], list[IO]]:
    """(name, dtype, dims) of the graph inputs and outputs declared in an ONNX file, read without
    loading its weights."""
    try:
        return _read_io(path)
    except ManifestError:
        raise
    except (KeyError, IndexError, ValueError, TypeError, OSError) as exc:  # UnicodeDecodeError is a ValueError
        raise ManifestError(f"{path}: not a readable ONNX file ({type(exc).__name__}: {exc})") from None


def _read_io(path: str | os.PathLike) -> tuple[list[IO], list[IO]]:
    inputs: list[IO] = []
    outputs: list[IO] = []
    with open(path, "rb") as fh:
        while (tag := _varint(fh.read)) is not None:
            num, wire = tag >> 3, tag & 7
            if wire != 2:
                if wire == 0:
                    _varint(fh.read)
                else:
                    fh.seek({1: 8, 5: 4}.get(wire, 0), 1)
                continue
            size = _varint(fh.read)
            if num != 7:  # not the graph
                fh.seek(size, 1)
                continue
            end = fh.tell() + size
            while fh.tell() < end:
                gtag = _varint(fh.read)
                gnum, gwire = gtag >> 3, gtag & 7
                if gwire == 0:
                    _varint(fh.read)
                    continue
                if gwire != 2:
                    fh.seek({1: 8, 5: 4}[gwire], 1)
                    continue
                gsize = _varint(fh.read)
                if gnum in (11, 12):
                    (inputs if gnum == 11 else outputs).append(_value_info(fh.read(gsize)))
                else:
                    fh.seek(gsize, 1)
            break
    if not outputs:
        raise ManifestError(f"{path}: not an ONNX model (no graph outputs found)")
    return inputs, outputs
