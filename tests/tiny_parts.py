"""Pieces of the tiny test models shared by several test files: a Qwen-style byte-level BPE
tokenizer trained in seconds, and weight scaling that makes random weights matter."""

from __future__ import annotations

import json

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from qwen_image_edge.runtime.images import VisionConfig
from qwen_image_edge.runtime.tokens import PromptTokenizer

SPECIALS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
CORPUS = [
    "a red circle on the left of a white background",
    "the blue square is at the top right, next to a green triangle",
    "Comprehend and analyze the provided prompt. Make the sky purple and add 3 stars!",
    "turn image 1 into a sketch; keep the cat from image 2",
]
# Low min pixels so small condition images are not upscaled past what the tiny model needs.
VISION = VisionConfig(min_pixels=1024, max_pixels=128 * 128)


def _train_tokenizer(path):
    """A byte-level BPE saved through transformers' Qwen2Tokenizer, as a Qwen checkpoint ships it."""
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS * 10, trainer)
    model = json.loads(bpe.to_str())["model"]
    qwen = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    qwen.add_special_tokens({"additional_special_tokens": SPECIALS})
    qwen.eos_token = "<|im_end|>"
    qwen.save_pretrained(path)
    return PromptTokenizer.from_file(path / "tokenizer.json", merge_size=VISION.merge_size)


def _scale_weights(model: torch.nn.Module, gain: float = 4.0) -> None:
    """Default init barely moves the residual stream; make every layer and norm weight count."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2 and "embed" not in name:
                param.mul_(gain)
            elif param.ndim == 1 and "norm" in name and "weight" in name:
                param.copy_(0.5 + torch.rand(param.shape, generator=gen))


def tiny_encoder(root, seed: int = 0):
    """A tokenizer trained under ``root / 'tok'`` and a random tiny Qwen3-VL encoder whose token ids
    are the tokenizer's, with weights scaled so every layer matters: ``(EncoderConfig, ConditionEncoder)``."""
    import dataclasses

    from qwen_image2_ref.config import TINY
    from qwen_image2_ref.encoder import ConditionEncoder

    tokenizer = _train_tokenizer(root / "tok")
    ids = {t: tokenizer.tokenizer.token_to_id(t) for t in SPECIALS}
    cfg = dataclasses.replace(
        TINY.encoder,
        vocab_size=tokenizer.tokenizer.get_vocab_size(),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    encoder = ConditionEncoder.from_config(cfg, tokenizer, VISION)
    _scale_weights(encoder.model)
    return cfg, encoder
