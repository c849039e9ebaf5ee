"""The device-resident denoising loop (runtime/device_loop.py) against the host numpy loop.

Bytes crossing host and device are measured with the counting backend (onnxruntime on the CPU
modelled as a device). A step's bytes are ``total(steps=3) - total(steps=2)``: everything the loop
moves for one more step, measured rather than assumed. Both loops run the same fp32 update (the
``sampler_step`` graph is the numpy formula), on the same onnxruntime CPU kernels here.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from qwen_image_edge.runtime import schedule
from qwen_image_edge.runtime.errors import BackendError, ManifestError
from qwen_image_edge.runtime.pipeline import Pipeline
from tests.test_runtime import psnr

KIB = 1024
RNG = np.random.default_rng(5)
IMAGES = [Image.fromarray(RNG.integers(0, 256, (64, 64, 4), dtype=np.uint8)),
          Image.fromarray(RNG.integers(0, 256, (48, 80, 3), dtype=np.uint8))]
SHORT, LONG = "a cat", "a small red cat sitting on a green mat beside a tall blue vase under a window at dawn"


@pytest.fixture(scope="module")
def pipes(tiny_export):
    """(host loop over onnxruntime, device loop over the counting backend, host loop over it),
    for the KV-cache pair (the default) and the single transformer graph."""
    out = {}
    for kv in (True, False):
        out[kv] = (Pipeline.load(tiny_export[1], threads=1, kv_cache=kv),
                   Pipeline.load(tiny_export[1], backend="counting", threads=1, kv_cache=kv),
                   Pipeline.load(tiny_export[1], backend="counting", threads=1, kv_cache=kv, device_loop=False))
    return out


def _call(pipe, prompt, images, steps, guided, **kw):
    kw = dict(steps=steps, seed=3, output="np", **kw)
    if guided:
        kw.update(negative_prompt="blurry", guidance=4.0)
    else:
        kw.update(guidance=1.0)
    return pipe.edit(images, prompt, **kw) if images else pipe.generate(prompt, width=64, height=64, **kw)


def _per_step(pipe, prompt, images, guided) -> tuple[int, int]:
    """(bytes of one more step, bytes of a 2-step image) under the counting backend."""
    traffic, totals = pipe.backend.traffic, []
    for steps in (2, 3):
        traffic.reset()
        _call(pipe, prompt, images, steps, guided)
        totals.append(traffic.total)
    return totals[1] - totals[0], totals[0]


def test_loops_are_chosen_as_asked(pipes, tiny_export):
    host, device, counted_host = pipes[True]
    assert host.device is None  # onnxruntime on the CPU: no device, the numpy loop
    assert device.device is not None and "sampler_step" in device.sessions
    assert counted_host.device is None and "sampler_step" not in counted_host.sessions
    with pytest.raises(BackendError, match="device_loop=True: backend 'onnxruntime' has no device"):
        Pipeline.load(tiny_export[1], threads=1, device_loop=True)


@pytest.mark.parametrize("kv", [True, False], ids=["kv-pair", "single-graph"])
@pytest.mark.parametrize("images", [0, 1, 2], ids=["text", "edit-1-image", "edit-2-images"])
@pytest.mark.parametrize("guided", [False, True], ids=["no-guidance", "guidance"])
def test_device_loop_bytes_per_step_are_constant_and_tiny(pipes, kv, images, guided):
    """<= 1 KiB per step on the device loop whatever the prompt and images (measured: 16 B, 20 B
    with guidance: a float32 timestep per transformer call and three schedule scalars), against the
    host loop's, which grows with the prompt and the condition images (the KV cache or text states
    and masks cross at every step)."""
    _, device, host = pipes[kv]
    imgs = IMAGES[:images]
    dev_short, _ = _per_step(device, SHORT, imgs, guided)
    dev_long, _ = _per_step(device, LONG, imgs, guided)
    assert dev_short == dev_long <= KIB
    assert dev_short == 4 * (2 if guided else 1) + 12  # timestep [1] per call; guidance, sigma, sigma_next
    host_short, _ = _per_step(host, SHORT, imgs, guided)
    host_long, _ = _per_step(host, LONG, imgs, guided)
    assert host_long > host_short > 10 * KIB


def test_host_loop_bytes_grow_with_condition_images(pipes):
    _, device, host = pipes[True]
    one, two = (_per_step(host, SHORT, IMAGES[:n], False)[0] for n in (1, 2))
    assert two > one
    assert len({_per_step(device, SHORT, IMAGES[:n], False)[0] for n in (0, 1, 2)}) == 1


@pytest.mark.parametrize("kv", [True, False], ids=["kv-pair", "single-graph"])
@pytest.mark.parametrize("images, guided", [(0, False), (0, True), (1, True), (2, False)])
def test_device_and_host_loops_give_the_same_images(pipes, kv, images, guided):
    """The same fp32 ops on the same kernels: equal to the last bit here (measured 0.0); the bound
    allows one float32 rounding of a value in [0, 1], in case a backend fuses the update."""
    host, device, _ = pipes[kv]
    a = _call(host, SHORT, IMAGES[:images], 3, guided)
    b = _call(device, SHORT, IMAGES[:images], 3, guided)
    assert a.shape == b.shape and np.abs(a - b).max() <= 2.0 ** -24


def test_latent_output_and_callback_match(pipes):
    """The callback sees the same latents at every step (the device loop downloads them for it),
    and ``output="latent"`` returns the same final latents."""
    host, device, _ = pipes[True]
    seen = {"host": [], "device": []}
    for pipe, steps_seen in ((host, seen["host"]), (device, seen["device"])):
        _call(pipe, SHORT, [], 3, True, callback=lambda i, n, x, s=steps_seen: s.append((i, n, x.copy())))
    assert [(i, n) for i, n, _ in seen["host"]] == [(i, n) for i, n, _ in seen["device"]] == [(0, 3), (1, 3), (2, 3)]
    for (_, _, a), (_, _, b) in zip(seen["host"], seen["device"]):
        np.testing.assert_array_equal(a, b)
    kw = dict(steps=3, seed=3, width=64, height=64, output="latent", negative_prompt="blurry", guidance=4.0)
    np.testing.assert_array_equal(host.generate(SHORT, **kw), device.generate(SHORT, **kw))


def test_sampler_step_graph_is_the_host_update(tiny_export, runtime_pipe):
    """The exported graph against schedule.apply_guidance + euler_step and decode_pixels' unpacking;
    guidance 1 with the velocity fed twice is the unguided update."""
    from qwen_image_edge.runtime.manifest import load_manifest

    manifest = load_manifest(tiny_export[1], verify_hashes=False)
    spec = manifest.graph("sampler_step")
    session = ort.InferenceSession(str(tiny_export[1] / spec.file), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for b, h, w, g in [(1, 2, 2, 1.0), (2, 3, 4, 4.5)]:
        x, v, vu = (rng.standard_normal((b, h * w, 64), dtype=np.float32) for _ in range(3))
        vu = v if g == 1.0 else vu
        got, z = session.run(None, {"latents": x, "velocity": v, "velocity_uncond": vu,
                                    "guidance": np.float32([g]), "sigma": np.float32([0.8]),
                                    "sigma_next": np.float32([0.55]), "latent_grid": np.zeros((h, w), bool)})
        want = schedule.euler_step(x, schedule.apply_guidance(v, vu, g), 0.8, 0.55)
        if g == 1.0:
            np.testing.assert_array_equal(want, schedule.euler_step(x, v, 0.8, 0.55))
        # the same three float32 ops in the same order: equal (one rounding each, no reassociation)
        np.testing.assert_array_equal(got, want)
        unpacked = want.transpose(0, 2, 1).reshape(b, 64, h, w) * runtime_pipe._std + runtime_pipe._mean
        np.testing.assert_allclose(z, unpacked, rtol=2.0 ** -23, atol=0)


def test_an_export_without_sampler_step_runs_the_host_loop(tiny_export, tmp_path):
    """Exports written before sampler_step load and run (numpy loop); only device_loop=True refuses."""
    old = tmp_path / "old"
    shutil.copytree(tiny_export[1], old)
    manifest = json.loads((old / "manifest.json").read_text())
    shutil.rmtree(old / "sampler_step")
    del manifest["graphs"]["sampler_step"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    pipe = Pipeline.load(old, backend="counting", threads=1)
    assert pipe.device is None
    new = Pipeline.load(tiny_export[1], threads=1)
    kw = dict(steps=2, seed=1, width=64, height=64, output="np")
    np.testing.assert_array_equal(pipe.generate(SHORT, **kw), new.generate(SHORT, **kw))
    with pytest.raises(ManifestError, match="device_loop=True needs the graph 'sampler_step'"):
        Pipeline.load(old, backend="counting", threads=1, device_loop=True)


def test_demo_device_loop_matches_the_host_loop(demo_export):
    """The shipped demo model, text-to-image with guidance and an edit: PSNR >= 45 dB between the
    loops' float images (measured: identical) and the judge reads the same attributes."""
    from qwen_image2_ref.demo import data, judge

    host = Pipeline.load(demo_export, threads=1)
    device = Pipeline.load(demo_export, backend="counting", threads=1)
    assert device.device is not None

    def attributes(image):
        j = judge.judge(np.round(image * 255).astype(np.uint8))
        return j.background, j.glyph, [(o.color, o.shape, o.position) for o in j.objects]

    pairs = []
    for i, (_, prompt) in enumerate(data.heldout_prompts(2, seed=3)):
        kw = dict(steps=8, seed=200 + i, output="np", negative_prompt="", guidance=2.0 if i else 1.0)
        pairs.append((host.generate(prompt, **kw)[0], device.generate(prompt, **kw)[0]))
    edit = data.sample_edit(np.random.default_rng(7))
    kw = dict(steps=8, seed=100, output="np")
    source = data.render(edit.source)
    pairs.append((host.edit([source], edit.instruction, **kw)[0], device.edit([source], edit.instruction, **kw)[0]))
    for a, b in pairs:
        a, b = a.astype(np.float64), b.astype(np.float64)
        assert psnr(a, b) >= 45.0, f"PSNR {psnr(a, b):.1f} dB"
        assert attributes(a) == attributes(b)


def test_bound_calls_refuse_aliased_missing_and_mistyped_buffers(pipes):
    """A bound call checks its device tensors as check_feeds checks arrays, needs a buffer per
    output, and refuses an input that is also an output (the graph would read what it overwrites)."""
    from qwen_image_edge.runtime.errors import ShapeError

    _, device, _ = pipes[True]
    ops, session = device.device, device.sessions["sampler_step"]
    x = ops.upload(np.zeros((1, 4, 64), np.float32))
    scalars = {k: np.float32([1.0]) for k in ("guidance", "sigma", "sigma_next")}
    feeds = {"latents": x, "velocity": x, "velocity_uncond": x, "latent_grid": ops.upload(np.zeros((2, 2), bool)),
             **scalars}
    z = ops.empty((1, 64, 2, 2), "float32")
    with pytest.raises(BackendError, match="input 'latents' is also an output buffer of this call"):
        session.run_bound(feeds, {"latents_next": x, "vae_latents": z})
    with pytest.raises(ShapeError, match=r"output buffers for \['latents_next'\], expected"):
        session.run_bound(feeds, {"latents_next": ops.empty((1, 4, 64), "float32")})
    with pytest.raises(ShapeError, match=r"input 'latents': expected float32\[B, N_t, 64\], got float16\[1, 4, 64\]"):
        session.run_bound({**feeds, "latents": ops.upload(np.zeros((1, 4, 64), np.float16))},
                          {"latents_next": ops.empty((1, 4, 64), "float32"), "vae_latents": z})
    out = ops.empty((1, 4, 64), "float32")
    session.run_bound(feeds, {"latents_next": out, "vae_latents": z})
    np.testing.assert_array_equal(ops.download(out), np.zeros((1, 4, 64), np.float32))
