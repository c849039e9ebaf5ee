"""A transformer graph of an export written anew with LoRA adapters fused into its weights.

Used by ``qwen-image-edge refit`` (:mod:`qwen_image_edge.export.refit`). A graph qualifies when its
initializers are named by checkpoint keys (``transformer_blocks.0.attn.to_q.weight`` ``[out, in]``,
read through a Transpose), as the lean export writes them: an adapter's layer keys then name the
initializers directly. The new graph ``model.<tag>.onnx`` is the old one with each touched
initializer pointing into ``model.<tag>.onnx.data``, which holds ``W + sum(scale * B @ A)`` (fp32
sum, cast back to the initializer's dtype: what the lean export writes for ``--lora``, bit for bit);
every other initializer keeps pointing where it did (the checkpoint shards linked into the export,
``model.onnx.data``, or inline). One tensor is in memory at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from tqdm.auto import tqdm

from qwen_image_edge.export.external_data import WeightSource, stream_tensors, torch_dtype
from qwen_image_edge.runtime.errors import ConfigError, ManifestError
from qwen_image_edge.runtime.manifest import DataFile, GraphSpec, resolve_path, sha256_file

log = logging.getLogger(__name__)

_FLOAT = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


@dataclass(frozen=True)
class GraphWeights:
    model: onnx.ModelProto  # without external data loaded
    tensors: dict[str, tuple[int, tuple[int, ...]]]  # checkpoint key -> (ONNX dtype, shape), float 2-D weights


def graph_weights(export_dir: Path, spec: GraphSpec) -> GraphWeights:
    """The graph's float weight matrices by checkpoint key; a ConfigError when it names none so."""
    model = onnx.load(str(resolve_path(export_dir, spec.file)), load_external_data=False)
    tensors = {t.name: (t.data_type, tuple(t.dims)) for t in model.graph.initializer
               if t.name.endswith(".weight") and len(t.dims) == 2 and t.data_type in _FLOAT}
    if not tensors:
        example = next((t.name for t in model.graph.initializer if len(t.dims) == 2), "none")
        raise ConfigError(
            f"refit: graph {spec.name!r} names its weights by trace ids (e.g. {example!r}), not by checkpoint keys, "
            "so adapters cannot be matched to them; re-export with `export --lean` (its graphs keep the "
            "checkpoint's names), then build --refittable")
    return GraphWeights(model, tensors)


def _location(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def read_initializer(t: onnx.TensorProto, export_dir: Path, graph_dir: Path) -> torch.Tensor:
    """One initializer's values (inline or external data inside the export directory)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        where = _location(t)
        rel = (graph_dir / where["location"]).relative_to(export_dir).as_posix()
        path = resolve_path(export_dir, rel)  # a location outside the export is refused
        offset, length = int(where.get("offset", 0)), int(where["length"])
        with open(path, "rb") as fh:
            fh.seek(offset)
            raw = fh.read(length)
        if len(raw) != length:
            raise ManifestError(f"{rel}: expected {length} bytes of {t.name!r} at offset {offset}, found {len(raw)}")
    elif t.raw_data:
        raw = t.raw_data
    else:  # typed fields (small tensors written without raw_data)
        from onnx import numpy_helper

        return torch.from_numpy(numpy_helper.to_array(t).copy())
    return torch.frombuffer(bytearray(raw), dtype=torch_dtype(t.data_type)).reshape(tuple(t.dims))


def _fused(t: onnx.TensorProto, export_dir: Path, graph_dir: Path, adapters) -> torch.Tensor:
    from qwen_image2_ref.lora import fused_weight

    return fused_weight(read_initializer(t, export_dir, graph_dir), t.name, adapters)


def write_fused_graph(export_dir: Path, spec: GraphSpec, weights: GraphWeights, keys: list[str], adapters, tag: str,
                      staged: list[Path]) -> GraphSpec:
    """Write ``model.<tag>.onnx`` (+ ``.data``) next to ``spec``'s file with ``keys`` fused; returns its spec.
    Every path written is appended to ``staged`` first (the caller removes them on failure)."""
    graph_path = resolve_path(export_dir, spec.file)
    graph_dir = graph_path.parent
    model = onnx.ModelProto()
    model.CopyFrom(weights.model)
    inits = {t.name: t for t in model.graph.initializer}
    stem = graph_path.name.split(".")[0]  # model.onnx or an earlier refit's model.<tag>.onnx
    data_name = f"{stem}.{tag}.onnx.data"
    sources = [WeightSource(k, inits[k].data_type, tuple(inits[k].dims),
                            make=functools.partial(_fused, inits[k], export_dir, graph_dir, adapters)) for k in keys]
    staged.append(graph_dir / data_name)
    with tqdm(total=sum(s.nbytes for s in sources), unit="B", unit_scale=True, desc=f"{spec.name} fused") as bar:
        protos = stream_tensors(sources, graph_dir / data_name, data_name, bar.update)
    for proto in protos:
        inits[proto.name].CopyFrom(proto)
    new_path = graph_dir / f"{stem}.{tag}.onnx"
    staged.append(new_path)
    onnx.save(model, str(new_path))
    new = _describe(export_dir, spec, model, new_path)
    log.info("%s: %d weights fused into %s", spec.name, len(keys), new.file)
    return new


def _describe(export_dir: Path, spec: GraphSpec, model: onnx.ModelProto, path: Path) -> GraphSpec:
    """``spec`` for the new file: its hash, and every data file it points into (known hashes reused)."""
    known = {d.file: d.sha256 for d in spec.external_data}
    rel = lambda p: p.relative_to(export_dir).as_posix()  # noqa: E731
    files = sorted({rel(path.parent / _location(t)["location"]) for t in model.graph.initializer
                    if t.data_location == onnx.TensorProto.EXTERNAL})
    data = tuple(DataFile(f, known.get(f) or sha256_file(export_dir / f)) for f in files)
    return dataclasses.replace(spec, file=rel(path), sha256=sha256_file(path), external_data=data)
