"""The text encoder's embedding table as int8 rows (export/encoder_qdq.py, calib/encoder_quant.py).

The table ``[vocab, hidden]`` is int8 codes with one fp32 scale per row, read in the graph as
``Gather(codes) -> Cast -> Mul(Gather(row scale))``; the fake-quantized module holds ``codes * scale``.
Measured here on the demo encoder with a trained LLM's outlier channels (as tests/test_encoder_quant.py):
the edge encoder (int4 AWQ + int8 table) keeps cosine >= 0.99 against fp32 over the calibration
prompts, and the onnxruntime CPU graph computes what the module computes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("modelopt.torch.quantization")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from qwen_image2_ref.model_folder import load_model  # noqa: E402
from qwen_image_edge.calib.encoder_quant import (  # noqa: E402
    STRESS_OUTLIERS,
    EncoderQuantPolicy,
    add_outlier_channels,
    graph_inputs,
    hidden_state_cosines,
    quantize_text_encoder,
)
from qwen_image_edge.calib.prompts import load_prompts  # noqa: E402
from qwen_image_edge.export.encoder_qdq import (  # noqa: E402
    EMBED_MAX,
    export_quantized_text_encoder,
    int8_rows,
    rewrite_int8_embedding,
)
from qwen_image_edge.runtime.errors import ConfigError  # noqa: E402

OUTLIERS = STRESS_OUTLIERS  # three channels 60-100x


@pytest.fixture(scope="module")
def prompts():
    return load_prompts("demo", 32)


@pytest.fixture(scope="module")
def model():
    m = load_model("demo")
    add_outlier_channels(m.encoder.model, *OUTLIERS)
    return m


@pytest.fixture(scope="module")
def edge_encoder(model, prompts):
    """The edge preset's text encoder: int4 AWQ linears, int8 embedding rows (the defaults)."""
    return quantize_text_encoder(model, EncoderQuantPolicy("int4"), prompts, progress=False)


@pytest.fixture(scope="module")
def exported(model, edge_encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8-embedding")
    spec = export_quantized_text_encoder(edge_encoder, model.config, out, 128)
    return spec, out / spec.file


def test_each_row_gets_its_own_scale():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((12, 64)).astype(np.float32) * np.logspace(-3, 2, 12, dtype=np.float32)[:, None]
    codes, scales = int8_rows(table)
    assert codes.dtype == np.int8 and codes.shape == table.shape and scales.shape == (12,)
    np.testing.assert_allclose(scales, np.abs(table).max(axis=1) / EMBED_MAX, rtol=1e-6)
    assert (np.abs(codes).max(axis=1) == EMBED_MAX).all()  # each row uses the whole grid
    err = np.abs(codes * scales[:, None] - table)
    assert (err <= scales[:, None] * (0.5 + 1e-4)).all()  # round to nearest: half a step of the row's own grid


def test_edge_encoder_keeps_cosine_over_the_calibration_prompts(model, edge_encoder, prompts):
    """The must-show: the hidden states (int4 linears + int8 table) against fp32, every prompt."""
    assert edge_encoder.embedding is not None
    table = edge_encoder.module.language_model.embed_tokens.weight.detach().numpy()
    codes, scales = edge_encoder.embedding
    np.testing.assert_array_equal(table, codes.astype(np.float32) * scales[:, None])  # the module holds codes * s
    assert hidden_state_cosines(model, edge_encoder.module, prompts).min() >= 0.99
    record = edge_encoder.summary["embedding"]
    assert record["rows"] == codes.shape[0] and record["bytes"] < record["fp32_bytes"] / 3


def test_graph_stores_the_table_as_int8_rows(exported, model):
    spec, path = exported
    graph = onnx.load(str(path))
    vocab, hidden = model.config.encoder.vocab_size, model.config.encoder.hidden_size
    inits = {i.name: i for i in graph.graph.initializer}
    tables = [i for i in inits.values() if list(i.dims) == [vocab, hidden]]
    assert [t.data_type for t in tables] == [onnx.TensorProto.INT8]  # no fp32 copy left
    lookup = next(n for n in graph.graph.node if n.op_type == "Gather" and n.input[0] == tables[0].name)
    cast = next(n for n in graph.graph.node if lookup.output[0] in n.input)
    assert cast.op_type == "Cast" and next(a.i for a in cast.attribute if a.name == "to") == onnx.TensorProto.FLOAT
    scale_lookup = [n for n in graph.graph.node if n.op_type == "Gather" and list(inits.get(n.input[0], onnx.TensorProto()).dims) == [vocab]]
    assert len(scale_lookup) == 1


@pytest.mark.parametrize("batch", [slice(0, 1), slice(4, 9)])
def test_graph_computes_the_fake_quantized_module(exported, model, edge_encoder, prompts, batch):
    """onnxruntime CPU with fp32 activations in its int4 kernel: the same fp32 products as the module,
    so only summation order differs (measured 2e-7 relative); bound 1e-5, as the int4 export's."""
    spec, path = exported
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    args = graph_inputs(model, prompts[batch])
    got = session.run(None, {t.name: a.numpy() for t, a in zip(spec.inputs, args)})[0]
    with torch.no_grad():
        ref = edge_encoder.module(*args).numpy()
    valid = args[1].numpy().astype(bool)
    assert np.linalg.norm(got[valid] - ref[valid]) / np.linalg.norm(ref[valid]) < 1e-5


def test_a_table_not_found_is_one_line(exported):
    _, path = exported
    graph = onnx.load(str(path))
    codes, scales = int8_rows(np.ones((7, 5), np.float32))
    with pytest.raises(ConfigError, match="expected one traced table") as err:
        rewrite_int8_embedding(graph, codes, scales)
    assert "\n" not in str(err.value)


def test_footprint_finds_the_table_and_projects_it_per_row(exported, model):
    """bench/footprint.py: the table is its own group (1 byte per code, 4 per row scale), projected
    with the full-size table's parameters and rows."""
    from bench.footprint import embedding_table, projected

    _, path = exported
    graph = onnx.load(str(path))
    inits = {i.name: i for i in graph.graph.initializer}
    codes, scales = embedding_table(graph, inits)
    assert inits[codes].data_type == onnx.TensorProto.INT8 and list(inits[scales].dims) == [inits[codes].dims[0]]
    rate = {"quantized": 0.0, "embedding": 1.0, "row_scale": 4.0, "rest": 4.0}
    params = {"quantizable": 0, "blocks": 0, "embedding": 151936 * 4096, "rows": 151936, "all": 10**9}
    table = 151936 * 4096 * 1 + 151936 * 4  # codes + one fp32 scale per row
    assert projected(params, rate) == table + (10**9 - 151936 * 4096) * 4


def test_manifest_records_the_table(model, edge_encoder, tmp_path):
    """As export/half.py's fp32-kept nodes: provenance.calibration.components.int8_embedding, per graph."""
    import json

    from qwen_image_edge.calib.component_export import export_components
    from qwen_image_edge.calib.components import parse_component_policy

    out = tmp_path / "export"
    manifest = export_components(model, parse_component_policy("text_encoder=int4"), out, qe=edge_encoder,
                                 graphs=["text_encoder"])
    assert manifest.graph("text_encoder").precision.value == "int4"
    components = json.loads((out / "manifest.json").read_text())["provenance"]["calibration"]["components"]
    record = components["int8_embedding"]["text_encoder"]
    codes, _ = edge_encoder.embedding
    assert record["precision"] == "int8" and [record["rows"], record["width"]] == list(codes.shape)
    assert components["text_encoder"]["policy"]["int8_embedding"] is True
