"""Every benchmark script starts and explains itself when run as `python bench/NAME.py --help`
(run as a script, bench/ comes first on sys.path, where bench/runtime.py and bench/export.py
would shadow the packages of the same name)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (REPO / "bench").glob("*.py"))


def test_there_are_bench_scripts():
    assert {"transformer.py", "runtime.py", "export.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help(script):
    out = subprocess.run([sys.executable, f"bench/{script}", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout
