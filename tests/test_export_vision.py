"""Editing graphs of an export: the Qwen3-VL vision tower and the text encoder's visual inputs.

The numpy tables that replace transformers' Python code (position-table resampling, 2-D rope,
per-image attention segments) are compared with transformers' own helpers; the exported graphs
with transformers' model at two image sizes and with one and two images (qwen_image_edge.export.validate).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qwen_image_edge.export.graphs import vision_tower
from qwen_image_edge.export.validate import validate
from qwen_image_edge.runtime.manifest import FORMAT_VERSION, load_manifest
from qwen_image_edge.runtime.vision import VisionTower, position_taps, rope_tables, segment_mask, visual_index

GRIDS = [[(1, 4, 4)], [(1, 4, 6), (1, 2, 4)], [(1, 6, 2), (1, 8, 8)]]


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    from qwen_image2_ref.model_folder import load_model
    from qwen_image_edge.export.onnx_export import export_model

    root = tmp_path_factory.mktemp("vis")
    model = load_model(tiny_model_dir)
    export_model(model, root / "export", graphs=["text_encoder", "vision_encoder"], max_resolution=128)
    return model, root / "export"


@pytest.mark.parametrize("grids", GRIDS)
def test_tables_match_transformers(exported, grids):
    from transformers.vision_utils import (
        get_vision_interpolation_indices_and_weights,
        get_vision_position_ids,
    )

    visual = exported[0].encoder.model.model.visual
    tower = vision_tower(exported[0].encoder.model)
    grid = torch.tensor(grids)
    index, weight = position_taps(np.asarray(grids), tower)
    ref_index, ref_weight = get_vision_interpolation_indices_and_weights(
        grid, visual.num_grid_per_side, mode="bilinear", align_corners=True, spatial_merge_size=tower.merge_size)
    np.testing.assert_array_equal(index, ref_index.numpy())
    np.testing.assert_array_equal(weight, ref_weight.numpy())  # same float32 operations in the same order

    cos, sin = rope_tables(np.asarray(grids), tower)
    ref_cos, ref_sin = visual.rotary_pos_emb(torch.zeros(1), get_vision_position_ids(grid, tower.merge_size))
    # numpy's and torch's float32 pow/cos may differ in the last bit
    np.testing.assert_allclose(cos, ref_cos.numpy(), atol=2e-6)
    np.testing.assert_allclose(sin, ref_sin.numpy(), atol=2e-6)

    sizes = [h * w for _, h, w in grids]
    mask = segment_mask(np.asarray(grids))
    assert mask.shape == (sum(sizes),) * 2 and mask.sum() == sum(s * s for s in sizes)


def test_validate_covers_edit_graphs(exported):
    model, export_dir = exported
    report = validate(export_dir, model)
    assert report.passed, report.table()
    cases = {g.graph: [c.shape for c in g.cases] for g in report.graphs}
    for n in (0, 1, 2):
        assert any(f"images={n}" in c for c in cases["text_encoder"]), cases
    assert sum("visual_embeds" in c for c in cases["vision_encoder"]) >= 2
    assert sum("deepstack_embeds" in c for c in cases["vision_encoder"]) >= 2
    for g in report.graphs:
        assert all(c.rel_l2 <= 1e-5 for c in g.cases)


def test_manifest_records_the_edit_graphs(exported):
    model, export_dir = exported
    manifest = load_manifest(export_dir)
    te = [t.name for t in manifest.graph("text_encoder").inputs]
    assert te[3:] == ["visual_embeds", "deepstack_embeds", "visual_index"]
    vis = manifest.graph("vision_encoder")
    assert [t.name for t in vis.outputs] == ["visual_embeds", "deepstack_embeds"]
    assert manifest.graph("text_encoder").dim_ranges["N_vis"][0] == 0  # text-only prompts use the same graph
    cfg = model.encoder.model.config.vision_config
    assert manifest.image.vision_tower == VisionTower(
        merge_size=cfg.spatial_merge_size, head_dim=cfg.hidden_size // cfg.num_heads, rope_theta=10000.0, grid_side=8)
    assert json.loads((export_dir / "manifest.json").read_text())["format_version"] == FORMAT_VERSION


def test_visual_inputs_reach_the_output(exported):
    """The validation can fail: the visual rows and the deepstack features both move the states."""
    import onnxruntime as ort

    from qwen_image_edge.runtime.tokens import mrope_position_ids

    model, export_dir = exported
    enc = model.encoder
    session = ort.InferenceSession(str(export_dir / "text_encoder" / "model.onnx"), providers=["CPUExecutionProvider"])
    grids = np.asarray([(1, 4, 4)])
    batch = enc.tokenizer.encode(["make it blue"], grids)
    rng = np.random.default_rng(0)
    d = model.config.encoder.hidden_size
    feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
             "position_ids": mrope_position_ids(batch, 2), "visual_embeds": rng.standard_normal((4, d), np.float32),
             "deepstack_embeds": rng.standard_normal((1, 4, d), np.float32), "visual_index": visual_index(batch, 4)}
    base = session.run(None, feeds)[0]
    after = batch.image_pad_mask[0].nonzero()[0][-1] + 1  # text after the image reads it
    for name in ("visual_embeds", "deepstack_embeds"):
        changed = session.run(None, {**feeds, name: np.zeros_like(feeds[name])})[0]
        assert np.abs(changed[0, after:] - base[0, after:]).max() > 1e-2, name
