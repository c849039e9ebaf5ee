"""The README's Python API examples run as written, in order, against the demo model's export, in a
process where importing torch, transformers or diffusers fails (the runtime needs none of them)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"

_BLOCK_TORCH = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'diffusers'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, _Block())
"""


def api_blocks(text: str) -> list[str]:
    """The ```python blocks of the README's "Python API" section."""
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_api_section_has_examples_for_each_topic():
    blocks = api_blocks(README.read_text())
    joined = "\n".join(blocks)
    assert len(blocks) >= 7
    for needle in ("Pipeline.load(", ".generate([", ".edit(", "callback=", "providers=", "threads=",
                   'output="latent"', "latents=", "except InputError"):
        assert needle in joined, needle


def test_api_examples_run(demo_export, tmp_path):
    (tmp_path / "demo-export").symlink_to(demo_export, target_is_directory=True)
    script = _BLOCK_TORCH + "\n".join(f"# --- README block {i}\n{b}" for i, b in enumerate(api_blocks(README.read_text())))
    script += "\nprint('README OK', sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "README OK []" in proc.stdout
    assert (tmp_path / "circle.png").is_file() and (tmp_path / "blue.png").is_file()
    # the printed error is the one the README shows
    assert "width 100: expected a multiple of 32 pixels" in proc.stdout


def recipe_commands(text: str, heading: str) -> list[list[str]]:
    """The ``qwen-image-edge`` command lines of the first bash block under ``heading``, as argv lists."""
    import shlex

    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    commands = []
    for line in block.splitlines():
        argv = shlex.split(line, comments=True)
        if argv and argv[0].endswith("/qwen-image-edge"):
            commands.append(argv[1:])
    return commands


def test_tensorrt_recipe_runs_on_the_standin(demo_default_export, tmp_path, monkeypatch, trt):
    """The README's TensorRT recipe, command by command, on the demo model, with tests/trt_standin.py
    as TensorRT: its export is the default one (the session fixture), its build must fit that export's
    ranges, and its run must write the image."""
    import shutil

    from qwen_image_edge.cli import build_parser, main

    commands = recipe_commands(README.read_text(), "TensorRT engines on a GPU machine")
    assert [c[0] for c in commands] == ["export", "build", "run"]
    export_args = build_parser().parse_args(commands[0])
    assert export_args.model == "demo" and export_args.max_resolution is None and export_args.graphs is None
    shutil.copytree(demo_default_export, tmp_path / export_args.out)
    monkeypatch.chdir(tmp_path)
    for argv in commands[1:]:
        assert main(argv) == 0, argv
    out = build_parser().parse_args(commands[2]).output
    from PIL import Image

    with Image.open(tmp_path / out) as image:
        assert image.size == (128, 128) and image.mode == "RGBA"
