"""Build TensorRT engines from an export directory and record them in its manifest.

API followed: the TensorRT 10.x Python API (10.8 to 10.13), checked against TensorRT 11.x's
migration notes: ``trt.Builder(logger)``, ``create_network(1 << STRONGLY_TYPED)``,
``OnnxParser.parse_from_file`` (external data next to the graph) and ``get_error(i).node() /
node_name() / desc()``, ``create_builder_config``, ``builder_optimization_level``,
``set_flag(BuilderFlag.FP16 | BF16 | WEIGHT_STREAMING)``, ``create_optimization_profile`` +
``set_shape`` + ``add_optimization_profile``, ``create_timing_cache`` / ``set_timing_cache`` /
``get_timing_cache().serialize()`` and ``build_serialized_network``; ``BuilderFlag.REFIT`` for the
transformer graphs with ``refittable`` (``qwen_image_edge.export.refit`` writes LoRA weights into them).

Precision (one decision per graph, :func:`network_mode`):

- int8 / fp8 graphs carry Q/DQ nodes, int4 graphs weight-only DequantizeLinear blocks: strongly
  typed network, the graph's types are the truth;
- fp16 / bf16 graphs, and fp32 graphs built with ``precision=fp16|bf16`` (applied to
  ``precision_graphs``, by default the condition encoder (text, vision) and the transformer: the
  VAE stays fp32 as the design says), use TensorRT 10's FP16 / BF16 builder flags on a weakly typed network. TensorRT 11
  removed those flags (strong typing only), so there an fp16/bf16 graph is built strongly typed
  with its own types, and an fp32 graph cannot be lowered by the builder: convert it first
  (ModelOpt AutoCast) or build with TensorRT 10;
- everything else: strongly typed fp32 (TensorRT may still use TF32, its default).

Weight streaming needs a strongly typed network. Engines go to
``engines/<gpu-slug>-trt<version>/<graph>.plan`` (written to a temporary name, then renamed);
the manifest's optional ``engines`` section is rewritten atomically after each engine, so a
crash leaves every recorded engine complete and the manifest loadable.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qwen_image_edge.export.manifest_writer import write_text_atomic
from qwen_image_edge.export.trt_profiles import BuildRanges, graph_ranges, input_profiles, wanted_ranges
from qwen_image_edge.runtime.backends import cuda
from qwen_image_edge.runtime.backends.tensorrt import (
    engine_dir,
    engine_key,
    import_tensorrt,
    process_logger,
    trt_major,
)
from qwen_image_edge.runtime.errors import BackendError, ConfigError, ManifestError
from qwen_image_edge.runtime.graphs import Component, check_graph_names, graphs_of
from qwen_image_edge.runtime.manifest import (
    MANIFEST_NAME,
    EngineSpec,
    GraphSpec,
    Manifest,
    Precision,
    load_manifest,
    sha256_file,
)

log = logging.getLogger(__name__)

# the condition encoder + MMDiT (single graph and the condition-KV-cache pair): not the VAE
DEFAULT_PRECISION_GRAPHS = (*graphs_of(Component.TEXT_ENCODER), *graphs_of(Component.TRANSFORMER))
TIMING_CACHE_NAME = "timing.cache"
REFITTABLE_GRAPHS = graphs_of(Component.TRANSFORMER)  # the weights LoRA adapters change


@dataclass(frozen=True)
class NetworkMode:
    strongly_typed: bool
    flags: tuple[str, ...]  # BuilderFlag member names
    precision: Precision  # what the engine computes in, recorded in the manifest


# Graphs whose own Q/DQ types decide (int4: weight-only DequantizeLinear blocks, TensorRT 10's INT4
# weight-only GEMM, parsed from the types as int8 / fp8 Q/DQ are)
QUANTIZED = (Precision.INT8, Precision.FP8, Precision.INT4)


def network_mode(graph: Precision, override: Precision | None, trt_version: str,
                 weight_streaming: bool = False) -> NetworkMode:
    """Strong or weak typing and builder flags for one graph (see the module docstring)."""
    major = trt_major(trt_version)
    if graph in QUANTIZED:
        if override is not None and override is not graph:
            raise ConfigError(f"precision {override.value}: a {graph.value} (Q/DQ) graph is built as its "
                              "quantizer typed it; --precision applies to fp32 graphs only")
        mode = NetworkMode(True, (), graph)
    else:
        target = graph if override is None else override
        if graph is not Precision.FP32 and target is not graph:
            raise ConfigError(f"precision {target.value}: the graph is already {graph.value}; "
                              "--precision applies to fp32 graphs only")
        if target in QUANTIZED:
            raise ConfigError(f"precision {target.value}: needs a quantized (Q/DQ) graph from the quantize stage")
        if target is Precision.FP32:
            mode = NetworkMode(True, (), target)
        elif major >= 11:
            if graph is Precision.FP32:
                raise ConfigError(
                    f"precision {target.value}: TensorRT {trt_version} builds strongly typed networks only "
                    "(BuilderFlag.FP16/BF16 were removed in 11.x); convert the graph to "
                    f"{target.value} first (ModelOpt AutoCast) or build with TensorRT 10.x"
                )
            mode = NetworkMode(True, (), target)
        else:
            mode = NetworkMode(False, ("FP16" if target is Precision.FP16 else "BF16",), target)
    if weight_streaming:
        if not mode.strongly_typed:
            raise ConfigError(f"weight streaming needs a strongly typed network; {mode.precision.value} via builder "
                              "flags is weakly typed on TensorRT 10: drop --weight-streaming or --precision")
        mode = dataclasses.replace(mode, flags=(*mode.flags, "WEIGHT_STREAMING"))
    return mode


def _parse_errors(parser) -> str:
    out = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        node, name, op = err.node(), err.node_name(), err.node_operator()
        where = f"node {node} {name!r} ({op})" if node >= 0 else "graph"
        out.append(f"{where}: {err.desc()}")
    return "; ".join(out) or "no parser error recorded"


def build_engine(trt, onnx_path: Path, graph: GraphSpec, ranges: dict, mode: NetworkMode, *,
                 opt_level: int = 3, timing_cache: bytes = b"", workspace_gb: float | None = None,
                 ) -> tuple[bytes, bytes]:
    """Parse, configure and build one engine; returns (plan, updated timing cache)."""
    logger = process_logger(trt)  # TensorRT keeps one logger per process
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if mode.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        raise BackendError(f"graph {graph.name!r}: TensorRT could not parse {onnx_path.name}: {_parse_errors(parser)}")
    found = sorted(network.get_input(i).name for i in range(network.num_inputs))
    if found != sorted(t.name for t in graph.inputs):
        raise ManifestError(f"graph {graph.name!r}: TensorRT sees inputs {found}, manifest declares "
                            f"{sorted(t.name for t in graph.inputs)}")
    config = builder.create_builder_config()
    if not 0 <= opt_level <= 5:
        raise ConfigError(f"--opt-level {opt_level}: expected 0..5 (TensorRT's builder_optimization_level)")
    config.builder_optimization_level = opt_level
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    for flag in mode.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    for p in input_profiles(graph, ranges):
        profile.set_shape(p.name, p.min, p.opt, p.max)
    if config.add_optimization_profile(profile) < 0:
        raise BackendError(f"graph {graph.name!r}: TensorRT rejected the optimisation profile: {logger.errors[-3:]}")
    _use_timing_cache(config, timing_cache, graph.name)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError(f"graph {graph.name!r}: TensorRT engine build failed: {logger.errors[-5:] or 'no error logged'}")
    cache = config.get_timing_cache()
    return bytes(memoryview(plan)), bytes(memoryview(cache.serialize())) if cache is not None else timing_cache


def _use_timing_cache(config, serialized: bytes, graph: str) -> None:
    """The saved timing cache, or a fresh one where TensorRT refuses it (``set_timing_cache`` returns
    False for a cache from another GPU or TensorRT version): the build then times every tactic again
    and the new cache replaces the old file."""
    if serialized and config.set_timing_cache(config.create_timing_cache(serialized), False):
        return
    if serialized:
        log.warning("%s: timing cache refused (written by another GPU or TensorRT version); building with a "
                    "fresh one", graph)
    if not config.set_timing_cache(config.create_timing_cache(b""), False):
        log.warning("%s: TensorRT refused an empty timing cache; building without one", graph)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _record(export_dir: Path, key: str, engine: EngineSpec) -> None:
    """Re-read the manifest, add one engine, write it back atomically."""
    current = load_manifest(export_dir, verify_hashes=False)
    updated = dataclasses.replace(current, engines={**current.engines, key: engine})
    write_text_atomic(export_dir / MANIFEST_NAME, updated.to_json())


def build_engines(export_dir: str | os.PathLike, *, graphs: Sequence[str] | None = None,
                  ranges: BuildRanges | None = None, precision: Precision | None = None,
                  precision_graphs: Sequence[str] = DEFAULT_PRECISION_GRAPHS, opt_level: int = 3,
                  timing_cache: str | os.PathLike | None = None, weight_streaming: bool = False,
                  workspace_gb: float | None = None, refittable: bool = False, trt=None) -> dict[str, EngineSpec]:
    """Build an engine per graph for this GPU; returns the manifest entries written. ``refittable``:
    the transformer graphs' engines are built with ``BuilderFlag.REFIT`` (``qwen_image_edge.export.refit``
    writes adapters into them); the other graphs are not (a refittable engine may run slower)."""
    if graphs:
        check_graph_names(graphs, where="build graphs")
    check_graph_names(precision_graphs, where="precision graphs")
    export_dir = Path(export_dir)
    manifest: Manifest = load_manifest(export_dir, verify_hashes=True)
    names = list(graphs) if graphs else list(manifest.graphs)
    unknown = [g for g in names if g not in manifest.graphs]
    if unknown:
        raise ConfigError(f"graphs {unknown}: not in this export; it has {sorted(manifest.graphs)}")
    wanted = wanted_ranges(manifest, ranges or BuildRanges())
    plans = {g: graph_ranges(manifest.graphs[g], wanted) for g in names}  # all range errors before any build
    trt = trt if trt is not None else import_tensorrt()
    version = str(trt.__version__)
    modes = {g: network_mode(manifest.graphs[g].precision, precision if g in precision_graphs else None, version,
                             weight_streaming) for g in names}
    if refittable:
        modes = {g: dataclasses.replace(m, flags=(*m.flags, "REFIT")) if g in REFITTABLE_GRAPHS else m
                 for g, m in modes.items()}
    cuda.check_driver()
    gpu = cuda.device_info()
    out_dir = export_dir / engine_dir(gpu, version)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_path = Path(timing_cache) if timing_cache else out_dir / TIMING_CACHE_NAME
    cache = cache_path.read_bytes() if cache_path.is_file() else b""
    written = {}
    for g in names:
        spec = manifest.graphs[g]
        start = time.perf_counter()
        plan, cache = build_engine(trt, export_dir / spec.file, spec, plans[g], modes[g], opt_level=opt_level,
                                   timing_cache=cache, workspace_gb=workspace_gb)
        write_atomic(cache_path, cache)
        entry = _save_engine(export_dir, out_dir / f"{g}.plan", plan, spec, plans[g], modes[g], gpu, version,
                             weight_streaming)
        key = engine_key(gpu, version, g)
        _record(export_dir, key, entry)
        written[key] = entry
        log.info("%s: built %s (%.1f MB) in %.1f s", g, entry.file, len(plan) / 1e6, time.perf_counter() - start)
    return written


def _save_engine(export_dir: Path, path: Path, plan: bytes, spec: GraphSpec, ranges: dict, mode: NetworkMode, gpu,
                 version: str, weight_streaming: bool) -> EngineSpec:
    """Write the plan atomically and describe it for the manifest's ``engines`` section."""
    write_atomic(path, plan)
    return EngineSpec(
        graph=spec.name, file=path.relative_to(export_dir).as_posix(), sha256=sha256_file(path),
        graph_sha256=spec.sha256, precision=mode.precision, tensorrt_version=version,
        gpu_name=gpu.name, compute_capability=gpu.compute_capability, dim_ranges=ranges,
        strongly_typed=mode.strongly_typed, weight_streaming=weight_streaming,
    )
