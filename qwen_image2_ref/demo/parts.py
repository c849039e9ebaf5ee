"""The demo's parts that every stage after their own reads back from the work folder: the VAE
(stage ``vae``) and the tokenizer + frozen random-init encoder (stage ``encoder``, rebuilt from its
seed). Shared by ``train`` and ``train_dit``, which therefore do not import each other."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Qwen2Tokenizer

from qwen_image2_ref.config import ModelConfig, VAEConfig
from qwen_image2_ref.demo import vocab
from qwen_image2_ref.demo.captions import CaptionStyle
from qwen_image2_ref.demo.stage_io import load_stage
from qwen_image2_ref.encoder import ConditionEncoder
from qwen_image2_ref.vae import QwenImageVAE
from qwen_image_edge.runtime.images import VisionConfig
from qwen_image_edge.runtime.tokens import PromptTokenizer

MIN_PIXELS = 32 * 32


def load_vae(out: Path) -> QwenImageVAE:
    state, meta = load_stage(out / "vae")
    vae = QwenImageVAE(VAEConfig(**meta["config"]))
    vae.load_state_dict(state)
    return vae.eval()


def build_encoder(out: Path, config: ModelConfig, seed: int, style: CaptionStyle = CaptionStyle.V1):
    """Train the tokenizer on caption language ``style``, save it through transformers' Qwen2Tokenizer
    (so transformers' processor and ``qwen_image_edge.runtime.tokens`` agree), and build the random-init
    encoder from a fixed seed (stage ``encoder`` may then pre-train it)."""
    bpe = vocab.train_tokenizer(vocab.DEFAULT_VOCAB_SIZE, seed=seed, style=style)
    model = json.loads(bpe.to_str())["model"]
    specials = list(vocab.SPECIAL_TOKENS)
    qwen = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                                                         for m in model["merges"]])
    qwen.add_special_tokens({"additional_special_tokens": specials[1:]})
    qwen.pad_token = specials[0]
    qwen.eos_token = "<|im_end|>"
    qwen.save_pretrained(out / "tokenizer")
    torch.manual_seed(seed + 7)
    encoder = encoder_for(out, config)
    encoder.requires_grad_(False)
    return encoder


def encoder_for(out: Path, config: ModelConfig):
    """The encoder over the tokenizer that ``build_encoder`` saved in ``out``, random-init from torch's
    current seed (load the ``encoder`` stage file into ``.model`` for the trained one)."""
    specials = list(vocab.SPECIAL_TOKENS)
    tokenizer = PromptTokenizer.from_file(out / "tokenizer" / "tokenizer.json",
                                          merge_size=config.encoder.vision_spatial_merge_size)
    ids = [tokenizer.tokenizer.token_to_id(t) for t in specials]
    if ids != list(range(len(specials))):
        raise RuntimeError(f"demo tokenizer: expected special token ids 0..{len(specials) - 1}, got {ids}")
    size = tokenizer.tokenizer.get_vocab_size()
    if size > config.encoder.vocab_size:
        raise RuntimeError(f"demo tokenizer has {size} tokens, more than the encoder's vocab {config.encoder.vocab_size}")
    # min_pixels: Qwen3-VL's default (256x256) would upscale a 128 px condition image to 4x the
    # <|image_pad|> slots that its 8x8 latents fill; the demo keeps every image at its own size.
    enc = config.encoder
    vision = VisionConfig(patch_size=enc.vision_patch_size, temporal_patch_size=enc.vision_temporal_patch_size,
                          merge_size=enc.vision_spatial_merge_size, min_pixels=MIN_PIXELS)
    return ConditionEncoder.from_config(config.encoder, tokenizer, vision)
