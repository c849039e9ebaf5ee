"""Memory-lean export: trace with fake tensors, attach the checkpoint's weights afterwards.

The plain path loads every weight in fp32 and lets the exporter copy them (1.6x the weights at
peak; ~42 GiB for the 7.1B transformer). Here no weight is ever materialised:

1. the model is opened lazily (``qwen_image2_ref.model_folder.load_lazy_model``): parameters on
   ``meta``, non-persistent buffers such as rotary tables computed for real (not in a checkpoint);
2. each graph wrapper is traced by the dynamo exporter under ``FakeTensorMode`` with
   ``optimize=False`` (which keeps every initializer named by its module path), and saved
   without initializers; the weights are graph inputs during the graphsurgeon clean-up;
3. every initializer is matched to its checkpoint tensor by identity (the wrapper's attribute
   prefix drops out) and checked, all before any byte is written: a missing key, a shape or an
   unconvertible dtype raises ``CheckpointError``;
4. weights are attached as ONNX external data: a tensor stored in the graph's dtype points
   straight into its safetensors shard (hard-linked into the graph's folder, the runtime only
   reads files inside the export dir), any other one is streamed chunk by chunk with its dtype
   conversion into ``model.onnx.data``; computed buffers are written there too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from tqdm.auto import tqdm

from qwen_image2_ref.lora import fused_weight
from qwen_image2_ref.model_folder import LoadedModel, ModelSource, resolve_model_path
from qwen_image2_ref.shards import ShardEntry
from qwen_image_edge.export.cleanup import cleanup_graph
from qwen_image_edge.export.external_data import (
    WeightSource,
    checkpoint_bytes,
    checkpoint_entries,
    external_tensor,
    link_or_copy,
    onnx_dtype,
    plan_sources,
    read_tensor,
    stream_tensors,
    tensor_bytes,
    torch_dtype,
)
from qwen_image_edge.export.iospec import GraphIO
from qwen_image_edge.export.registry import entry, graph_module
from qwen_image_edge.export.trace import DATA_NAME, ONNX_NAME, ExportedGraph, export_graph
from qwen_image_edge.runtime.errors import ConfigError
from qwen_image_edge.runtime.manifest import DataFile, GraphSpec, Precision, sha256_file

log = logging.getLogger(__name__)

INLINE_BYTES = 1 << 20  # computed tensors up to this size stay in the graph file
LEAN_RAM_SHARE = 0.4  # lean when the fp32 weights exceed this share of the available memory


# ----------------------------------------------------------------------------- when


def available_memory() -> int:
    """Bytes of memory available to a new allocation (``MemAvailable``), or the physical total."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plain_export_bytes(model_path: Path, graphs: list[str]) -> int:
    """fp32 bytes of the components the plain path loads for ``graphs``."""
    return sum(checkpoint_bytes(model_path / c, itemsize=4) for c in {entry(g).component.value for g in graphs})


def should_use_lean(model_path: Path, graphs: list[str]) -> bool:
    need, avail = plain_export_bytes(model_path, graphs), available_memory()
    lean = need > LEAN_RAM_SHARE * avail
    log.info("weights %.2f GB in fp32, %.2f GB memory available: %s export", need / 1e9, avail / 1e9,
             "lean" if lean else "plain")
    return lean


def choose_lean(model: ModelSource, graphs: list[str]) -> bool:
    """Lean for a folder whose weights would crowd memory; an open model is exported as it was
    opened (its weights are in memory already, or it was opened lazily)."""
    if isinstance(model, LoadedModel):
        return model.lazy
    return should_use_lean(resolve_model_path(model), graphs)


# ----------------------------------------------------------------------------- modules without weights


def weight_names(wrapper: nn.Module, root: nn.Module) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Wrapper path -> checkpoint key for every stored tensor, and wrapper path -> value for computed
    (non-persistent) buffers. Matched by identity, so a wrapper's attribute prefix drops out."""
    stored = {id(t): key for key, t in root.state_dict(keep_vars=True).items()}
    keys, computed = {}, {}
    for fqn, t in [*wrapper.named_parameters(remove_duplicate=False), *wrapper.named_buffers(remove_duplicate=False)]:
        if id(t) in stored:
            keys[fqn] = stored[id(t)]
        elif not t.is_meta:
            computed[fqn] = t
    return keys, computed


@contextlib.contextmanager
def fake_weights(module: nn.Module, mode) -> Iterator[None]:
    """Swap every parameter and buffer for a fake tensor of ``mode`` (no storage); restore after."""
    saved = []
    with mode:
        for sub in module.modules():
            for table in (sub._parameters, sub._buffers):
                for name, t in list(table.items()):
                    if t is None:
                        continue
                    saved.append((table, name, t))
                    fake = torch.empty(t.shape, dtype=t.dtype) if t.is_meta else mode.from_tensor(t)
                    table[name] = nn.Parameter(fake, requires_grad=False) if isinstance(t, nn.Parameter) else fake
    try:
        yield
    finally:
        for table, name, t in saved:
            table[name] = t


def preflight(name: str, model, dtype: torch.dtype = torch.float32) -> None:
    """Check, from the shard headers only, that the checkpoint holds every weight graph ``name``
    reads in a shape and dtype it can use (floating weights become ``dtype``); raises before any
    export output exists."""
    component = entry(name).component
    folder = model.path / component.value
    wrapper = graph_module(name, model)
    keys, computed = weight_names(wrapper, model.component(component))
    named = dict([*wrapper.named_parameters(remove_duplicate=False), *wrapper.named_buffers(remove_duplicate=False)])
    wanted = [(fqn, onnx_dtype(dtype if named[fqn].is_floating_point() else named[fqn].dtype), tuple(named[fqn].shape))
              for fqn in keys]
    plan_sources(wanted, keys, checkpoint_entries(folder), computed, where=f"{name} ({folder})")


@contextlib.contextmanager
def materialized(wrapper: nn.Module, keys: dict[str, str], entries: dict, dtype: torch.dtype) -> Iterator[int]:
    """Load just ``wrapper``'s stored weights from the shards (floating ones as ``dtype``); yields their
    byte count and puts the meta tensors back afterwards."""
    saved, nbytes = [], 0
    for prefix, sub in wrapper.named_modules(remove_duplicate=False):
        for table in (sub._parameters, sub._buffers):
            for name, t in list(table.items()):
                key = keys.get(f"{prefix}.{name}" if prefix else name)
                if t is None or key is None or not t.is_meta:
                    continue
                real = read_tensor(entries[key], dtype)
                nbytes += real.nbytes
                saved.append((table, name, t))
                table[name] = nn.Parameter(real, requires_grad=False) if isinstance(t, nn.Parameter) else real
    try:
        yield nbytes
    finally:
        for table, name, t in saved:
            table[name] = t


# ----------------------------------------------------------------------------- tracing


def trace_without_weights(wrapper: nn.Module, inputs: tuple, io: GraphIO, opset: int):
    """Dynamo-export ``wrapper`` under fake tensors. Returns the ONNX model with its weights as
    graph inputs (no data), their ``(name, onnx dtype, shape)`` and the real constants among them."""
    from onnxscript import ir  # only this path needs onnxscript's IR (the plain path never loads it)

    mode = FakeTensorMode()
    with fake_weights(wrapper, mode), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # dynamic_axes advice, deprecations
        fake_inputs = tuple(mode.from_tensor(t) for t in inputs)
        with mode, _quiet_torch_onnx():
            program = torch.onnx.export(
                wrapper, fake_inputs, dynamo=True, optimize=False, opset_version=opset,
                input_names=io.input_names, output_names=io.output_names, dynamic_axes=io.dynamic_axes(),
                verbose=False,
            )
    graph = program.model.graph
    weights = [(name, int(v.dtype.value), tuple(int(d) for d in v.shape)) for name, v in graph.initializers.items()]
    # tensors made in forward from Python data (index lists) are lifted as real constants
    constants = {name: v.const_value.raw for name, v in graph.initializers.items()
                 if isinstance(getattr(v.const_value, "raw", None), torch.Tensor)
                 and not isinstance(v.const_value.raw, FakeTensor)}
    values = list(graph.initializers.values())
    graph.initializers.clear()
    graph.inputs.extend(values)
    return ir.serde.serialize_model(program.model), weights, constants


@contextlib.contextmanager
def _quiet_torch_onnx() -> Iterator[None]:
    """The exporter reports its steps on stdout; library code only logs."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


def set_io_dims(model: onnx.ModelProto, io: GraphIO) -> None:
    """Name every graph input/output dim as the IOSpec does (dynamo names derived dims ``16*h``)."""
    for values, specs in ((model.graph.input, io.inputs), (model.graph.output, io.outputs)):
        by_name = {t.name: t for t in specs}
        for value in values:
            spec = by_name.get(value.name)
            if spec is None:
                continue
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for d in spec.dims:
                dims.add(**({"dim_param": d} if isinstance(d, str) else {"dim_value": d}))


def _float_resize_scales(model: onnx.ModelProto) -> None:
    """The exporter (``optimize=False``) writes nearest-upsample scales as a double constant; Resize
    takes float32 scales only (onnxruntime refuses the graph otherwise)."""
    scales = {n.input[2] for n in model.graph.node if n.op_type == "Resize" and len(n.input) > 2 and n.input[2]}
    for i, t in enumerate(model.graph.initializer):
        if t.name in scales and t.data_type == onnx.TensorProto.DOUBLE:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(t).astype("float32"), t.name))


def _rename_to_checkpoint_keys(model: onnx.ModelProto, sources: list[WeightSource],
                               keys: dict[str, str]) -> list[WeightSource]:
    """Name each stored weight by its checkpoint key (the graph calls it by the wrapper's path)."""
    rename = {s.name: keys[s.name] for s in sources if s.entry is not None}
    taken = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    clash = sorted(set(rename.values()) & taken)
    if clash:
        raise ConfigError(f"graph tensors already named like checkpoint keys: {', '.join(clash[:10])}")
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    return [dataclasses.replace(s, name=rename.get(s.name, s.name)) for s in sources]


def _fused(entry: ShardEntry, key: str, adapters: tuple, dtype: torch.dtype) -> torch.Tensor:
    return fused_weight(read_tensor(entry, torch.float32), key, adapters).to(dtype)  # fp32 sum, then the graph's dtype


def fuse_sources(sources: list[WeightSource], adapters: tuple) -> list[WeightSource]:
    """The weights LoRA adapters touch, fused as they stream (one base tensor read at a time, never
    the whole model); ``entry`` stays as the base so the QDQ pass quantizes the fused weight."""
    touched = {k for a in adapters for k in a.layers}
    return [dataclasses.replace(s, make=functools.partial(_fused, s.entry, s.name, adapters, torch_dtype(s.onnx_dtype)))
            if s.name in touched and s.entry is not None else s for s in sources]


def _cleanup(model: onnx.ModelProto, name: str, weight_names: set[str]) -> tuple[onnx.ModelProto, set[str]]:
    """Fold constants and drop dead nodes, then turn the weight inputs back into plain names."""
    model, _ = cleanup_graph(model, name)
    _float_resize_scales(model)
    used = {i for node in model.graph.node for i in node.input}
    keep = [i for i in model.graph.input if i.name not in weight_names]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    dropped = weight_names - used
    if dropped:
        log.debug("%s: %d weights unused after clean-up", name, len(dropped))
    return model, weight_names & used


# ----------------------------------------------------------------------------- attaching


def inline_tensor(source: WeightSource) -> onnx.TensorProto:
    """A small computed tensor stored in the graph file itself."""
    t = source.computed.detach().to(torch_dtype(source.onnx_dtype)).contiguous()
    return onnx.TensorProto(name=source.name, data_type=source.onnx_dtype, dims=list(source.shape),
                            raw_data=tensor_bytes(t))


def attach_weights(model: onnx.ModelProto, sources: list[WeightSource], graph_dir: Path, name: str,
                   link: bool = True) -> list[Path]:
    """Add the initializers of ``sources`` as external data under ``graph_dir``; returns the data files.
    ``link=False`` streams even the tensors stored as they are (a quantized graph must not carry the
    shards, which hold the unquantized weights too)."""
    direct = [s for s in sources if s.direct and link]
    inline = [s for s in sources if s.computed is not None and s.nbytes <= INLINE_BYTES]
    placed = {id(s) for s in direct + inline}
    streamed = [s for s in sources if id(s) not in placed]
    conversions = sorted({f"{s.entry.dtype if s.entry else 'quantized' if s.make else 'computed'}->"
                          f"{onnx.TensorProto.DataType.Name(s.onnx_dtype)}" for s in streamed})
    log.info("%s: attaching %d tensors / %.2f GB: %d pointed into the checkpoint shards, %d streamed (%s), "
             "%d small computed ones inline", name, len(sources), sum(s.nbytes for s in sources) / 1e9,
             len(direct), len(streamed), ", ".join(conversions) or "none", len(inline))
    files: list[Path] = []
    for shard in sorted({s.entry.file for s in direct}):
        how = link_or_copy(shard, graph_dir / shard.name)
        log.info("%s: %s %s into the export", name, how, shard.name)
        files.append(graph_dir / shard.name)
    protos = [external_tensor(s.name, s.onnx_dtype, s.shape, s.entry.file.name, s.entry.offset, s.entry.nbytes)
              for s in direct]
    protos += [inline_tensor(s) for s in inline]
    with tqdm(total=sum(s.nbytes for s in streamed), unit="B", unit_scale=True, desc=f"{name} weights",
              disable=not streamed) as bar:
        if streamed:
            protos += stream_tensors(streamed, graph_dir / DATA_NAME, DATA_NAME, bar.update)
            files.append(graph_dir / DATA_NAME)
    model.graph.initializer.extend(protos)
    return files


def export_graph_lean(name: str, model, inputs: tuple, io: GraphIO, export_dir: Path, opset: int, scales=None):
    """Trace graph ``name`` of a lean model without weights, attach them, save; hash what was written.

    ``scales`` (``qwen_image_edge.export.qdq_lean.CalibratedScales``): quantize the policy's layers to
    standard QDQ from these calibrated scales, their weights quantized as they stream."""
    start = time.perf_counter()
    graph = entry(name)
    folder = model.path / graph.component.value
    entries = checkpoint_entries(folder)  # headers only; a bad shard fails before tracing
    wrapper = graph_module(name, model)
    keys, computed = weight_names(wrapper, model.component(graph.component))
    if not graph.fake_trace:
        preflight(name, model)
        with materialized(wrapper, keys, entries, torch.float32) as nbytes:
            log.info("%s: plain export with only its own %d weights (%.2f GB) loaded", name, len(keys), nbytes / 1e9)
            return export_graph(name, wrapper, inputs, io, export_dir, opset)
    log.info("%s: tracing with fake tensors (no weights in memory)", name)
    proto, weights, constants = trace_without_weights(wrapper, inputs, io, opset)
    computed = {**constants, **computed}
    sources = plan_sources(weights, keys, entries, computed, where=f"{name} ({folder})")
    nodes_before = len(proto.graph.node)
    proto, used = _cleanup(proto, name, {w[0] for w in weights})
    sources = [s for s in sources if s.name in used]
    sources = _rename_to_checkpoint_keys(proto, sources, keys)
    if graph.component.value == "transformer":
        sources = fuse_sources(sources, model.loras)
    set_io_dims(proto, io)
    precision = Precision.FP32
    if scales is not None:
        from qwen_image_edge.export.qdq import check_quantized_count
        from qwen_image_edge.export.qdq_lean import insert_qdq

        sources, count = insert_qdq(proto, sources, scales, name)
        check_quantized_count(name, count, len(scales.layers))
        precision = scales.precision
        log.info("%s: %d layers quantized to %s from the calibrated scales", name, count, precision.value)
    graph_dir = export_dir / name
    graph_dir.mkdir(parents=True, exist_ok=True)
    data_files = attach_weights(proto, sources, graph_dir, name, link=scales is None)
    path = graph_dir / ONNX_NAME
    onnx.save(proto, str(path))
    rel = lambda p: p.relative_to(export_dir).as_posix()  # noqa: E731
    log.info("%s: hashing %d file(s)", name, 1 + len(data_files))
    spec = GraphSpec(name=name, file=rel(path), sha256=sha256_file(path), precision=precision, inputs=io.inputs,
                     outputs=io.outputs, dim_ranges=io.dim_ranges,
                     external_data=tuple(DataFile(rel(p), sha256_file(p)) for p in data_files))
    seconds = time.perf_counter() - start
    log.info("%s: lean export in %.1f s (%d -> %d nodes)", name, seconds, nodes_before, len(proto.graph.node))
    return ExportedGraph(spec, nodes_before, len(proto.graph.node), seconds)
