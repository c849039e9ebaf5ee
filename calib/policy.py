"""Which transformer layers are quantized, how, and how their activation ranges are calibrated.

A :class:`QuantPolicy` is data: it serialises into the manifest's provenance and back, and the
same policy always selects the same layers. Patterns are ``fnmatch`` patterns over the
transformer's module names (``transformer_blocks.3.attn.to_q``); a layer is quantized when an
``include`` pattern matches it, no ``exclude`` pattern does, and its block is not one of the
first / last ``keep_first`` / ``keep_last`` blocks. Defaults follow TensorRT's demoDiffusion and
modelopt's diffusers recipes: attention projections and MLP linears in the blocks; embedders,
modulation, final norm and output projection kept in high precision.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from qwen_image_edge.calib.components import read_json_object
from qwen_image_edge.runtime.errors import ConfigError
from qwen_image_edge.runtime.manifest import Precision

QUANTIZABLE_PRECISIONS = (Precision.INT8, Precision.FP8)

ATTENTION_PROJECTIONS = (
    "transformer_blocks.*.attn.to_q",
    "transformer_blocks.*.attn.to_k",
    "transformer_blocks.*.attn.to_v",
    "transformer_blocks.*.attn.to_out.0",
)
MLP_LINEARS = (
    "transformer_blocks.*.img_mlp.proj",
    "transformer_blocks.*.img_mlp.gate_layer",
    "transformer_blocks.*.img_mlp.out",
)
HIGH_PRECISION = ("img_in", "txt_in.*", "time_text_embed.*", "modulation.*", "norm_out.*", "proj_out")
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")


class Granularity(str, enum.Enum):
    """Weight scale granularity (activations are always per-tensor: one GEMM-wide scale)."""

    PER_TENSOR = "per-tensor"
    PER_CHANNEL = "per-channel"  # one scale per output channel


class Reduction(str, enum.Enum):
    """How per-denoising-step activation ranges become one range.

    Each layer input records, per calibration batch ``b`` and step ``s``, the abs-max per input
    channel ``a[b, s, c]`` (both guidance branches of a step fold into one max).

    - ``max``: max over batches and steps (modelopt's max calibration).
    - ``percentile``: the ``percentile``-th percentile over steps of the per-step max over batches.
    - ``min-mean``: TensorRT demoDiffusion's PercentileCalibrator: mean over batches per step, then
      the min over the first ``step_fraction`` of the steps.
    - ``mean-max``: its sibling: max over batches per step, then the mean over those steps.
    """

    MAX = "max"
    PERCENTILE = "percentile"
    MIN_MEAN = "min-mean"
    MEAN_MAX = "mean-max"


def parse_precision(value: str | Precision) -> Precision:
    """``"int8"`` / ``"fp8"`` (or the enum) -> Precision; anything else is a ConfigError."""
    try:
        p = Precision(value)
    except ValueError:
        p = None
    if p not in QUANTIZABLE_PRECISIONS:
        raise ConfigError(
            f"quantization precision {value!r}: unknown; expected one of {[q.value for q in QUANTIZABLE_PRECISIONS]}"
        )
    return p


def _enum(cls, value, field: str):
    try:
        return cls(value)
    except ValueError:
        raise ConfigError(f"quant policy {field} {value!r}: expected one of {[e.value for e in cls]}") from None


@dataclass(frozen=True)
class QuantPolicy:
    precision: Precision = Precision.INT8
    include: tuple[str, ...] = ATTENTION_PROJECTIONS + MLP_LINEARS
    exclude: tuple[str, ...] = HIGH_PRECISION
    keep_first: int = 0  # first K transformer blocks stay high precision
    keep_last: int = 0  # last K blocks
    weight_granularity: Granularity | None = None  # None: per-channel for INT8, per-tensor for FP8
    # INT8 only: weights use [-63, 63]. x86 CPUs without VNNI (AVX2 vpmaddubsw) sum u8 x s8 pairs in
    # int16 and saturate with full-range weights (measured: 8 % output error in onnxruntime's fused
    # MatMulIntegerToFloat); onnxruntime's quantizer calls this reduce_range. False for TensorRT.
    weight_reduce_range: bool = True
    smoothquant_alpha: float | None = 0.8  # INT8 only (TensorRT's demo value); None: no smoothing
    reduction: Reduction = Reduction.MAX
    percentile: float = 99.0  # for Reduction.PERCENTILE, over steps
    step_fraction: float = 1.0  # for Reduction.MIN_MEAN: the first fraction of steps considered

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", parse_precision(self.precision))
        default = Granularity.PER_CHANNEL if self.precision is Precision.INT8 else Granularity.PER_TENSOR
        granularity = _enum(Granularity, self.weight_granularity or default, "weight_granularity")
        object.__setattr__(self, "weight_granularity", granularity)
        if self.precision is Precision.FP8 and granularity is Granularity.PER_CHANNEL:
            raise ConfigError("quant policy weight_granularity 'per-channel': FP8 supports per-tensor weight "
                              "scales only (modelopt's E4M3 ONNX export and TensorRT's FP8 GEMMs)")
        object.__setattr__(self, "reduction", _enum(Reduction, self.reduction, "reduction"))
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if not self.include:
            raise ConfigError("quant policy include: expected at least one layer pattern, got none")
        if self.keep_first < 0 or self.keep_last < 0:
            raise ConfigError(f"quant policy keep_first/keep_last: expected >= 0, got {self.keep_first}/{self.keep_last}")
        if self.smoothquant_alpha is not None and not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ConfigError(f"quant policy smoothquant_alpha: expected in [0, 1] or None, got {self.smoothquant_alpha}")
        if not 0.0 < self.percentile <= 100.0:
            raise ConfigError(f"quant policy percentile: expected in (0, 100], got {self.percentile}")
        if not 0.0 < self.step_fraction <= 1.0:
            raise ConfigError(f"quant policy step_fraction: expected in (0, 1], got {self.step_fraction}")

    @property
    def smoothquant(self) -> bool:
        return self.precision is Precision.INT8 and self.smoothquant_alpha is not None

    # ------------------------------------------------------------------ selection

    def select(self, model: nn.Module) -> list[str]:
        """Names of the ``nn.Linear`` modules of ``model`` this policy quantizes, in module order."""
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        unmatched = [p for p in self.include if not any(fnmatch.fnmatchcase(n, p) for n in linears)]
        if unmatched:
            raise ConfigError(
                f"quant policy include {unmatched}: names no layer of the model; its linear layers are "
                f"{existing_layers(linears)}"
            )
        n_blocks = len({int(m.group(1)) for n in linears if (m := _BLOCK.match(n))})
        kept = set(range(min(self.keep_first, n_blocks))) | set(range(max(n_blocks - self.keep_last, 0), n_blocks))
        chosen = []
        for name in linears:
            if not any(fnmatch.fnmatchcase(name, p) for p in self.include):
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
                continue
            block = _BLOCK.match(name)
            if block is not None and int(block.group(1)) in kept:
                continue
            chosen.append(name)
        if not chosen:
            raise ConfigError(
                f"quant policy selects no layer (include {list(self.include)}, exclude {list(self.exclude)}, "
                f"keep_first {self.keep_first}, keep_last {self.keep_last} of {n_blocks} blocks); "
                f"the model's linear layers are {existing_layers(linears)}"
            )
        return chosen

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, enum.Enum):
                d[k] = v.value
            elif isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantPolicy:
        return policy_from_dict(cls, d, "quant policy")

    @classmethod
    def from_json(cls, path: str | Path, **overrides) -> QuantPolicy:
        return cls.from_dict({**read_json_object(path, f"quant policy file {path}"), **overrides})


def existing_layers(names: list[str]) -> list[str]:
    """Linear layer names with block indices folded to ``*`` (a short, readable list)."""
    out: list[str] = []
    for n in names:
        folded = _BLOCK.sub("transformer_blocks.*.", n)
        if folded not in out:
            out.append(folded)
    return out



def policy_from_dict(cls, d: dict[str, Any], what: str):
    """A policy dataclass from its JSON fields (lists become tuples); an unknown key is one line."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{what} keys {unknown}: unknown; expected some of {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def check_block_size(block_size: int, where: str) -> None:
    """A block-wise INT4 block size (the transformer's and the text encoder's policies)."""
    if block_size < 16 or block_size & (block_size - 1):
        # onnxruntime's MatMulNBits and TensorRT's INT4 weight-only GEMMs take powers of two >= 16
        raise ConfigError(f"{where} block_size: expected a power of two >= 16, got {block_size}")


@dataclass(frozen=True)
class Int4Policy:
    """The transformer in 4-bit weight-only (block-wise INT4, AWQ-lite by default), as the text
    encoder's INT4 (``calib.encoder_quant``): the same layer selection as :class:`QuantPolicy`
    (attention projections and MLP linears; embedders, modulation, final norm and output projection
    kept), no activation quantization, so no SmoothQuant or step reduction."""

    include: tuple[str, ...] = ATTENTION_PROJECTIONS + MLP_LINEARS
    exclude: tuple[str, ...] = HIGH_PRECISION
    keep_first: int = 0
    keep_last: int = 0
    # input channels per scale (clipped so a row holds >= 2 blocks). 32, not the encoder's 128: on the
    # demo under edge (validate's 8 end-to-end images, bound 25 dB) blocks of 128 gave PSNR min 20.2 dB
    # (16 prompts), 64 gave 25.9 (16 prompts) and 22.7 (quantize's default 32), 32 gave 30.4 and 28.9;
    # at full size 32 costs 0.625 B per weight (fp32 scales), and with the unquantized linears in fp16
    # (export.int4.store_half_weights) edge stays within 0.35x bf16 (bench/footprint.py).
    block_size: int = 32
    awq: bool = True  # AWQ-lite scale search; False: round-to-nearest with max scales
    precision: ClassVar[Precision] = Precision.INT4

    def __post_init__(self) -> None:
        check_block_size(self.block_size, "transformer int4 policy")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        self._selection()  # include / keep checks as QuantPolicy's

    def _selection(self) -> QuantPolicy:
        return QuantPolicy(include=self.include, exclude=self.exclude, keep_first=self.keep_first,
                           keep_last=self.keep_last)

    def select(self, model: nn.Module) -> list[str]:
        return self._selection().select(model)

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision.value, **{k: list(v) if isinstance(v, tuple) else v
                                                      for k, v in dataclasses.asdict(self).items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Int4Policy:
        """An INT4 policy file: ``{"precision": "int4", "block_size": 64, "keep_first": 1, ...}``."""
        return policy_from_dict(cls, {k: v for k, v in d.items() if k != "precision"}, "int4 policy")

    @classmethod
    def like(cls, policy: QuantPolicy | None) -> Int4Policy:
        """The INT4 policy selecting what ``policy`` (a transformer QuantPolicy) selects."""
        if policy is None:
            return cls()
        return cls(policy.include, policy.exclude, policy.keep_first, policy.keep_last)
