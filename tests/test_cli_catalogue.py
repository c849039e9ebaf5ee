"""The bad-input catalogue on the command line: each case is one thing a hostile new user does (a
flag out of range, a broken model folder or export, an output that cannot be written, a bad
image). The only acceptable outcome is one line ``qwen-image-edge: error: ...`` naming the
problem, exit code 2, and nothing written: no image, no temporary file, no empty folder.

Calls are in-process ``main([...])`` on the tiny model (tests/conftest.py); a case that breaks a
model folder or an export works on its own copy.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwen_image_edge.cli import main


@dataclass
class Env:
    """Paths a case builds its arguments from; ``model()`` / ``export()`` give private copies to break."""

    tmp: Path
    model_dir: Path
    export_dir: Path
    out: Path  # the folder outputs go to: must stay empty

    def model(self, edit: Callable[[Path], None] | None = None) -> str:
        if edit is None:
            return str(self.model_dir)
        copy = self.tmp / "model-copy"
        shutil.copytree(self.model_dir, copy)
        edit(copy)
        return str(copy)

    def export(self, edit: Callable[[Path], None] | None = None) -> str:
        if edit is None:
            return str(self.export_dir)
        copy = self.tmp / "export-copy"
        shutil.copytree(self.export_dir, copy)
        edit(copy)
        return str(copy)

    def image(self, name: str, make: Callable[[Path], None]) -> str:
        path = self.tmp / name
        make(path)
        return str(path)

    def o(self, name: str = "out.png") -> str:
        return str(self.out / name)


def _rgb(path: Path, size=(64, 48)) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _write(rel: str, text: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        (root / rel).write_text(text)
    return edit


def _truncate(rel: str, keep: float = 0.5) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        data = (root / rel).read_bytes()
        (root / rel).write_bytes(data[: int(len(data) * keep)])
    return edit


def _remove(rel: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        target = root / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return edit


def _manifest(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        data = json.loads((root / "manifest.json").read_text())
        change(data)
        (root / "manifest.json").write_text(json.dumps(data))
    return edit


def _set(path: str, value) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        *head, last = path.split(".")
        for key in head:
            data = data[key]
        data[last] = value
    return change


def _run(e: Env, *extra: str, export: str | None = None) -> list[str]:
    return ["run", "--export", export or e.export(), "a red circle", "-o", e.o(), *extra]


def _gen(e: Env, *extra: str, model: str | None = None) -> list[str]:
    return ["generate", "--model", model or e.model(), "a red circle", "-o", e.o(), *extra]


def _edit_run(e: Env, image: str, *extra: str) -> list[str]:
    return ["run", "--export", e.export(), "--image", image, "make it blue", "-o", e.o(), *extra]


# (id, argv from the Env, a piece of the one error line)
CASES: list[tuple[str, Callable[[Env], list[str]], str]] = [
    # ---- sampling flags (run: runtime, generate: reference)
    ("run-steps-zero", lambda e: _run(e, "--steps", "0"), "steps: expected a positive integer, got 0"),
    ("run-steps-negative", lambda e: _run(e, "--steps", "-3"), "steps: expected a positive integer"),
    ("run-steps-huge", lambda e: _run(e, "--steps", "100000"), "steps: expected 1..1000"),
    ("gen-steps-huge", lambda e: _gen(e, "--steps", "1001"), "steps: expected 1..1000"),
    ("run-guidance-below-1", lambda e: _run(e, "--guidance", "0.5"), "guidance: expected a number >= 1"),
    ("run-guidance-nan", lambda e: _run(e, "--guidance", "nan"), "guidance: expected a number >= 1"),
    ("run-guidance-inf", lambda e: _run(e, "--guidance", "inf"), "guidance: expected a number >= 1"),
    ("run-width-not-multiple", lambda e: _run(e, "--width", "100"), "width 100: expected a multiple of 32"),
    ("run-width-tiny", lambda e: _run(e, "--width", "16"), "width: expected 32..4096 pixels"),
    ("run-height-huge", lambda e: _run(e, "--height", "100000"), "height: expected 32..4096 pixels"),
    ("run-width-over-export", lambda e: _run(e, "--width", "512"), "outside the exported range"),
    ("run-seed-negative", lambda e: _run(e, "--seed", "-1"), "seed: expected a non-negative integer"),
    ("run-num-images-zero", lambda e: _run(e, "--num-images", "0"), "--num-images: expected 1..64"),
    ("run-num-images-huge", lambda e: _run(e, "--num-images", "100000"), "--num-images: expected 1..64"),
    ("run-threads-zero", lambda e: _run(e, "--threads", "0"), "threads: expected a positive integer"),
    ("run-threads-huge", lambda e: _run(e, "--threads", "1000000"), "CPU cores available"),
    ("gen-threads-huge", lambda e: _gen(e, "--threads", "1000000"), "CPU cores available"),
    ("run-bad-background", lambda e: _run(e, "--background", "not-a-colour"), "--background: expected a colour"),
    ("run-backend", lambda e: _run(e, "--backend", "nope"), "available backends"),
    ("run-provider", lambda e: _run(e, "--providers", "FooExecutionProvider"), "available: "),
    ("run-long-prompt", lambda e: ["run", "--export", e.export(), "a" + " a" * 1100, "-o", e.o()], "over the limit"),
    # ---- output paths
    ("out-suffix", lambda e: _run(e)[:-1] + [e.o("out.gif")], "expected a .png, .jpg/.jpeg or .webp path"),
    ("out-no-suffix", lambda e: _run(e)[:-1] + [e.o("out")], "expected a .png, .jpg/.jpeg or .webp path"),
    ("out-is-directory", lambda e: _run(e)[:-1] + [str(_mkdir(e.out / "d.png"))], "is a directory"),
    ("out-folder-missing", lambda e: _run(e)[:-1] + [e.o("missing/out.png")], "does not exist"),
    ("gen-out-folder-missing", lambda e: _gen(e)[:-1] + [e.o("missing/out.png")], "does not exist"),
    # ---- model folders (reference)
    ("model-missing", lambda e: _gen(e, model=str(e.tmp / "nothing")), "model_index.json"),
    ("model-index-truncated", lambda e: _gen(e, model=e.model(_truncate("model_index.json"))), "model_index.json"),
    ("model-index-a-list", lambda e: _gen(e, model=e.model(_write("model_index.json", "[]"))), "model_index.json"),
    ("model-index-not-utf8", lambda e: _gen(e, model=e.model(lambda r: (r / "model_index.json").write_bytes(b"\xff\xfe"))),
     "model_index.json"),
    ("transformer-config-truncated", lambda e: _gen(e, model=e.model(_truncate("transformer/config.json"))),
     "config.json"),
    ("vae-config-a-list", lambda e: _gen(e, model=e.model(_write("vae/config.json", "[1]"))), "config.json"),
    ("scheduler-config-missing", lambda e: _gen(e, model=e.model(_remove("scheduler/scheduler_config.json"))),
     "scheduler_config.json"),
    ("scheduler-config-truncated", lambda e: _gen(e, model=e.model(_truncate("scheduler/scheduler_config.json"))),
     "scheduler_config.json"),
    ("transformer-weights-missing", lambda e: _gen(e, model=e.model(_remove("transformer/diffusion_pytorch_model.safetensors"))),
     "transformer"),
    ("transformer-weights-truncated", lambda e: _gen(e, model=e.model(_truncate("transformer/diffusion_pytorch_model.safetensors"))),
     "transformer"),
    ("tokenizer-missing", lambda e: _gen(e, model=e.model(_remove("processor/tokenizer.json"))), "tokenizer"),
    # ---- exports (runtime)
    ("export-missing", lambda e: _run(e, export=str(e.tmp)), "not an export"),
    ("manifest-truncated", lambda e: _run(e, export=e.export(_truncate("manifest.json"))), "manifest.json"),
    ("manifest-a-list", lambda e: _run(e, export=e.export(_write("manifest.json", "[]"))), "manifest.json"),
    ("manifest-empty-object", lambda e: _run(e, export=e.export(_write("manifest.json", "{}"))), "manifest.json"),
    ("manifest-absurd-max-resolution", lambda e: _run(e, export=e.export(_manifest(_set("image.max_resolution", 10**9)))),
     "max_resolution"),
    ("manifest-negative-resolution", lambda e: _run(e, export=e.export(_manifest(_set("image.output_resolution", -64)))),
     "output_resolution"),
    ("manifest-steps-a-string", lambda e: _run(e, export=e.export(_manifest(_set("schedule.num_steps", "many")))),
     "num_steps"),
    ("graph-file-missing", lambda e: _run(e, export=e.export(_remove("vae_decoder"))), "vae_decoder"),
    ("graph-file-truncated", lambda e: _run(e, export=e.export(_truncate("transformer/model.onnx"))), "sha256"),
    ("graph-truncated-no-verify", lambda e: _run(e, "--no-verify", export=e.export(_truncate("vae_decoder/model.onnx"))),
     "vae_decoder"),
    ("tokenizer-file-changed", lambda e: _run(e, export=e.export(_write("tokenizer/tokenizer.json", "{}"))), "sha256"),
    # ---- condition images
    ("image-missing", lambda e: _edit_run(e, str(e.tmp / "none.png")), "no such file"),
    ("image-not-an-image", lambda e: _edit_run(e, e.image("x.png", lambda p: p.write_bytes(b"not a png"))),
     "not a readable image"),
    ("image-empty-file", lambda e: _edit_run(e, e.image("x.png", lambda p: p.write_bytes(b""))), "not a readable image"),
    ("image-truncated", lambda e: _edit_run(e, e.image("x.png", _truncated_png)), "not a readable image"),
    ("image-is-a-directory", lambda e: _edit_run(e, str(_mkdir(e.tmp / "dir.png"))), "no such file"),
    ("image-too-wide", lambda e: _edit_run(e, e.image("wide.png", lambda p: _rgb(p, (400, 32)))), "aspect"),
    ("gen-image-missing", lambda e: ["edit", "--model", e.model(), "--image", str(e.tmp / "none.png"), "x", "-o", e.o()],
     "no such file"),
    # ---- other commands
    ("info-image-missing", lambda e: ["info", "--image", str(e.tmp / "none.png")], "no such file"),
    ("info-image-without-parameters", lambda e: ["info", "--image", e.image("plain.png", _rgb)], "no 'qwen-image-edge' parameters"),
    ("info-image-not-an-image", lambda e: ["info", "--image", e.image("t.png", lambda p: p.write_text("hi"))],
     "not a readable image"),
    ("info-preset", lambda e: ["info", "--preset", "no-such-model"], "unknown preset"),
    ("export-out-exists", lambda e: ["export", "--model", e.model(), "--out", str(_mkdir(e.out / "exists"))], "already exists"),
    ("export-threads-huge", lambda e: ["export", "--model", e.model(), "--out", e.o("x"), "--threads", "99999"],
     "CPU cores available"),
    ("validate-report-folder-missing", lambda e: ["validate", e.export(), "--model", e.model(), "--report",
                                                  e.o("missing/report.json")], "does not exist"),
    ("validate-report-is-directory", lambda e: ["validate", e.export(), "--model", e.model(), "--report",
                                                str(_mkdir(e.out / "r.json"))], "is a directory"),
    ("demo-export-dir-is-a-file", lambda e: ["demo", "--export-dir", e.image("file", lambda p: p.write_text("x")),
                                             "-o", e.o()], "not a directory"),
    ("demo-threads-huge", lambda e: ["demo", "-o", e.o(), "--threads", "99999"], "CPU cores available"),
    # ---- --device / --dtype of the torch stages (cuda:99 exists on no machine: "CUDA is not available"
    # without a GPU, "no such GPU" with one; either way the line names the flag and what this machine can run)
    ("gen-device-no-such-gpu", lambda e: _gen(e, "--device", "cuda:99"), "this machine can run: cpu"),
    ("gen-device-unknown", lambda e: _gen(e, "--device", "tpu"), "--device tpu: expected cpu, cuda or cuda:N"),
    ("gen-dtype-unknown", lambda e: _gen(e, "--dtype", "fp64"), "--dtype fp64: expected one of fp32, bf16, fp16"),
    ("edit-device-no-such-gpu", lambda e: ["edit", "--model", e.model(), "--image", e.image("c.png", _rgb),
                                           "make it blue", "-o", e.o(), "--device", "cuda:99"],
     "this machine can run: cpu"),
    ("quantize-fp16", lambda e: ["quantize", "--model", e.model(), "--precision", "int8", "--out", e.o("q"),
                                 "--dtype", "fp16"], "--dtype fp16: quantize cannot run in fp16"),
    ("quantize-device-no-such-gpu", lambda e: ["quantize", "--model", e.model(), "--precision", "int8",
                                               "--out", e.o("q"), "--device", "cuda:99"], "this machine can run: cpu"),
    ("validate-dtype-unknown", lambda e: ["validate", e.export(), "--model", e.model(), "--dtype", "int8"],
     "--dtype int8: expected one of fp32, bf16, fp16"),
    ("distill-device-no-such-gpu", lambda e: ["distill", "--teacher", e.model(), "--out", e.o("d"),
                                              "--device", "cuda:99"], "this machine can run: cpu"),
]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _truncated_png(path: Path) -> None:
    _rgb(path, (64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def tiny(tiny_export):
    return tiny_export


@pytest.mark.parametrize(("case", "build", "match"), [pytest.param(*c, id=c[0]) for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case, build, match, tiny, tmp_path, capsys, monkeypatch):
    import qwen_image2_ref.demo as demo_pkg

    monkeypatch.setattr(demo_pkg, "WEIGHTS_DIR", tiny[0])
    monkeypatch.setenv("QWEN_IMAGE_EDGE_CACHE", str(tmp_path / "cache"))
    env = Env(tmp_path, tiny[0], tiny[1], _mkdir(tmp_path / "out"))
    argv = build(env)
    before = _listing(env.out)
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("qwen-image-edge: error: "), err[-2000:]
    assert match in lines[0], lines[0]
    assert out == ""
    assert _listing(env.out) == before  # no image, no temporary file, no folder
    assert not (tmp_path / "cache").exists()  # the demo cache is not started either


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_the_catalogue_is_large() -> None:
    assert len(CASES) >= 60
