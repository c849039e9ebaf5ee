"""A LoRA student (``distill --lora RANK``): peft adapters on the teacher's own transformer.

One copy of the model: the teacher's trajectories (the pool) are sampled from the base weights
before the adapters exist, then peft injects zero-initialised LoRA layers (``B = 0``: the student
starts as the teacher) and only they train. The student folder keeps the teacher's transformer
weights and carries the adapter as ``student_lora.safetensors`` in diffusers' key format
(``transformer.<module>.lora_A/B.weight`` + ``lora_adapter_metadata``, what
``QwenImage21Pipeline.load_lora_weights`` reads); ``model_index.json`` names it, so loading or
exporting the folder fuses it (``qwen_image2_ref.lora``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from qwen_image_edge.runtime.errors import ConfigError

ADAPTER_NAME = "student_lora.safetensors"
# every linear of the blocks: attention projections and the SwiGLU MLP
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out")


@dataclasses.dataclass(frozen=True)
class LoraStudentConfig:
    rank: int
    alpha: float | None = None  # None: alpha = rank (scale 1)
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"--lora: expected a rank >= 1, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"--lora-alpha: expected > 0, got {self.alpha}")
        if not self.targets:
            raise ConfigError("--lora-targets: expected at least one module name")

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


def add_adapter(transformer: nn.Module, config: LoraStudentConfig, seed: int = 0) -> nn.Module:
    """Inject the adapters in place; only they require grad afterwards. A's random init comes from
    ``seed`` (not the global generator), so a run and its resumption start alike on every rank."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:
        raise ConfigError("distill --lora needs peft: pip install 'qwen-image-edge[lora]'") from exc
    peft_config = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, target_modules=list(config.targets))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            inject_adapter_in_model(peft_config, transformer)
    except ValueError as exc:  # peft: a target that matches no module
        raise ConfigError(f"--lora-targets {', '.join(config.targets)}: {' '.join(str(exc).split())[:200]}") from exc
    for name, p in transformer.named_parameters():
        p.requires_grad_("lora_" in name)
    return transformer


def _state(weights: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return weights if isinstance(weights, dict) else weights.state_dict()


def adapter_state(weights: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained LoRA matrices by diffusers' keys (``transformer.<module>.lora_A.weight``), from
    the peft-wrapped transformer or its state dict (an FSDP student's, gathered)."""
    out = {}
    for name, t in _state(weights).items():
        if ".lora_A." in name or ".lora_B." in name:
            out["transformer." + name.replace(".default.weight", ".weight")] = t.detach().float().cpu().contiguous()
    return out


def base_state(weights: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The untouched base weights under their checkpoint keys (peft wraps them as ``.base_layer``)."""
    return {k.replace(".base_layer.", "."): v for k, v in _state(weights).items() if "lora_" not in k}


def save_adapter(path: Path, transformer: nn.Module | dict[str, torch.Tensor], config: LoraStudentConfig) -> Path:
    """The adapter as diffusers' ``save_lora_weights`` writes it (metadata: r, lora_alpha, targets)."""
    meta = {"transformer.r": config.rank, "transformer.lora_alpha": config.lora_alpha,
            "transformer.target_modules": sorted(config.targets), "transformer.alpha_pattern": {},
            "transformer.rank_pattern": {}}
    save_file(adapter_state(transformer), str(path),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True)})
    return path
