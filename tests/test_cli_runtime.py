"""`run` and `demo` on the command line (tiny model standing in for the shipped demo)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

import qwen_image2_ref.demo as demo_pkg
from qwen_image_edge.cli import main
from qwen_image_edge.export.demo import ensure_export


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def export_dir(model, tmp_path_factory):
    return ensure_export(model, tmp_path_factory.mktemp("clirt-export") / "export", max_resolution=128)


def test_ensure_export_reuses_a_verified_export(model, export_dir):
    stamp = (export_dir / "manifest.json").stat().st_mtime_ns
    assert ensure_export(model, export_dir, max_resolution=128) == export_dir
    assert (export_dir / "manifest.json").stat().st_mtime_ns == stamp


def test_ensure_export_redoes_a_damaged_export_of_the_same_model(model, tmp_path):
    from qwen_image_edge.runtime.manifest import load_manifest

    out = ensure_export(model, tmp_path / "e", max_resolution=64)
    graph = out / load_manifest(out).graph("vae_decoder").file
    graph.write_bytes(graph.read_bytes()[:100])  # truncated: the manifest still names this model as its source
    assert ensure_export(model, out, max_resolution=64) == out
    load_manifest(out, verify_hashes=True)  # whole again


def test_ensure_export_keeps_what_it_cannot_identify(model, tmp_path):
    """A folder whose manifest names no source is not replaced without overwrite (it may be anything)."""
    from qwen_image_edge.runtime.errors import ManifestError

    out = ensure_export(model, tmp_path / "e", max_resolution=64)
    (out / "manifest.json").write_text("{}")
    with pytest.raises(ManifestError, match="pass --overwrite"):
        ensure_export(model, out, max_resolution=64)
    assert (out / "manifest.json").read_text() == "{}"
    assert ensure_export(model, out, max_resolution=64, overwrite=True) == out
    assert (out / "manifest.json").read_text() != "{}"


def test_run_generates_a_png(export_dir, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(["run", "--export", str(export_dir), "a red circle", "-o", str(out), "--steps", "2",
                 "--threads", "1"]) == 0
    assert Image.open(out).size == (64, 64)
    assert capsys.readouterr().out.strip() == str(out)


@pytest.mark.parametrize("extra, match", [
    (["--steps", "-1"], "steps: expected a positive integer, got -1"),
    (["--width", "100"], "width 100: expected a multiple of 32"),
    (["--width", "512"], "outside the exported range 32..128"),
    (["--backend", "nope"], "available backends"),
    (["--providers", "FooExecutionProvider"], "available: "),
])
def test_run_bad_input_is_one_line(export_dir, tmp_path, capsys, extra, match):
    code = main(["run", "--export", str(export_dir), "a red circle", "-o", str(tmp_path / "o.png"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0], err
    assert not (tmp_path / "o.png").exists()


def test_run_missing_export(tmp_path, capsys):
    assert main(["run", "--export", str(tmp_path), "x", "-o", str(tmp_path / "o.png")]) == 2
    assert "not an export" in capsys.readouterr().err


def test_demo_exports_once_then_generates(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo_pkg, "WEIGHTS_DIR", model)
    out = tmp_path / "demo.png"
    args = ["demo", "a red circle", "--export-dir", str(tmp_path / "cache"), "-o", str(out), "--steps", "2"]
    assert main(args) == 0
    assert Image.open(out).mode == "RGBA"
    stamp = (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns
    assert main(args) == 0  # the second run reuses the export
    assert (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns == stamp


def test_demo_fast_uses_the_student(model, tmp_path, monkeypatch):
    monkeypatch.setattr(demo_pkg, "WEIGHTS_DIR", tmp_path / "absent")  # --fast must not need the teacher
    monkeypatch.setattr(demo_pkg, "STUDENT_DIR", model)
    out = tmp_path / "fast.png"
    assert main(["demo", "a red circle", "--fast", "--export-dir", str(tmp_path / "c"), "-o", str(out),
                 "--steps", "2"]) == 0
    assert Image.open(out).mode == "RGBA"
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["provenance"]["source"]["path"] == str(model)
