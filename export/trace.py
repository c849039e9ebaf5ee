"""One graph, the plain path: trace with the TorchScript exporter, clean up, save, describe.

The TorchScript exporter (``dynamo=False``) is used: it takes 0.2-0.6 s per tiny graph, is the
only path that carries modelopt's Q/DQ nodes, and keeps every dynamic axis symbolic when the
trace inputs use distinct sizes > 1 (the dynamo exporter silently specialised dims here; see
the toolchain notes). Every graph is cleaned up with onnx-graphsurgeon and saved with its
weights inline, or in one ``model.onnx.data`` file once it is over the protobuf limit (2 GB).
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from qwen_image_edge.export.cleanup import cleanup_graph
from qwen_image_edge.export.iospec import GraphIO
from qwen_image_edge.runtime.manifest import DataFile, GraphSpec, Precision, sha256_file

log = logging.getLogger(__name__)

DEFAULT_OPSET = 19
PROTOBUF_LIMIT = 2**31 - 1  # bytes; larger graphs keep their weights in external data
ONNX_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"


@dataclass(frozen=True)
class ExportedGraph:
    spec: GraphSpec
    nodes_before: int
    nodes_after: int
    seconds: float


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def trace_to_onnx(module: torch.nn.Module, inputs: tuple, io: GraphIO, path: Path, opset: int) -> onnx.ModelProto:
    """Trace ``module`` at ``inputs`` and return the ONNX model (weights loaded)."""
    scratch = path.parent / "_trace"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", module=r"torch\.onnx.*")  # constant-folding notices
            torch.onnx.export(
                module,
                inputs,
                str(scratch / ONNX_NAME),
                dynamo=False,
                opset_version=opset,
                input_names=io.input_names,
                output_names=io.output_names,
                dynamic_axes=io.dynamic_axes(),
                do_constant_folding=True,
            )
        model = onnx.load(str(scratch / ONNX_NAME))  # also loads per-tensor external files of big traces
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    declare_outputs(model, io)
    return model


def declare_outputs(model: onnx.ModelProto, io: GraphIO) -> None:
    """Output dims exactly as the IOSpec says.

    The exporter's shape inference gives up at some ops (a patchified VAE's final Clip, custom FP8
    ops) and invents a symbol such as ``Clipimage_dim_1`` for a dim the model fixes (4 channels).
    """
    for value, spec in zip(model.graph.output, io.outputs):
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for d in spec.dims:
            dim = dims.add()
            if isinstance(d, int):
                dim.dim_value = d
            else:
                dim.dim_param = d


def save_graph(model: onnx.ModelProto, path: Path, external_threshold: int = PROTOBUF_LIMIT) -> list[Path]:
    """Save inline, or with all weights in one ``model.onnx.data`` beside it; returns the data files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if _weight_bytes(model) <= external_threshold:
        onnx.save(model, str(path))
        return []
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=DATA_NAME, size_threshold=1024)
    return [path.parent / DATA_NAME]


def save_graph_spec(model: onnx.ModelProto, io: GraphIO, export_dir: Path, precision: Precision,
                    external_threshold: int = PROTOBUF_LIMIT) -> GraphSpec:
    """Save graph ``io.name`` under ``export_dir/<name>/`` and describe it (files hashed) for the manifest."""
    path = export_dir / io.name / ONNX_NAME
    data_files = save_graph(model, path, external_threshold)
    rel = lambda p: p.relative_to(export_dir).as_posix()  # noqa: E731
    return GraphSpec(
        name=io.name,
        file=rel(path),
        sha256=sha256_file(path),
        precision=precision,
        inputs=io.inputs,
        outputs=io.outputs,
        dim_ranges=io.dim_ranges,
        external_data=tuple(DataFile(rel(p), sha256_file(p)) for p in data_files),
    )


def export_graph(
    name: str,
    module: torch.nn.Module,
    inputs: tuple,
    io: GraphIO,
    export_dir: Path,
    opset: int = DEFAULT_OPSET,
    external_threshold: int = PROTOBUF_LIMIT,
) -> ExportedGraph:
    """Trace, clean up and save one graph under ``export_dir/<name>/``; hash what was written."""
    start = time.perf_counter()
    model = trace_to_onnx(module, inputs, io, export_dir / name / ONNX_NAME, opset)
    model, stats = cleanup_graph(model, name)
    spec = save_graph_spec(model, io, export_dir, Precision.FP32, external_threshold)
    del model
    seconds = time.perf_counter() - start
    log.info("%s: exported in %.1f s (%d -> %d nodes%s)", name, seconds, stats.nodes_before,
             stats.nodes_after, ", external data" if spec.external_data else "")
    return ExportedGraph(spec, stats.nodes_before, stats.nodes_after, seconds)
