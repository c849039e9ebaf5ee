"""Export of the tiny model: directory layout, IOSpecs in the files, external data, atomicity."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import qwen_image_edge.export.onnx_export as onnx_export
from qwen_image2_ref.model_folder import load_model
from qwen_image_edge.export.onnx_export import export_graph, export_model
from qwen_image_edge.export.registry import example_inputs, graph_io, graph_module
from qwen_image_edge.export.trace import save_graph, trace_to_onnx
from qwen_image_edge.runtime.errors import ConfigError, ManifestError
from qwen_image_edge.runtime.manifest import GRAPH_NAMES, MANIFEST_NAME, load_manifest, read_onnx_io

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir, load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "tiny"
    return out, export_model(tiny[1], out)


def test_export_directory_and_manifest(tiny, exported):
    out, manifest = exported
    assert sorted(manifest.graphs) == sorted(GRAPH_NAMES)
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    cfg = tiny[1].config
    for name, spec in manifest.graphs.items():
        io = graph_io(name, cfg, cfg.pipeline.output_resolution)
        assert spec.inputs == io.inputs and spec.outputs == io.outputs and spec.dim_ranges == io.dim_ranges
        model = onnx.load(str(out / spec.file))
        assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {19}
        # every symbolic dim of the IOSpec is symbolic in the file: nothing was baked in by tracing
        assert read_onnx_io(out / spec.file) == (list(io.inputs), list(io.outputs))
    p = manifest.prompt
    assert p.max_prompt_tokens == cfg.pipeline.max_prompt_tokens and p.drop_idx > 0
    assert "{prompt}" in p.template and manifest.schedule.num_steps == cfg.pipeline.num_steps
    assert set(manifest.provenance.source["checkpoint_sha256"]) == {"transformer", "vae", "text_encoder"}
    assert manifest.model.vae.latents_mean == tuple(cfg.vae.latents_mean)
    load_manifest(out, verify_hashes=True)


def test_transformer_graph_runs_without_condition_tokens(exported, tiny):
    """Text-to-image feeds cond_latents [B, 0, C]: the graph must accept zero-size tensors."""
    out, manifest = exported
    from qwen_image_edge.export.graphs import transformer_inputs

    args = transformer_inputs(tiny[1].config, 2, 4, (2, 2), (), pad=1)
    assert args[3].shape[1] == 0
    session = ort.InferenceSession(str(out / manifest.graph("transformer").file), providers=["CPUExecutionProvider"])
    got = session.run(None, {t.name: a.numpy() for t, a in zip(manifest.graph("transformer").inputs, args)})[0]
    ref = graph_module("transformer", tiny[1])(*args).detach().numpy()
    assert got.shape == ref.shape == (2, 4, 64)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5


def test_cleanup_removes_nodes_and_keeps_io(tiny, tmp_path):
    cfg = tiny[1].config
    io = graph_io("text_encoder", cfg, 64)
    done = export_graph("text_encoder", graph_module("text_encoder", tiny[1]), example_inputs("text_encoder", cfg),
                        io, tmp_path)
    assert done.nodes_after < done.nodes_before  # the dead final norm, folded shape arithmetic
    model = onnx.load(str(tmp_path / done.spec.file))
    assert len(model.graph.node) == done.nodes_after
    assert [i.name for i in model.graph.input] == io.input_names


def test_external_data_is_one_hashed_file(tiny, tmp_path):
    out = tmp_path / "ext"
    manifest = export_model(tiny[1], out, graphs=["vae_decoder"], external_threshold=0)
    spec = manifest.graph("vae_decoder")
    assert [d.file for d in spec.external_data] == ["vae_decoder/model.onnx.data"]
    assert sorted(p.name for p in (out / "vae_decoder").iterdir()) == ["model.onnx", "model.onnx.data"]
    load_manifest(out, verify_hashes=True)
    with open(out / spec.external_data[0].file, "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ManifestError, match="model.onnx.data' has sha256"):
        load_manifest(out, verify_hashes=True)
    z = np.random.default_rng(0).standard_normal((1, 64, 2, 3), dtype=np.float32)
    session = ort.InferenceSession(str(out / spec.file), providers=["CPUExecutionProvider"])
    assert session.run(None, {"latents": z})[0].shape == (1, 4, 32, 48)


def test_failed_export_leaves_nothing(tiny, tmp_path, monkeypatch):
    real = onnx_export.export_graph
    calls = []

    def failing(name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_graph", failing)
    with pytest.raises(RuntimeError, match="injected"):
        export_model(tiny[1], tmp_path / "out", graphs=["vae_decoder", "vae_encoder"])
    assert calls == ["vae_decoder", "vae_encoder"]
    assert list(tmp_path.iterdir()) == []  # neither the output nor a staging directory


def test_killed_export_leaves_no_valid_manifest(tiny, tmp_path):
    marker = tmp_path / "first-graph-done"
    out = tmp_path / "out"
    script = f"""
import time
import qwen_image_edge.export.onnx_export as ox
real = ox.export_graph
def slow(name, *a, **k):
    r = real(name, *a, **k)
    open({str(marker)!r}, "w").close()
    time.sleep(60)
    return r
ox.export_graph = slow
ox.export_model({str(tiny[0])!r}, {str(out)!r}, graphs=["vae_decoder", "vae_encoder"])
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "export process died before finishing a graph"
            assert time.monotonic() < deadline, "export did not reach the first graph in time"
            time.sleep(0.1)
        staged = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-") and p.is_dir()]
        assert len(staged) == 1 and (staged[0] / "vae_decoder" / "model.onnx").is_file()
        assert staged[0].with_name(staged[0].name + ".lock").is_file()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(out)
    assert not list(tmp_path.rglob(MANIFEST_NAME))
    # the next export to the same directory removes the killed one's staging (its lock is free) ...
    live = tmp_path / ".out.tmp-0123abcd"  # a running export's: its lock file is held
    live.mkdir()
    lock = tmp_path / ".out.tmp-0123abcd.lock"
    held = open(lock, "x")
    fcntl.flock(held, fcntl.LOCK_EX)
    unlocked = tmp_path / ".out.tmp-4567cdef"  # no lock file: not known to be stale
    unlocked.mkdir()
    try:
        export_model(tiny[1], out, graphs=["vae_decoder"])
    finally:
        held.close()
    assert load_manifest(out).graphs.keys() == {"vae_decoder"}
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out."))
    # ... but not a running export's, nor a directory without a lock
    assert left == sorted([live.name, lock.name, unlocked.name]), left


def test_refusals(tiny, exported, tmp_path):
    out, _ = exported
    with pytest.raises(ManifestError, match="already exists"):
        export_model(tiny[1], out, graphs=["vae_decoder"])
    with pytest.raises(ConfigError, match="opset"):
        export_model(tiny[1], tmp_path / "x", opset=17)
    with pytest.raises(ConfigError, match="unknown"):
        export_model(tiny[1], tmp_path / "x", graphs=["unet"])
    with pytest.raises(ConfigError, match="multiple of 32"):
        export_model(tiny[1], tmp_path / "x", graphs=["vae_decoder"], max_resolution=100)
    assert not (tmp_path / "x").exists()


def test_overwrite_replaces_atomically(tiny, tmp_path):
    out = tmp_path / "out"
    export_model(tiny[1], out, graphs=["vae_decoder"])
    manifest = export_model(tiny[1], out, graphs=["vae_encoder"], overwrite=True)
    assert list(manifest.graphs) == ["vae_encoder"] and not (out / "vae_decoder").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_patchified_vae_declares_its_pixel_channels(tmp_path):
    """The demo's VAE unpatchifies after a Clip that stops shape inference: the graph must still
    declare 4 output channels (not an invented symbol), or the manifest check refuses it."""
    import dataclasses

    import torch

    from qwen_image2_ref.config import DEMO
    from qwen_image2_ref.vae import QwenImageVAE
    from qwen_image_edge.export.graphs import VAEDecoderGraph

    cfg = dataclasses.replace(DEMO, vae=dataclasses.replace(DEMO.vae, base_dim=8, decoder_base_dim=8))
    io = graph_io("vae_decoder", cfg, 64)
    torch.manual_seed(0)
    module = VAEDecoderGraph(QwenImageVAE(cfg.vae).eval())
    model = trace_to_onnx(module, (torch.randn(2, 64, 3, 2),), io, tmp_path / "m.onnx", 19)
    save_graph(model, tmp_path / "m.onnx")
    _, outputs = read_onnx_io(tmp_path / "m.onnx")
    assert outputs[0].dims == ("B", 4, "H", "W")
    out = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"latents": np.zeros((1, 64, 2, 4), np.float32)})
    assert out[0].shape == (1, 4, 32, 64)
