"""Command-line habits and faults (issue 20): PNG parameters written, read back and equal to the
request; random printed seeds; --num-images; .jpg/.webp outputs; -v after the subcommand; the
thread cap; a full or read-only output folder; `demo` over another model's export; the demo
prompt language; modelopt's install hint hidden. In-process ``main([...])`` on the tiny model,
except the real-filesystem faults, which need a private mount (``unshare``) and so a subprocess.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwen_image_edge.cli import main
from qwen_image_edge.runtime.metadata import FIELDS, read_parameters

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red circle"
FLAGS = dict(seed=7, steps=2, guidance=3.0, negative_prompt="blurry", width=64, height=32)


def _argv(**kw) -> list[str]:
    return [a for k, v in kw.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qwen-image-edge: error: "), err
    return err[0]


# ------------------------------------------------------------------------------ PNG parameters


@pytest.mark.parametrize("command", ["run", "generate"])
def test_png_parameters_round_trip(command, tiny_export, tmp_path, capsys):
    """Written by the runtime and by the reference, read back, equal to the request; `info --image`
    prints the same values; the runtime and the reference name the same weights by the same digest."""
    model, export = (str(p) for p in tiny_export)
    head = ["run", "--export", export, "--threads", "1"] if command == "run" else ["generate", "--model", model]
    out = tmp_path / "out.png"
    assert main([*head, PROMPT, "-o", str(out), *_argv(**FLAGS)]) == 0
    params = read_parameters(out)
    request = {"task": "generate", "prompt": PROMPT, **FLAGS}
    assert {k: params[k] for k in request} == request
    assert set(params) == set(FIELDS)
    assert params["pipeline"] == ("runtime" if command == "run" else "reference")
    from qwen_image_edge.runtime.metadata import model_digest

    recorded = json.loads((tiny_export[1] / "manifest.json").read_text())["provenance"]["source"]
    assert params["model_sha256"] == model_digest(recorded["checkpoint_sha256"])  # same weights: same digest
    manifest_sha = hashlib.sha256((tiny_export[1] / "manifest.json").read_bytes()).hexdigest()
    assert params["export_sha256"] == (manifest_sha if command == "run" else None)
    from importlib.metadata import version

    assert params["version"] == version("qwen-image-edge")

    capsys.readouterr()
    assert main(["info", "--image", str(out)]) == 0
    printed = dict(line.split(": ", 1) if ": " in line else (line.rstrip(":"), "")
                   for line in capsys.readouterr().out.splitlines())
    assert printed == {k: "" if v is None else str(v) for k, v in params.items()}
    assert main(["info", "--image", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == params
    text = Image.open(out).text["parameters"]  # the layout other tools read
    assert text.startswith(f"{PROMPT}\nNegative prompt: blurry\nSteps: 2, ")
    assert "CFG scale: 3.0, Seed: 7, Size: 64x32" in text


def test_unicode_prompt_survives(tiny_export, tmp_path):
    prompt = "un cercle rouge — 赤い円 ✓"
    out = tmp_path / "u.png"
    assert main(["run", "--export", str(tiny_export[1]), prompt, "-o", str(out), "--threads", "1",
                 *_argv(steps=1, seed=1)]) == 0
    assert read_parameters(out)["prompt"] == prompt


def test_default_seed_is_random_printed_stored_and_reproduces(tiny_export, runtime_pipe, tmp_path, capsys):
    """No --seed: a random seed, printed on stderr, stored; the recorded parameters passed back to the
    API give the same image (so the defaults recorded are the ones that ran)."""
    export = str(tiny_export[1])
    seeds = []
    for name in ("a.png", "b.png"):
        assert main(["run", "--export", export, PROMPT, "-o", str(tmp_path / name), "--threads", "1"]) == 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("seed: "), err
        seeds.append(int(err[0].split()[1]))
        assert read_parameters(tmp_path / name)["seed"] == seeds[-1]
    assert seeds[0] != seeds[1]  # 2**31 choices: equal by chance once in two billion runs
    p = read_parameters(tmp_path / "a.png")
    manifest = json.loads((tiny_export[1] / "manifest.json").read_text())["schedule"]
    assert p["steps"] == (len(manifest["sigmas"]) if manifest.get("sigmas") else manifest["num_steps"])
    assert p["guidance"] == manifest["guidance_scale"]
    again = runtime_pipe.generate(p["prompt"], negative_prompt=p["negative_prompt"], seed=p["seed"], steps=p["steps"],
                                  guidance=p["guidance"], width=p["width"], height=p["height"])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(again))
    default = runtime_pipe.generate(PROMPT, seed=p["seed"])  # and the API's own defaults agree
    np.testing.assert_array_equal(np.asarray(default), np.asarray(again))


def test_num_images(tiny_export, runtime_pipe, tmp_path, capsys):
    out = tmp_path / "many.png"
    assert main(["run", "--export", str(tiny_export[1]), PROMPT, "-o", str(out), "--num-images", "3", "--threads", "1",
                 *_argv(seed=10, steps=1)]) == 0
    paths = [tmp_path / f"many-{i}.png" for i in range(3)]
    assert capsys.readouterr().out.split() == [str(p) for p in paths]
    assert sorted(tmp_path.iterdir()) == paths  # nothing else, no many.png
    for i, path in enumerate(paths):
        assert read_parameters(path)["seed"] == 10 + i
        api = runtime_pipe.generate(PROMPT, seed=10 + i, steps=1)
        np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(api))


# ---------------------------------------------------------------------------------- formats


def test_webp_is_lossless_with_alpha(tiny_export, tmp_path):
    export = str(tiny_export[1])
    for name in ("a.png", "a.webp"):
        assert main(["run", "--export", export, PROMPT, "-o", str(tmp_path / name), "--threads", "1",
                     *_argv(seed=3, steps=1)]) == 0
    png, webp = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "a.webp")
    assert webp.format == "WEBP" and webp.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(webp), np.asarray(png))


def test_jpeg_flattens_alpha_onto_the_background(tiny_export, tmp_path):
    """The tiny model's RGBA output has partial alpha everywhere: two backgrounds give two JPEGs whose
    difference is (1 - alpha) x (difference of the backgrounds), up to JPEG's own error."""
    export = str(tiny_export[1])
    common = ["--threads", "1", *_argv(seed=3, steps=1, width=64, height=64)]
    assert main(["run", "--export", export, PROMPT, "-o", str(tmp_path / "a.png"), *common]) == 0
    rgba = np.asarray(Image.open(tmp_path / "a.png")).astype(np.float64)
    alpha = rgba[..., 3:] / 255
    backgrounds = {"white": (255, 255, 255), "#0000ff": (0, 0, 255)}

    def error(jpg, rgb) -> float:
        expected = rgba[..., :3] * alpha + np.asarray(rgb, np.float64) * (1 - alpha)
        return float(np.abs(np.asarray(jpg).astype(np.float64) - expected).mean())

    for bg, rgb in backgrounds.items():
        out = tmp_path / f"{bg.strip('#')}.jpg"
        assert main(["run", "--export", export, PROMPT, "-o", str(out), "--background", bg, *common]) == 0
        jpg = Image.open(out)
        assert jpg.format == "JPEG" and jpg.mode == "RGB" and jpg.size == (64, 64)
        # JPEG q95, 4:4:4, on the tiny model's noise-like pixels: measured mean error 2.7-2.9 levels.
        assert error(jpg, rgb) < 8, bg
        (wrong,) = [v for k, v in backgrounds.items() if k != bg]
        assert error(jpg, wrong) > 24, bg  # the image's transparency makes the background visible


def test_flatten_is_over_compositing():
    from qwen_image_edge.outputs import flatten

    rgba = np.array([[[200, 100, 0, 0], [200, 100, 0, 255], [200, 100, 0, 128]]], np.uint8)
    out = np.asarray(flatten(Image.fromarray(rgba), (10, 20, 30)))
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [200, 100, 0]
    a = 128 / 255
    assert np.abs(out[0, 2] - (np.array([200, 100, 0]) * a + np.array([10, 20, 30]) * (1 - a))).max() <= 1


# ---------------------------------------------------------------------------------- flags


@pytest.mark.parametrize(("argv", "level"), [
    (["info", "--preset", "tiny", "-v"], logging.INFO),
    (["-v", "info", "--preset", "tiny", "-v"], logging.DEBUG),
    (["info", "--preset", "tiny", "-vv"], logging.DEBUG),
])
def test_verbose_after_the_subcommand(argv, level, capsys):
    root = logging.getLogger()
    saved = root.level
    try:
        assert main(argv) == 0 and root.level == level
    finally:
        root.setLevel(saved)


def test_threads_on_every_command_that_computes():
    from qwen_image_edge.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("export", "quantize", "distill", "validate", "generate", "edit", "run", "demo"):
        assert any("--threads" in a.option_strings for a in sub[name]._actions), name


def test_thread_cap_names_the_cores(monkeypatch):
    from qwen_image_edge.runtime.backends import onnxruntime as ortb
    from qwen_image_edge.runtime.errors import InputError

    cores = ortb.available_cores()
    assert ortb.check_threads(cores) == cores
    with pytest.raises(InputError, match=f"this machine has {cores} CPU cores"):
        ortb.check_threads(cores + 1)
    with pytest.raises(InputError, match=f"expected 1..{cores}"):
        ortb.OnnxRuntimeBackend(threads=10**6)  # the library refuses it too, not only the CLI
    for bad in (0, -1, 2.5, "2", True):
        with pytest.raises(InputError, match="threads"):
            ortb.check_threads(bad)


def test_steps_bound_is_one_number():
    """--help's bound (argparse only, no numpy at parse time) is the library's check_steps bound."""
    from qwen_image_edge.cli_args import MAX_STEPS as HELP_BOUND
    from qwen_image_edge.runtime.errors import InputError
    from qwen_image_edge.runtime.sampling import MAX_STEPS, check_steps

    assert HELP_BOUND == MAX_STEPS == 1000
    assert check_steps(MAX_STEPS) == MAX_STEPS
    with pytest.raises(InputError, match="steps: expected 1..1000"):
        check_steps(MAX_STEPS + 1)


def test_no_verify_says_what_it_gives_up(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "What it gives up" in text and "wrong image without any error" in text


# ------------------------------------------------------------------------------ filesystem faults


def test_full_folder_is_refused_before_any_work(tiny_export, tmp_path, capsys, monkeypatch):
    from qwen_image_edge.runtime import pipeline

    real = os.statvfs

    def nearly_full(path):
        st = real(path)
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 1, 1, *tuple(st)[5:]))

    def no_load(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the output was checked")

    monkeypatch.setattr(os, "statvfs", nearly_full)
    monkeypatch.setattr(pipeline.Pipeline, "load", no_load)
    assert main(["run", "--export", str(tiny_export[1]), PROMPT, "-o", str(tmp_path / "o.png")]) == 2
    assert "bytes free" in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_failing_write_leaves_nothing(code, tiny_export, tmp_path, capsys, monkeypatch):
    """The disk fills (or turns read-only) between the check and the write: one line, no partial file."""
    real = Image.Image.save

    def failing(self, fp, *args, **kwargs):
        real(self, fp, *args, **kwargs)  # bytes reach the temporary file, then the device gives up
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(Image.Image, "save", failing)
    assert main(["run", "--export", str(tiny_export[1]), PROMPT, "-o", str(tmp_path / "o.png"), "--threads", "1",
                 *_argv(steps=1, seed=0)]) == 2
    assert "nothing was saved" in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def _unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs unprivileged user+mount namespaces (unshare -rm)")
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_real_full_or_read_only_filesystem(fault, tiny_export, tmp_path):
    """A small tmpfs, filled or mounted read-only, in a private mount namespace: `run -o` there fails
    with one line before any work, and leaves the filesystem as it was."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli = (f"import sys; from qwen_image_edge.cli import main; "
           f"sys.exit(main(['run', '--export', {str(tiny_export[1])!r}, 'x', '-o', {str(mnt / 'o.png')!r}]))")
    if fault == "full":
        setup = f"mount -t tmpfs -o size=64k tmpfs {mnt} && (cat /dev/zero > {mnt}/fill 2>/dev/null; true)"
    else:
        setup = f"mount -t tmpfs -o ro tmpfs {mnt}"
    script = f"{setup} && {sys.executable} -c \"{cli}\"; echo rc=$?; ls -A {mnt}"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = proc.stdout.split()
    assert "rc=2" in lines, (proc.stdout, proc.stderr)
    assert lines[lines.index("rc=2") + 1:] == (["fill"] if fault == "full" else [])  # nothing left behind
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qwen-image-edge: error: output "), err
    assert ("bytes free" if fault == "full" else "read-only file system") in err[0]


# ----------------------------------------------------------------------------------------- demo


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_demo_refuses_an_export_of_another_model(tiny_export, tmp_path, capsys, monkeypatch):
    """`demo --export-dir DIR` where DIR holds an export of another model (here: the tiny model's, while
    the demo weights are a changed copy elsewhere) refuses, names --overwrite and leaves DIR as it was."""
    import qwen_image2_ref.demo as demo_pkg

    other = tmp_path / "other-model"
    shutil.copytree(tiny_export[0], other)
    (other / "vae" / "config.json").write_text((other / "vae" / "config.json").read_text() + "\n")  # other weights
    monkeypatch.setattr(demo_pkg, "WEIGHTS_DIR", other)
    existing = tmp_path / "student-export"
    shutil.copytree(tiny_export[1], existing)
    before = _tree(existing)
    argv = ["demo", "--export-dir", str(existing), "-o", str(tmp_path / "d.png"), "--steps", "1"]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "--overwrite" in line and str(tiny_export[0]) in line
    assert _tree(existing) == before and not (tmp_path / "d.png").exists()
    assert main([*argv, "--overwrite", "--threads", "1"]) == 0  # said so: replaced
    source = json.loads((existing / "manifest.json").read_text())["provenance"]["source"]
    assert Path(source["path"]) == other


def test_a_failed_demo_export_leaves_no_empty_folders(tiny_export, tmp_path, capsys, monkeypatch):
    """`demo --export-dir a/b/export` creates a/ and a/b/ for the export; when the export fails (here on
    purpose; a full disk in life) they go again, and no image is written."""
    import qwen_image2_ref.demo as demo_pkg
    from qwen_image_edge.export import onnx_export
    from qwen_image_edge.runtime.errors import ConfigError

    def failing(*args, **kwargs):
        raise ConfigError("export failed on purpose")

    monkeypatch.setattr(demo_pkg, "WEIGHTS_DIR", tiny_export[0])
    monkeypatch.setattr(onnx_export, "export_model", failing)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["demo", "--export-dir", str(tmp_path / "a" / "b" / "export"), "-o", str(out / "d.png")]) == 2
    assert "export failed on purpose" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and list(out.iterdir()) == []


def test_demo_warns_about_prompts_outside_its_language(tiny_export, tmp_path, caplog, monkeypatch):
    from qwen_image_edge.export import demo as demo_export

    monkeypatch.setattr(demo_export, "ensure_export", lambda *a, **k: tiny_export[1])
    with caplog.at_level(logging.WARNING, logger="qwen_image_edge.cli"):
        assert main(["demo", "a red circle on the left", "-o", str(tmp_path / "a.png"), "--steps", "1",
                     "--threads", "1"]) == 0
        assert main(["demo", "a Dog on the left on a white background", "-o", str(tmp_path / "b.png"),
                     "--steps", "1", "--threads", "1"]) == 0
        assert main(["demo", "a red circle on the left on a white background", "-o", str(tmp_path / "c.png"),
                     "--steps", "1", "--threads", "1"]) == 0
    notes = [r.getMessage() for r in caplog.records if r.name == "qwen_image_edge.cli"]
    assert len(notes) == 3, notes  # two for the second prompt (an unknown word, no shape), none for the last
    assert "no background phrase" in notes[0] and "'a red circle on the left'" in notes[0]
    assert "'Dog' (write 'dog')" not in notes[1] and "'Dog'" in notes[1] and "vocabulary" in notes[1]
    assert "no shape" in notes[2]


# ------------------------------------------------------------------------------------- modelopt


def test_modelopt_install_hint_is_hidden():
    """modelopt warns at import to `pip install nvidia-modelopt[hf]` (the README says not to): the
    quantize path hides it. Control: re-importing without the filter shows it, so the test can fail."""
    pytest.importorskip("modelopt")
    code = (
        "import importlib, warnings\n"
        "from qwen_image_edge.cli import quiet_third_party_warnings\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    with quiet_third_party_warnings():\n"
        "        import modelopt.torch\n"
        "print('QUIET', sum('modelopt[hf]' in str(w.message) for w in seen))\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    importlib.reload(modelopt.torch)\n"
        "print('LOUD', sum('modelopt[hf]' in str(w.message) for w in seen))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "QUIET 0" in proc.stdout
    if "LOUD 0" in proc.stdout:
        pytest.skip("this modelopt / transformers pair does not print the hint at all")


# ------------------------------------------------------------------------------- demo language


def test_the_written_language_names_every_word_class():
    """`demo --help` (static text, built without numpy) and the README list every colour, shape,
    position, background and glyph of the demo data; a word added to data.py must be added there."""
    import re

    from qwen_image2_ref.demo import data
    from qwen_image2_ref.demo.language import LANGUAGE

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### The demo model's prompt language"):]
    section = section[: section.index("\n## ")]
    for text in (LANGUAGE, section):
        for word in (*data.COLORS, *data.SHAPES, *data.POSITIONS, *data.BACKGROUNDS, *data.GLYPHS):
            assert re.search(rf"\b{re.escape(word)}\b", text), word
        for kind in data.EDIT_KINDS:  # each edit kind has an example instruction
            example = data.INSTRUCTIONS[kind][0].split(" {")[0]
            assert example in text, kind


def test_demo_captions_pass_and_other_prompts_are_flagged():
    """Captions and instructions the demo data writes (seeds other than the vocabulary's) raise no
    vocabulary warning; captions none at all; words from elsewhere, or a missing background, do."""
    from qwen_image2_ref.demo import data
    from qwen_image2_ref.demo.language import prompt_warnings

    rng = np.random.default_rng(2024)
    for _ in range(300):
        scene = data.sample_scene(rng, *data.SIZES[int(rng.integers(3))], split="any")
        caption = data.caption(scene, rng)
        assert prompt_warnings(caption) == [], caption
        instruction = data.sample_edit(rng, split="any").instruction
        assert not [n for n in prompt_warnings(instruction) if "vocabulary" in n], instruction
    assert any("'cat'" in n for n in prompt_warnings("a cat on a white background"))
    assert any("'Red' (write 'red')" in n for n in prompt_warnings("a Red circle on a white background"))
    assert any("no background" in n for n in prompt_warnings("a red circle on the left"))
