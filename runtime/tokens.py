"""Prompt templates, tokenization and embedding post-processing for the Qwen3-VL condition encoder.

Shared by the reference and the runtime, in numpy + ``tokenizers`` only. The rules follow
diffusers' ``QwenImage21Pipeline._get_qwen_prompt_embeds`` with its ``Qwen3VLProcessor``:

- the template is a raw ChatML string (system, user, then the assistant header); an edit prompt
  prefixes the user turn with ``<image1><|vision_start|><|image_pad|><|vision_end|>`` and one
  `` <imageN><|vision_start|>...`` more per further image;
- every ``<|image_pad|>`` becomes as many pad tokens as its image has merged vision tokens,
  ``t * h * w // merge**2`` (the processor's expansion);
- a batch is LEFT padded; an empty prompt is read as ``" "`` (Qwen has no BOS token);
- the encoder's hidden states lose their padding and the first ``drop_idx`` tokens (the system
  message, as the chat template renders it), then are right padded to the batch max with a mask.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from qwen_image_edge.runtime.errors import ConfigError, InputError, ShapeError

SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."
MAX_PROMPT_TOKENS = 1024
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
PAD_TOKEN = "<|endoftext|>"
_REQUIRED_TOKENS = ("<|im_start|>", "<|im_end|>", VISION_START, VISION_END, IMAGE_PAD)


def system_message(system_prompt: str = SYSTEM_PROMPT) -> str:
    """The system turn as Qwen's chat template renders it; its token count is ``drop_idx``."""
    return f"<|im_start|>system\n{system_prompt}<|im_end|>\n"


def vision_prefix(num_images: int) -> str:
    """The per-image placeholders that open the user turn of an edit prompt."""
    if num_images < 1:
        raise InputError(f"edit prompt: expected at least 1 condition image, got {num_images}")
    slot = f"{VISION_START}{IMAGE_PAD}{VISION_END}"
    return "<image1>" + slot + "".join(f" <image{i}>{slot}" for i in range(2, num_images + 1))


def prompt_text(prompt: str, num_images: int = 0, system_prompt: str = SYSTEM_PROMPT) -> str:
    """The full template string for one user prompt (``num_images == 0``: text-to-image)."""
    user = (vision_prefix(num_images) if num_images else "") + (prompt or " ")
    return f"{system_message(system_prompt)}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


@dataclass(frozen=True, eq=False)
class TokenBatch:
    """A left-padded batch of templated prompts, ready for the encoder.

    ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` (1 at image pads) are int64 [B, L];
    ``image_grid_thw`` is int64 [B * n_images, 3] (each prompt sees the same images, in order)
    or None for text-to-image. ``drop_idx`` tokens open every row after its padding.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    mm_token_type_ids: np.ndarray
    drop_idx: int
    prompt_tokens: tuple[int, ...]
    image_grid_thw: np.ndarray | None = None

    @property
    def image_pad_mask(self) -> np.ndarray:
        return self.mm_token_type_ids == 1  # [B, L]

    @property
    def lengths(self) -> np.ndarray:
        return self.attention_mask.sum(axis=1)  # [B]


class PromptTokenizer:
    """Templates, tokenizes and pads prompts with a ``tokenizers.Tokenizer`` (tokenizer.json)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        system_prompt: str = SYSTEM_PROMPT,
        max_prompt_tokens: int = MAX_PROMPT_TOKENS,
        pad_token: str = PAD_TOKEN,
        merge_size: int = 2,
    ) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_prompt_tokens = max_prompt_tokens
        self.merge_size = merge_size
        missing = [t for t in (*_REQUIRED_TOKENS, pad_token) if tokenizer.token_to_id(t) is None]
        if missing:
            raise ConfigError(f"tokenizer: special tokens {missing} are missing from its vocabulary")
        self.pad_id = tokenizer.token_to_id(pad_token)
        self.image_pad_id = tokenizer.token_to_id(IMAGE_PAD)
        self.video_pad_id = tokenizer.token_to_id(VIDEO_PAD)
        self.drop_idx = len(self._ids(system_message(system_prompt)))

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> PromptTokenizer:
        """Load ``tokenizer.json``; the pad token comes from a sibling ``tokenizer_config.json`` if any."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"tokenizer: expected a tokenizer.json file, found nothing at {path}")
        config_path = path.with_name("tokenizer_config.json")
        if "pad_token" not in kwargs and config_path.is_file():
            pad = json.loads(config_path.read_text()).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if pad:
                kwargs["pad_token"] = pad
        return cls(Tokenizer.from_file(str(path)), **kwargs)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def count_prompt_tokens(self, prompt: str) -> int:
        """Tokens of the user prompt alone, the quantity ``max_prompt_tokens`` limits."""
        return len(self._ids(prompt or " "))

    def check_prompt(self, prompt: str, where: str = "prompt") -> int:
        if not isinstance(prompt, str):
            raise InputError(f"{where}: expected a string, got {type(prompt).__name__}")
        for token in (IMAGE_PAD, VIDEO_PAD):
            if token in prompt:
                raise InputError(f"{where}: contains the reserved vision token {token}; remove it")
        count = self.count_prompt_tokens(prompt)
        if count > self.max_prompt_tokens:
            raise InputError(
                f"{where}: {count} tokens, over the limit of {self.max_prompt_tokens} tokens; shorten the prompt"
            )
        return count

    def encode(
        self, prompts: Sequence[str], image_grid_thw: np.ndarray | Sequence | None = None
    ) -> TokenBatch:
        """Template and tokenize a batch; ``image_grid_thw`` [n_images, 3] are the condition images'
        vision grids (the same images for every prompt), None for text-to-image."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise InputError("prompts: expected at least one prompt, got an empty list")
        grids = None if image_grid_thw is None else np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
        if grids is not None and len(grids) == 0:
            grids = None
        n_images = 0 if grids is None else len(grids)
        pads_per_image = [] if grids is None else [int(g.prod()) // self.merge_size**2 for g in grids]
        counts, rows = [], []
        for i, prompt in enumerate(prompts):
            counts.append(self.check_prompt(prompt, where=f"prompt {i}"))
            ids = self._ids(prompt_text(prompt, n_images, self.system_prompt))
            rows.append(self._expand_image_pads(ids, pads_per_image))
        length = max(len(r) for r in rows)
        input_ids = np.full((len(rows), length), self.pad_id, dtype=np.int64)  # [B, L]
        attention_mask = np.zeros((len(rows), length), dtype=np.int64)  # [B, L]
        for b, row in enumerate(rows):
            input_ids[b, length - len(row) :] = row
            attention_mask[b, length - len(row) :] = 1
        mm_types = np.zeros_like(input_ids)
        mm_types[input_ids == self.image_pad_id] = 1
        mm_types[attention_mask == 0] = 0
        repeated = None if grids is None else np.tile(grids, (len(rows), 1))  # [B * n_images, 3]
        return TokenBatch(input_ids, attention_mask, mm_types, self.drop_idx, tuple(counts), repeated)

    def _expand_image_pads(self, ids: list[int], pads_per_image: list[int]) -> list[int]:
        slots = [k for k, t in enumerate(ids) if t == self.image_pad_id]
        if len(slots) != len(pads_per_image):
            raise InputError(
                f"prompt: {len(slots)} {IMAGE_PAD} slots in the template, expected {len(pads_per_image)} (one per image)"
            )
        out: list[int] = []
        start = 0
        for slot, n in zip(slots, pads_per_image):
            out += ids[start:slot] + [self.image_pad_id] * n
            start = slot + 1
        return out + ids[start:]


def mrope_position_ids(batch: TokenBatch, merge_size: int = 2) -> np.ndarray:
    """Qwen3-VL's 3-axis (t, h, w) position ids int64 [3, B, L], as transformers computes them.

    Text-only batches get ``arange(L)`` on every axis, padding included (transformers does not
    shift left-padded rows; RoPE is relative, so a constant shift changes nothing). With images,
    each row counts only its real tokens: text runs advance one per token, an image block of
    merged grid ``h x w`` takes ``(p, p + i, p + j)`` and advances ``p`` by ``max(h, w)``;
    padding gets 0.
    """
    n_rows, length = batch.input_ids.shape
    if batch.image_grid_thw is None:
        return np.broadcast_to(np.arange(length, dtype=np.int64), (3, n_rows, length)).copy()  # [3, B, L]
    positions = np.zeros((3, n_rows, length), dtype=np.int64)
    grids = iter(batch.image_grid_thw.tolist())
    for b in range(n_rows):
        valid = np.flatnonzero(batch.attention_mask[b])
        types = batch.mm_token_type_ids[b, valid]
        row, p, k = [], 0, 0
        while k < len(types):
            run = k + 1
            while run < len(types) and types[run] == types[k]:
                run += 1
            if types[k] == 0:
                row.append(np.broadcast_to(np.arange(p, p + run - k), (3, run - k)))  # [3, n]
                p += run - k
            else:
                t, h, w = next(grids)
                if (run - k) != t * (h // merge_size) * (w // merge_size):
                    raise ShapeError(
                        f"token batch row {b}: image run of {run - k} tokens does not match grid {t, h, w}"
                    )
                axes = (np.arange(t), np.arange(h // merge_size), np.arange(w // merge_size))
                grid = np.stack(np.meshgrid(*axes, indexing="ij"))  # [3, t, h/m, w/m]
                row.append(grid.reshape(3, -1) + p)  # [3, t*h*w/merge**2]
                p += max(h, w) // merge_size
            k = run
        positions[:, b, valid] = np.concatenate(row, axis=1)  # [3, n_valid]
    return positions


@dataclass(frozen=True, eq=False)
class PromptIndex:
    """Where each output token of the post-processed embeddings comes from.

    ``rows``/``cols`` int64 [B, L'] index the encoder's [B, L, D] hidden states; ``mask`` int64
    [B, L'] is 1 on real tokens (padding positions point at column 0 and must be zeroed);
    ``image_pad_mask`` bool [B, L'] marks the image pad tokens.
    """

    rows: np.ndarray
    cols: np.ndarray
    mask: np.ndarray
    image_pad_mask: np.ndarray


def prompt_index(batch: TokenBatch) -> PromptIndex:
    """Drop the left padding and the ``drop_idx`` system tokens, right pad to the batch max."""
    lengths = batch.lengths
    if (lengths <= batch.drop_idx).any():
        raise ShapeError(
            f"token batch: every row needs more than drop_idx={batch.drop_idx} tokens, got lengths {lengths.tolist()}"
        )
    keep = lengths - batch.drop_idx  # [B]
    out_len = int(keep.max())
    total = batch.input_ids.shape[1]
    pos = np.arange(out_len)[None, :]  # [1, L']
    mask = (pos < keep[:, None]).astype(np.int64)  # [B, L']
    first = total - keep  # [B] first kept column of each left-padded row
    cols = np.where(mask == 1, first[:, None] + pos, 0).astype(np.int64)  # [B, L']
    rows = np.broadcast_to(np.arange(len(keep))[:, None], cols.shape).astype(np.int64)  # [B, L']
    image_pad_mask = batch.image_pad_mask[rows, cols] & (mask == 1)  # [B, L']
    return PromptIndex(rows, cols, mask, image_pad_mask)


def postprocess_hidden_states(hidden, batch: TokenBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """diffusers' post-processing of the encoder output, in numpy.

    ``hidden`` is [B, L, D] (anything ``numpy.asarray`` accepts). Returns prompt embeddings
    float32 [B, L', D] (zeros on padding), the mask int64 [B, L'] and image_pad_mask bool [B, L'].
    """
    hidden = np.asarray(hidden)
    expected = batch.input_ids.shape
    if hidden.ndim != 3 or hidden.shape[:2] != expected:
        raise ShapeError(
            f"encoder hidden states: expected [{expected[0]}, {expected[1]}, D], got {list(hidden.shape)}"
        )
    index = prompt_index(batch)
    gathered = hidden[index.rows, index.cols]  # [B, L', D]
    embeds = np.where(index.mask[..., None] == 1, gathered, 0).astype(np.float32)  # [B, L', D]
    return embeds, index.mask, index.image_pad_mask
