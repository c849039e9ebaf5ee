"""Graph clean-up after tracing: constant folding, dead nodes, topological order.

Uses onnx-graphsurgeon (NVIDIA's, kept with TensorRT): ``fold_constants`` evaluates constant
subgraphs with onnxruntime, ``cleanup`` drops nodes and tensors nothing reads (e.g. the final
norm of the text encoder, whose input is the graph output), ``toposort`` orders the rest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CleanupStats:
    nodes_before: int
    nodes_after: int


def cleanup_graph(model: onnx.ModelProto, name: str = "graph") -> tuple[onnx.ModelProto, CleanupStats]:
    """Fold constants and remove dead nodes; keeps IO names, opset and IR version."""
    import onnx_graphsurgeon as gs

    before = len(model.graph.node)
    import onnxruntime

    # graphsurgeon folds through onnxruntime, whose optimiser warns about nodes it leaves alone
    onnxruntime.set_default_logger_severity(3)
    graph = gs.import_onnx(model)
    graph.fold_constants().cleanup().toposort()
    out = gs.export_onnx(graph, do_type_check=True)
    out.ir_version = model.ir_version
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    stats = CleanupStats(before, len(out.graph.node))
    log.info("%s: clean-up %d -> %d nodes", name, stats.nodes_before, stats.nodes_after)
    return out, stats
