"""validate: every tiny graph in onnxruntime vs torch at several shapes; a corrupted graph fails."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qwen_image2_ref.model_folder import load_model
from qwen_image_edge.cli import main
from qwen_image_edge.export.graphs import transformer_inputs
from qwen_image_edge.export.onnx_export import export_model
from qwen_image_edge.export.validate import REPORT_NAME, THRESHOLDS, compare, validate, validation_cases
from qwen_image_edge.runtime.manifest import GRAPH_NAMES, MANIFEST_NAME, Precision, load_manifest, sha256_file


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    model = load_model(tiny_model_dir)
    out = tmp_path_factory.mktemp("exports") / "tiny"
    export_model(model, out)
    return tiny_model_dir, model, out


def test_every_graph_within_fp32_bounds(tiny):
    _, model, out = tiny
    report = validate(out, model)
    assert report.passed, report.table()
    assert [g.graph for g in report.graphs] == list(GRAPH_NAMES)
    for g in report.graphs:
        assert len(g.cases) >= 2
        assert all(c.rel_l2 <= 1e-5 and c.cosine >= 0.99999 for c in g.cases)
    saved = json.loads((out / REPORT_NAME).read_text())
    assert saved["passed"] is True and len(saved["graphs"]) == len(GRAPH_NAMES)


def test_cases_cover_two_sizes_of_every_dynamic_axis(tiny):
    _, model, out = tiny
    manifest = load_manifest(out, verify_hashes=False)
    for name, spec in manifest.graphs.items():
        seen: dict[str, set[int]] = {}
        for _, feeds, _, _ in validation_cases(name, model, spec):
            for t in spec.inputs:
                for dim, size in zip(t.dims, feeds[t.name].shape):
                    if isinstance(dim, str):
                        seen.setdefault(dim, set()).add(size)
        symbols = {d for t in spec.inputs for d in t.dims if isinstance(d, str)}
        assert symbols and set(seen) == symbols
        assert all(len(v) >= 2 for v in seen.values()), (name, seen)
        if name == "transformer":
            assert 0 in seen["N_c"]  # text-to-image: zero condition tokens


def test_compare_ignores_padded_rows_only_when_asked():
    ref = np.ones((2, 3, 4), np.float32)
    got = ref.copy()
    got[0, 0] = 100.0  # a garbage row at a padded query position
    valid = np.array([[False, True, True], [True, True, True]])
    max_abs, rel, cos = compare(ref, got, valid)
    assert max_abs == 0.0 and rel == 0.0 and cos == pytest.approx(1.0, abs=1e-12)
    assert compare(ref, got)[1] > 1.0


def _corrupt_copy(out, dst, graph):
    shutil.copytree(out, dst)
    path = dst / graph / "model.onnx"
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += 0.05 * (np.abs(arr).max() + 1.0)  # one weight, a few percent of the largest
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(path))
    manifest = json.loads((dst / MANIFEST_NAME).read_text())
    manifest["graphs"][graph]["sha256"] = sha256_file(path)  # a consistent but wrong export
    (dst / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_corrupted_graph_fails_with_nonzero_exit(tiny, tmp_path, capsys):
    path, _, out = tiny
    bad = tmp_path / "bad"
    _corrupt_copy(out, bad, "transformer")
    report_path = tmp_path / "report.json"
    code = main(["validate", str(bad), "--model", str(path), "--report", str(report_path)])
    assert code == 1
    assert "FAILED" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    by_name = {g["graph"]: g for g in report["graphs"]}
    assert by_name["transformer"]["passed"] is False
    assert all(by_name[g]["passed"] for g in GRAPH_NAMES if g != "transformer")
    bound = THRESHOLDS[Precision.FP32].max_rel_l2
    assert max(c["rel_l2"] for c in by_name["transformer"]["cases"]) > bound


def test_cli_validate_passes_and_tampering_is_an_error(tiny, tmp_path, capsys):
    path, _, out = tiny
    assert main(["validate", str(out), "--model", str(path), "--report", str(tmp_path / "r.json")]) == 0
    bad = tmp_path / "tampered"
    shutil.copytree(out, bad)
    (bad / "vae_encoder" / "model.onnx").write_bytes(b"\x08\x09")
    assert main(["validate", str(bad), "--model", str(path)]) == 2
    assert "vae_encoder" in capsys.readouterr().err


def test_transformer_inputs_are_consistent(tiny):
    _, model, _ = tiny
    args = transformer_inputs(model.config, 2, 5, (2, 3), ((2, 2),), pad=2)
    n_t, l_prefix, seq = args[0].shape[1], args[4].shape[0], args[5].shape[0]
    assert seq == l_prefix + n_t and args[7].shape == (2, seq, seq) and args[3].shape[1] == 4
