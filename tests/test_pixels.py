"""uint8 pixels against diffusers: ``qwen_image_edge.runtime.sampling.to_images`` (shared by the reference and the
runtime) against diffusers' ``VaeImageProcessor.postprocess``, and the PIL images of the reference and
the runtime against ``QwenImage21Pipeline(..., output_type="pil")`` for the same initial latents.

The other parity tests compare float outputs, or the runtime with our own reference: code the two
share (pixels -> PIL) cancels out there. Here diffusers is the judge of the final bytes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_image_edge.runtime.sampling import initial_noise, to_images
from tests.tiny_model import load_peer_pipeline


@pytest.fixture(scope="module")
def peer(tiny_model_dir):
    return load_peer_pipeline(tiny_model_dir)


def _diffusers_pil(pixels: np.ndarray) -> list[Image.Image]:
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor().postprocess(torch.from_numpy(pixels), output_type="pil")


@pytest.mark.parametrize("channels", [4, 3])
def test_to_images_is_diffusers_postprocess(channels):
    """Bit-exact: both do x*0.5+0.5 (== x/2+0.5 exactly in fp32), clamp to [0, 1], *255, round half to even.
    Values reach past [-1, 1] (a decoder without a final clamp, fp16 overshoot) and half of them land on
    the exact levels k/255, so truncation (floor) or a wrong [-1, 1] -> [0, 1] map shows on many pixels."""
    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1.2, 1.2, (2, channels, 16, 24)).astype(np.float32)  # [B, C, H, W]
    levels = rng.integers(0, 256, pixels[:, :, :8].shape)
    pixels[:, :, :8] = (2 * levels / 255 - 1).astype(np.float32)  # exact level k -> uint8 k
    ours, theirs = to_images(pixels), _diffusers_pil(pixels)
    for a, b in zip(ours, theirs, strict=True):
        assert a.mode == b.mode == ("RGBA" if channels == 4 else "RGB") and a.size == b.size == (24, 16)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.stack([np.asarray(a) for a in ours])[:, :8], levels.transpose(0, 2, 3, 1))


def _peer_pil(peer, prompt, seed, width, height, image=None, **kwargs) -> np.ndarray:
    noise = torch.from_numpy(initial_noise(seed, 1, height, width, 64))  # the latents ours draw for this seed
    with torch.no_grad():
        out = peer(prompt, image=image, height=height, width=width, num_inference_steps=2, latents=noise,
                   output_type="pil", use_kv_cache=False, output_resolution=64, **kwargs).images
    assert out[0].mode == "RGBA"
    return np.asarray(out[0]).astype(np.int16)


def _close_in_uint8(ours: Image.Image, theirs: np.ndarray) -> None:
    """fp32 float images agree to ~1e-6 of full scale (tests/test_pipeline.py, tests/test_runtime.py), i.e.
    ~3e-4 of one uint8 level: a value rounds the other way only within that distance of a .5 boundary, so at
    most ~3e-4 of the values may differ, by one level (0 measured). The bound, 1e-3 of the values, is ~3x that;
    truncation moves ~half the values by one level, a missing clamp or a wrong map by many levels."""
    assert ours.mode == "RGBA"
    a = np.asarray(ours).astype(np.int16)
    assert a.shape == theirs.shape
    diff = np.abs(a - theirs)
    assert diff.max() <= 1, f"max difference {diff.max()} levels"
    assert np.mean(diff > 0) <= 1e-3, f"{np.mean(diff > 0):.2%} of the values differ"


def test_generate_pixels_match_diffusers(peer, reference, runtime_pipe):
    kw = dict(width=96, height=64, steps=2, seed=5, negative_prompt="blurry", guidance=3.0)
    theirs = _peer_pil(peer, "a red circle", 5, 96, 64, negative_prompt="blurry", true_cfg_scale=3.0)
    _close_in_uint8(reference.generate("a red circle", progress=False, **kw), theirs)
    _close_in_uint8(runtime_pipe.generate("a red circle", **kw), theirs)


def test_edit_pixels_match_diffusers(peer, reference, runtime_pipe):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 4), dtype=np.uint8))
    kw = dict(width=64, height=64, steps=2, seed=7)
    theirs = _peer_pil(peer, "make it blue", 7, 64, 64, image=[image])
    _close_in_uint8(reference.edit([image], "make it blue", progress=False, **kw), theirs)
    _close_in_uint8(runtime_pipe.edit([image], "make it blue", **kw), theirs)
