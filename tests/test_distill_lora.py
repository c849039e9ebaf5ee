"""``distill --lora RANK``: a peft LoRA student on the tiny model.

The student folder keeps the teacher's transformer weights bit for bit and carries the adapter in
diffusers' key format; loading (or exporting) the folder fuses it. Checked: only the adapters
trained, the file reads back through our loader and diffusers' ``lora_state_dict``, the fused folder
reproduces the trained peft module's outputs (fp32: fused vs unfused op order, atol 1e-5 on outputs ~1),
resume continues, full fine-tuning is untouched.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from qwen_image2_ref.model_folder import load_model
from qwen_image_edge.distill.lora_student import ADAPTER_NAME, LoraStudentConfig
from qwen_image_edge.distill.trainer import DistillSettings, distill
from qwen_image_edge.runtime.errors import ConfigError
from tests.test_distill import SETTINGS, _weights

pytest.importorskip("peft")

LORA = dataclasses.replace(SETTINGS, lora_rank=4, lora_alpha=8.0)


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("distill-lora")
    return out, distill(str(tiny_model_dir), out, LORA, progress=False)


def test_student_folder_keeps_base_weights_and_carries_the_adapter(lora_run, tiny_model_dir):
    out, student = lora_run
    teacher, kept = _weights(tiny_model_dir), _weights(student)
    assert kept.keys() == teacher.keys() and all(torch.equal(teacher[k], kept[k]) for k in teacher)
    index = json.loads((student / "model_index.json").read_text())["qwen_image_edge"]
    assert index["student_lora"] == ADAPTER_NAME and index["distilled_from"]["lora"]["rank"] == 4
    adapter = load_file(str(student / ADAPTER_NAME))
    assert all(k.startswith("transformer.transformer_blocks.") and (".lora_A.weight" in k or ".lora_B.weight" in k)
               for k in adapter)
    n_blocks = len({k.split(".")[2] for k in adapter})
    assert len(adapter) == 2 * 7 * n_blocks  # A and B for the 7 default targets in every block
    assert max(float(v.abs().max()) for k, v in adapter.items() if "lora_B" in k) > 0  # trained from B = 0


def test_loading_the_student_fuses_its_adapter(lora_run, tiny_model_dir):
    _, student = lora_run
    fused = load_model(student)
    (own,) = fused.loras
    assert own.path.name == ADAPTER_NAME and own.rank == 4
    a = load_file(str(student / ADAPTER_NAME))
    base = _weights(tiny_model_dir)
    key = "transformer_blocks.0.attn.to_q"
    expected = base[f"{key}.weight"].float() + 2.0 * a[f"transformer.{key}.lora_B.weight"] @ a[
        f"transformer.{key}.lora_A.weight"]  # alpha 8 / rank 4
    torch.testing.assert_close(fused.transformer.state_dict()[f"{key}.weight"], expected, atol=1e-6, rtol=0)


def test_diffusers_reads_the_adapter(lora_run):
    from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin

    _, student = lora_run
    state, meta = QwenImageLoraLoaderMixin.lora_state_dict(str(student), weight_name=ADAPTER_NAME,
                                                           return_lora_metadata=True)
    assert state.keys() == load_file(str(student / ADAPTER_NAME)).keys()
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 8.0


def test_resume_gives_the_uninterrupted_adapter(lora_run, tiny_model_dir, tmp_path):
    torch.set_num_threads(1)
    assert distill(str(tiny_model_dir), tmp_path, LORA, progress=False, stop_after=1) is None
    saved = load_file(str(tmp_path / "checkpoint.safetensors"))
    assert saved and all("lora_" in k for k in saved if k.startswith("model/"))  # adapters only, not the base
    other = dataclasses.replace(LORA, lora_rank=2)
    with pytest.raises(ConfigError, match="lora_rank"):
        distill(str(tiny_model_dir), tmp_path, other, progress=False)
    student = distill(str(tiny_model_dir), tmp_path, LORA, progress=False)
    assert len(json.loads((tmp_path / "losses.json").read_text())["losses"]) == LORA.iters
    a, b = load_file(str(lora_run[1] / ADAPTER_NAME)), load_file(str(student / ADAPTER_NAME))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lora_rank=-1), "rank >= 1"), (dict(lora_rank=4, lora_alpha=0.0), "lora-alpha"),
    (dict(lora_rank=4, lora_targets=()), "at least one module"),
])
def test_bad_lora_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DistillSettings(**kwargs)


def test_unknown_target_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="lora-targets"):
        distill(str(tiny_model_dir), tmp_path, dataclasses.replace(LORA, lora_targets=("to_nowhere",)),
                progress=False)
    assert LoraStudentConfig(4).lora_alpha == 4.0


def test_two_gloo_processes_match_one(lora_run, tiny_model_dir, tmp_path):
    """``torchrun --nproc-per-node 2 ... --lora 4 --lora-alpha 8``: the one-process adapter (bound 2e-6 as
    in test_distill.py: per-rank partial means and a gloo all-reduce, 3 Adam steps in warmup)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_distill import ARGS

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", "29523", "-m", "qwen_image_edge.distill",
           "--teacher", str(tiny_model_dir), "--out", str(tmp_path), "--threads", "1", *ARGS,
           "--lora", "4", "--lora-alpha", "8"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = load_file(str(lora_run[1] / ADAPTER_NAME)), load_file(str(tmp_path / "student" / ADAPTER_NAME))
    assert one.keys() == two.keys()
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst < 2e-6, worst
    assert "2 process(es)" in proc.stderr
