"""Reference pipeline parity with diffusers' QwenImage21Pipeline on the same tiny components.

Both sides start from the same packed initial latents and run the same fp32 ops; they differ
only in summation order (diffusers attends segment by segment, we use one masked attention), so
pixels agree to rounding: measured ~5e-7 on [0, 1] outputs; the bound 1e-5 leaves room for a
different BLAS without letting a wrong block, mask or schedule through (those move pixels by >1e-2).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_image2_ref.model_folder import load_model, load_pipeline
from qwen_image_edge.runtime.errors import CheckpointError, InputError, NumericalError
from qwen_image_edge.runtime.sampling import initial_noise
from tests.tiny_model import load_peer_pipeline

TOL = 1e-5
STEPS = 3


@pytest.fixture(scope="module")
def folder(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def ours(folder):
    return load_pipeline(folder)


@pytest.fixture(scope="module")
def peer(folder):
    return load_peer_pipeline(folder)


def _peer_run(peer, prompt, seed, width, height, image=None, **kwargs):
    batch = 1 if isinstance(prompt, str) else len(prompt)
    noise = torch.from_numpy(initial_noise(seed, batch, height, width, 64))
    with torch.no_grad():
        return peer(prompt, image=image, height=height, width=width, num_inference_steps=STEPS, latents=noise,
                    output_type="np", use_kv_cache=False, output_resolution=64, **kwargs).images


def _rgba(seed, w, h):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8))


def test_text_to_image_parity(ours, peer):
    ref = _peer_run(peer, "a red circle on the left", 3, 96, 64)
    out = ours.generate("a red circle on the left", width=96, height=64, steps=STEPS, seed=3, output="np",
                        progress=False)
    assert out.shape == ref.shape == (1, 64, 96, 4)
    assert np.abs(out - ref).max() <= TOL


def test_batch_of_prompts_parity(ours, peer):
    prompts = ["a blue square", "the green triangle is at the top right, next to a red circle"]
    ref = _peer_run(peer, prompts, 5, 64, 64)
    out = ours.generate(prompts, width=64, height=64, steps=STEPS, seed=5, output="np", progress=False)
    assert np.abs(out - ref).max() <= TOL


def test_guidance_parity(ours, peer):
    ref = _peer_run(peer, "a red circle", 7, 64, 64, negative_prompt="blurry", true_cfg_scale=3.0)
    out = ours.generate("a red circle", negative_prompt="blurry", guidance=3.0, width=64, height=64,
                        steps=STEPS, seed=7, output="np", progress=False)
    assert np.abs(out - ref).max() <= TOL
    plain = ours.generate("a red circle", width=64, height=64, steps=STEPS, seed=7, output="np", progress=False)
    assert np.abs(out - plain).max() > 1e-3  # guidance changed the image


def test_edit_parity_one_image(ours, peer):
    image = _rgba(11, 96, 64)
    ref = _peer_run(peer, "make it blue", 9, 96, 64, image=[image])
    out = ours.edit([image], "make it blue", width=96, height=64, steps=STEPS, seed=9, output="np",
                    progress=False)
    assert out.shape == ref.shape == (1, 64, 96, 4)
    assert np.abs(out - ref).max() <= TOL


def test_edit_size_follows_the_image(ours):
    # 128x64 at a 64^2 area: sqrt(4096 * 2) = 90.5 -> 96 wide, 45.3 -> 32 high (multiples of 32)
    img = ours.edit([_rgba(3, 128, 64)], "make it blue", steps=1, seed=0, progress=False)
    assert img.size == (96, 32)


def test_edit_parity_two_images(ours, peer):
    images = [_rgba(12, 64, 64), _rgba(13, 64, 128)]
    ref = _peer_run(peer, "swap them", 4, 64, 96, image=images)
    out = ours.edit(images, "swap them", width=64, height=96, steps=STEPS, seed=4, output="np", progress=False)
    assert np.abs(out - ref).max() <= TOL


def test_prompt_and_image_change_the_output(ours):
    """Guards against a vacuous parity: the condition must move the pixels."""
    kw = dict(width=64, height=64, steps=STEPS, seed=1, output="np", progress=False)
    a = ours.generate("a red circle", **kw)
    b = ours.generate("a green square at the bottom", **kw)
    assert np.abs(a - b).mean() > 1e-3
    e1 = ours.edit([_rgba(1, 64, 64)], "make it blue", **kw)
    e2 = ours.edit([_rgba(2, 64, 64)], "make it blue", **kw)
    assert np.abs(e1 - e2).mean() > 1e-3


def test_pil_output_and_seed(ours):
    img = ours.generate("a red circle", width=64, height=32, steps=2, seed=0, progress=False)
    assert img.mode == "RGBA" and img.size == (64, 32)
    (again,) = ours.generate(["a red circle"], width=64, height=32, steps=2, seed=0, progress=False)  # a list -> a list
    assert np.array_equal(np.asarray(img), np.asarray(again))


def test_diffusers_written_folder_loads(ours, peer, tmp_path):
    """A folder written by QwenImage21Pipeline.save_pretrained loads as it is and samples the same."""
    peer.save_pretrained(tmp_path / "peer")
    again = load_pipeline(tmp_path / "peer")
    kw = dict(width=64, height=64, steps=2, seed=2, output="np", progress=False)
    np.testing.assert_array_equal(again.generate("a red circle", **kw), ours.generate("a red circle", **kw))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), "steps: expected a positive integer, got 0"),
        (dict(steps=-2), "steps: expected a positive integer, got -2"),
        (dict(width=16), "width: expected 32..4096 pixels, got 16"),
        (dict(width=80), "width 80: expected a multiple of 32 pixels .*try 64 or 96"),
        (dict(guidance=0.5), "guidance: expected a number >= 1"),
        (dict(seed=-1), "seed: expected a non-negative integer"),
    ],
)
def test_bad_generate_input(ours, kwargs, match):
    with pytest.raises(InputError, match=match):
        ours.generate("a red circle", progress=False, **kwargs)


def test_prompt_over_limit(ours):
    with pytest.raises(InputError, match="1025 tokens, over the limit of 1024"):
        ours.generate("a" + " a" * 1024, steps=1, progress=False)


def test_bad_edit_input(ours, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    with pytest.raises(InputError, match="not a readable image"):
        ours.edit([not_image], "make it blue", steps=1, progress=False)
    with pytest.raises(InputError, match="at most 10 condition images"):
        ours.edit([_rgba(0, 32, 32)] * 11, "make it blue", steps=1, progress=False)
    with pytest.raises(InputError, match="at least one condition image"):
        ours.edit([], "make it blue", steps=1, progress=False)


def test_missing_model_folder(tmp_path):
    with pytest.raises(CheckpointError, match="model_index.json"):
        load_model(tmp_path)


def test_default_negative_prompt_is_used_under_guidance(ours):
    import dataclasses

    kw = dict(width=64, height=64, steps=2, seed=3, output="np", progress=False)
    explicit = ours.generate("a red circle", negative_prompt="blurry", guidance=3.0, **kw)
    saved = ours.config
    try:
        ours.config = dataclasses.replace(
            saved, pipeline=dataclasses.replace(saved.pipeline, default_negative_prompt="blurry")
        )
        implicit = ours.generate("a red circle", guidance=3.0, **kw)
    finally:
        ours.config = saved
    np.testing.assert_array_equal(implicit, explicit)


def test_kv_cache_option_gives_the_same_images(ours, peer):
    kw = dict(width=64, height=64, steps=STEPS, seed=6, output="np", progress=False)
    plain = ours.edit([_rgba(5, 64, 64)], "make it blue", negative_prompt="x", guidance=2.0, **kw)
    ours.use_kv_cache = True
    try:
        cached = ours.edit([_rgba(5, 64, 64)], "make it blue", negative_prompt="x", guidance=2.0, **kw)
    finally:
        ours.use_kv_cache = False
    assert np.abs(cached - plain).max() <= TOL
    noise = torch.from_numpy(initial_noise(6, 1, 64, 64, 64))
    with torch.no_grad():
        ref = peer("make it blue", image=[_rgba(5, 64, 64)], negative_prompt="x", true_cfg_scale=2.0, height=64,
                   width=64, num_inference_steps=STEPS, latents=noise, output_type="np", use_kv_cache=True,
                   output_resolution=64).images
    assert np.abs(cached - ref).max() <= TOL


def test_nan_stops_the_reference_and_names_the_step(ours, monkeypatch):
    """As the runtime does: a NaN in the velocity stops at its step, one in the decoded pixels stops
    before any image is made (it used to come out as an all-black PNG)."""
    bad = np.zeros((1, 16, 64), np.float32)
    bad[0, 3, 5] = np.nan
    with pytest.raises(NumericalError, match=r"transformer output 'velocity': NaN or Inf at step 0; refusing"):
        ours.generate("a red circle", width=64, height=64, steps=2, latents=bad, progress=False)
    real = ours.vae.decode_normalized
    monkeypatch.setattr(ours.vae, "decode_normalized", lambda z: real(z) * torch.tensor(float("inf")))
    with pytest.raises(NumericalError, match=r"vae_decoder output 'image': NaN or Inf; refusing"):
        ours.generate("a red circle", width=64, height=64, steps=1, seed=0, progress=False)
