"""qwen_image_edge.runtime.manifest: round trip and every refusal as a typed error naming the file and the problem.

The export directory here is built by hand from a tiny ONNX graph (no torch), so these tests
exercise the contract module alone.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwen_image_edge.runtime.errors import ManifestError
from qwen_image_edge.runtime.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    GraphSpec,
    Manifest,
    Precision,
    TensorSpec,
    load_manifest,
    read_onnx_io,
    resolve_path,
    sha256_file,
)

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


def _export_dir(root: Path) -> Path:
    d = root / "exp"
    _onnx(d / "g" / "model.onnx")
    (d / "tokenizer").mkdir()
    (d / "tokenizer" / "tokenizer.json").write_text("{}")
    spec = GraphSpec("g", "g/model.onnx", sha256_file(d / "g" / "model.onnx"), Precision.FP32, INPUTS, OUTPUTS,
                     dim_ranges={"B": (1, 2, 4), "L": (1, 8, 64)})
    m = Manifest(model={"name": "t"}, prompt={"tokenizer": "tokenizer/tokenizer.json"},
                 schedule={"num_steps": 3, "sigmas": None}, image={"max_resolution": 64},
                 graphs={"g": spec}, provenance={"tool_versions": {}})
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
    g = m.graph("g")
    assert g.inputs == INPUTS and g.outputs == OUTPUTS and g.precision is Precision.FP32
    assert g.dim_ranges["L"] == (1, 8, 64) and m.format_version == FORMAT_VERSION


def test_onnx_header_reader_matches_onnx(export_dir):
    inputs, outputs = read_onnx_io(export_dir / "g" / "model.onnx")
    model = onnx.load(str(export_dir / "g" / "model.onnx"))
    assert [t.name for t in inputs] == [i.name for i in model.graph.input]
    assert list(inputs) == list(INPUTS) and list(outputs) == list(OUTPUTS)


def test_unknown_format_version(export_dir):
    _edit(export_dir, lambda d: d.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ManifestError, match=rf"manifest.json: format_version {FORMAT_VERSION + 1} is not supported"):
        load_manifest(export_dir)


def test_missing_manifest_and_missing_field(export_dir, tmp_path):
    with pytest.raises(ManifestError, match="manifest.json: not found"):
        load_manifest(tmp_path / "nowhere")
    _edit(export_dir, lambda d: d.pop("schedule"))
    with pytest.raises(ManifestError, match="missing field 'schedule'"):
        load_manifest(export_dir)


def test_missing_file(export_dir):
    os.remove(export_dir / "g" / "model.onnx")
    with pytest.raises(ManifestError, match=r"graph 'g': file 'g/model.onnx' not found"):
        load_manifest(export_dir)


def test_hash_mismatch(export_dir):
    path = export_dir / "g" / "model.onnx"
    model = onnx.load(str(path))
    model.graph.initializer[0].raw_data = np.full((4, 4), 7, np.float32).tobytes()
    onnx.save(model, str(path))
    load_manifest(export_dir, verify_hashes=False)  # on-demand hashing: the IO still matches
    with pytest.raises(ManifestError, match=r"graph 'g': file 'g/model.onnx' has sha256 .* manifest expects"):
        load_manifest(export_dir)


def test_io_name_mismatch(export_dir):
    path = export_dir / "g" / "model.onnx"
    _onnx(path, input_name="latents")
    _edit(export_dir, lambda d: d["graphs"]["g"].update(sha256=sha256_file(path)))
    with pytest.raises(ManifestError, match=r"graph 'g' \(g/model.onnx\): inputs are \['latents', 'mask'\], manifest declares \['x', 'mask'\]"):
        load_manifest(export_dir)


def test_io_dim_mismatch(export_dir):
    _edit(export_dir, lambda d: d["graphs"]["g"]["inputs"][0].update(dims=["B", 5]))
    with pytest.raises(ManifestError, match=r"graph 'g' .*input x: float32\[B, 4\], manifest declares x: float32\[B, 5\]"):
        load_manifest(export_dir)


@pytest.mark.parametrize("bad", ["../outside.onnx", "/etc/passwd", "g/../../outside.onnx"])
def test_path_escaping_export_dir(export_dir, bad):
    _edit(export_dir, lambda d: d["graphs"]["g"].update(file=bad))
    with pytest.raises(ManifestError, match="must be relative and inside"):
        load_manifest(export_dir)


def test_symlink_escaping_export_dir(export_dir, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.copyfile(export_dir / "g" / "model.onnx", outside)
    (export_dir / "g" / "link.onnx").symlink_to(outside)
    _edit(export_dir, lambda d: d["graphs"]["g"].update(file="g/link.onnx"))
    with pytest.raises(ManifestError, match=r"path 'g/link.onnx' resolves to .*outside the export directory"):
        load_manifest(export_dir)
    assert resolve_path(export_dir, "g/model.onnx") == (export_dir / "g" / "model.onnx").resolve()


def test_unknown_precision_and_graph(export_dir):
    with pytest.raises(ManifestError, match="no graph 'transformer'"):
        load_manifest(export_dir).graph("transformer")
    _edit(export_dir, lambda d: d["graphs"]["g"].update(precision="int4"))
    with pytest.raises(ManifestError, match="malformed field"):
        load_manifest(export_dir)


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
