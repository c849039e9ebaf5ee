"""`build --refittable` and `refit EXPORT_DIR --lora FILE[:SCALE]` (qwen_image_edge/export/refit.py).

Against the TensorRT stand-in (tests/trt_standin.py + trt_standin_refit.py: its engines carry their
graph and weights and run them with onnxruntime; a refit changes them only through TensorRT's refit
calls), on a lean export of the tiny model's transformer (refit needs the checkpoint's weight names,
which only the lean export keeps). The reference is an engine built from an export made with
``--lora`` by the other exporter (TorchScript): the same fp32 weights through differently ordered
fp32 ops, measured 1.9e-6 apart on outputs up to 1.7 in magnitude, so atol 1e-5; the adapter moves
the output by ~2.4. The fused weights themselves must equal the reference model's (``load_model(...,
loras=)``, the same fp32 sum and cast) bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qwen_image_edge.runtime.errors import ConfigError
from qwen_image_edge.runtime.manifest import load_manifest
from tests.real_trt import real_trt_and_gpu

ATOL = 1e-5
MODULES = {"transformer_blocks.0.attn.to_q": (32, 32), "transformer_blocks.1.img_mlp.proj": (96, 32),
           "img_in": (32, 64), "txt_in.in_layer": (32, 32)}  # module -> weight [out, in]; img_in is read twice


def _write_lora(path: Path, modules=MODULES, rank: int = 4, seed: int = 0) -> Path:
    """An adapter as diffusers' ``save_lora_weights`` writes it (alpha 8, rank 4: scale 2)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m, (out, inp) in modules.items():
        tensors[f"transformer.{m}.lora_A.weight"] = torch.randn(rank, inp, generator=g) * 0.3
        tensors[f"transformer.{m}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.3
    meta = {"transformer.r": rank, "transformer.lora_alpha": 8.0}
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    return path


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    return _write_lora(tmp_path_factory.mktemp("lora") / "style.safetensors")


@pytest.fixture(scope="module")
def lean(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny transformer, lean export (weights named by checkpoint keys, shards linked in)."""
    from qwen_image_edge.export.onnx_export import export_model

    out = tmp_path_factory.mktemp("refit") / "lean"
    export_model(tiny_model_dir, out, graphs=["transformer"], lean=True)
    return out


@pytest.fixture(scope="module")
def feeds(tiny_model_dir, lean) -> dict[str, np.ndarray]:
    from qwen_image2_ref.model_folder import load_model
    from qwen_image_edge.export.graphs import transformer_example

    names = [t.name for t in load_manifest(lean, verify_hashes=False).graphs["transformer"].inputs]
    return {n: t.numpy() for n, t in zip(names, transformer_example(load_model(tiny_model_dir).config))}


@pytest.fixture
def copy(lean, tmp_path) -> Path:
    return Path(shutil.copytree(lean, tmp_path / "export"))


def _velocity(export_dir: Path, feeds) -> np.ndarray:
    """The transformer engine of ``export_dir`` (the one the manifest names) on ``feeds``."""
    from qwen_image_edge.runtime.backends.tensorrt import TensorRTBackend

    m = load_manifest(export_dir, verify_hashes=False)
    sess = TensorRTBackend(export_dir, m).open(m.graphs["transformer"], export_dir / m.graphs["transformer"].file)
    try:
        return sess.run(feeds)["velocity"]
    finally:
        sess.close()


def _snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- refit


def test_refit_engine_equals_an_engine_built_from_the_fused_export(copy, lora, feeds, tiny_model_dir, tmp_path, trt):
    import onnx

    from qwen_image2_ref.model_folder import load_model
    from qwen_image_edge.export.onnx_export import export_model
    from qwen_image_edge.export.refit import refit_engines
    from qwen_image_edge.export.refit_graph import read_initializer
    from qwen_image_edge.export.tensorrt import build_engines

    (base_engine,) = build_engines(copy, refittable=True).values()
    assert "set_flag:REFIT" in trt.CALLS
    base = _velocity(copy, feeds)
    before = load_manifest(copy)
    result = refit_engines(copy, [(lora, 0.5)])

    m = load_manifest(copy)  # every hash the manifest records still holds
    (key,) = result.engines
    engine, graph = m.engines[key], m.graphs["transformer"]
    assert engine.graph_sha256 == graph.sha256 != before.graphs["transformer"].sha256
    assert engine.file != base_engine.file and not (copy / base_engine.file).exists()
    assert not (copy / before.graphs["transformer"].file).exists()  # superseded files removed
    (entry,) = m.provenance.source["loras"]
    assert (entry["file"], entry["scale"], entry["layers"]) == (lora.name, 0.5, sorted(MODULES))
    assert trt.CALLS[-4:] == ["Refitter", "refit_from_file", "refit_cuda_engine", "serialize"]

    # the graph's weights: the reference model's fused ones, bit for bit; the rest untouched
    fused = load_model(tiny_model_dir, loras=[(lora, 0.5)]).transformer.state_dict()
    proto = onnx.load(str(copy / graph.file), load_external_data=False)
    weights = {t.name: read_initializer(t, copy.resolve(), (copy / graph.file).parent.resolve())
               for t in proto.graph.initializer if t.name in fused}
    assert len(weights) > len(MODULES)
    for name, value in weights.items():
        assert torch.equal(value, fused[name]), name

    # the engine: what an engine built from an export made with the adapter computes
    reference = tmp_path / "fused"
    export_model(tiny_model_dir, reference, graphs=["transformer"], lean=False, loras=[(lora, 0.5)])
    build_engines(reference)
    ours, expected = _velocity(copy, feeds), _velocity(reference, feeds)
    assert np.abs(base - expected).max() > 100 * ATOL  # the adapter matters at this tolerance
    np.testing.assert_allclose(ours, expected, rtol=0, atol=ATOL)
    # and the onnxruntime backend runs the same new graph
    import onnxruntime

    sess = onnxruntime.InferenceSession(str(copy / graph.file), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, feeds)[0], ours, rtol=0, atol=1e-6)


def test_refit_twice_stacks_adapters(lean, lora, feeds, tmp_path, trt):
    from qwen_image_edge.export.refit import refit_engines
    from qwen_image_edge.export.tensorrt import build_engines

    twice, once = (Path(shutil.copytree(lean, tmp_path / name)) for name in ("twice", "once"))
    for export_dir in (twice, once):
        build_engines(export_dir, refittable=True)
    refit_engines(twice, [(lora, 0.5)])
    refit_engines(twice, [(lora, 0.5)])  # onto the export's current weights: as one refit at scale 1
    refit_engines(once, [(lora, 1.0)])
    assert [e["scale"] for e in load_manifest(twice).provenance.source["loras"]] == [0.5, 0.5]
    assert len(list(twice.rglob("*.plan"))) == len(list(twice.rglob("*.onnx"))) == 1  # superseded files removed
    # (W + d) + d against W + 2d: fp32 rounding of the weights only
    np.testing.assert_allclose(_velocity(twice, feeds), _velocity(once, feeds), rtol=0, atol=ATOL)


def test_cli_build_refittable_then_refit(copy, lora, trt, capsys):
    from qwen_image_edge.cli import main

    assert main(["build", str(copy), "--refittable"]) == 0
    capsys.readouterr()
    assert main(["refit", str(copy), "--lora", f"{lora}:0.5"]) == 0
    assert capsys.readouterr().out.startswith("transformer: engines/nvidia-stand-in-gpu-trt")
    assert load_manifest(copy).provenance.source["loras"][0]["scale"] == 0.5


# ----------------------------------------------------------------------------- refusals: one line, nothing written


def _bad_adapters(tmp: Path, lora: Path) -> dict[str, tuple[str, str]]:
    """case -> (--lora value, what the one-line error must say)."""
    torch.save({"transformer.img_in.lora_A.weight": torch.zeros(4, 64)}, tmp / "adapter.pt")
    return {
        "missing file": (str(tmp / "none.safetensors"), "expected a safetensors file, found none"),
        "pickle": (str(tmp / "adapter.pt"), "pickle adapters are refused"),
        "shape": (str(_write_lora(tmp / "wide.safetensors", {"img_in": (32, 65)})), "expected A [r, 64]"),
        "architecture": (str(_write_lora(tmp / "unet.safetensors", {"down_blocks.0.proj": (32, 32)})),
                         "not a linear layer of this transformer"),
        "scale": (f"{lora}:strong", "finite number as SCALE"),
    }


@pytest.mark.parametrize("case", ["missing file", "pickle", "shape", "architecture", "scale"])
def test_bad_adapters_are_refused_in_one_line_and_nothing_is_written(copy, lora, tmp_path, trt, capsys, case):
    from qwen_image_edge.cli import main
    from qwen_image_edge.export.tensorrt import build_engines

    build_engines(copy, refittable=True)
    value, match = _bad_adapters(tmp_path, lora)[case]
    before = _snapshot(copy)
    assert main(["refit", str(copy), "--lora", value]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1, err
    assert _snapshot(copy) == before


def test_engine_built_without_refittable_is_refused(copy, lora, trt):
    from qwen_image_edge.export.refit import refit_engines
    from qwen_image_edge.export.tensorrt import build_engines

    build_engines(copy)
    before = _snapshot(copy)
    with pytest.raises(ConfigError, match=r"built without --refittable .*rebuild it with `build --refittable`"):
        refit_engines(copy, [lora])
    assert _snapshot(copy) == before
    assert "Refitter" not in trt.CALLS  # refused from engine.refittable, before any refit call


def test_engine_built_from_another_graph_is_refused(copy, lora, trt):
    """Refitting it would record it as built from the current graph: its structure may differ."""
    import dataclasses

    from qwen_image_edge.export.manifest_writer import write_text_atomic
    from qwen_image_edge.export.refit import refit_engines
    from qwen_image_edge.export.tensorrt import build_engines
    from qwen_image_edge.runtime.manifest import MANIFEST_NAME

    build_engines(copy, refittable=True)
    m = load_manifest(copy)
    (key, e), = m.engines.items()
    stale = dataclasses.replace(e, graph_sha256="ee" * 32)
    write_text_atomic(copy / MANIFEST_NAME, dataclasses.replace(m, engines={key: stale}).to_json())
    before = _snapshot(copy)
    with pytest.raises(ConfigError, match=r"built from another version of graph 'transformer'.*rebuild it"):
        refit_engines(copy, [lora])
    assert _snapshot(copy) == before


def test_quantized_plain_and_unbuilt_exports_are_refused(copy, lora, tiny_export, tmp_path, trt):
    import dataclasses

    from qwen_image_edge.export.manifest_writer import write_text_atomic
    from qwen_image_edge.export.refit import refit_engines
    from qwen_image_edge.runtime.manifest import MANIFEST_NAME, Precision

    with pytest.raises(ConfigError, match=r"no engine of \['transformer'\] .*build --refittable"):
        refit_engines(copy, [lora])
    m = load_manifest(copy)
    int8 = dataclasses.replace(m.graphs["transformer"], precision=Precision.INT8)
    write_text_atomic(copy / MANIFEST_NAME, dataclasses.replace(m, graphs={"transformer": int8}).to_json())
    before = _snapshot(copy)
    with pytest.raises(ConfigError, match=r"'transformer' is int8 \(Q/DQ\).*quantize with --lora"):
        refit_engines(copy, [lora])
    assert _snapshot(copy) == before
    plain = Path(shutil.copytree(tiny_export[1], tmp_path / "plain"))  # the TorchScript export
    before = _snapshot(plain)
    with pytest.raises(ConfigError, match=r"trace ids \(e.g. 'onnx::MatMul_\d+'\).*export --lean"):
        refit_engines(plain, [lora])
    assert _snapshot(plain) == before


def test_a_failed_refit_removes_what_it_staged(copy, lora, trt, monkeypatch):
    from qwen_image_edge.export import refit
    from qwen_image_edge.export.tensorrt import build_engines
    from qwen_image_edge.runtime.errors import BackendError

    build_engines(copy, refittable=True)
    before = _snapshot(copy)
    monkeypatch.setattr(trt.Refitter, "refit_cuda_engine", lambda self: False)  # TensorRT refuses the refit
    with pytest.raises(BackendError, match="TensorRT's refit failed"):
        refit.refit_engines(copy, [lora])
    assert _snapshot(copy) == before


# ----------------------------------------------------------------------------- what the stand-in enforces


def test_standin_refitter_behaves_like_tensorrts(copy, trt):
    import onnx

    from qwen_image_edge.export.tensorrt import build_engines
    from qwen_image_edge.runtime.backends.tensorrt import process_logger

    build_engines(copy, refittable=True)
    m = load_manifest(copy)
    (e,) = m.engines.values()
    logger = process_logger(trt)
    engine = trt.Runtime(logger).deserialize_cuda_engine((copy / e.file).read_bytes())
    refitter = trt.Refitter(engine, logger)
    names = refitter.get_all_weights()
    assert "img_in.weight" in names and refitter.get_missing_weights() == []
    assert not refitter.set_named_weights("no.such.weight", np.zeros(4, np.float32))
    assert not refitter.set_named_weights("img_in.weight", np.zeros(7, np.float32))  # another count
    assert refitter.set_named_weights("img_in.weight", np.zeros((32, 64), np.float32))
    assert set(refitter.get_missing_weights()) == set(names) - {"img_in.weight"}
    assert refitter.refit_cuda_engine() is False  # weights missing: nothing applied
    # the ONNX refitter reports a file that lacks a weight of the engine
    graph = onnx.load(str(copy / m.graphs["transformer"].file), load_external_data=False)
    del graph.graph.initializer[[t.name for t in graph.graph.initializer].index("img_in.weight")]
    onnx.save(graph, str(copy / "transformer" / "short.onnx"))
    parser = trt.OnnxParserRefitter(trt.Refitter(engine, logger), logger)
    assert parser.refit_from_file(str(copy / "transformer" / "short.onnx")) is False
    assert "Only successfully refitted" in parser.get_error(0).desc()
    # a plan built without REFIT gives no refitter
    build_engines(copy)
    (e,) = load_manifest(copy).engines.values()
    plain = trt.Runtime(logger).deserialize_cuda_engine((copy / e.file).read_bytes())
    assert plain.refittable is False
    with pytest.raises(trt.MisuseError, match="BuilderFlag.REFIT"):
        trt.Refitter(plain, logger)


# ----------------------------------------------------------------------------- real TensorRT


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not real_trt_and_gpu(), reason="needs TensorRT and a CUDA GPU")
def test_real_refit_matches_onnxruntime_on_the_fused_graph(copy, lora, feeds):
    """fp32 engines (TensorRT uses TF32 in matmuls by default: 10-bit mantissa, relative error ~1e-3
    per product, so the bound is relative: 1% of the output's range); the adapter moves it ~100%."""
    import onnxruntime

    from qwen_image_edge.export.refit import refit_engines
    from qwen_image_edge.export.tensorrt import build_engines

    build_engines(copy, refittable=True)
    base = _velocity(copy, feeds)
    refit_engines(copy, [(lora, 0.5)])
    ours = _velocity(copy, feeds)
    m = load_manifest(copy)
    sess = onnxruntime.InferenceSession(str(copy / m.graphs["transformer"].file), providers=["CPUExecutionProvider"])
    expected = sess.run(None, feeds)[0]
    scale = np.abs(expected).max()
    assert np.abs(base - expected).max() > 0.2 * scale
    assert np.abs(ours - expected).max() <= 0.01 * scale
