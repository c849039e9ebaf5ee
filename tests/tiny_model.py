"""A tiny random Qwen-Image-2.1 model with weights that matter, saved in the real folder layout.

Used by the pipeline, CLI and export tests. Transformer and VAE start from diffusers' own init
(so both libraries hold the same weights) and are scaled/perturbed as the toolchain notes (section 9)
say, or random weights barely move the output.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from qwen_image2_ref.config import TINY, ModelConfig, PipelineConfig
from qwen_image2_ref.model_folder import save_model
from qwen_image2_ref.transformer import QwenImageTransformer
from qwen_image2_ref.vae import QwenImageVAE
from tests.tiny_parts import tiny_encoder
from tests.transformer_peer import make_peer


def _peer_vae(cfg, seed: int):
    from diffusers import AutoencoderKLQwenImage21

    torch.manual_seed(seed)
    kwargs = {k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"}
    vae = AutoencoderKLQwenImage21(**kwargs)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.mul_(0.5 + torch.rand_like(p))
    return vae.eval()


def build_tiny_model(root: Path, seed: int = 0, output_resolution: int = 64,
                     peer_init: bool = True) -> tuple[ModelConfig, Path]:
    """Train a tokenizer, build and save a tiny model under ``root / 'model'``. ``peer_init=False``:
    the reference's own random init instead of diffusers' (for machines without diffusers, such as
    the GPU machine bench/gpu_check.py runs on, where only the folder's format matters)."""
    enc_cfg, encoder = tiny_encoder(root, seed)
    config = dataclasses.replace(
        TINY, encoder=enc_cfg, pipeline=PipelineConfig(output_resolution=output_resolution, num_steps=3)
    )
    torch.manual_seed(seed)
    transformer = QwenImageTransformer(config.transformer)
    vae = QwenImageVAE(config.vae)
    if peer_init:
        transformer.load_state_dict(make_peer(config.transformer, seed=seed).state_dict())
        vae.load_state_dict(_peer_vae(config.vae, seed).state_dict())
    path = save_model(root / "model", config, transformer, vae, encoder)
    return config, path


def load_peer_pipeline(path: Path):
    """diffusers' QwenImage21Pipeline from a folder, with a processor that needs no torchvision."""
    from diffusers import QwenImage21Pipeline
    from transformers import Qwen3VLProcessor

    class ImageOnlyProcessor(Qwen3VLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    processor = ImageOnlyProcessor.from_pretrained(path / "processor")
    return QwenImage21Pipeline.from_pretrained(path, processor=processor)
