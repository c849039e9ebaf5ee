"""torch -> ONNX for every graph of a model, into an export directory with its manifest.

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from tqdm.auto import tqdm

from qwen_image_edge.export.cleanup import cleanup_graph
from qwen_image_edge.export.graphs import example_inputs, graph_module
from qwen_image_edge.export.iospec import MIN_RESOLUTION, RESOLUTION_MULTIPLE, GraphIO, graph_io
from qwen_image_edge.export.manifest_writer import (
    build_manifest,
    copy_tokenizer,
    image_section,
    prompt_section,
    staging_dir,
    write_manifest,
)
from qwen_image_edge.runtime.errors import ConfigError
from qwen_image_edge.runtime.manifest import GRAPH_NAMES, DataFile, GraphSpec, Manifest, Precision, sha256_file

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


def export_model(
    model,
    out: str | Path,
    graphs: Sequence[str] | None = None,
    max_resolution: int | None = None,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    external_threshold: int = PROTOBUF_LIMIT,
    lean: bool | None = None,
) -> Manifest:
    """Export the graphs of ``model`` (a checkpoint folder, ``"demo"`` or a ``LoadedModel``) to ``out``.

    ``max_resolution`` (pixels, multiple of 32) bounds the declared image-size range; it
    defaults to the model's output resolution. ``out`` appears only once everything, manifest
    last, has been written. ``lean`` traces without weights and attaches them from the checkpoint
    (``qwen_image_edge.export.lean``); ``None`` chooses it for a checkpoint folder whose fp32 weights would take
    more than 40% of the available memory.
    """
    if opset < 19:
        raise ConfigError(f"export opset: expected >= 19 (float8 / bf16 Q/DQ need it), got {opset}")
    graphs = list(graphs or GRAPH_NAMES)
    unknown = [g for g in graphs if g not in GRAPH_NAMES]
    if unknown:
        raise ConfigError(f"export graphs {unknown}: unknown; expected some of {list(GRAPH_NAMES)}")
    if lean is None:
        from qwen_image_edge.export.lean import should_use_lean
        from qwen_image2_ref.model_folder import resolve_model_path

        lean = not hasattr(model, "transformer") and should_use_lean(resolve_model_path(model), graphs)
    if lean:
        from qwen_image_edge.export.lean import export_graph_lean, load_lean_model, preflight

        model = load_lean_model(model.path if hasattr(model, "transformer") else model)
        for name in graphs:
            preflight(name, model)  # every graph's weights, before anything is written
    elif not hasattr(model, "transformer"):
        from qwen_image2_ref.model_folder import load_model

        model = load_model(model)
    cfg = model.config
    max_resolution = max_resolution or cfg.pipeline.output_resolution
    out = Path(out)
    with staging_dir(out, overwrite=overwrite) as staging:
        specs: dict[str, GraphSpec] = {}
        for name in tqdm(graphs, desc="export", unit="graph"):
            io = graph_io(name, cfg, max_resolution)
            if lean:
                done = export_graph_lean(name, model, example_inputs(name, cfg), io, staging, opset)
            else:
                done = export_graph(name, graph_module(name, model), example_inputs(name, cfg), io, staging,
                                    opset, external_threshold)
            specs[name] = done.spec
        prompt = prompt_section(model, copy_tokenizer(model.path, staging))
        image = image_section(model, MIN_RESOLUTION, max_resolution, RESOLUTION_MULTIPLE)
        write_manifest(staging, build_manifest(model, specs, prompt, image, lean=bool(lean)))
    log.info("export %s complete: %s", out, ", ".join(graphs))
    from qwen_image_edge.runtime.manifest import load_manifest

    return load_manifest(out, verify_hashes=False)
