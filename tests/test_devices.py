"""--device / --dtype resolution (qwen_image2_ref.devices) and the memory-lean, device-direct loader.

CUDA paths are tested by logic on any machine: ``torch.cuda`` is monkeypatched to report GPUs
(resolution only reads is_available, device_count, is_bf16_supported and get_device_name).
"""

from __future__ import annotations

import logging
import weakref

import pytest
import torch

from qwen_image2_ref import checkpoint
from qwen_image2_ref.devices import available_devices, parse_dtype, resolve_placement
from qwen_image_edge.runtime.errors import ConfigError


def _fake_gpus(monkeypatch, count: int, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")


def test_without_cuda_the_default_is_cpu_fp32_and_cuda_is_one_line_naming_what_runs(monkeypatch):
    _fake_gpus(monkeypatch, 0)
    p = resolve_placement()
    assert (p.device, p.dtype) == (torch.device("cpu"), torch.float32)
    assert available_devices() == ["cpu"]
    with pytest.raises(ConfigError) as err:
        resolve_placement("cuda")
    assert str(err.value) == "--device cuda: CUDA is not available here; this machine can run: cpu"
    assert resolve_placement("cpu", "bf16").dtype is torch.bfloat16  # bf16 on the CPU is allowed


def test_with_cuda_the_default_is_gpu_bf16_and_indexes_are_checked(monkeypatch):
    _fake_gpus(monkeypatch, 2)
    p = resolve_placement()
    assert (p.device, p.dtype) == (torch.device("cuda", 0), torch.bfloat16)
    assert resolve_placement("cuda:1").device == torch.device("cuda", 1)
    assert resolve_placement("cpu").dtype is torch.float32  # the CPU asked without a dtype: fp32
    with pytest.raises(ConfigError, match=r"--device cuda:2: no such GPU \(2 visible\); "
                                          r"this machine can run: cpu, cuda:0, cuda:1$"):
        resolve_placement("cuda:2")


def test_a_gpu_without_bf16_defaults_to_fp16_and_refuses_bf16(monkeypatch):
    _fake_gpus(monkeypatch, 1, bf16=False)
    assert resolve_placement().dtype is torch.float16
    with pytest.raises(ConfigError, match="Fake GPU has no bf16 support; this GPU can run: fp32, fp16"):
        resolve_placement("cuda", "bf16")


@pytest.mark.parametrize(("given", "expected"), [("fp32", torch.float32), ("BF16", torch.bfloat16),
                                                 ("float16", torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_dtype_names(given, expected):
    assert parse_dtype(given) is expected


@pytest.mark.parametrize("bad", ["fp64", "int8", "", torch.int32])
def test_unknown_dtype_is_one_line(bad):
    with pytest.raises(ConfigError, match=r"^--dtype .*: expected one of fp32, bf16, fp16$"):
        parse_dtype(bad)


def test_fp16_is_refused_for_calibration_only():
    with pytest.raises(ConfigError, match=r"^--dtype fp16: quantize cannot run in fp16: .*65504"):
        resolve_placement("cpu", "fp16", stage="quantize")
    assert resolve_placement("cpu", "fp16", stage="generate").dtype is torch.float16


def test_a_bad_device_fails_before_any_weight_is_read(tiny_model_dir, monkeypatch):
    from qwen_image2_ref.model_folder import load_model

    _fake_gpus(monkeypatch, 0)

    def no_read(*a, **k):
        raise AssertionError("a weights file was opened")

    monkeypatch.setattr(checkpoint, "safe_open", no_read)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        load_model(tiny_model_dir, device="cuda")


def test_the_loaded_pair_is_logged(tiny_model_dir, caplog):
    from qwen_image2_ref.model_folder import load_model

    with caplog.at_level(logging.INFO, logger="qwen_image2_ref.model_folder"):
        model = load_model(tiny_model_dir, device="cpu", dtype="bf16")
    assert "on cpu in bf16" in caplog.text
    assert (model.device, model.dtype) == (torch.device("cpu"), torch.bfloat16)
    assert model.pipeline().dtype is torch.bfloat16  # the pipeline follows the model's placement


class _Spy:
    """Wraps the loader's tensor reader: records the fp32 bytes alive at once among the tensors it
    hands out (each released tensor leaves the count through a weakref finalizer) and the devices
    they were made on."""

    def __init__(self, real):
        self.real, self.devices, self.live, self.peak = real, [], 0, 0

    def __call__(self, entry, *args, **kwargs):
        t = self.real(entry, *args, **kwargs)
        self.devices.append(str(t.device))
        if t.dtype is torch.float32:
            self.live += t.nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self.release, t.nbytes)
        return t

    def release(self, nbytes):
        self.live -= nbytes


def test_a_sharded_fp32_checkpoint_loads_in_bf16_one_tensor_at_a_time(tmp_path, monkeypatch):
    """Never a full fp32 copy in host memory: at most one fp32 tensor (the one being cast) is alive."""
    torch.manual_seed(0)
    source = torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(6)))
    folder = checkpoint.save_component(source, tmp_path / "c", {}, max_shard_size=40_000)
    files, _ = checkpoint.find_weight_files(folder)
    assert len(files) >= 3  # really sharded
    spy = _Spy(checkpoint.read_tensor)
    monkeypatch.setattr(checkpoint, "read_tensor", spy)
    with torch.device("meta"):
        target = torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(6)))
    checkpoint.load_into(target, folder, dtype=torch.bfloat16, device="cpu")
    largest = max(t.nbytes for t in source.state_dict().values())
    total = sum(t.nbytes for t in source.state_dict().values())
    assert 0 < spy.peak <= largest < total / 4, (spy.peak, largest, total)  # not even a shard of fp32
    assert set(spy.devices) == {"cpu"}
    for (name, want), got in zip(source.state_dict().items(), target.state_dict().values()):
        assert got.dtype is torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16)), name


def test_a_bf16_checkpoint_makes_no_fp32_tensor(tmp_path, monkeypatch):
    source = torch.nn.Linear(32, 32)
    folder = checkpoint.save_component(source, tmp_path / "c", {}, dtype=torch.bfloat16)
    spy = _Spy(checkpoint.read_tensor)
    monkeypatch.setattr(checkpoint, "read_tensor", spy)
    with torch.device("meta"):
        target = torch.nn.Linear(32, 32)
    checkpoint.load_into(target, folder, dtype=torch.bfloat16)
    assert spy.peak == 0 and target.weight.dtype is torch.bfloat16


def test_distill_device_follows_the_asked_one(monkeypatch):
    from qwen_image_edge.distill.trainer import init_distributed

    _fake_gpus(monkeypatch, 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed(torch.device("cpu"))[2] == torch.device("cpu")  # a GPU box asked for the CPU
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    assert init_distributed(torch.device("cuda", 1))[2] == torch.device("cuda", 1)
