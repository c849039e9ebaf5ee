"""The graph registry, torch side: one entry per graph name of ``qwen_image_edge.runtime.graphs``.

Each entry holds the graph's IOSpec builder (``qwen_image_edge.export.iospec``), the wrapper module
that becomes the graph (``qwen_image_edge.export.graphs``, built around one component's module),
its tracing inputs, its validation cases (``qwen_image_edge.export.cases``) and how the lean export
traces it. Export, lean export, quantized export, validate and the TensorRT build look a graph up
here by name, and an unknown name is a :class:`ConfigError` in every one of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from qwen_image2_ref.config import ModelConfig
from qwen_image2_ref.model_folder import LoadedModel
from qwen_image_edge.export import cases, graphs, iospec, sampler_step
from qwen_image_edge.export.iospec import GraphIO, check_max_resolution
from qwen_image_edge.runtime.errors import ConfigError
from qwen_image_edge.runtime.graphs import GRAPHS, Component, GraphInfo, graph_info
from qwen_image_edge.runtime.manifest import GraphSpec, Manifest


@dataclass(frozen=True)
class GraphEntry:
    info: GraphInfo  # name, component, KV-cache role (torch-free)
    io: Callable[[ModelConfig, int], GraphIO]  # (config, max_resolution) -> IOSpec
    wrapper: Callable[[nn.Module], nn.Module]  # component module -> module whose forward takes the IOSpec's inputs
    example_inputs: Callable[[ModelConfig], tuple]  # tracing inputs
    cases: Callable[..., Iterator]  # (model, spec, export_dir, manifest) -> validation cases
    # The lean export traces under fake tensors with the dynamo exporter; its ONNX attention takes
    # 4-D q/k/v only, and the vision tower's is 3-D, so that graph is exported by the plain path
    # with only its own weights loaded (~0.6B of the 8B encoder).
    fake_trace: bool = True

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def component(self) -> Component:
        return self.info.component


def _entry(name: str, io, wrapper, example, validation, fake_trace: bool = True) -> GraphEntry:
    return GraphEntry(GRAPHS[name], io, wrapper, example, validation, fake_trace)


REGISTRY: dict[str, GraphEntry] = {
    e.name: e
    for e in (
        _entry("text_encoder", iospec.text_encoder_io, graphs.TextEncoderGraph, graphs.text_encoder_example,
               cases.text_encoder_cases),
        _entry("transformer", iospec.transformer_io, graphs.TransformerGraph, graphs.transformer_example,
               cases.transformer_cases),
        _entry("vae_decoder", iospec.vae_decoder_io, graphs.VAEDecoderGraph, graphs.vae_decoder_example,
               cases.vae_decoder_cases),
        _entry("vae_encoder", iospec.vae_encoder_io, graphs.VAEEncoderGraph, graphs.vae_encoder_example,
               cases.vae_encoder_cases),
        _entry("vision_encoder", iospec.vision_encoder_io, graphs.VisionEncoderGraph, graphs.vision_encoder_example,
               cases.vision_encoder_cases, fake_trace=False),
        _entry("transformer_prefill", iospec.transformer_prefill_io, graphs.TransformerPrefillGraph,
               graphs.transformer_prefill_example, cases.kv_pair_cases),
        _entry("transformer_step", iospec.transformer_step_io, graphs.TransformerStepGraph,
               graphs.transformer_step_example, cases.kv_pair_cases),
        # no weights to stream: the lean export traces it as the plain one does
        _entry("sampler_step", sampler_step.sampler_step_io, sampler_step.SamplerStepGraph,
               sampler_step.sampler_step_example, sampler_step.sampler_step_cases, fake_trace=False),
    )
}
if REGISTRY.keys() != GRAPHS.keys():  # the two halves of the table name the same graphs
    raise ConfigError(f"graph registry: torch side {sorted(REGISTRY)} != runtime side {sorted(GRAPHS)}")


def entry(name: str) -> GraphEntry:
    """The registry entry of graph ``name``; a ConfigError naming the known graphs otherwise."""
    return REGISTRY[graph_info(name).name]


def graph_io(name: str, cfg: ModelConfig, max_resolution: int) -> GraphIO:
    """The IOSpec of graph ``name`` for a model config and an exported resolution range."""
    e = entry(name)
    return e.io(cfg, check_max_resolution(max_resolution))


def wrap(name: str, component: nn.Module) -> nn.Module:
    """Graph ``name``'s module around ``component`` (e.g. a quantized copy of the transformer)."""
    return entry(name).wrapper(component).eval()


def graph_module(name: str, model: LoadedModel) -> nn.Module:
    """The module of graph ``name`` for a ``LoadedModel``."""
    e = entry(name)
    return e.wrapper(model.component(e.component)).eval()


def example_inputs(name: str, cfg: ModelConfig) -> tuple:
    """Tracing inputs of graph ``name``: batch 2, every dynamic dim > 1 and different from the others."""
    return entry(name).example_inputs(cfg)


def validation_cases(name: str, model: LoadedModel, spec: GraphSpec, export_dir: Path | None = None,
                     manifest: Manifest | None = None) -> Iterator:
    """``(label, feeds, reference, valid)`` per case of graph ``name`` (``qwen_image_edge.export.cases``)."""
    return entry(name).cases(model, spec, export_dir, manifest)
