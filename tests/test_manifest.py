"""qwen_image_edge.runtime.manifest: round trip and every refusal as a typed error naming the file and the problem.

The export directory here is built by hand from a tiny ONNX graph (no torch), so these tests
exercise the contract module alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwen_image_edge.runtime import fields
from qwen_image_edge.runtime.errors import ManifestError
from qwen_image_edge.runtime.images import VisionConfig
from qwen_image_edge.runtime.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    DataFile,
    GraphSpec,
    Manifest,
    Precision,
    TensorSpec,
    load_manifest,
    read_onnx_io,
    resolve_path,
    sha256_file,
)
from qwen_image_edge.runtime.schedule import SchedulerConfig
from qwen_image_edge.runtime.sections import (
    ConditionRange,
    ImageSection,
    ModelSection,
    PromptSection,
    Provenance,
    ScheduleSection,
    TargetRange,
    TransformerSection,
    VaeSection,
)
from qwen_image_edge.runtime.vision import VisionTower

INPUTS = (TensorSpec("x", "float32", ("B", 4)), TensorSpec("mask", "bool", ("B", "L")))
OUTPUTS = (TensorSpec("y", "float32", ("B", 4)),)


def _onnx(path: Path, input_name: str = "x") -> None:
    w = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", [input_name, "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["B", 4]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, ["B", "L"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])],
        initializer=[w],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))


def _sections(tokenizer_sha256: str) -> dict:
    """Every section, filled by hand (a tiny model's numbers; no torch)."""
    transformer = TransformerSection(in_channels=4, num_layers=1, num_heads=1, head_dim=8, context_dim=8,
                                     axes_dims_rope=(2, 2, 4), rope_theta=1e4, causal_condition=True,
                                     extra={"mlp_ratio": 3})
    vae = VaeSection(z_dim=4, scale_factor_spatial=16, latents_mean=(0.0, 0.1, 0.2, 0.3),
                     latents_std=(1.0, 1.5, 2.0, 2.5))
    return dict(
        model=ModelSection("t", transformer, vae, encoder={"hidden_size": 8}, pipeline={"num_steps": 3}),
        prompt=PromptSection("tokenizer/tokenizer.json", tokenizer_sha256, "{prompt}", "sys", "drop the system turn",
                             2, "<pad>", 16, 2),
        schedule=ScheduleSection(SchedulerConfig(), 3, None, 4.0, False, " "),
        image=ImageSection(64, 32, 64, 32, 16, ConditionRange(4.0, 32, 128, 16, 16), TargetRange(128, 16), 4,
                           VisionConfig(), VisionTower(2, 8, 1e4, 4), "shared"),
        provenance=Provenance({"name": "t"}, {"onnx": "1"}, "by hand", "2026-01-01T00:00:00+00:00", None, None),
    )


def _export_dir(root: Path) -> Path:
    d = root / "exp"
    _onnx(d / "vae_decoder" / "model.onnx")
    (d / "vae_decoder" / "model.onnx.data").write_bytes(b"\0" * 8)  # an external data file, so its fields are checked too
    (d / "tokenizer").mkdir()
    (d / "tokenizer" / "tokenizer.json").write_text("{}")
    spec = GraphSpec("vae_decoder", "vae_decoder/model.onnx", sha256_file(d / "vae_decoder" / "model.onnx"), Precision.FP32, INPUTS, OUTPUTS,
                     dim_ranges={"B": (1, 2, 4), "L": (1, 8, 64)},
                     external_data=(DataFile("vae_decoder/model.onnx.data", sha256_file(d / "vae_decoder" / "model.onnx.data")),))
    m = Manifest(graphs={"vae_decoder": spec}, **_sections(sha256_file(d / "tokenizer" / "tokenizer.json")))
    (d / MANIFEST_NAME).write_text(m.to_json())
    return d


@pytest.fixture
def export_dir(tmp_path):
    return _export_dir(tmp_path)


def _edit(d: Path, fn) -> None:
    data = json.loads((d / MANIFEST_NAME).read_text())
    fn(data)
    (d / MANIFEST_NAME).write_text(json.dumps(data))


def test_round_trip(export_dir):
    m = load_manifest(export_dir)
    assert Manifest.from_dict(json.loads(m.to_json())) == m
    assert json.loads(m.to_json()) == json.loads((export_dir / MANIFEST_NAME).read_text())
    g = m.graph("vae_decoder")
    assert g.inputs == INPUTS and g.outputs == OUTPUTS and g.precision is Precision.FP32
    assert g.dim_ranges["L"] == (1, 8, 64) and m.format_version == FORMAT_VERSION
    # typed where the runtime reads; the rest of the model config kept as written
    assert m.model.vae.latents_std == (1.0, 1.5, 2.0, 2.5) and m.model.transformer.extra == {"mlp_ratio": 3}
    assert m.vae_scale_factor == 16 and m.schedule.default_steps == 3 and isinstance(m.image.vision, VisionConfig)


def _concrete(data: dict, path: str) -> tuple[dict | list, str | int, str]:
    """The container and key that ``path`` (with ``*`` for the first key or index) names in ``data``,
    and the path with the stars filled in."""
    parts = path.replace("[", ".[").split(".")
    node, concrete = data, []
    for part in parts:
        if part == "*":
            part = next(iter(node))
        elif part == "[*]":
            part = 0
        concrete.append(f"[{part}]" if isinstance(part, int) else part)
        parent, key = node, part
        node = node[part]
    return parent, key, ".".join(concrete).replace(".[", "[")


REQUIRED = fields.required_paths(Manifest)


def test_required_fields_cover_every_section():
    tops = {p.split(".")[0] for p in REQUIRED}
    assert tops == {"format_version", "model", "prompt", "schedule", "image", "graphs", "provenance"}
    for path in ("schedule.guidance_scale", "model.vae.scale_factor_spatial", "model.transformer.rope_theta",
                 "image.condition.max_aspect", "image.target.max_tokens", "graphs.*.inputs[*].dims"):
        assert path in REQUIRED


@pytest.mark.parametrize("path", REQUIRED)
def test_each_required_field_missing_is_named(export_dir, path):
    data = json.loads((export_dir / MANIFEST_NAME).read_text())
    parent, key, concrete = _concrete(data, path)
    del parent[key]
    (export_dir / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=rf"manifest.json: {re.escape(concrete)}: required field missing"):
        load_manifest(export_dir, verify_hashes=False)


# format_version is left out: a wrong version is its own refusal (test_older_and_newer_format_versions)
TYPED = [(p, a) for p, a in fields.required_fields(Manifest) if p != "format_version"]


@pytest.mark.parametrize("path,annotation", TYPED, ids=[p for p, _ in TYPED])
def test_each_required_field_mistyped_is_named(export_dir, path, annotation):
    data = json.loads((export_dir / MANIFEST_NAME).read_text())
    parent, key, concrete = _concrete(data, path)
    parent[key] = 7 if fields.accepts(annotation, "x") else "x"  # a value of the wrong type
    assert not fields.accepts(annotation, parent[key])
    (export_dir / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=rf"manifest.json: {re.escape(concrete)}: expected .*, got "):
        load_manifest(export_dir, verify_hashes=False)


@pytest.mark.parametrize("path,value,message", [
    ("schedule.guidance_scale", "x", "schedule.guidance_scale: expected a number, got 'x'"),
    ("prompt.drop_idx", 1.5, "prompt.drop_idx: expected an integer, got 1.5"),
    ("schedule.guidance_distilled", 0, "schedule.guidance_distilled: expected true or false, got 0"),
    ("model.transformer.axes_dims_rope", [2, 6], "model.transformer.axes_dims_rope: expected a list of 3 items, got 2"),
    ("model.vae.latents_std", [1, 1, 1], "model.vae.latents_std: expected 4 values"),
    ("model.vae.latents_std", [1, 1, 0, 1], r"model.vae.latents_std: expected every value > 0, got 0.0"),
    ("image.max_resolution", 10**9, "image.max_resolution: expected a multiple of 32 in 32..4096 pixels"),
    ("image.output_resolution", -64, "image.output_resolution: expected a multiple of 32"),
    ("image.min_resolution", 96, "image.min_resolution: 96 is above output_resolution 64"),
    ("image.condition.max_aspect", 0.5, "image.condition.max_aspect: expected a ratio >= 1"),
    ("image.target.max_tokens", 0, "image.target.max_tokens: expected >= 1, got 0"),
    ("graphs.vae_decoder.precision", "int2", r"graphs.vae_decoder.precision: expected one of \['fp32'"),
    ("image.vae_scale_factor", 8, "image.vae_scale_factor: 8, but model.vae.scale_factor_spatial is 16"),
])
def test_mistyped_or_inconsistent_field(export_dir, path, value, message):
    def put(d):
        parent, key, _ = _concrete(d, path)
        parent[key] = value
    _edit(export_dir, put)
    with pytest.raises(ManifestError, match=message):
        load_manifest(export_dir, verify_hashes=False)


def test_unknown_field_is_refused(export_dir):
    _edit(export_dir, lambda d: d["schedule"].update(guidance_scal=3.0))
    with pytest.raises(ManifestError, match=r"manifest.json: schedule: unknown fields \['guidance_scal'\]"):
        load_manifest(export_dir)


def test_onnx_header_reader_matches_onnx(export_dir):
    inputs, outputs = read_onnx_io(export_dir / "vae_decoder" / "model.onnx")
    model = onnx.load(str(export_dir / "vae_decoder" / "model.onnx"))
    assert [t.name for t in inputs] == [i.name for i in model.graph.input]
    assert list(inputs) == list(INPUTS) and list(outputs) == list(OUTPUTS)


def test_older_and_newer_format_versions(export_dir):
    _edit(export_dir, lambda d: d.update(format_version=FORMAT_VERSION - 1))
    with pytest.raises(ManifestError, match=rf"manifest.json: format_version {FORMAT_VERSION - 1} is older .* re-export"):
        load_manifest(export_dir)
    _edit(export_dir, lambda d: d.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ManifestError, match=rf"manifest.json: format_version {FORMAT_VERSION + 1} is not supported"):
        load_manifest(export_dir)


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="manifest.json: not found"):
        load_manifest(tmp_path / "nowhere")


def test_missing_file(export_dir):
    os.remove(export_dir / "vae_decoder" / "model.onnx")
    with pytest.raises(ManifestError, match=r"graph 'vae_decoder': file 'vae_decoder/model.onnx' not found"):
        load_manifest(export_dir)


def test_hash_mismatch(export_dir):
    path = export_dir / "vae_decoder" / "model.onnx"
    model = onnx.load(str(path))
    model.graph.initializer[0].raw_data = np.full((4, 4), 7, np.float32).tobytes()
    onnx.save(model, str(path))
    load_manifest(export_dir, verify_hashes=False)  # on-demand hashing: the IO still matches
    with pytest.raises(ManifestError, match=r"graph 'vae_decoder': file 'vae_decoder/model.onnx' has sha256 .* manifest expects"):
        load_manifest(export_dir)


def test_io_name_mismatch(export_dir):
    path = export_dir / "vae_decoder" / "model.onnx"
    _onnx(path, input_name="latents")
    _edit(export_dir, lambda d: d["graphs"]["vae_decoder"].update(sha256=sha256_file(path)))
    with pytest.raises(ManifestError, match=r"graph 'vae_decoder' \(vae_decoder/model.onnx\): inputs are \['latents', 'mask'\], manifest declares \['x', 'mask'\]"):
        load_manifest(export_dir)


def test_io_dim_mismatch(export_dir):
    _edit(export_dir, lambda d: d["graphs"]["vae_decoder"]["inputs"][0].update(dims=["B", 5]))
    with pytest.raises(ManifestError, match=r"graph 'vae_decoder' .*input x: float32\[B, 4\], manifest declares x: float32\[B, 5\]"):
        load_manifest(export_dir)


@pytest.mark.parametrize("bad", ["../outside.onnx", "/etc/passwd", "vae_decoder/../../outside.onnx"])
def test_path_escaping_export_dir(export_dir, bad):
    _edit(export_dir, lambda d: d["graphs"]["vae_decoder"].update(file=bad))
    with pytest.raises(ManifestError, match="must be relative and inside"):
        load_manifest(export_dir)


def test_symlink_escaping_export_dir(export_dir, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.copyfile(export_dir / "vae_decoder" / "model.onnx", outside)
    (export_dir / "vae_decoder" / "link.onnx").symlink_to(outside)
    _edit(export_dir, lambda d: d["graphs"]["vae_decoder"].update(file="vae_decoder/link.onnx"))
    with pytest.raises(ManifestError, match=r"path 'vae_decoder/link.onnx' resolves to .*outside the export directory"):
        load_manifest(export_dir)
    assert resolve_path(export_dir, "vae_decoder/model.onnx") == (export_dir / "vae_decoder" / "model.onnx").resolve()


def test_unknown_graph(export_dir):
    with pytest.raises(ManifestError, match="no graph 'transformer'"):
        load_manifest(export_dir).graph("transformer")


def test_manifest_module_is_torch_and_onnx_free():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'onnx'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import qwen_image_edge.runtime.manifest\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_a_graph_the_runtime_does_not_know_is_refused(export_dir):
    _edit(export_dir, lambda d: d["graphs"].update(vae_encoderx=d["graphs"]["vae_decoder"]))
    with pytest.raises(ManifestError, match=r"manifest.json: graphs \['vae_encoderx'\]: unknown; expected some of"):
        load_manifest(export_dir, verify_hashes=False)
