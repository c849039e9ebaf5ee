"""LoRA adapter files for the transformer: read, checked against the model, fused into its weights.

Formats read (the ones diffusers' ``QwenImageLoraLoaderMixin.lora_state_dict`` accepts for Qwen-Image):

- diffusers / peft: ``<module>.lora_A.weight`` [r, in] and ``<module>.lora_B.weight`` [out, r], keys
  prefixed ``transformer.`` (diffusers' ``save_lora_weights``), ``base_model.model.`` (peft's
  ``save_pretrained``) or nothing, possibly with peft's adapter name (``lora_A.default.weight``).
  The scale is ``lora_alpha / r`` from the file's ``lora_adapter_metadata`` (what diffusers writes and
  reads, with its per-module ``alpha_pattern`` / ``rank_pattern``), else 1; stray ``.alpha`` tensors
  are ignored, as diffusers does.
- kohya-style, as Qwen-Image-Lightning ships: ``<module>.lora_down.weight`` / ``lora_up.weight`` /
  ``.alpha``, optionally prefixed ``diffusion_model.``; scale ``alpha / rank`` per module (1 without
  an alpha). ``lora_unet_`` files with flattened names (``lora_unet_transformer_blocks_0_attn_to_q``)
  are resolved against the model's own module names.

Fusing adds ``user_scale * module_scale * B @ A`` to each weight in fp32 and casts back. Only
safetensors files are read (a pickle is refused: loading one can run code).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from qwen_image_edge.runtime.errors import CheckpointError, InputError
from qwen_image_edge.runtime.manifest import sha256_file

log = logging.getLogger(__name__)

PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry (a JSON LoraConfig)
_SUFFIX = re.compile(r"^(?P<module>.+?)\.(?:(?P<part>lora_A|lora_B|lora_down|lora_up)(?:\.[A-Za-z0-9_]+)?\.weight"
                     r"|(?P<alpha>alpha))$")
_LIST = 8  # names shown in an error

# What a caller passes per adapter: a file, or a (file, scale) pair.
LoraSpec = str | os.PathLike | tuple[str | os.PathLike, float]


@dataclass(frozen=True)
class LoraLayer:
    """One adapted linear: ``W += scale * B @ A``."""

    down: torch.Tensor  # A [r, in], fp32
    up: torch.Tensor  # B [out, r], fp32
    scale: float  # alpha / rank from the file (the user's scale is the adapter's)

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class LoraAdapter:
    """An adapter file read and checked against a transformer's weight shapes."""

    path: Path
    scale: float  # the user's multiplier
    sha256: str
    format: str  # "diffusers" or "kohya"
    layers: Mapping[str, LoraLayer]  # by the weight's checkpoint key, "transformer_blocks.0.attn.to_q.weight"

    @property
    def rank(self) -> int:
        return max(layer.rank for layer in self.layers.values())

    def delta(self, key: str) -> torch.Tensor | None:
        """``scale * B @ A`` for weight ``key`` in fp32, or None when the adapter leaves it alone."""
        layer = self.layers.get(key)
        if layer is None:
            return None
        return (self.scale * layer.scale) * (layer.up @ layer.down)  # [out, r] @ [r, in] -> [out, in]

    def provenance(self) -> dict:
        """What the manifest records of this adapter."""
        ranks = sorted({layer.rank for layer in self.layers.values()})
        return {"file": self.path.name, "sha256": self.sha256, "scale": self.scale, "format": self.format,
                "rank": ranks[-1], "ranks": ranks, "layers": sorted(k.removesuffix(".weight") for k in self.layers)}


def _scale(value: object, where: str) -> float:
    try:
        scale = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"{where}: expected a number for the LoRA scale, got {value!r}") from None
    if not math.isfinite(scale):
        raise InputError(f"{where}: expected a finite LoRA scale, got {value!r}")
    return scale


def normalize_specs(loras: Iterable[LoraSpec] | None) -> tuple[tuple[Path, float], ...]:
    """The ``loras=`` argument of the Python entry points as (path, scale) pairs."""
    out = []
    for spec in loras or ():
        if isinstance(spec, (str, os.PathLike)):
            out.append((Path(spec), 1.0))
        elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], (str, os.PathLike)):
            out.append((Path(spec[0]), _scale(spec[1], f"LoRA {spec[0]}")))
        else:
            raise InputError(f"loras: expected a file or a (file, scale) pair per adapter, got {spec!r}")
    return tuple(out)


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    if not path.is_file():
        raise InputError(f"LoRA {path}: expected a safetensors file, found none")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        first = " ".join(str(exc).split())[:120]
        raise CheckpointError(f"LoRA {path}: expected a safetensors file (pickle adapters are refused), "
                              f"cannot read it ({first})") from exc
    if not tensors:
        raise CheckpointError(f"LoRA {path}: expected LoRA tensors, the file holds none")
    raw = meta.get(METADATA_KEY)
    try:
        config = json.loads(raw) if raw else {}
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"LoRA {path}: metadata {METADATA_KEY!r} is not JSON ({exc})") from exc
    return tensors, config if isinstance(config, dict) else {}


def _strip(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _unflatten(key: str, modules: Mapping[str, str], path: Path) -> str:
    """``lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight`` -> the dotted module name, by the
    model's own names with dots as underscores (unambiguous for this architecture)."""
    flat, _, rest = key.removeprefix("lora_unet_").partition(".")
    if flat not in modules:
        raise CheckpointError(f"LoRA {path}: key {key!r} names no module of this transformer")
    return f"{modules[flat]}.{rest}"


def _metadata_scale(config: dict, module: str, rank: int) -> float:
    """alpha / r for one module from diffusers' adapter metadata (keys ``transformer.lora_alpha`` ...)."""
    if not config:
        return 1.0
    get = lambda name, default=None: config.get(f"transformer.{name}", config.get(name, default))  # noqa: E731

    def pattern(table: dict | None, default):
        for pat, value in (table or {}).items():
            if re.fullmatch(rf"(.*\.)?(?:{pat})", module):
                return value
        return default

    alpha = float(pattern(get("alpha_pattern"), get("lora_alpha", rank)))
    r = int(pattern(get("rank_pattern"), rank))
    return alpha / math.sqrt(r) if get("use_rslora", False) else alpha / r


def _group(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """module name -> its parts ("lora_A", "lora_B", "alpha"), lora_down/up named as A/B."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _SUFFIX.match(key)
        if m is None:
            what = "DoRA magnitudes are" if "dora" in key else "a LoRA bias is" if "lora_B" in key else "the key is"
            raise CheckpointError(f"LoRA {path}: key {key!r}: {what} not supported; expected "
                                  "<module>.lora_A/lora_B.weight, <module>.lora_down/lora_up.weight or <module>.alpha")
        part = m["alpha"] or {"lora_down": "lora_A", "lora_up": "lora_B"}.get(m["part"], m["part"])
        parts.setdefault(m["module"], {})[part] = t
        if m["part"] in ("lora_down", "lora_up"):
            parts[m["module"]]["kohya"] = t
    return parts


def read_lora(path: str | os.PathLike, scale: float, shapes: Mapping[str, tuple[int, ...]]) -> LoraAdapter:
    """Read adapter ``path`` and check it against ``shapes`` (the transformer's weight shapes by key):
    every key must name a linear weight of this transformer with matching in/out sizes."""
    path = Path(path)
    tensors, config = _read_file(path)
    keys = {k: _strip(k) for k in tensors}
    others = sorted({k.split(".")[0] for k in tensors if k.split(".")[0] in ("text_encoder", "vae", "unet")})
    if others:
        raise CheckpointError(f"LoRA {path}: adapts {', '.join(others)}; only transformer adapters are supported")
    if any(k.startswith("lora_unet_") for k in keys.values()):
        modules = {k.removesuffix(".weight").replace(".", "_"): k.removesuffix(".weight") for k in shapes}
        keys = {k: _unflatten(v, modules, path) for k, v in keys.items()}
    parts = _group({keys[k]: t for k, t in tensors.items()}, path)
    layers, kohya = {}, False
    for module, p in sorted(parts.items()):
        if "lora_A" not in p or "lora_B" not in p:
            if set(p) == {"alpha"}:
                continue  # an alpha with no pair (diffusers drops these too)
            raise CheckpointError(f"LoRA {path}: module {module!r} has {sorted(set(p) - {'kohya'})}; expected "
                                  "both the down (A) and up (B) matrices")
        key = f"{module}.weight"
        layers[key] = _layer(path, module, p, shapes.get(key), config)
        kohya |= "kohya" in p
    if not layers:
        raise CheckpointError(f"LoRA {path}: expected LoRA matrices, found only {_listing(sorted(tensors))}")
    adapter = LoraAdapter(path, float(scale), sha256_file(path), "kohya" if kohya else "diffusers", layers)
    log.info("LoRA %s: %s format, rank %d, %d layers, scale %g", path.name, adapter.format, adapter.rank,
             len(layers), adapter.scale)
    return adapter


def _listing(names: list[str]) -> str:
    return ", ".join(names[:_LIST]) + (f", ... and {len(names) - _LIST} more" if len(names) > _LIST else "")


def _layer(path: Path, module: str, p: dict[str, torch.Tensor], shape: tuple[int, ...] | None,
           config: dict) -> LoraLayer:
    a, b = p["lora_A"], p["lora_B"]
    if shape is None or len(shape) != 2:
        raise CheckpointError(f"LoRA {path}: {module!r} is not a linear layer of this transformer "
                              f"(adapter for another architecture?)")
    out_f, in_f = shape
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or tuple(a.shape[1:]) != (in_f,) or b.shape[0] != out_f:
        raise CheckpointError(f"LoRA {path}: {module!r}: expected A [r, {in_f}] and B [{out_f}, r] for weight "
                              f"[{out_f}, {in_f}], got A {list(a.shape)} and B {list(b.shape)}")
    rank = a.shape[0]
    if "kohya" in p:
        scale = float(p["alpha"].float().reshape(-1)[0]) / rank if "alpha" in p else 1.0
    else:
        scale = _metadata_scale(config, module, rank)
    return LoraLayer(a.float(), b.float(), scale)


def read_loras(specs: Iterable[LoraSpec] | None, shapes: Mapping[str, tuple[int, ...]]) -> tuple[LoraAdapter, ...]:
    """Every adapter of ``specs`` read and checked, before any weight is touched."""
    return tuple(read_lora(p, s, shapes) for p, s in normalize_specs(specs))


def module_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Weight shapes by state-dict key (works on meta modules too)."""
    return {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}


def fused_weight(base: torch.Tensor, key: str, adapters: Iterable[LoraAdapter]) -> torch.Tensor:
    """``base + sum(delta)`` computed in fp32 and cast back to ``base``'s dtype."""
    acc = None
    for adapter in adapters:
        d = adapter.delta(key)
        if d is not None:
            acc = base.float() + d.to(base.device) if acc is None else acc + d.to(base.device)
    return base if acc is None else acc.to(base.dtype)


@torch.no_grad()
def fuse_loras(module: nn.Module, adapters: Iterable[LoraAdapter]) -> int:
    """Add every adapter's deltas into ``module``'s weights in place; returns the weights changed."""
    adapters = tuple(adapters)
    params = dict(module.named_parameters())
    keys = sorted({k for a in adapters for k in a.layers})
    for key in keys:
        p = params[key]
        p.copy_(fused_weight(p.data, key, adapters))
    if keys:
        log.info("fused %d LoRA adapter(s) into %d weights", len(adapters), len(keys))
    return len(keys)
