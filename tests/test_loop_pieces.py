"""The loop pieces both pipelines share (qwen_image_edge.runtime.schedule / sampling / edit): one
formula each, on numpy arrays and torch tensors alike, and one request resolution."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_image_edge.runtime.edit import condition_images
from qwen_image_edge.runtime.errors import InputError
from qwen_image_edge.runtime.images import condition_size
from qwen_image_edge.runtime.sampling import convert_pixels, one_or_list, resolve_request, to_images
from qwen_image_edge.runtime.schedule import SchedulerConfig, apply_guidance, euler_step, make_sigmas
from qwen_image_edge.runtime.sections import ScheduleSection

RNG = np.random.default_rng(0)
X, V, V_NEG = (RNG.standard_normal((2, 16, 8), dtype=np.float32) for _ in range(3))


def test_euler_step_is_one_formula_for_numpy_and_torch():
    sigmas = make_sigmas(4, 16, SchedulerConfig())  # float32 grid, as both loops use it
    for i in range(4):
        ours = euler_step(X, V, sigmas[i], sigmas[i + 1])
        theirs = euler_step(torch.from_numpy(X), torch.from_numpy(V), sigmas[i], sigmas[i + 1])
        assert ours.dtype == np.float32 and theirs.dtype == torch.float32
        np.testing.assert_array_equal(ours, theirs.numpy())  # same float32 ops, bit for bit
        dt = np.float32(sigmas[i + 1]) - np.float32(sigmas[i])  # the step diffusers takes, in float32
        np.testing.assert_array_equal(ours, X + dt * V)


@pytest.mark.parametrize("scale", [1.0, 2.5, 4.0])
def test_guidance_is_one_formula_for_numpy_and_torch(scale):
    ours = apply_guidance(V, V_NEG, scale)
    theirs = apply_guidance(torch.from_numpy(V), torch.from_numpy(V_NEG), scale)
    assert ours.dtype == np.float32 and theirs.dtype == torch.float32
    np.testing.assert_array_equal(ours, theirs.numpy())
    np.testing.assert_array_equal(ours, V_NEG + np.float32(scale) * (V - V_NEG))  # from the unconditional side
    if scale == 1.0:
        np.testing.assert_allclose(ours, V, rtol=0, atol=1e-6)


def _schedule(**kw) -> ScheduleSection:
    base = dict(scheduler=SchedulerConfig(), num_steps=40, sigmas=None, guidance_scale=4.0, guidance_distilled=False,
                default_negative_prompt=" ")
    return ScheduleSection(**{**base, **kw})


def test_request_defaults_come_from_the_schedule():
    r = resolve_request("a cat", None, None, None, None, None, 3, default_size=(64, 96), schedule=_schedule(),
                        vae_factor=16)
    assert (r.steps, r.guidance, r.negative_prompts, r.width, r.height) == (40, 4.0, (" ",), 64, 96)
    assert r.latent_shape == (6, 4) and r.use_guidance
    fixed = resolve_request(["a", "b"], None, None, None, None, 1.0, 0, default_size=(64, 64),
                            schedule=_schedule(sigmas=(1.0, 0.5)), vae_factor=16)
    assert fixed.steps == 2 and fixed.negative_prompts is None and not fixed.use_guidance
    # the factor is the model's, not a constant: 8 px per latent side takes multiples of 16
    assert resolve_request("a", None, 48, 32, 1, 1.0, 0, default_size=(64, 64), schedule=_schedule(),
                           vae_factor=8).latent_shape == (4, 6)
    with pytest.raises(InputError, match="width 48: expected a multiple of 32"):
        resolve_request("a", None, 48, 64, 1, 1.0, 0, default_size=(64, 64), schedule=_schedule(), vae_factor=16)
    with pytest.raises(InputError, match=r"output: expected one of \['pil', 'np', 'latent'\], got 'png'"):
        resolve_request("a", None, None, None, 1, 1.0, 0, default_size=(64, 64), schedule=_schedule(), vae_factor=16,
                        output="png")


def test_request_warnings(caplog):
    with caplog.at_level(logging.WARNING):
        resolve_request("a", "b", None, None, 1, 1.0, 0, default_size=(64, 64), schedule=_schedule(), vae_factor=16)
        resolve_request("a", "b", None, None, 1, 2.0, 0, default_size=(64, 64),
                        schedule=_schedule(guidance_distilled=True), vae_factor=16)
    text = caplog.text
    assert "negative_prompt is ignored: guidance 1.00" in text and "guidance distilled in" in text


def test_condition_image_checks():
    img = Image.new("RGBA", (128, 64))
    pil, sizes = condition_images(np.zeros((64, 128, 4), np.uint8), 2, 64)  # one image, not in a list
    assert len(pil) == 1 and sizes == [condition_size(img, 64)] == [(96, 32)]
    with pytest.raises(InputError, match="at most 2 condition images, got 3"):
        condition_images([img] * 3, 2, 64)
    with pytest.raises(InputError, match="at least one condition image"):
        condition_images([], 2, 64)
    with pytest.raises(InputError, match="condition image 1: "):
        condition_images([img, "/nowhere/missing.png"], 2, 64)


def test_pixels_and_return_convention():
    pixels = np.linspace(-1.2, 1.2, 2 * 4 * 3 * 5, dtype=np.float32).reshape(2, 4, 3, 5)  # [B, C, H, W]
    unit = convert_pixels(pixels, "np")
    assert unit.shape == (2, 3, 5, 4) and unit.min() == 0.0 and unit.max() == 1.0
    images = convert_pixels(pixels, "pil")
    assert [np.asarray(i).tolist() for i in images] == [np.asarray(i).tolist() for i in to_images(pixels)]
    np.testing.assert_array_equal(np.asarray(images[1]), np.round(unit[1] * 255).astype(np.uint8))
    assert one_or_list(images, "a", "pil") is images[0]
    assert one_or_list(images, ["a", "b"], "pil") is images
    assert one_or_list(unit, "a", "np") is unit  # arrays stay batched


def test_diffusers_keyword_names(runtime_pipe, reference):
    """num_inference_steps / guidance_scale are aliases of steps / guidance in both pipelines (same
    image), generator= is refused naming seed=, both spellings at once and unknown names are
    InputErrors that say what to write."""
    for pipe in (runtime_pipe, reference):
        kw = {"progress": False} if pipe is reference else {}
        ours = pipe.generate("a red circle", steps=2, guidance=3.0, seed=4, output="latent", negative_prompt="blurry",
                             **kw)
        theirs = pipe.generate("a red circle", num_inference_steps=2, guidance_scale=3.0, seed=4, output="latent",
                               negative_prompt="blurry", **kw)
        np.testing.assert_array_equal(ours, theirs)
        other = pipe.generate("a red circle", num_inference_steps=2, guidance_scale=1.0, seed=4, output="latent",
                              negative_prompt="blurry", **kw)
        assert not np.array_equal(ours, other)  # the alias reaches the sampler (no guidance at 1)
        with pytest.raises(InputError, match=r"generator= is diffusers' torch.Generator; pass seed=<int>"):
            pipe.generate("a red circle", generator=object(), **kw)
        with pytest.raises(InputError, match=r"got both steps= and diffusers' num_inference_steps="):
            pipe.generate("a red circle", steps=2, num_inference_steps=3, **kw)
        with pytest.raises(InputError, match=r"unknown keyword 'sampler'; expected .*steps \(num_inference_steps\)"):
            pipe.generate("a red circle", sampler="euler", **kw)
