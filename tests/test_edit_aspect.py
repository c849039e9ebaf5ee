"""Editing ordinary photos with a default export: every aspect ratio from 1:4 to 4:1.

Condition images are resized to about ``output_resolution**2`` pixels whatever their own size, so
a default export sizes its condition (and target) ranges by that area over the aspect range, not by
the output's longest side (which refused every 4:3 and 3:2 photo before).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from qwen_image2_ref.model_folder import load_model
from qwen_image_edge.export.iospec import condition_range
from qwen_image_edge.export.onnx_export import export_model
from qwen_image_edge.export.trt_profiles import BuildRanges, graph_ranges, wanted_ranges
from qwen_image_edge.runtime.edit import load_condition_images
from qwen_image_edge.runtime.errors import InputError
from qwen_image_edge.runtime.images import calculate_dimensions, condition_size, condition_sizes
from qwen_image_edge.runtime.manifest import load_manifest
from qwen_image_edge.runtime.pipeline import Pipeline
from tests.tiny_model import build_tiny_model

RATIOS = {"4:3": (4, 3), "3:2": (3, 2), "16:9": (16, 9), "1:4": (1, 4), "4:1": (4, 1)}


def _photo(ratio: tuple[int, int], scale: int = 40) -> Image.Image:
    """A photo-like RGB image of that aspect ratio (its own pixel size does not matter)."""
    w, h = ratio[0] * scale, ratio[1] * scale
    rng = np.random.default_rng(w * 7 + h)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("resolution", [64, 128, 1024])
def test_condition_sizes_are_every_size_an_aspect_in_range_gives(resolution):
    """The enumeration the export sizes its ranges from holds every size the resize rule gives for a
    ratio in [1/4, 4] (10,001 ratios, log-spaced, plus the ends), and nothing it never gives."""
    sizes = condition_sizes(resolution)
    ratios = np.concatenate([np.geomspace(0.25, 4.0, 10_001), [0.25, 4.0, 1.0]])
    seen = {calculate_dimensions(resolution * resolution, float(r)) for r in ratios}
    assert seen == sizes


@pytest.mark.parametrize("name", list(RATIOS))
def test_default_demo_export_edits_photos(demo_default_export, name):
    pipe = Pipeline.load(demo_default_export, threads=1)
    image = _photo(RATIOS[name])
    out = pipe.edit(image, "make the circle blue", steps=1, seed=0)
    # the output follows the condition image: about 128^2 pixels at the photo's aspect ratio
    assert out.size == condition_size(image, 128)
    w, h = out.size
    assert abs(w / h - RATIOS[name][0] / RATIOS[name][1]) < 0.35  # multiples of 32 at 128 px: 4:1 -> 256x64
    assert np.isfinite(np.asarray(out, np.float32)).all() and out.mode == "RGBA"


def test_default_demo_export_refuses_past_4_to_1_with_the_nearest_size(demo_default_export):
    pipe = Pipeline.load(demo_default_export, threads=1)
    with pytest.raises(InputError, match=r"\(500x100, aspect 5.00:1\): this export edits aspect ratios from 1:4 to "
                                         r"4:1; the nearest supported sizes are 400x100 \(crop\) or 500x125 \(pad\)"):
        pipe.edit(Image.new("RGB", (500, 100)), "make the circle blue", steps=1)


@pytest.fixture(scope="module")
def tiny_1024_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-1024")
    _, path = build_tiny_model(root, output_resolution=1024)
    # the tiny processor caps the vision tower at 128^2 pixels; Qwen3-VL's own cap (16,777,216) lets a
    # 1024^2 condition image through at full size, one vision slot per 2x2 latent tokens
    config = path / "processor" / "processor_config.json"
    data = json.loads(config.read_text())
    data["image_processor"]["size"]["longest_edge"] = 16_777_216
    config.write_text(json.dumps(data))
    out = root / "export"
    export_model(load_model(path), out)  # default options: max_resolution = output resolution
    return out


def test_default_export_at_1024_accepts_photo_ratios(tiny_1024_export):
    """Qwen-Image-2.1's output resolution: a 16:9 photo becomes 1376x768 (longest side past 1024);
    the runtime's checks, the exported ranges and the default TensorRT profiles all take it."""
    m = load_manifest(tiny_1024_export)
    cond = condition_range_of(m)
    assert (cond["min_side"], cond["max_side"], cond["max_aspect"]) == (512, 2048, 4.0)
    wanted = wanted_ranges(m, BuildRanges())
    enc = graph_ranges(m.graphs["vae_encoder"], wanted)
    dec = graph_ranges(m.graphs["vae_decoder"], wanted)
    n_c = graph_ranges(m.graphs["transformer"], wanted)["N_c"][2]
    n_t = graph_ranges(m.graphs["transformer"], wanted)["N_t"][2]
    for name, ratio in RATIOS.items():
        image = _photo(ratio)
        _, [(w, h)] = load_condition_images([image], m, 1024)  # raises on a refused image
        assert enc["Wc"][0] <= w <= enc["Wc"][2] and enc["Hc"][0] <= h <= enc["Hc"][2], name
        assert dec["W"][0] <= w <= dec["W"][2] and dec["H"][0] <= h <= dec["H"][2], name  # output follows it
        assert (w // 16) * (h // 16) <= min(n_c, n_t), name
    assert condition_size(_photo(RATIOS["16:9"]), 1024) == (1376, 768)


def condition_range_of(manifest) -> dict:
    return dataclasses.asdict(manifest.image.condition)


def test_edit_at_1024_runs_at_4_to_1(tiny_1024_export):
    """One real 4:1 edit through every graph at 1024 px: the condition image at 2048x512 through the
    vision and VAE encoders and the transformer (a small 256x64 output keeps it cheap)."""
    pipe = Pipeline.load(tiny_1024_export, threads=2)
    out = pipe.edit(_photo(RATIOS["4:1"]), "make it blue", steps=1, seed=0, width=256, height=64, output="np")
    assert out.shape == (1, 64, 256, 4) and np.isfinite(out).all()


def test_condition_range_matches_the_manifest_and_the_model(tiny_1024_export):
    m = load_manifest(tiny_1024_export)
    model_cfg = load_model(m.provenance.source["path"]).config
    assert m.image.condition == condition_range(model_cfg)
