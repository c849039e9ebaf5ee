"""`generate` and `edit` on the command line, with the tiny model: output, and bad input as one line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qwen_image_edge.cli import main


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qwen-image-edge: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def test_generate_writes_a_png(model, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(["generate", "--model", str(model), "a red circle", "-o", str(out), "--steps", "2",
                 "--width", "64", "--height", "32"]) == 0
    img = Image.open(out)
    assert img.size == (64, 32) and img.mode == "RGBA"
    assert not list(tmp_path.glob(".*.tmp"))


def test_edit_writes_a_png(model, tmp_path):
    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 4), dtype=np.uint8)).save(src)
    out = tmp_path / "edited.png"
    assert main(["edit", "--model", str(model), "--image", str(src), "--image", str(src), "make it blue",
                 "-o", str(out), "--steps", "2"]) == 0
    assert Image.open(out).size == (64, 64)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--steps", "0"], "steps: expected a positive integer, got 0"),
        (["--width", "16"], "width: expected 32..4096 pixels, got 16"),
        (["--guidance", "0"], "guidance: expected a number >= 1"),
    ],
)
def test_generate_bad_input_is_one_line(model, tmp_path, capsys, extra, match):
    code = main(["generate", "--model", str(model), "a red circle", "-o", str(tmp_path / "x.png"), *extra])
    assert code == 2
    assert match in _one_error_line(capsys)
    assert not (tmp_path / "x.png").exists()


def test_prompt_over_the_limit(model, tmp_path, capsys):
    code = main(["generate", "--model", str(model), "a" + " a" * 1024, "-o", str(tmp_path / "x.png")])
    assert code == 2 and "1025 tokens, over the limit of 1024" in _one_error_line(capsys)


def test_edit_with_a_file_that_is_not_an_image(model, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    code = main(["edit", "--model", str(model), "--image", str(bad), "x", "-o", str(tmp_path / "y.png")])
    assert code == 2 and "not a readable image" in _one_error_line(capsys)


def test_missing_model_and_bad_output_path(tmp_path, capsys, model):
    assert main(["generate", "--model", str(tmp_path), "x", "-o", str(tmp_path / "y.png")]) == 2
    assert "model_index.json" in _one_error_line(capsys)
    assert main(["generate", "--model", str(model), "x", "-o", str(tmp_path / "y.gif")]) == 2
    assert "expected a .png, .jpg/.jpeg or .webp path" in _one_error_line(capsys)
