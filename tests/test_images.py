"""runtime/images.py against the peers: transformers' Qwen2-VL PIL image processor (what
Qwen3VLProcessor uses without torchvision) and diffusers' QwenImage21 / VaeImageProcessor rules."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from qwen_image_edge.runtime.errors import InputError
from qwen_image_edge.runtime.images import (
    VisionConfig,
    calculate_dimensions,
    condition_size,
    load_image,
    resize_rgba,
    smart_resize,
    vae_input,
    vision_patches,
    vision_rgb,
)

# Small min/max pixels so tiny images hit the upscale, keep and downscale branches of smart_resize.
CFG = VisionConfig(min_pixels=64 * 64, max_pixels=160 * 160)


def _hf_processor(cfg: VisionConfig):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=cfg.patch_size,
        temporal_patch_size=cfg.temporal_patch_size,
        merge_size=cfg.merge_size,
        min_pixels=cfg.min_pixels,
        max_pixels=cfg.max_pixels,
        image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std),
    )


def _random_image(rng, width, height, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(data[..., 0] if channels == 1 else data, mode)


# (width, height): below min pixels, inside the range, above max pixels, odd sizes, wide and tall.
SIZES = [(40, 30), (97, 61), (128, 128), (300, 90), (50, 210), (333, 257), (31, 500)]


@pytest.mark.parametrize("size", SIZES)
def test_vision_patches_match_transformers(size):
    rng = np.random.default_rng(size[0] * 1000 + size[1])
    image = _random_image(rng, *size)
    ours, grid = vision_patches([image], CFG)
    theirs = _hf_processor(CFG)(images=[image], return_tensors="np")
    np.testing.assert_array_equal(grid, theirs["image_grid_thw"])
    assert ours.dtype == np.float32 and ours.shape == theirs["pixel_values"].shape
    np.testing.assert_array_equal(ours, theirs["pixel_values"])


def test_vision_patches_batch_and_modes_match_transformers():
    rng = np.random.default_rng(1)
    images = [_random_image(rng, 70, 45), _random_image(rng, 64, 96, "L"), _random_image(rng, 130, 33)]
    cfg = VisionConfig(
        min_pixels=32 * 32, max_pixels=128 * 128, image_mean=(0.48, 0.45, 0.4), image_std=(0.27, 0.26, 0.28)
    )
    ours, grid = vision_patches(images, cfg)
    theirs = _hf_processor(cfg)(images=images, return_tensors="np")
    np.testing.assert_array_equal(grid, theirs["image_grid_thw"])
    np.testing.assert_array_equal(ours, theirs["pixel_values"])
    # Each image's patch count is its grid product, in order.
    assert ours.shape[0] == int(np.prod(grid, axis=1).sum())


def test_patch_order_is_not_plain_raster():
    """A wrong (row-major, no merge windows) patch order must differ from transformers'."""
    rng = np.random.default_rng(2)
    image = _random_image(rng, 128, 64)
    theirs = _hf_processor(CFG)(images=[image], return_tensors="np")["pixel_values"]
    ours, grid = vision_patches([image], CFG)
    _, gh, gw = grid[0]
    p = CFG.patch_size
    raster = ours.reshape(gh // 2, gw // 2, 2, 2, -1).transpose(0, 2, 1, 3, 4).reshape(gh * gw, -1)
    assert not np.array_equal(raster, theirs)
    # Within a patch the layout is (C, T, P, P): both temporal copies are the same frame.
    patch = ours[0].reshape(3, CFG.temporal_patch_size, p, p)
    np.testing.assert_array_equal(patch[:, 0], patch[:, 1])


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = np.random.default_rng(3)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(8, 3000, size=2))
        if max(h, w) / min(h, w) > 200:
            continue
        for lo, hi in ((56 * 56, 28 * 28 * 1280), (65536, 16777216), (1024, 256 * 256)):
            assert smart_resize(h, w, 32, lo, hi) == hf_smart_resize(h, w, 32, lo, hi)
    with pytest.raises(InputError, match="aspect ratio"):
        smart_resize(10, 2500, 32, 1024, 65536)


def test_calculate_dimensions_matches_diffusers():
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_dimensions as peer

    for area in (128 * 128, 512 * 512, 1024 * 1024):
        for ratio in (1.0, 0.5, 16 / 9, 3 / 4, 2.37, 0.31):
            w, h, _ = peer(area, ratio)
            assert calculate_dimensions(area, ratio) == (w, h)
            assert w % 32 == 0 and h % 32 == 0


@pytest.mark.parametrize("mode", ["RGBA", "RGB"])
def test_vae_input_matches_diffusers(mode):
    """The pipeline's condition-image path: RGBA, LANCZOS resize, [-1, 1], all four channels."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    rng = np.random.default_rng(4)
    image = _random_image(rng, 150, 90, mode)
    width, height = condition_size(image, 128)
    peer = VaeImageProcessor(vae_scale_factor=16, vae_latent_channels=64)
    rgba = image.convert("RGBA") if image.mode != "RGBA" else image
    assert np.array_equal(
        np.asarray(resize_rgba(image, width, height)), np.asarray(peer.resize(rgba, height, width))
    )
    theirs = peer.preprocess(rgba, height=height, width=width)
    ours = vae_input(image, width, height)
    assert ours.shape == (1, 4, height, width) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs.to(torch.float32).numpy())
    if mode == "RGB":
        np.testing.assert_array_equal(ours[:, 3], 1.0)


def test_vision_rgb_composites_alpha_on_white():
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    alpha = np.zeros((20, 30, 1), dtype=np.uint8)
    alpha[:, 15:] = 255
    out = np.asarray(vision_rgb(Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA")))
    np.testing.assert_array_equal(out[:, :15], 255)
    np.testing.assert_array_equal(out[:, 15:], rgb[:, 15:])


def test_load_image(tmp_path):
    rng = np.random.default_rng(6)
    array = rng.integers(0, 256, size=(12, 17, 4), dtype=np.uint8)
    Image.fromarray(array, "RGBA").save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png")
    assert loaded.mode == "RGBA" and np.array_equal(np.asarray(loaded), array)
    assert np.array_equal(np.asarray(load_image(array)), array)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="notes.txt: not a readable image"):
        load_image(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InputError, match=r"float pixels must lie in \[0, 1\]"):  # 0..255 floats: not guessed
        load_image(array.astype(np.float32))
    with pytest.raises(InputError, match="expected a path"):
        load_image(42)


def test_vision_config_round_trips_processor_json():
    cfg = VisionConfig(min_pixels=1024, max_pixels=4096 * 16, image_mean=(0.1, 0.2, 0.3))
    assert VisionConfig.from_dict(cfg.to_dict()) == cfg
    assert VisionConfig.from_dict({"image_processor": cfg.to_dict()}) == cfg
    legacy = VisionConfig.from_dict({"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 16})
    assert (legacy.min_pixels, legacy.max_pixels, legacy.patch_size) == (3136, 12845056, 16)


def test_runtime_modules_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
        "import qwen_image_edge.runtime.images, qwen_image_edge.runtime.tokens"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
