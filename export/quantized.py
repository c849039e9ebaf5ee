"""An export directory whose transformer is a quantized QDQ graph (INT8 or FP8); the rest stays fp32.

The transformer is traced from modelopt's fake-quantized module with the TorchScript exporter
(the only path that carries its Q/DQ nodes), rewritten to standard QDQ by ``qwen_image_edge.export.qdq`` and saved
without onnx-graphsurgeon's constant folding: folding would evaluate ``DequantizeLinear`` of the
int8 weights back into fp32 initializers. The VAE and the text encoder are exported as ``export``
does. The manifest records the transformer graphs' precision, and provenance ``calibration`` holds the
policy, the quantized layers and the calibration summary.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

from qwen_image2_ref.model_folder import LoadedModel
from qwen_image_edge.export.iospec import MIN_RESOLUTION, RESOLUTION_MULTIPLE, check_max_resolution
from qwen_image_edge.export.lean import export_graph_lean, preflight
from qwen_image_edge.export.manifest_writer import (
    build_manifest,
    copy_tokenizer,
    image_section,
    prompt_section,
    staging_dir,
    write_manifest,
)
from qwen_image_edge.export.qdq import check_quantized_count, to_standard_qdq
from qwen_image_edge.export.qdq_lean import CalibratedScales
from qwen_image_edge.export.registry import example_inputs, graph_io, graph_module, wrap
from qwen_image_edge.export.trace import (
    DEFAULT_OPSET,
    ONNX_NAME,
    PROTOBUF_LIMIT,
    declare_outputs,
    export_graph,
    save_graph_spec,
    trace_to_onnx,
)
from qwen_image_edge.runtime.errors import ConfigError
from qwen_image_edge.runtime.graphs import GRAPH_NAMES, Component, check_graph_names, graphs_of
from qwen_image_edge.runtime.manifest import GraphSpec, Manifest, load_manifest

log = logging.getLogger(__name__)

# Graphs that hold the transformer's math: all get the quantized module (the condition KV-cache
# pair, where an export has it, splits the same layers; static per-tensor scales quantize each
# token alike, so the pair computes what the single graph computes).
TRANSFORMER_GRAPHS = graphs_of(Component.TRANSFORMER)


def export_quantized_transformer(quantized, cfg, export_dir: Path, max_resolution: int, name: str = "transformer",
                                 opset: int = DEFAULT_OPSET, external_threshold: int = PROTOBUF_LIMIT) -> GraphSpec:
    """Trace graph ``name`` (``transformer`` or one of the KV-cache pair) of ``quantized.module`` (a
    ``qwen_image_edge.calib.quantize.QuantizedTransformer``), rewrite it to standard QDQ and save it."""
    start = time.perf_counter()
    io = graph_io(name, cfg, max_resolution)
    module = wrap(name, quantized.module)
    model = trace_to_onnx(module, example_inputs(name, cfg), io, export_dir / name / ONNX_NAME, opset)
    model, stats = to_standard_qdq(model, quantized.policy.precision)
    check_quantized_count(name, stats.folded_weights, len(quantized.layers))
    declare_outputs(model, io)  # the QDQ rewrite rebuilds the outputs' value infos
    spec = save_graph_spec(model, io, export_dir, quantized.policy.precision, external_threshold)
    log.info("%s (%s): exported in %.1f s", name, quantized.policy.precision.value, time.perf_counter() - start)
    return spec


def export_fp32_graph(name: str, model: LoadedModel, cfg, export_dir: Path, max_resolution: int, opset: int = DEFAULT_OPSET,
                      external_threshold: int = PROTOBUF_LIMIT) -> GraphSpec:
    """An unquantized graph of the same export, exactly as ``export_model`` writes it."""
    io = graph_io(name, cfg, max_resolution)
    return export_graph(name, graph_module(name, model), example_inputs(name, cfg), io, export_dir, opset,
                        external_threshold).spec


def calibration_section(quantized) -> dict:
    return {
        "precision": quantized.policy.precision.value,
        "policy": quantized.policy.to_dict(),
        "layers": list(quantized.layers),
        "summary": quantized.summary,
        "qdq": "standard QuantizeLinear/DequantizeLinear; weights stored quantized, pre-transposed [in, out]",
    }


def export_quantized(model: LoadedModel, quantized, out: str | Path, graphs=None, max_resolution: int | None = None,
                     opset: int = DEFAULT_OPSET, overwrite: bool = False,
                     external_threshold: int = PROTOBUF_LIMIT) -> Manifest:
    """Export ``model`` (a ``LoadedModel``) to ``out`` with the transformer graphs from ``quantized``
    (``None``: an all-fp32 export written the same way, the baseline quantized exports compare to).

    A lazily opened ``model`` (``load_lazy_model``) takes the lean path: ``quantized`` is then the
    :class:`~qwen_image_edge.export.qdq_lean.CalibratedScales` of a calibration, every graph is
    traced without weights and the weights stream from the checkpoint, quantized on the way
    (``qwen_image_edge.export.qdq_lean``), so no copy of the model is held."""
    if opset < 19:
        raise ConfigError(f"quantized export opset: expected >= 19 (float8 Q/DQ needs it), got {opset}")
    graphs = check_graph_names(graphs or GRAPH_NAMES, where="quantized export graphs")
    if max_resolution is not None:
        check_max_resolution(max_resolution)
    if not any(g in TRANSFORMER_GRAPHS for g in graphs):
        raise ConfigError(f"quantized export graphs {graphs}: expected one of {list(TRANSFORMER_GRAPHS)} among them")
    cfg = model.config
    max_resolution = max_resolution or cfg.pipeline.output_resolution
    out = Path(out)
    if model.lazy:
        if quantized is not None and not isinstance(quantized, CalibratedScales):
            raise ConfigError("lean quantized export: expected the CalibratedScales of a calibration "
                              f"(qdq_lean.calibrated_scales), got {type(quantized).__name__}")
        for name in graphs:
            preflight(name, model)  # every graph's weights, before anything is written
    with staging_dir(out, overwrite=overwrite) as staging:
        specs: dict[str, GraphSpec] = {}
        for name in tqdm(graphs, desc="export", unit="graph"):
            if model.lazy:
                scales = quantized if name in TRANSFORMER_GRAPHS else None
                specs[name] = export_graph_lean(name, model, example_inputs(name, cfg),
                                                graph_io(name, cfg, max_resolution), staging, opset, scales).spec
            elif quantized is not None and name in TRANSFORMER_GRAPHS:
                specs[name] = export_quantized_transformer(quantized, cfg, staging, max_resolution, name, opset,
                                                           external_threshold)
            else:
                specs[name] = export_fp32_graph(name, model, cfg, staging, max_resolution, opset, external_threshold)
        prompt = prompt_section(model, copy_tokenizer(model.path, staging))
        image = image_section(model, MIN_RESOLUTION, max_resolution, RESOLUTION_MULTIPLE)
        manifest = build_manifest(model, specs, prompt, image, lean=model.lazy)
        if quantized is not None:
            provenance = dataclasses.replace(manifest.provenance, calibration=calibration_section(quantized))
            manifest = dataclasses.replace(manifest, provenance=provenance)
        write_manifest(staging, manifest)
    log.info("export %s complete (%s transformer)", out, quantized.policy.precision.value if quantized else "fp32")
    return load_manifest(out, verify_hashes=False)
