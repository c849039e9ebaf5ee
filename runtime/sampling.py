"""Numpy pieces of the sampling loop shared by the reference pipeline and the runtime:
the seeded initial noise, output-size rules, request validation and pixels -> PIL.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from qwen_image_edge.runtime.errors import InputError, ShapeError

# A target latent grid must split into 2x2 groups (one encoder slot each): pixels in multiples of 32.
SIZE_MULTIPLE = 32
MIN_SIZE = 32
MAX_SIZE = 4096
VAE_FACTOR = 16


def initial_noise(seed: int, batch: int, height: int, width: int, channels: int) -> np.ndarray:
    """Packed ``[B, L, C]`` noise, ``L = (H/16)(W/16)`` row-major, as every consumer draws it."""
    length = (height // VAE_FACTOR) * (width // VAE_FACTOR)
    return np.random.default_rng(seed).standard_normal((batch, length, channels), dtype=np.float32)


def resolve_size(width: int | None, height: int | None, default: tuple[int, int]) -> tuple[int, int]:
    """Output size in pixels: defaults filled in; a multiple of 32 in ``[32, 4096]`` or an InputError.

    Sizes are not rounded silently: a target latent grid must split into 2x2 groups (one encoder
    slot each), and an embedded caller should get exactly the size it asked for or an error.
    """
    out = []
    for name, value, fallback in (("width", width, default[0]), ("height", height, default[1])):
        value = fallback if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InputError(f"{name}: expected an integer number of pixels, got {value!r}")
        if not MIN_SIZE <= value <= MAX_SIZE:
            raise InputError(f"{name}: expected {MIN_SIZE}..{MAX_SIZE} pixels, got {value}")
        if value % SIZE_MULTIPLE:
            lower = value // SIZE_MULTIPLE * SIZE_MULTIPLE
            raise InputError(
                f"{name} {value}: expected a multiple of {SIZE_MULTIPLE} pixels (16 per latent token x 2x2 "
                f"groups); try {lower} or {lower + SIZE_MULTIPLE}"
            )
        out.append(int(value))
    return out[0], out[1]


def check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise InputError(f"steps: expected a positive integer, got {steps!r}")
    return int(steps)


def check_guidance(guidance) -> float:
    try:
        value = float(guidance)
    except (TypeError, ValueError):
        raise InputError(f"guidance: expected a number >= 1, got {guidance!r}") from None
    if not np.isfinite(value) or value < 1.0:
        raise InputError(f"guidance: expected a number >= 1 (1 disables guidance), got {guidance!r}")
    return value


@dataclass(frozen=True)
class Request:
    """A validated sampling request."""

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...] | None
    width: int
    height: int
    steps: int
    guidance: float
    seed: int

    @property
    def use_guidance(self) -> bool:
        return self.negative_prompts is not None and self.guidance > 1.0

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.height // VAE_FACTOR, self.width // VAE_FACTOR


def as_prompts(prompt, what: str = "prompt") -> tuple[str, ...]:
    prompts = (prompt,) if isinstance(prompt, str) else tuple(prompt) if prompt is not None else ()
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError(f"{what}: expected a string or a non-empty list of strings, got {prompt!r}")
    return prompts


def make_request(prompt, negative_prompt, width, height, steps, guidance, seed, default_size) -> Request:
    prompts = as_prompts(prompt)
    negatives = None
    if negative_prompt is not None:
        negatives = as_prompts(negative_prompt, "negative_prompt")
        if len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise InputError(f"negative_prompt: expected 1 or {len(prompts)} prompts, got {len(negatives)}")
    w, h = resolve_size(width, height, default_size)
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**31))
    elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed: expected a non-negative integer, got {seed!r}")
    return Request(prompts, negatives, w, h, check_steps(steps), check_guidance(guidance), int(seed))


def to_images(pixels: np.ndarray) -> list[Image.Image]:
    """``[B, 4, H, W]`` in [-1, 1] -> RGBA PIL images (diffusers' postprocess: round, not floor)."""
    if pixels.ndim != 4 or pixels.shape[1] not in (3, 4):
        raise ShapeError(f"decoded pixels: expected [B, 4, H, W], got {list(pixels.shape)}")
    arr = np.clip(pixels.astype(np.float32) / 2 + 0.5, 0.0, 1.0)
    arr = np.round(arr.transpose(0, 2, 3, 1) * 255).astype(np.uint8)  # [B, H, W, 4]
    return [Image.fromarray(a) for a in arr]
