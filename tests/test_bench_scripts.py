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


def test_gpu_check_quick_runs_every_part_on_cpu():
    out = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for line in ("[step]", "ms per step", "TFLOP/s", "[calibrate]", "quantized layers", "[generate]",
                 "PSNR vs CPU fp32", "judge color"):
        assert line in out.stdout, out.stdout
    assert "FAILED" not in out.stdout


def test_gpu_check_counts_the_flops_the_linears_do():
    """step_flops' projection and MLP terms equal 2 x in x out per row of every nn.Linear the
    forward runs (counted by hooks); attention adds 4 seq^2 D per layer on top."""
    import torch

    from bench.gpu_check import TEXT_ROWS, step_flops, step_inputs
    from qwen_image2_ref.config import TransformerConfig
    from qwen_image2_ref.transformer import QwenImageTransformer

    cfg = TransformerConfig(num_layers=2, num_heads=2, head_dim=16, context_dim=24, axes_dims_rope=(4, 6, 6))
    model = QwenImageTransformer(cfg).eval()
    counted = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda mod, a, out: counted.append(2 * a[0][..., :1].numel() * mod.in_features
                                                                       * mod.out_features))
    target = (4, 6)
    with torch.no_grad():
        model(**step_inputs(cfg, target, "cpu", torch.float32))
    seq = TEXT_ROWS + 24
    attention = cfg.num_layers * 4 * seq * seq * cfg.hidden_size
    assert step_flops(cfg, TEXT_ROWS, 0, 24, seq) - attention == sum(counted)
