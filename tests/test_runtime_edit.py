"""``Pipeline.edit`` (torch-free) against the reference ``QwenImagePipeline.edit``, and bad edit input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwen_image_edge.runtime.errors import InputError, ManifestError
from qwen_image_edge.runtime.pipeline import Pipeline
from tests.test_runtime import DEMO_PSNR_DB, TOL, psnr

STEPS = 3
RNG = np.random.default_rng(0)
RGBA = Image.fromarray(RNG.integers(0, 256, (80, 60, 4), dtype=np.uint8))  # portrait, with alpha
RGB = Image.fromarray(RNG.integers(0, 256, (50, 90, 3), dtype=np.uint8))  # landscape


def _both(runtime_pipe, reference, images, instruction="make the circle blue", **kw):
    kw = {"steps": STEPS, "seed": 3, "output": "np", **kw}
    return runtime_pipe.edit(images, instruction, **kw), reference.edit(images, instruction, progress=False, **kw)


@pytest.mark.parametrize("images, kw, size", [
    ([RGBA], {}, (64, 64)),  # 60x80 -> 64x64 at the tiny model's 64^2 area
    ([RGBA, RGB], {}, (96, 32)),  # output size follows the last image
    ([RGB, RGBA], dict(guidance=3.0, negative_prompt="blurry"), (64, 64)),
    ([RGB], dict(width=64, height=96), (64, 96)),
])
def test_matches_the_reference(runtime_pipe, reference, images, kw, size):
    ours, ref = _both(runtime_pipe, reference, images, **kw)
    assert ours.shape == ref.shape == (1, size[1], size[0], 4)
    # fp32 graphs vs eager torch: the same math in another order; measured <= 1.2e-6 (TOL: tests/test_runtime.py)
    assert np.abs(ours - ref).max() <= TOL


def test_batch_of_instructions(runtime_pipe, reference):
    ours, ref = _both(runtime_pipe, reference, [RGBA], ["make it blue", "turn the square green and move it"])
    assert ours.shape[0] == 2 and np.abs(ours - ref).max() <= TOL


def test_the_condition_image_matters(runtime_pipe):
    """The parity above is not vacuous: another image (or its alpha) changes the edit."""
    kw = dict(steps=STEPS, seed=3, output="np")
    base = runtime_pipe.edit([RGBA], "make the circle blue", **kw)
    other = runtime_pipe.edit([Image.fromarray(255 - np.asarray(RGBA))], "make the circle blue", **kw)
    opaque = np.asarray(RGBA).copy()
    opaque[..., 3] = 255
    no_alpha = runtime_pipe.edit([Image.fromarray(opaque)], "make the circle blue", **kw)
    # 100x the parity tolerance: a wrong condition path would fail the parity tests (random tiny
    # weights move the output by ~5e-3 here)
    assert np.abs(base - other).max() > 1e-3
    assert np.abs(base - no_alpha).max() > 1e-3


def test_pil_output_and_paths(runtime_pipe, tmp_path):
    path = tmp_path / "in.png"
    RGBA.save(path)
    img, stats = runtime_pipe.edit(str(path), "make the circle blue", steps=1, seed=0, return_stats=True)
    assert isinstance(img, Image.Image) and img.mode == "RGBA" and img.size == (64, 64)
    # this call's own timings: each condition graph once, one transformer call for its one step
    assert stats.calls("vision_encoder") == stats.calls("vae_encoder") == 1
    assert stats.calls("transformer") + stats.calls("transformer_step") == 1 and stats.calls("vae_decoder") == 1


def _palette_with_transparency() -> Image.Image:
    rgb = Image.fromarray(RNG.integers(0, 256, (70, 70, 3), dtype=np.uint8)).quantize(16)
    rgb.info["transparency"] = 3  # palette index 3 is transparent
    return rgb


@pytest.mark.parametrize("make", [
    lambda: RGB.convert("L"),
    lambda: RGBA.convert("LA"),
    lambda: RGB.quantize(32),
    _palette_with_transparency,
], ids=["grayscale", "gray+alpha", "palette", "palette+transparency"])
def test_other_png_modes(runtime_pipe, reference, tmp_path, make):
    path = tmp_path / "in.png"
    make().save(path)
    loaded = Image.open(path)
    ours, ref = _both(runtime_pipe, reference, [str(path)], steps=2)
    assert np.abs(ours - ref).max() <= TOL
    # converted, not misread: the same as the image converted to RGBA first (PIL's palette/alpha rules)
    as_rgba = runtime_pipe.edit([loaded.convert("RGBA")], "make the circle blue", steps=2, seed=3, output="np")
    np.testing.assert_allclose(ours, as_rgba, atol=1e-6)


@pytest.mark.parametrize("images, match", [
    ([], "at least one condition image"),
    (["/nonexistent/x.png"], "condition image 0: image /nonexistent/x.png: no such file"),
    ([np.zeros((0, 4, 3), np.uint8)], r"condition image 0: .*(expected a non-empty image|H, W > 0), got"),
    ([np.zeros((4, 4), np.int64)], "condition image 0: image array: expected uint8"),
    ([Image.new("RGB", (800, 10))], r"\(800x10, aspect 80.00:1\): this export edits aspect ratios from 1:4 to 4:1; "
                                     r"the nearest supported sizes are 40x10 \(crop\) or 800x200 \(pad\)"),
    ([Image.new("RGB", (10, 41))], r"aspect 4.10:1\): .* 1:4 to 4:1; .* 10x40 \(crop\) or 11x41 \(pad\)"),
    ([RGB] * 11, "at most 10 condition images, got 11"),
    # two images of the largest condition area fit (at 64 px a 3:2 image is 96x64: 24 tokens each)
    ([Image.new("RGB", (64, 64))] * 9, r"need 144 condition latent tokens, but this export holds at most 48"),
])
def test_bad_images(runtime_pipe, images, match):
    with pytest.raises(InputError, match=match):
        runtime_pipe.edit(images, "make the circle blue", steps=1)


def test_unreadable_and_empty_files(runtime_pipe, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    for name in ("empty.png", "text.png"):
        with pytest.raises(InputError, match=f"condition image 0: image .*{name}: not a readable image file"):
            runtime_pipe.edit(str(tmp_path / name), "make the circle blue", steps=1)


def test_target_size_outside_the_range(runtime_pipe):
    with pytest.raises(InputError, match="width 256: outside the exported range 32..128"):
        runtime_pipe.edit([RGB], "make the circle blue", width=256, steps=1)


def test_export_without_edit_graphs(exported, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(exported[1], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["graphs"]["vision_encoder"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    pipe = Pipeline.load(copy, threads=1)
    assert pipe.generate("a red circle", steps=1, seed=0).size == (64, 64)
    with pytest.raises(ManifestError, match="cannot edit"):
        pipe.edit([RGB], "make the circle blue", steps=1)


def test_cli_run_edit(exported, tmp_path, capsys):
    from qwen_image_edge.cli import main

    first, last = tmp_path / "a.png", tmp_path / "b.png"
    RGBA.save(first)
    RGB.save(last)
    out = tmp_path / "out.png"
    code = main(["run", "--export", str(exported[1]), "--image", str(first), "--image", str(last),
                 "make the circle blue", "-o", str(out), "--steps", "1", "--threads", "1"])
    assert code == 0 and Image.open(out).size == (96, 32)
    (tmp_path / "bad.png").write_bytes(b"")
    code = main(["run", "--export", str(exported[1]), "--image", str(tmp_path / "bad.png"), "x", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "not a readable image file" in err and "Traceback" not in err


# --------------------------------------------------------------------------- demo model

def _demo_weights() -> Path | None:
    from qwen_image2_ref.demo import WEIGHTS_DIR

    return WEIGHTS_DIR if (WEIGHTS_DIR / "model_index.json").is_file() else None


@pytest.mark.skipif(_demo_weights() is None, reason="demo weights not trained yet (qwen_image2_ref/demo/weights)")
def test_demo_edit_matches_the_reference(demo_export):
    """Runtime edit vs reference edit on the shipped demo model: PSNR >= 90 dB on the float images (the
    bound's arithmetic: tests/test_runtime.py), and the judge reads the edit as applied exactly where it does
    on the reference output."""
    import torch

    from qwen_image2_ref.demo import data, judge
    from qwen_image2_ref.model_folder import load_pipeline

    torch.set_num_threads(1)
    ours_pipe, ref_pipe = Pipeline.load(demo_export, threads=1), load_pipeline("demo")
    rng = np.random.default_rng(7)
    applied = {"ours": 0, "ref": 0}
    for i in range(4):
        edit = data.sample_edit(rng)
        source = data.render(edit.source)
        kw = dict(steps=12, seed=100 + i, output="np")
        ours = ours_pipe.edit([source], edit.instruction, **kw)[0].astype(np.float64)  # [H, W, 4] in [0, 1]
        ref = ref_pipe.edit([source], edit.instruction, progress=False, **kw)[0].astype(np.float64)
        assert psnr(ours, ref) >= DEMO_PSNR_DB, f"edit {i} ({edit.instruction!r}): PSNR {psnr(ours, ref):.1f} dB"
        for name, img in (("ours", ours), ("ref", ref)):
            img = np.round(img * 255).astype(np.uint8)
            applied[name] += judge.score(judge.judge(img), edit.target, edit)["edit_applied"]
    assert applied["ours"] == applied["ref"], applied


def test_edit_never_imports_torch(exported, tmp_path):
    """Edit with the runtime in a process where importing torch raises."""
    import subprocess
    import sys

    RGBA.save(tmp_path / "in.png")
    script = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'diffusers', 'onnx'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from qwen_image_edge.runtime.pipeline import Pipeline
img = Pipeline.load({str(exported[1])!r}, threads=1).edit({str(tmp_path / 'in.png')!r}, 'make it blue', steps=1, seed=0)
print('ok', img.size, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'diffusers')))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok (64, 64) []"
