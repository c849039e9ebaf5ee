"""The export-directory contract: ``manifest.json``, versioned, read without torch or onnx.

An export directory holds ``manifest.json`` and the files it names (graphs, their external data,
the tokenizer). The manifest is the only thing the runtime trusts: model config, prompt rules,
schedule, image rules, and per graph its file, sha256, precision, input/output specs and the
declared range of every symbolic dim.

Checks made by :func:`load_manifest`:

- ``format_version`` is known; every field is present and typed;
- every named file resolves inside the export directory (no absolute paths, ``..`` or symlinks
  out of it) and exists;
- each graph's inputs/outputs (names, dtypes, dims) equal those stored in its ONNX file. The
  ONNX header is read with a small protobuf walker that seeks past initializers, so this costs
  a few reads per graph and needs neither ``onnx`` nor ``onnxruntime``;
- with ``verify_hashes=True`` (the default), the sha256 of every graph and data file. This
  streams every byte once: roughly 1 s per GB on one core (a full fp32 export is ~60 GB, a
  bf16/fp8 one 10-30 GB), so a runtime that trusts its disk may pass ``verify_hashes=False``
  and call :func:`verify_graph` later, e.g. once after installation.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_image_edge.runtime.errors import ManifestError
from qwen_image_edge.runtime.graphs import GRAPH_NAMES, KV_CACHE_GRAPHS  # noqa: F401  (the graph table's names)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


class Precision(str, enum.Enum):
    """Numeric precision of a graph's heavy math (one enum for the whole project)."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"  # W8A8 SmoothQuant
    FP8 = "fp8"  # E4M3 W8A8


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, dtype (numpy name, e.g. ``float32``) and dims (int or symbol)."""

    name: str
    dtype: str
    dims: tuple[str | int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(str(d["name"]), str(d["dtype"]), tuple(d["dims"]))

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype}[{', '.join(str(x) for x in self.dims)}]"


@dataclass(frozen=True)
class DataFile:
    """A file a graph needs besides its ``.onnx`` (external weights), with its sha256."""

    file: str
    sha256: str


@dataclass(frozen=True)
class GraphSpec:
    name: str
    file: str
    sha256: str
    precision: Precision
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dim_ranges: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # symbol -> (min, opt, max)
    external_data: tuple[DataFile, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "precision": self.precision.value,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "dim_ranges": {k: list(v) for k, v in self.dim_ranges.items()},
            "external_data": [{"file": d.file, "sha256": d.sha256} for d in self.external_data],
        }

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> GraphSpec:
        return cls(
            name=name,
            file=str(d["file"]),
            sha256=str(d["sha256"]),
            precision=Precision(d["precision"]),
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            dim_ranges={k: tuple(int(x) for x in v) for k, v in d.get("dim_ranges", {}).items()},
            external_data=tuple(DataFile(str(x["file"]), str(x["sha256"])) for x in d.get("external_data", [])),
        )


@dataclass(frozen=True)
class EngineSpec:
    """A TensorRT engine built from one graph (``qwen-image-edge build``); optional manifest section.

    Keyed in the manifest by ``<gpu-slug>-trt<version>/<graph>``. An engine runs only on the GPU
    model and TensorRT version it was built with, and only for the graph file whose sha256 it records.
    """

    graph: str
    file: str
    sha256: str
    graph_sha256: str  # the ONNX file it was built from
    precision: Precision
    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    dim_ranges: dict[str, tuple[int, int, int]]  # the shapes the engine's profile accepts
    strongly_typed: bool = True
    weight_streaming: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "graph": self.graph, "file": self.file, "sha256": self.sha256, "graph_sha256": self.graph_sha256,
            "precision": self.precision.value, "tensorrt_version": self.tensorrt_version,
            "gpu": {"name": self.gpu_name, "compute_capability": list(self.compute_capability)},
            "dim_ranges": {k: list(v) for k, v in self.dim_ranges.items()},
            "strongly_typed": self.strongly_typed, "weight_streaming": self.weight_streaming,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineSpec:
        major, minor = (int(x) for x in d["gpu"]["compute_capability"])
        return cls(
            graph=str(d["graph"]), file=str(d["file"]), sha256=str(d["sha256"]),
            graph_sha256=str(d["graph_sha256"]), precision=Precision(d["precision"]),
            tensorrt_version=str(d["tensorrt_version"]), gpu_name=str(d["gpu"]["name"]),
            compute_capability=(major, minor),
            dim_ranges={k: tuple(int(x) for x in v) for k, v in d["dim_ranges"].items()},
            strongly_typed=bool(d.get("strongly_typed", True)), weight_streaming=bool(d.get("weight_streaming", False)),
        )


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to know about an export directory.

    ``model``: the ModelConfig as a dict (latents_mean/std for latent normalisation live in
    ``model['vae']``); ``prompt``: tokenizer file, template, system prompt, drop rule, token limit;
    ``schedule``: scheduler config dict, steps, fixed sigmas or None, guidance scale, whether
    guidance was distilled in; ``image``: output resolution, exported min/max resolution, multiple;
    ``provenance``: source checkpoint digests, tool versions, creation time, later summaries.
    """

    model: dict[str, Any]
    prompt: dict[str, Any]
    schedule: dict[str, Any]
    image: dict[str, Any]
    graphs: dict[str, GraphSpec]
    provenance: dict[str, Any]
    format_version: int = FORMAT_VERSION
    engines: dict[str, EngineSpec] = field(default_factory=dict)  # optional; written by `build`

    def to_dict(self) -> dict[str, Any]:
        out = {
            "format_version": self.format_version,
            "model": self.model,
            "prompt": self.prompt,
            "schedule": self.schedule,
            "image": self.image,
            "graphs": {name: g.to_dict() for name, g in self.graphs.items()},
            "provenance": self.provenance,
        }
        if self.engines:  # absent until a build: exports stay byte-identical for older readers
            out["engines"] = {key: e.to_dict() for key, e in self.engines.items()}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = MANIFEST_NAME) -> Manifest:
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(d).__name__}")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"{where}: format_version {version!r} is not supported; this runtime reads version {FORMAT_VERSION}"
            )
        try:
            graphs = {name: GraphSpec.from_dict(name, g) for name, g in d["graphs"].items()}
            return cls(
                model=dict(d["model"]),
                prompt=dict(d["prompt"]),
                schedule=dict(d["schedule"]),
                image=dict(d["image"]),
                graphs=graphs,
                provenance=dict(d["provenance"]),
                format_version=version,
                engines={key: EngineSpec.from_dict(e) for key, e in d.get("engines", {}).items()},
            )
        except KeyError as exc:
            raise ManifestError(f"{where}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(f"{where}: malformed field ({exc})") from None

    def graph(self, name: str) -> GraphSpec:
        if name not in self.graphs:
            raise ManifestError(f"{MANIFEST_NAME}: no graph {name!r}; this export has {sorted(self.graphs)}")
        return self.graphs[name]


# ----------------------------------------------------------------------------- ONNX header
# A protobuf walker for ModelProto.graph.{input, output} (onnx.proto field numbers), so the
# runtime can check a graph file's IO without onnx; initializers are skipped with seek().

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


def _value_info(buf: bytes) -> TensorSpec:
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
    return TensorSpec(name, dtype, tuple(dims))


def read_onnx_io(path: str | os.PathLike) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Graph inputs and outputs declared in an ONNX file, read without loading its weights."""
    try:
        return _read_onnx_io(path)
    except ManifestError:
        raise
    except (KeyError, IndexError, ValueError, TypeError, OSError) as exc:  # UnicodeDecodeError is a ValueError
        raise ManifestError(f"{path}: not a readable ONNX file ({type(exc).__name__}: {exc})") from None


def _read_onnx_io(path: str | os.PathLike) -> tuple[list[TensorSpec], list[TensorSpec]]:
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
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


# ----------------------------------------------------------------------------- files


def resolve_path(export_dir: str | os.PathLike, relative: str) -> Path:
    """``export_dir / relative``, refusing anything that lands outside the export directory."""
    root = Path(export_dir).resolve()
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts or not str(relative):
        raise ManifestError(f"{MANIFEST_NAME}: path {relative!r} must be relative and inside {root}")
    path = (root / rel).resolve()  # follows symlinks
    if path != root and root not in path.parents:
        raise ManifestError(f"{MANIFEST_NAME}: path {relative!r} resolves to {path}, outside the export directory {root}")
    return path


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _existing(export_dir: Path, relative: str, what: str) -> Path:
    path = resolve_path(export_dir, relative)
    if not path.is_file():
        raise ManifestError(f"{what}: file {relative!r} not found in {export_dir}")
    return path


def verify_graph(export_dir: str | os.PathLike, graph: GraphSpec) -> None:
    """Check the sha256 of a graph's ONNX file and of its external data files."""
    export_dir = Path(export_dir)
    for rel, expected in [(graph.file, graph.sha256)] + [(d.file, d.sha256) for d in graph.external_data]:
        found = sha256_file(_existing(export_dir, rel, f"graph {graph.name!r}"))
        if found != expected:
            raise ManifestError(
                f"graph {graph.name!r}: file {rel!r} has sha256 {found[:16]}..., manifest expects {expected[:16]}..."
            )


def check_io(graph: GraphSpec, inputs: list[TensorSpec], outputs: list[TensorSpec], source: str) -> None:
    """The manifest's IO spec must equal what the graph file (or a backend session) declares."""
    for kind, declared, found in (("inputs", graph.inputs, inputs), ("outputs", graph.outputs, outputs)):
        if [t.name for t in declared] != [t.name for t in found]:
            raise ManifestError(
                f"graph {graph.name!r} ({source}): {kind} are {[t.name for t in found]}, "
                f"manifest declares {[t.name for t in declared]}"
            )
        for d, f in zip(declared, found):
            if d.dtype != f.dtype or tuple(d.dims) != tuple(f.dims):
                raise ManifestError(f"graph {graph.name!r} ({source}): {kind[:-1]} {f}, manifest declares {d}")


def load_manifest(export_dir: str | os.PathLike, verify_hashes: bool = True) -> Manifest:
    """Read and check ``<export_dir>/manifest.json`` (see the module docstring for what is checked)."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: not found; a directory without a complete manifest is not an export")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    manifest = Manifest.from_dict(data, where=str(path))
    tokenizer = manifest.prompt.get("tokenizer")
    if tokenizer:
        _existing(export_dir, tokenizer, "prompt tokenizer")
    for graph in manifest.graphs.values():
        onnx_path = _existing(export_dir, graph.file, f"graph {graph.name!r}")
        for d in graph.external_data:
            _existing(export_dir, d.file, f"graph {graph.name!r}")
        if verify_hashes:  # first: a corrupt file is reported as a hash mismatch, not a parse error
            verify_graph(export_dir, graph)
        inputs, outputs = read_onnx_io(onnx_path)
        check_io(graph, inputs, outputs, source=graph.file)
    return manifest
