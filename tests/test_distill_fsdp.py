"""``distill --strategy fsdp`` on the tiny model: FSDP2 over 2 gloo processes against 1, DCP resume
on the same and another world size, bf16 mixed precision, activation checkpointing, LoRA, refusals.

The multi-process runs share one torchrun launch (tests/fsdp_worker.py: a launch costs ~15 s of
imports per process on 2 cores); the one-process runs are in-process (a one-rank gloo group).

The fp32 bound, 2e-6 on any weight: the same fp32 math, only summed in another order (two
per-rank partial means averaged by a gloo reduce-scatter instead of one mean), 3 AdamW steps in
warmup (lr <= 1.5e-4): measured 4.8e-7, as DDP's (tests/test_distill.py uses the same bound).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen_image_edge.distill import fsdp
from qwen_image_edge.distill.trainer import DistillSettings, distill
from qwen_image_edge.runtime.errors import ConfigError
from tests.test_distill import ARGS, SETTINGS, _weights

FSDP = DistillSettings(**{**SETTINGS.__dict__, "strategy": "fsdp"})
BOUND = 2e-6


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _losses(out: Path) -> list[float]:
    return json.loads((out / "losses.json").read_text())["losses"]


def _run(model, out: Path, settings=FSDP, **kw):
    torch.set_num_threads(1)
    return distill(str(model), out, settings, progress=False, **kw)


@pytest.fixture(scope="module")
def two(tiny_model_dir, tmp_path_factory):
    """One torchrun launch, 2 gloo processes: an uninterrupted fsdp run; one interrupted after 2 of
    3 iterations and resumed; one interrupted and left (resumed by one process below); a LoRA
    student with activation checkpointing."""
    root = tmp_path_factory.mktemp("fsdp-2p")
    base = ["--teacher", str(tiny_model_dir), "--threads", "1", "--strategy", "fsdp", *ARGS]
    runs = [[*base, "--out", str(root / "full")],
            [*base, "--out", str(root / "cut"), "--stop-after", "2"],
            [*base, "--out", str(root / "cut")],
            [*base, "--out", str(root / "left"), "--stop-after", "2"],
            [*base, "--out", str(root / "lora"), "--lora", "4", "--activation-checkpointing"]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", "29529",
           str(Path(__file__).with_name("fsdp_worker.py")), json.dumps(runs)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr
    return root


@pytest.fixture(scope="module")
def one(tiny_model_dir, tmp_path_factory):
    """The uninterrupted fsdp run in one process: (work folder, student folder)."""
    out = tmp_path_factory.mktemp("fsdp-1p")
    return out, _run(tiny_model_dir, out)


def test_two_processes_match_one(two, one):
    assert _worst(_weights(two / "full" / "student"), _weights(one[1])) < BOUND
    meta = json.loads((two / "full" / fsdp.META_NAME).read_text())
    assert meta["world"] == 2 and meta["iteration"] == 3
    # two ranks wrote two shard files
    assert len(list((two / "full" / meta["folder"]).glob("*.distcp"))) == 2


def test_one_process_fsdp_is_ddp(one, tiny_model_dir, tmp_path):
    """FSDP over one rank against today's trainer (DDP path, one process): the same student."""
    ddp = _run(tiny_model_dir, tmp_path, SETTINGS)
    assert _worst(_weights(ddp), _weights(one[1])) < BOUND


def test_resumed_on_the_same_world_size_is_the_uninterrupted_run(two):
    full, cut = two / "full", two / "cut"
    for k, v in _weights(full / "student").items():
        torch.testing.assert_close(_weights(cut / "student")[k], v, rtol=0, atol=0, msg=k)
    assert _losses(cut) == _losses(full)
    # the pointer moved to the last checkpoint and the earlier folder is gone
    assert [p.name for p in cut.glob(f"{fsdp.DCP_PREFIX}*")] == [f"{fsdp.DCP_PREFIX}00000003"]


def test_resumed_on_one_process_is_the_uninterrupted_run(two, one, tiny_model_dir, tmp_path):
    """A 2-process checkpoint (iteration 2) finished by 1 process: DCP reshards it."""
    out = tmp_path / "left"
    shutil.copytree(two / "left", out)
    meta = json.loads((out / fsdp.META_NAME).read_text())
    assert meta["world"] == 2 and meta["iteration"] == 2 and not (out / "student").exists()
    student = _run(tiny_model_dir, out)
    assert _worst(_weights(student), _weights(two / "full" / "student")) < BOUND
    assert _worst(_weights(student), _weights(one[1])) < BOUND
    losses = _losses(out)
    assert len(losses) == 3 and losses[:2] == _losses(two / "full")[:2]


def test_interrupted_and_resumed_in_one_process_is_exact(one, tiny_model_dir, tmp_path):
    assert _run(tiny_model_dir, tmp_path, stop_after=2) is None
    student = _run(tiny_model_dir, tmp_path)
    for k, v in _weights(one[1]).items():
        torch.testing.assert_close(_weights(student)[k], v, rtol=0, atol=0, msg=k)


def test_lora_student_shards_and_checkpoints_its_adapters_only(two, tiny_model_dir, tmp_path):
    import torch.distributed.checkpoint as dcp

    ddp = _run(tiny_model_dir, tmp_path, DistillSettings(**{**SETTINGS.__dict__, "lora_rank": 4}))
    a = load_file(str(ddp / "student_lora.safetensors"))
    b = load_file(str(two / "lora" / "student" / "student_lora.safetensors"))
    assert _worst(a, b) < BOUND
    assert max(float(v.abs().max()) for k, v in b.items() if "lora_B" in k) > 1e-5  # B starts at 0: it trained
    meta = json.loads((two / "lora" / fsdp.META_NAME).read_text())
    stored = dcp.FileSystemReader(str(two / "lora" / meta["folder"])).read_metadata().state_dict_metadata
    model_keys = [k for k in stored if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys)


def test_bf16_mixed_precision_computes_in_bf16_over_fp32_masters(one, tiny_model_dir, tmp_path):
    """Losses within 2e-2 relative of the fp32 run (measured <= 3.4e-3: bf16 keeps 8 bits, 2^-9
    relative per rounding, through 2 layers), yet not equal to them (the compute really is bf16);
    the student is fp32 and off bf16's grid (the optimizer steps fp32 masters)."""
    bf16 = DistillSettings(**{**FSDP.__dict__, "mixed_precision": "bf16"})
    student = _weights(_run(tiny_model_dir, tmp_path, bf16))
    got, ref = _losses(tmp_path), _losses(one[0])
    rel = [abs(g - r) / r for g, r in zip(got, ref)]
    assert max(rel) < 2e-2 and max(rel) > 1e-5, rel
    assert {v.dtype for v in student.values()} == {torch.float32}
    assert any(bool((v.bfloat16().float() != v).any()) for v in student.values())
    assert _worst(student, _weights(tiny_model_dir)) > 1e-5


def test_activation_checkpointing_recomputes_each_block_with_the_same_result(one, tiny_model_dir, tmp_path,
                                                                              monkeypatch):
    from qwen_image2_ref.transformer import Block

    calls = []
    real = Block.forward
    monkeypatch.setattr(Block, "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    counts = []
    for ac in (False, True):
        calls.clear()
        settings = DistillSettings(**{**FSDP.__dict__, "activation_checkpointing": ac})
        student = _run(tiny_model_dir, tmp_path / str(ac), settings)
        counts.append(len(calls))
        for k, v in _weights(one[1]).items():
            torch.testing.assert_close(_weights(student)[k], v, rtol=0, atol=0, msg=k)
    layers = json.loads((tiny_model_dir / "transformer" / "config.json").read_text())["num_layers"]
    assert counts[1] - counts[0] == layers * FSDP.iters  # one more forward per block per iteration


# ------------------------------------------------------------------------------------ refusals

def test_unknown_strategy_and_bf16_without_fsdp_are_refused(tiny_model_dir, tmp_path, capsys):
    from qwen_image_edge.distill.cli import main

    with pytest.raises(ConfigError, match="--strategy: expected one of ddp, fsdp, got 'zero'"):
        DistillSettings(strategy="zero")
    with pytest.raises(ConfigError, match="--mixed-precision: expected one of fp32, bf16, got 'fp16'"):
        DistillSettings(strategy="fsdp", mixed_precision="fp16")
    with pytest.raises(ConfigError, match="bf16: needs --strategy fsdp"):
        DistillSettings(mixed_precision="bf16")
    out = tmp_path / "never"
    assert main(["--teacher", str(tiny_model_dir), "--out", str(out), "--strategy", "zero", *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --strategy") and "\n" not in err and not out.exists()


def test_a_checkpoint_of_the_other_strategy_is_refused(one, tiny_model_dir, tmp_path):
    _run(tiny_model_dir, tmp_path / "ddp", SETTINGS, stop_after=1)
    with pytest.raises(ConfigError, match="a ddp checkpoint; resume it with --strategy ddp"):
        _run(tiny_model_dir, tmp_path / "ddp")
    shutil.copytree(one[0], tmp_path / "fsdp", ignore=shutil.ignore_patterns("student"))
    with pytest.raises(ConfigError, match="an fsdp checkpoint; resume it with --strategy fsdp"):
        _run(tiny_model_dir, tmp_path / "fsdp", SETTINGS)


def test_a_dcp_checkpoint_of_another_model_is_refused(one, tiny_model_dir, tmp_path):
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    weights = next((other / "transformer").glob("*.safetensors"))
    state = load_file(str(weights))
    state["proj_out.weight"] = state["proj_out.weight"] * 1.5
    save_file(state, str(weights), metadata={"format": "pt"})
    out = tmp_path / "run"
    shutil.copytree(one[0], out, ignore=shutil.ignore_patterns("student"))
    with pytest.raises(ConfigError, match=r"another run \(differs in \['teacher'\]\)"):
        _run(other, out)


def test_a_dcp_folder_with_other_tensors_or_none_is_refused(two, one, tiny_model_dir, tmp_path):
    """The pointer's run matches but its folder holds a LoRA student's shards, or is missing."""
    out = tmp_path / "run"
    shutil.copytree(one[0], out, ignore=shutil.ignore_patterns("student", f"{fsdp.DCP_PREFIX}*"))
    meta = json.loads((out / fsdp.META_NAME).read_text())
    shutil.copytree(two / "lora" / json.loads((two / "lora" / fsdp.META_NAME).read_text())["folder"],
                    out / meta["folder"])
    with pytest.raises(ConfigError, match="not a checkpoint of this student"):
        _run(tiny_model_dir, out)
    shutil.rmtree(out / meta["folder"])
    with pytest.raises(ConfigError, match="which is missing"):
        _run(tiny_model_dir, out)
