"""One graph registry: every entry point looks graph names up in one table and refuses unknown
ones; each entry is wired to its own graph; a model is opened once into a typed ``LoadedModel``;
the torch-side packages import one way (no loops, export never imports calib)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from torch import nn

from qwen_image2_ref.model_folder import LoadedModel, load_lazy_model, load_model, open_model
from qwen_image_edge.export import lean, registry
from qwen_image_edge.export.onnx_export import export_model
from qwen_image_edge.export.quantized import TRANSFORMER_GRAPHS, export_quantized
from qwen_image_edge.export.tensorrt import DEFAULT_PRECISION_GRAPHS, build_engines
from qwen_image_edge.export.validate import validate
from qwen_image_edge.runtime import manifest
from qwen_image_edge.runtime.errors import CheckpointError, ConfigError
from qwen_image_edge.runtime.graphs import (
    GRAPH_NAMES,
    GRAPHS,
    KV_CACHE_GRAPHS,
    Component,
    KVRole,
    check_graph_names,
    graph_info,
)

REPO = Path(__file__).parents[1]
UNKNOWN = "vae_encoderx"  # one typo away from the graph an unknown name used to fall through to


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> LoadedModel:
    return load_model(tiny_model_dir)


def test_roles_and_components_come_from_the_one_table():
    assert manifest.GRAPH_NAMES is GRAPH_NAMES and manifest.KV_CACHE_GRAPHS is KV_CACHE_GRAPHS
    assert registry.REGISTRY.keys() == GRAPHS.keys()
    assert [GRAPHS[g].kv_role for g in KV_CACHE_GRAPHS] == [KVRole.PREFILL, KVRole.STEP]
    # what quantization and the TensorRT precision flags act on follows the components
    assert set(TRANSFORMER_GRAPHS) == {"transformer", *KV_CACHE_GRAPHS}
    assert set(DEFAULT_PRECISION_GRAPHS) == set(GRAPH_NAMES) - {"vae_decoder", "vae_encoder", "sampler_step"}
    assert {g: GRAPHS[g].component for g in ("vision_encoder", "vae_encoder")} == {
        "vision_encoder": Component.TEXT_ENCODER, "vae_encoder": Component.VAE}


@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_each_entry_builds_its_own_graph(name, tiny):
    """IOSpec, wrapper and example inputs of one entry agree: the wrapper's forward takes the
    IOSpec's inputs in order, the example inputs have their dims (a symbol one size everywhere)
    and the outputs come out with the declared dims."""
    cfg = tiny.config
    io = registry.graph_io(name, cfg, 64)
    assert io.name == name
    module = registry.graph_module(name, tiny)
    assert list(inspect.signature(module.forward).parameters) == io.input_names
    args = registry.example_inputs(name, cfg)
    with torch.no_grad():
        outs = module(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    sizes: dict[str, int] = {}
    for spec, t in [*zip(io.inputs, args, strict=True), *zip(io.outputs, outs, strict=True)]:
        assert t.dim() == len(spec.dims), spec
        for d, n in zip(spec.dims, t.shape):
            if isinstance(d, int):
                assert n == d, (spec, tuple(t.shape))
            else:
                assert sizes.setdefault(d, n) == n, (spec, d, sizes[d], n)


UNKNOWN_NAME_CALLS = {
    "graph_io": lambda m, tmp: registry.graph_io(UNKNOWN, m.config, 64),
    "graph_module": lambda m, tmp: registry.graph_module(UNKNOWN, m),
    "example_inputs": lambda m, tmp: registry.example_inputs(UNKNOWN, m.config),
    "wrap (quantized module)": lambda m, tmp: registry.wrap(UNKNOWN, nn.Identity()),
    "validation_cases": lambda m, tmp: registry.validation_cases(UNKNOWN, m, None),
    "lean preflight": lambda m, tmp: lean.preflight(UNKNOWN, m),
    "lean export": lambda m, tmp: lean.export_graph_lean(UNKNOWN, m, (), None, tmp / "x", 19),
    "export_model": lambda m, tmp: export_model(m, tmp / "x", graphs=["vae_decoder", UNKNOWN]),
    "export_quantized": lambda m, tmp: export_quantized(m, None, tmp / "x", graphs=["transformer", UNKNOWN]),
    "validate": lambda m, tmp: validate(tmp / "x", m, graphs=[UNKNOWN]),
    "build_engines": lambda m, tmp: build_engines(tmp / "x", graphs=[UNKNOWN]),
    "build_engines precision graphs": lambda m, tmp: build_engines(tmp / "x", precision_graphs=[UNKNOWN]),
    "runtime graph_info": lambda m, tmp: graph_info(UNKNOWN),
    "runtime check_graph_names": lambda m, tmp: check_graph_names(["transformer", UNKNOWN]),
}


@pytest.mark.parametrize("call", UNKNOWN_NAME_CALLS.values(), ids=UNKNOWN_NAME_CALLS.keys())
def test_unknown_graph_name_is_a_config_error_everywhere(call, tiny, tmp_path):
    with pytest.raises(ConfigError, match=rf"{UNKNOWN}.*unknown; expected (one|some) of \[.*'vae_encoder'"):
        call(tiny, tmp_path)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_a_model_is_opened_once_into_a_typed_loaded_model(tiny, tiny_model_dir):
    assert open_model(tiny) is tiny  # an open model passes through, nothing is reloaded
    lazy = open_model(tiny, lazy=True)  # the lean export's view: same folder, no weights read
    assert lazy.lazy and not tiny.lazy and lazy.path == tiny.path
    assert lazy.config == tiny.config  # the folded lean loader reads the folder as load_model does
    assert all(p.is_meta for p in lazy.transformer.parameters()) and all(p.is_meta for p in lazy.vae.parameters())
    assert not any(p.is_meta for p in tiny.transformer.parameters())
    assert lazy.component(Component.TEXT_ENCODER) is lazy.encoder.model
    assert open_model(lazy, lazy=True) is lazy
    assert load_model(tiny_model_dir, device="meta").config == load_lazy_model(tiny_model_dir).config
    with pytest.raises(CheckpointError, match="without weights"):
        lazy.pipeline()
    reopened = open_model(lazy)  # a stage that needs weights reopens the folder with them
    assert not reopened.lazy
    torch.testing.assert_close(reopened.transformer.state_dict(), tiny.transformer.state_dict(), rtol=0, atol=0)


# ----------------------------------------------------------------------------- import structure

PACKAGES = {"export": "qwen_image_edge.export", "calib": "qwen_image_edge.calib",
            "distill": "qwen_image_edge.distill", "qwen_image2_ref": "qwen_image2_ref"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:]]
    return ".".join(p for p in parts if p != "__init__")


def _imports(path: Path, known: set[str]) -> set[str]:
    """Project modules ``path`` imports anywhere in its body (top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            found |= subs or ({node.module} & known)
    return found


def test_torch_side_packages_import_one_way():
    files = [p for folder in PACKAGES for p in (REPO / folder).rglob("*.py")]
    names = {_module_name(p): p for p in files}
    graph = {m: _imports(p, set(names)) - {m} for m, p in names.items()}
    upward = sorted((m, i) for m, deps in graph.items() for i in deps
                    if m.startswith("qwen_image_edge.export") and i.startswith(("qwen_image_edge.calib",
                                                                                  "qwen_image_edge.distill")))
    assert upward == [], "export imports a stage above it"
    # a cycle: some module reaches itself again (depth-first over the import graph)
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> list[str] | None:
        state[m] = 1
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                return [*stack, m, dep]
            if dep not in state and (cycle := visit(dep, [*stack, m])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m, [])
            assert cycle is None, f"import loop: {' -> '.join(cycle[cycle.index(cycle[-1]):])}"
