"""Each sampling flag and keyword does what it says, on the tiny model.

CLI (`generate`/`edit`: reference, `run`: runtime): the written PNG equals the API image for the same
arguments, so every flag reaches the call; the seed, guidance and negative prompt each change the image;
--steps sets the number of transformer calls; --threads reaches torch / onnxruntime's session options.
API (both pipelines, generate and edit): the same properties for the keyword arguments.
CLI calls are in-process ``main([...])`` so that patched code is what runs (tests/mutate.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qwen_image_edge.cli import main

PROMPT = "a red circle"
# Guidance > 1 with a negative prompt: two transformer calls per step (positive and negative are run
# one after the other in both pipelines, not batched). 96x32: neither side is the default (64, and the
# source image's 64x64 for edits), so an ignored --width or --height shows.
FLAGS = dict(seed=5, guidance=4.0, negative_prompt="blurry", steps=2, width=96, height=32)
CHEAP = dict(steps=1, width=32, height=32)
COMMANDS = ("generate", "edit", "run", "run-edit")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-flags") / "source.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 4), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def calls(monkeypatch):
    """Transformer calls per step (single graph or cached step), counted in both pipelines."""
    from qwen_image2_ref.transformer import QwenImageTransformer
    from qwen_image_edge.runtime.backends.onnxruntime import OnnxRuntimeSession

    seen: list[str] = []

    def counted(cls, method, name_of):
        real = getattr(cls, method)

        def wrapper(self, *args, **kwargs):
            seen.append(name_of(self))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(cls, method, wrapper)

    counted(OnnxRuntimeSession, "run", lambda s: s.spec.name)
    counted(QwenImageTransformer, "forward", lambda s: "transformer")
    counted(QwenImageTransformer, "step", lambda s: "transformer_step")

    class Calls:
        def reset(self):
            seen.clear()

        @property
        def transformer(self):
            return sum(name in ("transformer", "transformer_step") for name in seen)

    return Calls()


def _argv(**kw) -> list[str]:
    names = dict(negative_prompt="--negative-prompt")
    return [arg for k, v in kw.items() for arg in (names.get(k, f"--{k}"), str(v))]


def _cli(command, tiny_export, source, out, **kw) -> np.ndarray:
    model, export = (str(p) for p in tiny_export)
    head = {"generate": ["generate", "--model", model], "edit": ["edit", "--model", model, "--image", str(source)],
            "run": ["run", "--export", export], "run-edit": ["run", "--export", export, "--image", str(source)]}
    threads = ["--threads", "1"] if command.startswith("run") else []  # as runtime_pipe: same reduction order
    assert main([*head[command], PROMPT, "-o", str(out), *threads, *_argv(**kw)]) == 0
    img = Image.open(out)
    assert img.format == "PNG" and img.mode == "RGBA"  # the only output format: lossless, alpha kept
    return np.asarray(img)


def _one(result) -> Image.Image:
    """One prompt's image (the reference returned a list of one before both pipelines agreed on one image)."""
    return result[0] if isinstance(result, list) else result


def _api(command, runtime_pipe, reference, source, **kw) -> Image.Image:
    if command == "generate":
        return _one(reference.generate(PROMPT, progress=False, **kw))
    if command == "edit":
        return _one(reference.edit([str(source)], PROMPT, progress=False, **kw))
    if command == "run":
        return runtime_pipe.generate(PROMPT, **kw)
    return runtime_pipe.edit([str(source)], PROMPT, **kw)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_reaches_the_call(command, tiny_export, runtime_pipe, reference, source, tmp_path, calls):
    """A flag ignored or changed on the way (seed, guidance, negative prompt, steps, size) changes the image."""
    cli = _cli(command, tiny_export, source, tmp_path / "out.png", **FLAGS)
    assert calls.transformer == 2 * FLAGS["steps"]  # guidance: positive + negative per step
    calls.reset()
    api = _api(command, runtime_pipe, reference, source, **FLAGS)
    assert calls.transformer == 2 * FLAGS["steps"]
    assert api.size == (FLAGS["width"], FLAGS["height"])
    np.testing.assert_array_equal(cli, np.asarray(api))


@pytest.mark.parametrize("command", ["generate", "run"])
def test_seed(command, tiny_export, runtime_pipe, reference, source, tmp_path):
    """Same seed: the same bytes; another seed: another image (and each is the API's)."""
    _cli(command, tiny_export, source, tmp_path / "a.png", seed=5, **CHEAP)
    _cli(command, tiny_export, source, tmp_path / "b.png", seed=5, **CHEAP)
    other = _cli(command, tiny_export, source, tmp_path / "c.png", seed=6, **CHEAP)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), other)
    np.testing.assert_array_equal(other, np.asarray(_api(command, runtime_pipe, reference, source, seed=6, **CHEAP)))


@pytest.mark.parametrize("command", ["generate", "run"])
def test_guidance_negative_prompt_and_steps(command, tiny_export, runtime_pipe, reference, source, tmp_path, calls):
    """Guidance 1 vs 4 and two negative prompts: three different images, each the API's for its flags;
    the transformer runs once per step without guidance, twice with it."""
    cases = [dict(guidance=1.0, negative_prompt="blurry", steps=3), dict(guidance=4.0, negative_prompt="blurry", steps=2),
             dict(guidance=4.0, negative_prompt="a green square", steps=2)]
    images = []
    for i, kw in enumerate(cases):
        calls.reset()
        images.append(_cli(command, tiny_export, source, tmp_path / f"{i}.png", seed=1, width=32, height=32, **kw))
        assert calls.transformer == kw["steps"] * (2 if kw["guidance"] > 1 else 1), kw
        api = _api(command, runtime_pipe, reference, source, seed=1, width=32, height=32, **kw)
        np.testing.assert_array_equal(images[-1], np.asarray(api))
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])


def test_threads_reach_onnxruntime(tiny_export, tmp_path, monkeypatch):
    """--threads N: every onnxruntime session gets N intra-op threads; without it onnxruntime's default (0)."""
    import onnxruntime as ort

    real, seen = ort.InferenceSession, []

    def spy(path, sess_options=None, **kwargs):
        seen.append(sess_options.intra_op_num_threads)
        return real(path, sess_options=sess_options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    export = str(tiny_export[1])
    assert main(["run", "--export", export, PROMPT, "-o", str(tmp_path / "a.png"), "--threads", "2", *_argv(**CHEAP)]) == 0
    assert len(seen) >= 3 and set(seen) == {2}, seen  # text encoder, transformer(s), VAE decoder: all of them
    seen.clear()
    assert main(["run", "--export", export, PROMPT, "-o", str(tmp_path / "b.png"), *_argv(**CHEAP)]) == 0
    assert len(seen) >= 3 and set(seen) == {0}, seen


@pytest.mark.parametrize("command", ["generate", "edit"])
def test_threads_reach_torch(command, tiny_export, source, tmp_path, monkeypatch):
    """--threads N sets torch's intra-op threads (recorded, not applied: the test process keeps its own)."""
    import torch

    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    _cli(command, tiny_export, source, tmp_path / "a.png", threads=2, **CHEAP)
    assert seen == [2]


# --------------------------------------------------------------------------- the API's keywords

@pytest.mark.parametrize("command", COMMANDS)
def test_api_keywords(command, runtime_pipe, reference, source, calls):
    """Each keyword changes what it says, on both pipelines' generate and edit (``command`` names the call:
    generate/edit = reference, run/run-edit = runtime)."""
    def call(**changes):
        calls.reset()
        image = _api(command, runtime_pipe, reference, source, **{**FLAGS, **changes})
        return np.asarray(image), calls.transformer, image.size

    base, n, size = call()
    assert n == 2 * FLAGS["steps"] and size == (FLAGS["width"], FLAGS["height"])
    np.testing.assert_array_equal(call()[0], base)  # same seed, same image
    for changes in (dict(seed=6), dict(guidance=2.0), dict(negative_prompt="a green square")):
        assert not np.array_equal(call(**changes)[0], base), changes
    assert call(guidance=1.0)[1] == FLAGS["steps"]  # no guidance: one call per step
    assert call(steps=3)[1] == 6
    assert call(width=32, height=64)[2] == (32, 64)


@pytest.mark.parametrize("command", ["generate", "run"])
def test_diffusers_flag_names(command, tiny_export, source, tmp_path):
    """--num-inference-steps / --guidance-scale (diffusers' names, typed by habit) are --steps / --guidance."""
    model, export = (str(p) for p in tiny_export)
    head = ["generate", "--model", model] if command == "generate" else ["run", "--export", export, "--threads", "1"]
    flags = ["--negative-prompt", "blurry", "--seed", "3", "--width", "32", "--height", "32"]
    assert main([*head, PROMPT, "-o", str(tmp_path / "ours.png"), *flags, "--steps", "2", "--guidance", "4"]) == 0
    assert main([*head, PROMPT, "-o", str(tmp_path / "theirs.png"), *flags,
                 "--num-inference-steps", "2", "--guidance-scale", "4"]) == 0
    assert main([*head, PROMPT, "-o", str(tmp_path / "other.png"), *flags,
                 "--num-inference-steps", "1", "--guidance-scale", "4"]) == 0
    ours, theirs, other = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("ours", "theirs", "other"))
    np.testing.assert_array_equal(ours, theirs)
    assert not np.array_equal(ours, other)
