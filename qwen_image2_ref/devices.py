"""Where and in what precision the torch reference runs: ``--device`` / ``--dtype`` resolved once.

:func:`resolve_placement` turns what a user asked (``"cuda:1"``, ``"bf16"``, or nothing) into a
:class:`Placement`, checked against this machine before anything loads: a device or dtype it
cannot run is a one-line ``ConfigError`` that says what it can run. Nothing asked: CUDA with bf16
where a GPU is present, else the CPU with fp32 (``load_model`` logs the pair at INFO).

Which stage refuses fp16 and why (:data:`FP16_REFUSED`): calibration records activation ranges,
and fp16 tops out at 65504; a full-size transformer's activations can exceed that, so an fp16
calibration would record ``inf`` ranges (bf16 keeps fp32's exponent range). fp16 otherwise runs on
both devices (torch has CPU kernels for the reference's conv, matmul and norms).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from qwen_image_edge.runtime.errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
_NAMES = {v: k for k, v in DTYPES.items()}

FP16_REFUSED = {
    "quantize": "calibration records activation ranges and fp16 overflows past 65504 (ranges would be inf); "
                "use --dtype bf16 (fp32's exponent range) or fp32",
}


@dataclass(frozen=True)
class Placement:
    """A resolved device and dtype for the torch stages."""

    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return _NAMES[self.dtype]

    def __str__(self) -> str:
        return f"{self.device} {self.dtype_name}"


def available_devices() -> list[str]:
    """What this machine can run: ``cpu`` and one ``cuda:N`` per visible GPU."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu", *(f"cuda:{i}" for i in range(count))]


def _can_run() -> str:
    return f"this machine can run: {', '.join(available_devices())}"


def parse_device(device: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``, present on this machine."""
    text = str(device).strip().lower()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise ConfigError(f"--device {device}: expected cpu, cuda or cuda:N; {_can_run()}")
    if dev.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available here; {_can_run()}")
    index = 0 if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: no such GPU ({torch.cuda.device_count()} visible); {_can_run()}")
    return torch.device("cuda", index)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``fp32`` / ``bf16`` / ``fp16`` (or torch's names, or a ``torch.dtype`` of those)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _NAMES:
            raise ConfigError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
        return dtype
    name = str(dtype).strip().lower()
    name = _ALIASES.get(name, name)
    if name not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def default_placement() -> Placement:
    """A GPU with bf16 where CUDA is available (and bf16 supported), else the CPU with fp32."""
    if torch.cuda.is_available():
        dev = torch.device("cuda", 0)
        return Placement(dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return Placement(torch.device("cpu"), torch.float32)


def resolve_placement(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None, *,
                      stage: str | None = None) -> Placement:
    """The device and dtype a stage runs in; ``None`` picks the default (for each separately: a GPU
    asked without a dtype runs bf16, the CPU asked without one runs fp32). Checked, never loaded."""
    default = default_placement()
    dev = parse_device(device) if device is not None else default.device
    if dtype is not None:
        dt = parse_dtype(dtype)
    else:
        dt = default.dtype if dev.type == default.device.type else torch.float32
    if dev.type == "cuda" and dt is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--dtype bf16: {torch.cuda.get_device_name(dev)} has no bf16 support; this GPU can run: "
                          "fp32, fp16")
    if dt is torch.float16 and stage in FP16_REFUSED:
        raise ConfigError(f"--dtype fp16: {stage} cannot run in fp16: {FP16_REFUSED[stage]}")
    placement = Placement(dev, dt)
    # DEBUG: the loader logs the pair at INFO with what it loaded (resolution may run twice per command)
    log.debug("%s: running on %s in %s", stage or "torch reference", placement.device, placement.dtype_name)
    return placement


def release_memory() -> None:
    """Give freed model memory back after dropping the last reference to a model: collect cycles,
    empty CUDA's cache, and ask glibc to return free heap pages (tensors below its mmap threshold,
    up to 32 MiB each, are freed into the heap, which otherwise keeps them resident)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass
