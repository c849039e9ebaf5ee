"""The installed distribution: its import names live under ``qwen_image_edge`` (no generic top-level
``runtime``, ``export``, ``calib`` or ``distill``), and the data the stages read ships with it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_claims_no_generic_top_level_names(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [wheel] = tmp_path.glob("qwen_image_edge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"qwen_image_edge", "qwen_image2_ref"}
    for module in ("runtime/pipeline.py", "runtime/backends/onnxruntime.py", "export/onnx_export.py",
                   "calib/quantize.py", "calib/data/general_prompts.txt", "distill/trainer.py", "distill/__main__.py"):
        assert f"qwen_image_edge/{module}" in names, module
    shipped = [n for n in names if n.startswith("qwen_image2_ref/demo/")]
    assert "qwen_image2_ref/demo/weights/transformer/config.json" in shipped
    assert "qwen_image2_ref/demo/student/model_index.json" in shipped


def test_public_api_imports_without_torch():
    code = ("import qwen_image_edge, sys\n"
            "from qwen_image_edge import Pipeline, InputError, QwenImageEdgeError\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "import importlib.util\n"
            "assert all(importlib.util.find_spec(n) is None for n in ('runtime', 'export', 'calib', 'distill'))\n"
            "print(Pipeline.__module__)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "qwen_image_edge.runtime.pipeline"
