"""Refit TensorRT engines with LoRA adapters: new transformer weights without an engine rebuild.

``qwen-image-edge build --refittable`` builds the transformer engines with ``BuilderFlag.REFIT``;
``qwen-image-edge refit EXPORT_DIR --lora FILE[:SCALE]`` then, in order:

1. checks everything before writing a byte: the manifest and its hashes; the transformer graphs
   are float (an int8 / fp8 Q/DQ graph stores weights quantized with scales calibrated on the base
   weights: re-quantize with ``quantize --lora`` instead) and name their weights by checkpoint keys
   (the lean export does; the TorchScript path names them by trace ids such as ``onnx::MatMul_905``,
   which no adapter key can be matched to); every adapter against those weights' shapes
   (:mod:`qwen_image2_ref.lora`); every engine of those graphs for this GPU and TensorRT version is
   refittable and was built from the graph file the manifest names;
2. writes each graph an adapter touches anew (:mod:`qwen_image_edge.export.refit_graph`): the
   touched weights fused into a new data file, the others still pointing where they did;
3. refits each engine from that file with TensorRT's ONNX parser refitter, which sets every
   refittable weight by its ONNX initializer name (the names the ONNX parser gave the engine's
   weights at build), and serializes it to a new plan file;
4. rewrites the manifest atomically (graph and engine files and hashes, the adapters appended to
   ``provenance.source.loras``), then deletes the files nothing references any more.

New files carry new names, so a failure before step 4 leaves the old manifest and every file it
names intact (what was staged is removed). Adapters stack: they are fused into the export's current
weights, earlier adapters included, and the provenance lists them all. Engines of the same graphs
for other GPUs or TensorRT versions keep the old weights; the runtime refuses them as built from
another graph (rebuild them there).

API followed (TensorRT 10.x, 11.x): ``BuilderFlag.REFIT``, ``ICudaEngine.refittable``,
``trt.Refitter(engine, logger)``, ``trt.OnnxParserRefitter(refitter, logger).refit_from_file(path)``
with ``num_errors`` / ``get_error(i)``, ``Refitter.get_missing_weights()``, ``refit_cuda_engine()``,
``ICudaEngine.serialize()``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from qwen_image_edge.export.manifest_writer import write_text_atomic
from qwen_image_edge.export.refit_graph import GraphWeights, graph_weights, write_fused_graph
from qwen_image_edge.export.tensorrt import REFITTABLE_GRAPHS, write_atomic
from qwen_image_edge.runtime.backends import cuda
from qwen_image_edge.runtime.backends.tensorrt import engine_key, import_tensorrt, process_logger
from qwen_image_edge.runtime.errors import BackendError, ConfigError
from qwen_image_edge.runtime.manifest import (
    MANIFEST_NAME,
    EngineSpec,
    GraphSpec,
    Manifest,
    Precision,
    load_manifest,
    resolve_path,
    sha256_file,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefitResult:
    graphs: dict[str, GraphSpec]  # the graphs written anew, by name
    engines: dict[str, EngineSpec]  # the engines refit, by manifest key


def refit_engines(export_dir: str | os.PathLike, loras, *, trt=None) -> RefitResult:
    """Fuse ``loras`` (files or (file, scale) pairs) into the export's transformer graphs and write
    them into this GPU's engines of those graphs (see the module docstring)."""
    from qwen_image2_ref.lora import normalize_specs, read_loras

    export_dir = Path(export_dir).resolve()  # graph and data paths are compared under it
    specs = normalize_specs(loras)
    if not specs:
        raise ConfigError("refit: expected at least one --lora FILE[:SCALE], got none")
    manifest = load_manifest(export_dir, verify_hashes=True)
    names = [g for g in REFITTABLE_GRAPHS if g in manifest.graphs]
    if not names:
        raise ConfigError(f"refit: the export has no transformer graph ({', '.join(REFITTABLE_GRAPHS)}); "
                          f"it has {sorted(manifest.graphs)}")
    for g in names:  # first: a quantized graph holds no float weights to match an adapter against
        _check_float(manifest.graphs[g])
    weights = {g: graph_weights(export_dir, manifest.graphs[g]) for g in names}
    shapes = {k: shape for w in weights.values() for k, (_, shape) in w.tensors.items()}
    adapters = read_loras(specs, shapes)  # every adapter checked before anything is written
    touched = {g: sorted({k for a in adapters for k in a.layers} & set(w.tensors)) for g, w in weights.items()}
    touched = {g: keys for g, keys in touched.items() if keys}
    trt = trt if trt is not None else import_tensorrt()
    version = str(trt.__version__)
    cuda.check_driver()
    gpu = cuda.device_info()
    targets = {engine_key(gpu, version, g): manifest.engines[engine_key(gpu, version, g)] for g in touched
               if engine_key(gpu, version, g) in manifest.engines}
    if not targets:
        raise ConfigError(f"refit: no engine of {sorted(touched)} for {gpu} with TensorRT {version} in this export; "
                          "build them with `qwen-image-edge build --refittable` first (or fuse adapters at export: "
                          "`export --lora`)")
    for engine in targets.values():
        _check_engine(trt, export_dir, manifest, engine)
    _warn_other_engines(manifest, touched, targets)
    return _write(trt, export_dir, manifest, weights, touched, targets, adapters)


def _check_float(spec: GraphSpec) -> None:
    if spec.precision in (Precision.INT8, Precision.FP8):
        raise ConfigError(
            f"refit: graph {spec.name!r} is {spec.precision.value} (Q/DQ): its weights are stored quantized with "
            "scales calibrated on the base weights, so an adapter cannot be fused into them here; quantize with "
            "--lora, then build")


def _check_engine(trt, export_dir: Path, manifest: Manifest, engine: EngineSpec) -> None:
    """The engine was built from the graph file the manifest names, and with ``BuilderFlag.REFIT``."""
    graph = manifest.graphs[engine.graph]
    if engine.graph_sha256 != graph.sha256:
        raise ConfigError(f"refit: engine {engine.file} was built from another version of graph {graph.name!r} "
                          f"(sha256 {engine.graph_sha256[:16]}..., the manifest's graph has {graph.sha256[:16]}...); "
                          "rebuild it with `build --refittable`")
    cuda_engine = _deserialize(trt, export_dir, engine)
    if not cuda_engine.refittable:
        raise ConfigError(f"refit: engine {engine.file} was built without --refittable (TensorRT's "
                          "BuilderFlag.REFIT), so its weights cannot be replaced; rebuild it with `build --refittable`")


def _deserialize(trt, export_dir: Path, engine: EngineSpec):
    path = resolve_path(export_dir, engine.file)
    if not path.is_file() or sha256_file(path) != engine.sha256:
        raise BackendError(f"refit: engine {engine.file} is missing or does not have the manifest's sha256; "
                           "rebuild it")
    logger = process_logger(trt)
    cuda_engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
    if cuda_engine is None:
        raise BackendError(f"refit: TensorRT could not load engine {engine.file}: {logger.errors[-3:]}")
    return cuda_engine


def _warn_other_engines(manifest: Manifest, touched: dict, targets: dict) -> None:
    others = sorted(k for k, e in manifest.engines.items() if e.graph in touched and k not in targets)
    if others:
        log.warning("refit: engines %s keep the old weights; the runtime will refuse them as built from another "
                    "graph: rebuild them on their GPU", others)


def refit_engine(trt, plan: bytes, onnx_path: Path, where: str) -> bytes:
    """``plan`` with every refittable weight set from ``onnx_path`` (by ONNX initializer name)."""
    logger = process_logger(trt)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        raise BackendError(f"refit {where}: TensorRT could not load the engine: {logger.errors[-3:]}")
    refitter = trt.Refitter(engine, logger)
    parser = trt.OnnxParserRefitter(refitter, logger)
    if not parser.refit_from_file(os.fspath(onnx_path)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors)) or logger.errors[-3:]
        raise BackendError(f"refit {where}: TensorRT's ONNX refitter refused {onnx_path.name}: {errors}")
    missing = refitter.get_missing_weights()
    if missing:
        raise BackendError(f"refit {where}: {len(missing)} weights were not supplied, e.g. {list(missing)[:5]}")
    if not refitter.refit_cuda_engine():
        raise BackendError(f"refit {where}: TensorRT's refit failed: {logger.errors[-3:] or 'no error logged'}")
    return bytes(memoryview(engine.serialize()))


def _write(trt, export_dir: Path, manifest: Manifest, weights: dict[str, GraphWeights], touched: dict,
           targets: dict[str, EngineSpec], adapters) -> RefitResult:
    tag = uuid.uuid4().hex[:8]  # new names: the files the current manifest names are never overwritten
    staged: list[Path] = []
    try:
        graphs = {g: write_fused_graph(export_dir, manifest.graphs[g], weights[g], keys, adapters, tag, staged)
                  for g, keys in touched.items()}
        engines = {}
        for key, engine in targets.items():
            spec = graphs[engine.graph]
            old = export_dir / engine.file
            path = old.with_name(f"{engine.graph}.{tag}.plan")
            staged.append(path)
            plan = refit_engine(trt, old.read_bytes(), export_dir / spec.file, engine.file)
            write_atomic(path, plan)
            engines[key] = dataclasses.replace(engine, file=path.relative_to(export_dir).as_posix(),
                                               sha256=sha256_file(path), graph_sha256=spec.sha256)
            log.info("%s: refit into %s (%.1f MB)", engine.graph, engines[key].file, len(plan) / 1e6)
        _commit(export_dir, graphs, engines, adapters)
    except BaseException:
        for path in staged:
            path.unlink(missing_ok=True)
        raise
    _remove_unreferenced(export_dir, manifest)
    return RefitResult(graphs, engines)


def _commit(export_dir: Path, graphs: dict[str, GraphSpec], engines: dict[str, EngineSpec], adapters) -> None:
    """Re-read the manifest, put in the new graphs, engines and adapters, write it back atomically."""
    current = load_manifest(export_dir, verify_hashes=False)
    source = dict(current.provenance.source or {})
    source["loras"] = [*source.get("loras", []), *(a.provenance() for a in adapters)]
    updated = dataclasses.replace(
        current, graphs={**current.graphs, **graphs}, engines={**current.engines, **engines},
        provenance=dataclasses.replace(current.provenance, source=source))
    write_text_atomic(export_dir / MANIFEST_NAME, updated.to_json())


def _remove_unreferenced(export_dir: Path, before: Manifest) -> None:
    """Delete the files ``before`` named that the manifest now on disk does not (old graphs, data, plans)."""
    after = load_manifest(export_dir, verify_hashes=False)
    gone = _files(before) - _files(after)
    for rel in sorted(gone):
        (export_dir / rel).unlink(missing_ok=True)
    if gone:
        log.info("refit: removed %d superseded file(s): %s", len(gone), ", ".join(sorted(gone)))


def _files(m: Manifest) -> set[str]:
    out = {e.file for e in m.engines.values()}
    for g in m.graphs.values():
        out |= {g.file, *(d.file for d in g.external_data)}
    return out
