"""Lean export (fake-tensor trace + weights attached from the shards) against the plain export.

The checkpoint is the tiny model rewritten as bf16 shards; the plain export loads it cast to fp32,
the lean one streams the same bf16 -> fp32 conversion, so both graphs hold identical weights and
differ only in how the two exporters decompose ops (fp32 rounding: rel L2 ~1e-7..1e-6).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import qwen_image_edge.export.lean as lean
from qwen_image2_ref.checkpoint import (
    DIFFUSERS_WEIGHTS_NAME,
    TRANSFORMERS_WEIGHTS_NAME,
    iter_tensors,
    read_config,
    save_component,
)
from qwen_image2_ref.config import TransformerConfig
from qwen_image2_ref.model_folder import load_model
from qwen_image2_ref.transformer import QwenImageTransformer
from qwen_image_edge.export.graphs import transformer_inputs
from qwen_image_edge.export.onnx_export import export_model
from qwen_image_edge.export.registry import graph_module
from qwen_image_edge.export.validate import validate, validation_cases
from qwen_image_edge.runtime.errors import CheckpointError
from qwen_image_edge.runtime.manifest import GRAPH_NAMES, load_manifest

REPO = Path(__file__).parents[1]
WEIGHT_NAMES = {"transformer": DIFFUSERS_WEIGHTS_NAME, "vae": DIFFUSERS_WEIGHTS_NAME,
                "text_encoder": TRANSFORMERS_WEIGHTS_NAME}
REL_L2 = 1e-5  # same fp32 weights, two exporters' op orders: fp32 rounding only


def _rewrite(src: Path, dst: Path, dtype=torch.bfloat16, shard="64KB", edit=None) -> Path:
    """Copy a model folder with every component re-saved as ``dtype`` shards (``edit`` may change
    the transformer's state dict first)."""
    shutil.copytree(src, dst)
    for comp, weights_name in WEIGHT_NAMES.items():
        state = dict(iter_tensors(src / comp))
        if edit is not None and comp == "transformer":
            edit(state)
        save_component(state, dst / comp, read_config(src / comp), max_shard_size=shard, dtype=dtype,
                       weights_name=weights_name, overwrite=True)
    return dst


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def bf16(tiny, tmp_path_factory):
    path = _rewrite(tiny, tmp_path_factory.mktemp("bf16") / "model")
    return path, load_model(path)  # fp32, cast from the bf16 shards as the plain export does


@pytest.fixture(scope="module")
def exports(bf16, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    plain = export_model(bf16[1], root / "plain", lean=False)
    lean_manifest = export_model(bf16[0], root / "lean", lean=True)
    return (root / "plain", plain), (root / "lean", lean_manifest)


def _session(out: Path, manifest, name: str):
    return ort.InferenceSession(str(out / manifest.graph(name).file), providers=["CPUExecutionProvider"])


@pytest.mark.slow
@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_lean_and_plain_give_the_same_outputs(name, bf16, exports):
    (p_out, p_man), (l_out, l_man) = exports
    plain, lean_s = _session(p_out, p_man, name), _session(l_out, l_man, name)
    cases = list(validation_cases(name, bf16[1], l_man.graph(name)))
    assert len(cases) >= 2  # every dynamic axis at two values (and N_c = 0 for the transformer)
    for label, feeds, _, valid in cases:
        for a, b in zip(plain.run(None, feeds), lean_s.run(None, feeds)):
            if valid is not None:
                a, b = a[valid], b[valid]
            assert a.shape == b.shape and np.isfinite(b).all()
            rel = np.linalg.norm(a - b) / np.linalg.norm(a)
            assert rel < REL_L2, f"{name} {label}: rel L2 {rel:.2e}"


@pytest.mark.slow
def test_lean_export_is_an_ordinary_export(bf16, exports):
    """Manifest with hashed external data, initializer names = checkpoint keys, validate passes."""
    (plain_out, _), (out, manifest) = exports
    load_manifest(out, verify_hashes=True)
    assert "dynamo exporter under FakeTensorMode" in manifest.provenance.exporter
    assert "TorchScript" in load_manifest(plain_out, verify_hashes=False).provenance.exporter
    spec = manifest.graph("transformer")
    assert [d.file for d in spec.external_data] == ["transformer/model.onnx.data"]  # bf16 -> fp32: streamed
    model = onnx.load(str(out / spec.file), load_external_data=False)
    external = {t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert external == set(dict(iter_tensors(bf16[0] / "transformer")))  # the checkpoint's keys, no prefix
    report = validate(out, bf16[1], report=out.parent / "lean-validation.json")
    assert report.passed, report.table()


@pytest.mark.slow
def test_same_dtype_points_into_the_checkpoint_shards(tiny, tmp_path):
    """fp32 shards: the initializers point into hard links of the shards, and the graph equals the
    torch reference at two shapes (N_c = 0 included)."""
    ckpt = _rewrite(tiny, tmp_path / "fp32", dtype=torch.float32, shard="100KB")
    out = tmp_path / "out"
    manifest = export_model(ckpt, out, graphs=["transformer"], lean=True)
    spec = manifest.graph("transformer")
    shards = sorted(p.name for p in (ckpt / "transformer").glob("*.safetensors"))
    assert len(shards) > 1 and sorted(Path(d.file).name for d in spec.external_data) == shards
    for name in shards:
        assert os.path.samefile(out / "transformer" / name, ckpt / "transformer" / name)  # linked, not copied
    load_manifest(out, verify_hashes=True)
    model = load_model(ckpt)
    session = _session(out, manifest, "transformer")
    for args in (transformer_inputs(model.config, 2, 5, (2, 3), ((2, 2),), pad=1),
                 transformer_inputs(model.config, 1, 3, (4, 2), ())):
        got = session.run(None, {t.name: a.numpy() for t, a in zip(spec.inputs, args)})[0]
        with torch.no_grad():
            ref = graph_module("transformer", model)(*args).numpy()
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < REL_L2


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.pop("transformer_blocks.1.attn.to_k.weight"), "missing keys: transformer_blocks.1.attn.to_k"),
    (lambda s: s.update({"proj_out.weight": torch.ones_like(s["proj_out.weight"], dtype=torch.int32)}),
     "cannot be converted.*proj_out.weight"),
])
def test_bad_checkpoint_fails_before_any_output(tiny, tmp_path, edit, match):
    ckpt = _rewrite(tiny, tmp_path / "bad", edit=edit)
    parent = tmp_path / "exports"
    parent.mkdir()
    with pytest.raises(CheckpointError, match=match):
        export_model(ckpt, parent / "out", graphs=["vae_decoder", "transformer"], lean=True)
    assert list(parent.iterdir()) == []  # neither the output nor a staging directory


def test_lean_is_chosen_when_weights_crowd_memory(tiny, monkeypatch):
    need = lean.plain_export_bytes(tiny, ["transformer", "text_encoder"])
    assert need == 4 * sum(t.numel() for c in ("transformer", "text_encoder") for _, t in iter_tensors(tiny / c))
    monkeypatch.setattr(lean, "available_memory", lambda: int(need / lean.LEAN_RAM_SHARE) - 1)
    assert lean.should_use_lean(tiny, ["transformer", "text_encoder"])
    monkeypatch.setattr(lean, "available_memory", lambda: int(need / lean.LEAN_RAM_SHARE) + 1)
    assert not lean.should_use_lean(tiny, ["transformer", "text_encoder"])


def test_streaming_converts_in_chunks_like_torch(tmp_path, monkeypatch):
    """A tensor several chunks long, bf16 -> fp32, equals torch's cast byte for byte; offsets aligned."""
    from safetensors.torch import save_file

    import qwen_image_edge.export.external_data as ed

    monkeypatch.setattr(ed, "CHUNK_BYTES", 1000)
    tensors = {"a": torch.randn(37, 29).to(torch.bfloat16), "b": torch.randn(3).to(torch.bfloat16)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    entries = ed.read_header(tmp_path / "x.safetensors")
    sources = ed.plan_sources([(k, onnx.TensorProto.FLOAT, tuple(t.shape)) for k, t in tensors.items()],
                              {k: k for k in tensors}, entries, {}, where="test")
    protos = ed.stream_tensors(sources, tmp_path / "d.bin", "d.bin")
    data = (tmp_path / "d.bin").read_bytes()
    for p in protos:
        info = {e.key: e.value for e in p.external_data}
        offset, length = int(info["offset"]), int(info["length"])
        assert offset % ed.ALIGN == 0 and info["location"] == "d.bin"
        got = np.frombuffer(data[offset:offset + length], dtype=np.float32).reshape(tuple(p.dims))
        np.testing.assert_array_equal(got, tensors[p.name].float().numpy())


# ----------------------------------------------------------------------------- memory

BIG = TransformerConfig(num_layers=2, num_heads=40, head_dim=128, context_dim=32, axes_dims_rope=(16, 56, 56))


@pytest.mark.slow
def test_lean_peak_rss_is_below_half_the_checkpoint(tiny, tmp_path):
    """A 5120-wide 2-layer transformer (~1.7 GB of bf16 shards): the lean export, streaming it to
    fp32, peaks below half of that in a fresh process (interpreter, torch and onnx included)."""
    ckpt = tmp_path / "big"
    shutil.copytree(tiny, ckpt)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in QwenImageTransformer(BIG).state_dict().items()}
    state = {k: torch.zeros(s, dtype=torch.bfloat16) for k, s in shapes.items()}  # values do not matter here
    save_component(state, ckpt / "transformer", BIG.to_diffusers(), max_shard_size="500MB", overwrite=True)
    weight_bytes = sum(t.nbytes for t in state.values())
    del state
    out = tmp_path / "out"
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so the child would report this
    # process's peak (the zeros above) as its own
    script = (f"from qwen_image_edge.export.onnx_export import export_model; "
              f"export_model({str(ckpt)!r}, {str(out)!r}, graphs=['transformer'], lean=True); "
              f"print([int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    peak = json.loads(res.stdout.strip().splitlines()[-1])
    assert (out / "transformer" / "model.onnx.data").stat().st_size >= 2 * weight_bytes  # fp32 (+ alignment)
    print(f"lean export peak RSS {peak / 2**30:.2f} GiB for {weight_bytes / 2**30:.2f} GiB of bf16 weights")
    assert peak < weight_bytes / 2, f"peak RSS {peak / 2**30:.2f} GiB, weights {weight_bytes / 2**30:.2f} GiB"
