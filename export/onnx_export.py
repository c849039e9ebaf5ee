"""torch -> ONNX for every graph of a model, into an export directory with its manifest.

Each graph goes by the plain path (``qwen_image_edge.export.trace``: weights in memory, the
TorchScript exporter) or, for a checkpoint too large for memory, the lean one
(``qwen_image_edge.export.lean``: traced without weights, weights attached from the shards).
The graph registry (``qwen_image_edge.export.registry``) gives each graph's IOSpec, module and
tracing inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from qwen_image2_ref.model_folder import ModelSource, open_model
from qwen_image_edge.export.iospec import MIN_RESOLUTION, RESOLUTION_MULTIPLE, check_max_resolution
from qwen_image_edge.export.lean import choose_lean, export_graph_lean, preflight
from qwen_image_edge.export.manifest_writer import (
    build_manifest,
    copy_tokenizer,
    image_section,
    prompt_section,
    staging_dir,
    write_manifest,
)
from qwen_image_edge.export.registry import example_inputs, graph_io, graph_module
from qwen_image_edge.export.trace import DEFAULT_OPSET, PROTOBUF_LIMIT, ExportedGraph, export_graph
from qwen_image_edge.runtime.errors import ConfigError
from qwen_image_edge.runtime.graphs import GRAPH_NAMES, check_graph_names
from qwen_image_edge.runtime.manifest import GraphSpec, Manifest, load_manifest

log = logging.getLogger(__name__)


def export_model(
    model: ModelSource,
    out: str | Path,
    graphs: Sequence[str] | None = None,
    max_resolution: int | None = None,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    external_threshold: int = PROTOBUF_LIMIT,
    lean: bool | None = None,
    loras=None,
) -> Manifest:
    """Export the graphs of ``model`` (a checkpoint folder, ``"demo"`` or a ``LoadedModel``) to ``out``.

    ``max_resolution`` (pixels, multiple of 32) bounds the declared image-size range; it
    defaults to the model's output resolution. ``out`` appears only once everything, manifest
    last, has been written. ``lean`` traces without weights and attaches them from the checkpoint
    (``qwen_image_edge.export.lean``); ``None`` chooses it for a checkpoint folder whose fp32 weights would take
    more than 40% of the available memory. ``loras``: adapter files or (file, scale) pairs fused into
    the transformer (``qwen_image2_ref.lora``), listed in the manifest's provenance.
    """
    if opset < 19:
        raise ConfigError(f"export opset: expected >= 19 (float8 / bf16 Q/DQ need it), got {opset}")
    graphs = check_graph_names(graphs or GRAPH_NAMES, where="export graphs")
    if max_resolution is not None:
        check_max_resolution(max_resolution)
    model = open_model(model, lazy=choose_lean(model, graphs) if lean is None else lean, loras=loras)
    if model.lazy:
        for name in graphs:
            preflight(name, model)  # every graph's weights, before anything is written
    cfg = model.config
    max_resolution = max_resolution or cfg.pipeline.output_resolution
    out = Path(out)
    with staging_dir(out, overwrite=overwrite) as staging:
        specs: dict[str, GraphSpec] = {}
        for name in tqdm(graphs, desc="export", unit="graph"):
            specs[name] = _export_one(name, model, staging, max_resolution, opset, external_threshold).spec
        prompt = prompt_section(model, copy_tokenizer(model.path, staging))
        image = image_section(model, MIN_RESOLUTION, max_resolution, RESOLUTION_MULTIPLE)
        write_manifest(staging, build_manifest(model, specs, prompt, image, lean=model.lazy))
    log.info("export %s complete: %s", out, ", ".join(graphs))
    return load_manifest(out, verify_hashes=False)


def _export_one(name: str, model, export_dir: Path, max_resolution: int, opset: int,
                external_threshold: int) -> ExportedGraph:
    cfg = model.config
    io = graph_io(name, cfg, max_resolution)
    if model.lazy:
        return export_graph_lean(name, model, example_inputs(name, cfg), io, export_dir, opset)
    return export_graph(name, graph_module(name, model), example_inputs(name, cfg), io, export_dir, opset,
                        external_threshold)
