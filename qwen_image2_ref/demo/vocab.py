"""The demo model's tokenizer: a small byte-level BPE trained on the demo caption language.

Why byte-level BPE, set up like Qwen2's tokenizer (NFC, Qwen2's split regex, byte-level pieces):
it encodes any string without an unknown token, keeps "\\n" as a token as the chat template
needs, and splits "<image1>" into "<", "image", "1", ">" exactly as the real tokenizer does, so the
runtime's templates and drop-index logic run unchanged on the demo model. A few hundred merges
cover the whole caption language (each vocabulary word becomes one or two tokens).

The chat and edit templates are qwen_image_edge.runtime.tokens' own (``prompt_text``), so the corpus holds exactly
what the runtime will feed the encoder. The Qwen special tokens come first (ids 0-6,
<|endoftext|> is the pad, as qwen_image_edge.runtime.tokens.PAD_TOKEN expects), so the demo encoder
config can name its image/video/vision token ids from ``special_token_ids``. Training is
deterministic: a fixed corpus from a seeded generator and a trainer that breaks ties by pair id.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from qwen_image2_ref.demo import captions, data
from qwen_image2_ref.demo.captions import CaptionStyle
from qwen_image_edge.runtime import tokens

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
)
DEFAULT_VOCAB_SIZE = 512
# Qwen2's pre-tokenizer split (letters runs, single digits, punctuation runs, newlines, spaces).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def corpus(seed: int = 0, n_captions: int = 3000, n_edits: int = 1500,
           style: CaptionStyle = CaptionStyle.V1) -> list[str]:
    """Training text: captions in ``style``, instructions, both wrapped in the chat template, and every word."""
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    for i in range(n_captions):
        w, h = data.SIZES[i % len(data.SIZES)]
        cap = captions.caption(data.sample_scene(rng, w, h, "any"), rng, style)
        texts.append(tokens.prompt_text(cap) if i % 4 == 0 else cap)
    for i in range(n_edits):
        ex = data.sample_edit(rng, split="any")
        texts.append(tokens.prompt_text(ex.instruction, 1 + i % 2) if i % 3 == 0 else ex.instruction)
    words = [*data.COLORS, *data.SHAPES, *data.POSITIONS, *data.BACKGROUNDS, *data.GLYPHS,
             "system", "user", "assistant", tokens.SYSTEM_PROMPT]
    for phrases in (*data.POSITION_PHRASES.values(), *data.BACKGROUND_PHRASES.values(), *data.INSTRUCTIONS.values()):
        words.extend(phrases)
    if style is CaptionStyle.V2:
        for phrases in (*captions.POSITION_PHRASES_V2.values(), *captions.BACKGROUND_PHRASES_V2.values()):
            words.extend(phrases)
        texts.extend(captions.TEMPLATES_V2)
    texts.extend(words)
    texts.extend(data.CAPTION_TEMPLATES)
    return texts


def _empty_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0,
                    style: CaptionStyle = CaptionStyle.V1) -> Tokenizer:
    """A byte-level BPE with ``vocab_size`` entries (special tokens and 256 bytes included), trained
    on the caption language ``style``."""
    tok = _empty_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed, style=style), trainer=trainer)
    return tok


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


def save_tokenizer(path: str | os.PathLike, tokenizer: Tokenizer | None = None, **train_kwargs) -> Path:
    """Write ``tokenizer.json`` (the given tokenizer, or a freshly trained one) atomically."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":
        path = path / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tok = tokenizer if tokenizer is not None else train_tokenizer(**train_kwargs)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(tok.to_str(pretty=True), encoding="utf-8")
    os.replace(tmp, path)
    return path
