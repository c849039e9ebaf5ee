"""The graphs an export can hold: names, components and KV-cache roles (the torch-free half of the
graph registry).

One table, :data:`GRAPHS`. ``qwen_image_edge.export.registry`` keys the torch side (IOSpec builder,
module builder, example inputs, validation cases) by these entries; the runtime, the manifest and
the TensorRT build read the names and roles from here. An unknown name is an error wherever a name
comes in: :func:`graph_info` / :func:`check_graph_names`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from qwen_image_edge.runtime.errors import ConfigError, QwenImageEdgeError


class Component(str, enum.Enum):
    """The checkpoint folder (``<model>/<component>/``) whose weights a graph holds."""

    TRANSFORMER = "transformer"
    VAE = "vae"
    TEXT_ENCODER = "text_encoder"


class KVRole(str, enum.Enum):
    """Part of the condition KV cache: the transformer split into a prefix pass and target steps."""

    NONE = "none"
    PREFILL = "prefill"  # prefix (text + condition tokens) -> per-layer keys/values
    STEP = "step"  # target tokens + the cache -> velocity


@dataclass(frozen=True)
class GraphInfo:
    name: str
    component: Component
    kv_role: KVRole = KVRole.NONE
    edit_only: bool = False  # only editing (condition images) runs it
    optional: bool = False  # an export may lack it (older exports): the runtime then does without


GRAPHS: dict[str, GraphInfo] = {
    g.name: g
    for g in (
        GraphInfo("text_encoder", Component.TEXT_ENCODER),
        GraphInfo("transformer", Component.TRANSFORMER),
        GraphInfo("vae_decoder", Component.VAE),
        GraphInfo("vae_encoder", Component.VAE, edit_only=True),
        GraphInfo("vision_encoder", Component.TEXT_ENCODER, edit_only=True),
        GraphInfo("transformer_prefill", Component.TRANSFORMER, KVRole.PREFILL),
        GraphInfo("transformer_step", Component.TRANSFORMER, KVRole.STEP),
        # guidance + Euler update + the decoder's unpacked, denormalised latents, for a loop that keeps
        # its latents on the device. No weights: VAE because its constants are the VAE's latent
        # statistics and it stays in fp32 with the VAE graphs (exports before it: the host loop).
        GraphInfo("sampler_step", Component.VAE, optional=True),
    )
}
GRAPH_NAMES = tuple(GRAPHS)
# An export lists both or neither; the single ``transformer`` graph is always there.
KV_CACHE_GRAPHS = tuple(next(g.name for g in GRAPHS.values() if g.kv_role is r) for r in (KVRole.PREFILL, KVRole.STEP))
EDIT_GRAPHS = tuple(g.name for g in GRAPHS.values() if g.edit_only)
SAMPLER_GRAPH = "sampler_step"


def graph_info(name: str, *, where: str = "graph", error: type[QwenImageEdgeError] = ConfigError) -> GraphInfo:
    """The entry of graph ``name``; ``error`` (ConfigError by default) for a name not in the table."""
    info = GRAPHS.get(name)
    if info is None:
        raise error(f"{where} {name!r}: unknown; expected one of {list(GRAPH_NAMES)}")
    return info


def check_graph_names(names: Iterable[str], *, where: str = "graphs",
                      error: type[QwenImageEdgeError] = ConfigError) -> list[str]:
    """``names`` as a list, after checking every one is in the table (all unknown ones named at once)."""
    names = list(names)
    unknown = [n for n in names if n not in GRAPHS]
    if unknown:
        raise error(f"{where} {unknown}: unknown; expected some of {list(GRAPH_NAMES)}")
    return names


def graphs_of(component: Component) -> tuple[str, ...]:
    """Names of the graphs that hold ``component``'s weights, in table order."""
    return tuple(g.name for g in GRAPHS.values() if g.component is component)
