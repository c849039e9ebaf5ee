"""The bad-input catalogue for the Python API and export directories (issue 20): keyword arguments of
the wrong type or range, bad condition images, broken exports; then hypothesis over generate's
keywords and over JSON mutations of a real manifest.json. The only acceptable outcomes are a typed
error (``QwenImageEdgeError``) or a correct result.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qwen_image_edge.runtime.errors import BackendError, InputError, ManifestError, QwenImageEdgeError

OK = dict(steps=1, seed=0, width=32, height=32)

# (id, keyword changes, expected error type, a piece of its message)
GENERATE_CASES = [
    ("prompt-int", dict(prompt=123), InputError, "prompt: expected a string"),
    ("prompt-none", dict(prompt=None), InputError, "prompt: expected a string"),
    ("prompt-empty-list", dict(prompt=[]), InputError, "prompt: expected a string"),
    ("prompt-bytes", dict(prompt=b"a red circle"), InputError, "prompt: expected a string"),
    ("prompt-list-with-int", dict(prompt=["a", 1]), InputError, "prompt: expected a string"),
    ("negative-int", dict(negative_prompt=5, guidance=2.0), InputError, "negative_prompt: expected a string"),
    ("negative-count", dict(negative_prompt=["a", "b"], guidance=2.0), InputError, "negative_prompt: expected 1"),
    ("width-str", dict(width="32"), InputError, "width: expected an integer"),
    ("width-float", dict(width=32.0), InputError, "width: expected an integer"),
    ("width-bool", dict(width=True), InputError, "width: expected an integer"),
    ("height-odd", dict(height=33), InputError, "expected a multiple of 32"),
    ("height-over-export", dict(height=1024), InputError, "outside the exported range"),
    ("steps-zero", dict(steps=0), InputError, "steps: expected a positive integer"),
    ("steps-float", dict(steps=1.5), InputError, "steps: expected a positive integer"),
    ("steps-str", dict(steps="1"), InputError, "steps: expected a positive integer"),
    ("steps-bool", dict(steps=True), InputError, "steps: expected a positive integer"),
    ("steps-huge", dict(steps=10**6), InputError, "steps: expected 1..1000"),
    ("guidance-str", dict(guidance="x"), InputError, "guidance: expected a number"),
    ("guidance-nan", dict(guidance=float("nan")), InputError, "guidance: expected a number"),
    ("guidance-below-1", dict(guidance=0.5), InputError, "guidance: expected a number"),
    ("guidance-list", dict(guidance=[2.0]), InputError, "guidance: expected a number"),
    ("seed-negative", dict(seed=-1), InputError, "seed: expected a non-negative integer"),
    ("seed-float", dict(seed=1.5), InputError, "seed: expected a non-negative integer"),
    ("seed-str", dict(seed="1"), InputError, "seed: expected a non-negative integer"),
    ("output-unknown", dict(output="jpeg"), InputError, "output: expected one of"),
    ("latents-shape", dict(latents=np.zeros((1, 2, 3), np.float32)), InputError, "latents: expected float32"),
    ("latents-list", dict(latents=[1.0, 2.0]), InputError, "latents: expected float32"),
    ("callback-not-callable", dict(callback=5), InputError, "callback: expected a callable"),
]


@pytest.mark.parametrize(("case", "changes", "error", "match"), GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_generate_bad_keywords(case, changes, error, match, runtime_pipe):
    kwargs = {"prompt": "a red circle", **OK, **changes}
    with pytest.raises(error, match=match) as info:
        runtime_pipe.generate(kwargs.pop("prompt"), **kwargs)
    assert "\n" not in str(info.value)


EDIT_CASES = [
    ("images-none", None, "expected a path, a PIL image or a numpy array"),
    ("images-empty", [], "expected at least one condition image"),
    ("images-int", [5], "expected a path, a PIL image or a numpy array"),
    ("images-missing-file", ["no-such.png"], "no such file"),
    ("image-past-4-to-1", [np.zeros((400, 32, 3), np.uint8)], "aspect ratios from 1:4 to 4:1"),
    ("image-float-0-255", [np.full((32, 32, 3), 200.0, np.float32)], r"\[0, 1\]"),
    ("image-int64", [np.zeros((32, 32, 3), np.int64)], "expected uint8, uint16"),
    ("image-empty-array", [np.zeros((0, 32, 3), np.uint8)], "H, W > 0"),
]


@pytest.mark.parametrize(("case", "images", "match"), EDIT_CASES, ids=[c[0] for c in EDIT_CASES])
def test_edit_bad_images(case, images, match, runtime_pipe):
    with pytest.raises(InputError, match=match):
        runtime_pipe.edit(images, "make it blue", **OK)


def _broken_export(tiny_export, tmp_path, edit) -> str:
    out = tmp_path / "export"
    shutil.copytree(tiny_export[1], out)
    edit(out)
    return str(out)


def _manifest_edit(change):
    def edit(root):
        data = json.loads((root / "manifest.json").read_text())
        change(data)
        (root / "manifest.json").write_text(json.dumps(data))
    return edit


LOAD_CASES = [
    ("no-folder", lambda r: shutil.rmtree(r), ManifestError),
    ("manifest-missing", lambda r: (r / "manifest.json").unlink(), ManifestError),
    ("manifest-truncated", lambda r: (r / "manifest.json").write_text((r / "manifest.json").read_text()[:200]),
     ManifestError),
    ("manifest-not-utf8", lambda r: (r / "manifest.json").write_bytes(b"\xff\xfe{}"), ManifestError),
    ("format-version-future", _manifest_edit(lambda d: d.update(format_version=999)), ManifestError),
    ("graphs-not-a-dict", _manifest_edit(lambda d: d.update(graphs=[])), ManifestError),
    ("graph-sha-wrong", _manifest_edit(lambda d: d["graphs"]["vae_decoder"].update(sha256="0" * 64)), ManifestError),
    ("tokenizer-removed", lambda r: shutil.rmtree(r / "tokenizer"), ManifestError),
    ("graph-file-empty", lambda r: (r / "transformer" / "model.onnx").write_bytes(b""), ManifestError),
]


@pytest.mark.parametrize(("case", "edit", "error"), LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_load_broken_exports(case, edit, error, tiny_export, tmp_path):
    from qwen_image_edge.runtime.pipeline import Pipeline

    with pytest.raises(error) as info:
        Pipeline.load(_broken_export(tiny_export, tmp_path, edit), threads=1)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("case", "kwargs", "error", "match"), [
    ("threads-huge", dict(threads=10**6), InputError, "CPU cores available"),
    ("threads-zero", dict(threads=0), InputError, "threads: expected a positive integer"),
    ("threads-str", dict(threads="2"), InputError, "threads: expected a positive integer"),
    ("backend-unknown", dict(backend="nope"), BackendError, "available backends"),
    ("provider-unknown", dict(providers=["FooExecutionProvider"]), BackendError, "available: "),
], ids=lambda v: v if isinstance(v, str) else "")
def test_load_bad_options(case, kwargs, error, match, tiny_export):
    from qwen_image_edge.runtime.pipeline import Pipeline

    with pytest.raises(error, match=match):
        Pipeline.load(tiny_export[1], **kwargs)


def test_the_catalogues_are_large():
    from tests.test_cli_catalogue import CASES

    assert len(GENERATE_CASES) + len(EDIT_CASES) + len(LOAD_CASES) + 5 + len(CASES) >= 100


# --------------------------------------------------------------------------- hypothesis: keywords

NUMBERS = st.one_of(st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True, width=32),
                    st.sampled_from([None, "1", True, [1]]))


def _either(draw, valid, invalid):
    """A valid value four times in five: enough runs reach a generation, the rest probe the checks."""
    return draw(valid if draw(st.integers(0, 4)) else invalid)


@st.composite
def requests(draw):
    """generate's keywords: mostly plausible, one in five of the wrong type or range each."""
    kw = {}
    kw["prompt"] = _either(draw, st.one_of(st.text(max_size=20), st.lists(st.text(max_size=8), min_size=1, max_size=2)),
                           st.sampled_from([None, 0, b"x", ["a", None], []]))
    if draw(st.booleans()):
        kw["negative_prompt"] = _either(draw, st.one_of(st.none(), st.text(max_size=8)), st.sampled_from([3, ["a", "b"]]))
    kw["steps"] = _either(draw, st.sampled_from([1, 2, None]), st.sampled_from([0, -1, 1.0, "1", True, 1001]))
    if draw(st.booleans()):
        kw["guidance"] = _either(draw, st.floats(1.0, 8.0), NUMBERS)
    kw["width"] = _either(draw, st.sampled_from([32, 64, 96, None]), st.sampled_from([0, -32, 33, 4096, "32", 32.0]))
    kw["height"] = _either(draw, st.sampled_from([32, 64, 96, None]), st.sampled_from([16, 48.0, False]))
    kw["seed"] = _either(draw, st.one_of(st.none(), st.integers(0, 2**40)), st.sampled_from([-1, 1.5, "3", True]))
    return kw


@settings(derandomize=True, max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_property_generate_keywords(runtime_pipe, kw):
    """Any mix of keyword values: an InputError, or an image of the asked size (default 64 px) whose
    pixels are those of the same call with the values normalised (so nothing was silently changed)."""
    kw = dict(kw)
    prompt = kw.pop("prompt")
    try:
        image = runtime_pipe.generate(prompt, **kw)
    except QwenImageEdgeError as exc:
        assert isinstance(exc, InputError), exc
        event("InputError")
        return
    event("image")
    images = image if isinstance(image, list) else [image]
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    assert len(images) == len(prompts)
    size = (kw["width"] or 64, kw["height"] or 64)  # the tiny model's output resolution
    assert all(im.size == size and im.mode == "RGBA" for im in images)
    if kw.get("seed") is not None and len(prompts) == 1:
        again = runtime_pipe.generate(prompts[0], **{**kw, "width": size[0], "height": size[1]})
        np.testing.assert_array_equal(np.asarray(again), np.asarray(images[0]))


# ------------------------------------------------------------------------- hypothesis: manifests


@pytest.fixture(scope="module")
def manifest_copy(tiny_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("manifest-fuzz") / "export"
    shutil.copytree(tiny_export[1], out)
    return out, json.loads((out / "manifest.json").read_text())


def _paths(data, prefix=()):
    """Every (path, value) in a JSON tree."""
    yield prefix, data
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _paths(v, (*prefix, i))


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=False),
                        st.text(max_size=6), st.just([]), st.just({}), st.just([1, "a"]))


@st.composite
def mutations(draw, original):
    data = copy.deepcopy(original)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p, _ in _paths(data) if p]
        path = draw(st.sampled_from(paths))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["delete", "replace", "scale"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "scale" and isinstance(parent[path[-1]], (int, float)) and not isinstance(parent[path[-1]], bool):
            parent[path[-1]] = parent[path[-1]] * draw(st.sampled_from([-1, 0, 2, 10**6]))
        else:
            parent[path[-1]] = draw(JSON_VALUES)
    return data


def test_property_manifest_mutations(manifest_copy):
    """Random JSON mutations of the tiny export's manifest.json: a ManifestError, or a manifest that
    loads (hashes verified). Nothing else: no KeyError, TypeError, ... from deep inside."""
    from qwen_image_edge.runtime.manifest import load_manifest

    folder, original = manifest_copy

    @settings(derandomize=True, max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(mutations(original))
    def check(data):
        (folder / "manifest.json").write_text(json.dumps(data))
        try:
            load_manifest(folder, verify_hashes=True)
        except ManifestError as exc:
            assert "\n" not in str(exc)
            event("ManifestError")
            return
        event("loaded")

    try:
        check()
    finally:
        (folder / "manifest.json").write_text(json.dumps(original))
