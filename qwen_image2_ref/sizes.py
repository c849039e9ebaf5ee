"""Parameter counts and weight sizes of a preset, for planning exports and GPU memory.

Every model is built on the meta device: shapes without storage, so the full 2.1 model (about
16 B parameters in all) is counted in a second or two and no memory is touched.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import Qwen3VLForConditionalGeneration

from qwen_image2_ref.config import EncoderConfig, ModelConfig
from qwen_image2_ref.encoder import build_qwen3vl_config
from qwen_image2_ref.transformer import QwenImageTransformer
from qwen_image2_ref.vae import QwenImageVAE

logger = logging.getLogger(__name__)

BF16_BYTES = 2


@dataclass(frozen=True)
class TransformerSize:
    layers: int
    heads: int
    head_dim: int
    hidden: int
    params: int

    @property
    def bf16_gb(self) -> float:
        return self.params * BF16_BYTES / 1e9


@dataclass(frozen=True)
class VAESize:
    encoder_params: int
    decoder_params: int
    params: int  # encoder + decoder + the 1x1 quant convs between them

    @property
    def bf16_gb(self) -> float:
        return self.params * BF16_BYTES / 1e9


@dataclass(frozen=True)
class EncoderSize:
    text_params: int
    vision_params: int
    lm_head_params: int  # the pipeline reads hidden states only, so an export can drop the head
    params: int

    @property
    def bf16_gb(self) -> float:
        return self.params * BF16_BYTES / 1e9


@dataclass(frozen=True)
class ModelSizes:
    preset: str
    transformer: TransformerSize
    vae: VAESize
    encoder: EncoderSize

    @property
    def params(self) -> int:
        return self.transformer.params + self.vae.params + self.encoder.params

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"preset": self.preset, "params": self.params}
        for name in ("transformer", "vae", "encoder"):
            part = getattr(self, name)
            out[name] = {**dataclasses.asdict(part), "bf16_gb": part.bf16_gb}
        return out


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_sizes(config: ModelConfig) -> ModelSizes:
    """Count the parameters of each component of ``config`` (meta device, no weights)."""
    with torch.device("meta"):
        transformer = QwenImageTransformer(config.transformer)
        vae = QwenImageVAE(config.vae)
    tc = config.transformer
    t_size = TransformerSize(
        tc.num_layers, tc.num_heads, tc.head_dim, tc.hidden_size, count_params(transformer)
    )
    v_size = VAESize(count_params(vae.encoder), count_params(vae.decoder), count_params(vae))
    e_size = encoder_size(config.encoder)
    logger.info(
        "%s: transformer %d, vae %d, encoder %d params",
        config.name,
        t_size.params,
        v_size.params,
        e_size.params,
    )
    return ModelSizes(config.name, t_size, v_size, e_size)


def encoder_size(config: EncoderConfig) -> EncoderSize:
    """Parameters of transformers' ``Qwen3VLForConditionalGeneration`` built from ``config``."""
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(build_qwen3vl_config(config))
    return EncoderSize(
        text_params=count_params(model.model.language_model),
        vision_params=count_params(model.model.visual),
        lm_head_params=count_params(model.lm_head),
        params=count_params(model),
    )
