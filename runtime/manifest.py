"""The export-directory contract: ``manifest.json``, versioned, read without torch or onnx.

An export directory holds ``manifest.json`` and the files it names (graphs, their external data,
the tokenizer). The manifest is the only thing the runtime trusts: model config, prompt rules,
schedule, image rules, and per graph its file, sha256, precision, input/output specs and the
declared range of every symbolic dim.

Checks made by :func:`load_manifest`:

- ``format_version`` is this runtime's (an older export is refused with a request to re-export);
  every field is present and typed (:mod:`qwen_image_edge.runtime.sections`), a problem is a
  ManifestError naming the field's path (``schedule.guidance_scale``);
- every named file resolves inside the export directory (no absolute paths, ``..`` or symlinks
  out of it) and exists;
- each graph's inputs/outputs (names, dtypes, dims) equal those stored in its ONNX file, read by
  :mod:`qwen_image_edge.runtime.onnx_header` (a few reads per graph; neither ``onnx`` nor
  ``onnxruntime``);
- with ``verify_hashes=True`` (the default), the sha256 of every graph and data file. This
  streams every byte once: roughly 1 s per GB on one core (a full fp32 export is ~60 GB, a
  bf16/fp8 one 10-30 GB), so a runtime that trusts its disk may pass ``verify_hashes=False``
  and call :func:`verify_graph` later, e.g. once after installation.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_image_edge.runtime import fields
from qwen_image_edge.runtime.errors import ManifestError
from qwen_image_edge.runtime.fields import KEY, OPTIONAL, FieldError
from qwen_image_edge.runtime.graphs import (  # noqa: F401  (GRAPH_NAMES, KV_CACHE_GRAPHS: the graph table's names)
    GRAPH_NAMES,
    KV_CACHE_GRAPHS,
    check_graph_names,
)
from qwen_image_edge.runtime.onnx_header import read_io
from qwen_image_edge.runtime.sections import (
    ImageSection,
    ModelSection,
    PromptSection,
    Provenance,
    ScheduleSection,
)

# 2: typed sections; image.vision holds the VisionConfig fields; every field is required.
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"


class Precision(str, enum.Enum):
    """Numeric precision of a graph's heavy math (one enum for the whole project)."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"  # W8A8 SmoothQuant
    FP8 = "fp8"  # E4M3 W8A8
    INT4 = "int4"  # weight-only, block-wise (the condition encoder's language model)


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, dtype (numpy name, e.g. ``float32``) and dims (int or symbol)."""

    name: str
    dtype: str
    dims: tuple[str | int, ...]

    def to_dict(self) -> dict[str, Any]:
        return fields.to_json(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return parse_section(cls, d, "tensor")

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype}[{', '.join(str(x) for x in self.dims)}]"


@dataclass(frozen=True)
class DataFile:
    """A file a graph needs besides its ``.onnx`` (external weights), with its sha256."""

    file: str
    sha256: str


@dataclass(frozen=True)
class GraphSpec:
    name: str = field(metadata=KEY)  # its key in ``graphs``
    file: str
    sha256: str
    precision: Precision
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dim_ranges: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # symbol -> (min, opt, max)
    external_data: tuple[DataFile, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return fields.to_json(self)

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> GraphSpec:
        return parse_section(cls, d, f"graphs.{name}", key=name)


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
    def from_dict(cls, d: dict[str, Any], path: str = "engine") -> EngineSpec:
        data = parse_section(_EngineJson, d, path)
        return cls(data.graph, data.file, data.sha256, data.graph_sha256, data.precision, data.tensorrt_version,
                   data.gpu.name, data.gpu.compute_capability, data.dim_ranges, data.strongly_typed,
                   data.weight_streaming)


@dataclass(frozen=True)
class _Gpu:
    name: str
    compute_capability: tuple[int, int]


@dataclass(frozen=True)
class _EngineJson:
    """EngineSpec as the manifest lays it out (the GPU nested)."""

    graph: str
    file: str
    sha256: str
    graph_sha256: str
    precision: Precision
    tensorrt_version: str
    gpu: _Gpu
    dim_ranges: dict[str, tuple[int, int, int]]
    strongly_typed: bool
    weight_streaming: bool


def parse_section(cls, data, path: str, where: str = MANIFEST_NAME, key: str | None = None):
    """``fields.from_json`` with its FieldError as a one-line ManifestError (``where: path: problem``)."""
    try:
        return fields.from_json(cls, data, path, key)
    except FieldError as exc:
        raise ManifestError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to know about an export directory, one typed section each.

    ``model``: the reference's ModelConfig (what the runtime reads typed: transformer channels and
    rope, VAE latent statistics and scale factor); ``prompt``: tokenizer file, template, system
    prompt, drop rule, token limit; ``schedule``: scheduler config, steps, fixed sigmas or None,
    guidance scale, whether guidance was distilled in; ``image``: output resolution, exported size
    ranges, condition and target ranges, the VAE scale factor, vision preprocessing;
    ``provenance``: source checkpoint digests, tool versions, creation time, later summaries.
    """

    model: ModelSection
    prompt: PromptSection
    schedule: ScheduleSection
    image: ImageSection
    graphs: dict[str, GraphSpec]
    provenance: Provenance
    format_version: int = FORMAT_VERSION
    engines: dict[str, EngineSpec] = field(default_factory=dict, metadata=OPTIONAL)  # written by `build`

    def __post_init__(self) -> None:
        check_graph_names(self.graphs, where=f"{MANIFEST_NAME}: graphs", error=ManifestError)
        if self.image.vae_scale_factor != self.model.vae.scale_factor_spatial:
            raise FieldError("image.vae_scale_factor", f"{self.image.vae_scale_factor}, but "
                                                       f"model.vae.scale_factor_spatial is {self.model.vae.scale_factor_spatial}")

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent token side."""
        return self.image.vae_scale_factor

    def to_dict(self) -> dict[str, Any]:
        out = {
            "format_version": self.format_version,
            "model": fields.to_json(self.model),
            "prompt": fields.to_json(self.prompt),
            "schedule": fields.to_json(self.schedule),
            "image": fields.to_json(self.image),
            "graphs": {name: g.to_dict() for name, g in self.graphs.items()},
            "provenance": fields.to_json(self.provenance),
        }
        if self.engines:  # absent until a build
            out["engines"] = {key: e.to_dict() for key, e in self.engines.items()}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = MANIFEST_NAME) -> Manifest:
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(d).__name__}")
        _check_version(d.get("format_version"), where)
        sections = {k: v for k, v in d.items() if k != "engines"}
        manifest = parse_section(cls, sections, "", where)
        engines = d.get("engines", {})
        if not isinstance(engines, dict):
            raise ManifestError(f"{where}: engines: expected an object, got {type(engines).__name__}")
        parsed = {key: EngineSpec.from_dict(e, f"engines.{key}") for key, e in engines.items()}
        return dataclasses.replace(manifest, engines=parsed) if parsed else manifest

    def graph(self, name: str) -> GraphSpec:
        if name not in self.graphs:
            raise ManifestError(f"{MANIFEST_NAME}: no graph {name!r}; this export has {sorted(self.graphs)}")
        return self.graphs[name]


def _check_version(version, where: str) -> None:
    if version == FORMAT_VERSION:
        return
    if version is None:
        raise ManifestError(f"{where}: format_version: required field missing (this runtime reads version "
                            f"{FORMAT_VERSION}; re-export the model)")
    if isinstance(version, int) and not isinstance(version, bool) and version < FORMAT_VERSION:
        raise ManifestError(f"{where}: format_version {version} is older than this runtime reads ({FORMAT_VERSION}); "
                            "re-export the model with this version (qwen-image-edge export)")
    raise ManifestError(f"{where}: format_version {version!r} is not supported; this runtime reads version "
                        f"{FORMAT_VERSION} (a newer export needs a newer qwen-image-edge)")


def read_onnx_io(path: str | os.PathLike) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Graph inputs and outputs declared in an ONNX file, read without loading its weights."""
    inputs, outputs = read_io(path)
    return [TensorSpec(*t) for t in inputs], [TensorSpec(*t) for t in outputs]


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
    _existing(export_dir, manifest.prompt.tokenizer, "prompt tokenizer")
    for graph in manifest.graphs.values():
        onnx_path = _existing(export_dir, graph.file, f"graph {graph.name!r}")
        for d in graph.external_data:
            _existing(export_dir, d.file, f"graph {graph.name!r}")
        if verify_hashes:  # first: a corrupt file is reported as a hash mismatch, not a parse error
            verify_graph(export_dir, graph)
        inputs, outputs = read_onnx_io(onnx_path)
        check_io(graph, inputs, outputs, source=graph.file)
    return manifest
