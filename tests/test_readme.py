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
