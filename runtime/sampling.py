"""Numpy pieces of the sampling loop shared by the reference pipeline and the runtime:
the seeded initial noise, output-size rules, request resolution and validation, pixels -> the
caller's output form, and the return convention.

Both pipelines' ``generate``/``edit`` return, for ``output="pil"``, one PIL image for a prompt
given as a string and a list of images for a list of prompts; ``output="np"`` (``[B, H, W, C]``
floats in [0, 1]) and ``output="latent"`` (packed ``[B, L, C]``) are always batched arrays.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image

from qwen_image_edge.runtime.errors import InputError, ShapeError

log = logging.getLogger(__name__)

# Qwen-Image 2.x: 16 pixels per latent side. The pipelines pass their own (manifest or config);
# this is only the default of :func:`initial_noise` for callers that sample for that family.
DEFAULT_VAE_FACTOR = 16
# A target latent grid must split into 2x2 groups (one encoder slot each): pixels in multiples of
# 2 * the VAE factor (32); the CLI checks sizes with this before any model is loaded.
SIZE_MULTIPLE = 2 * DEFAULT_VAE_FACTOR
MIN_SIZE = 32
MAX_SIZE = 4096
# The flow-matching schedulers train on 1000 timesteps (num_train_timesteps): more steps only subdivide
# a grid the model never saw, and each costs one or two transformer calls (a typo of 10000 ran for hours).
MAX_STEPS = 1000
OUTPUTS = ("pil", "np", "latent")


# diffusers' keyword names that users type by habit -> ours (accepted as aliases)
DIFFUSERS_ALIASES = {"num_inference_steps": "steps", "guidance_scale": "guidance"}


def diffusers_aliases(where: str, extra: dict, **ours):
    """``ours`` (steps=..., guidance=...) with diffusers' names in ``extra`` folded in.

    ``num_inference_steps`` / ``guidance_scale`` are aliases; naming both spellings is an error.
    ``generator`` is refused with the name to use instead: the runtime draws its noise with numpy
    from ``seed``, so a torch.Generator has no meaning here. Any other keyword is an InputError
    listing the accepted ones (Python's TypeError would not say what to write instead).
    """
    for name, value in extra.items():
        if name in DIFFUSERS_ALIASES:
            target = DIFFUSERS_ALIASES[name]
            if ours.get(target) is not None:
                raise InputError(f"{where}: got both {target}= and diffusers' {name}=; pass one")
            ours[target] = value
        elif name == "generator":
            raise InputError(f"{where}: generator= is diffusers' torch.Generator; pass seed=<int> instead "
                             "(the noise is numpy.random.default_rng(seed).standard_normal)")
        else:
            raise InputError(f"{where}: unknown keyword {name!r}; expected prompt/images, negative_prompt, width, "
                             "height, steps (num_inference_steps), guidance (guidance_scale), seed, callback, "
                             "latents, output")
    return tuple(ours.values())


def initial_noise(seed: int, batch: int, height: int, width: int, channels: int,
                  vae_factor: int = DEFAULT_VAE_FACTOR) -> np.ndarray:
    """Packed ``[B, L, C]`` noise, ``L = (H/f)(W/f)`` row-major, as every consumer draws it."""
    length = (height // vae_factor) * (width // vae_factor)
    return np.random.default_rng(seed).standard_normal((batch, length, channels), dtype=np.float32)


def resolve_size(width: int | None, height: int | None, default: tuple[int, int],
                 multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """Output size in pixels: defaults filled in; a multiple of ``multiple`` in ``[32, 4096]`` or an InputError.

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
        if value % multiple:
            lower = value // multiple * multiple
            raise InputError(
                f"{name} {value}: expected a multiple of {multiple} pixels ({multiple // 2} per latent token x 2x2 "
                f"groups); try {lower} or {lower + multiple}"
            )
        out.append(int(value))
    return out[0], out[1]


def check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise InputError(f"steps: expected a positive integer, got {steps!r}")
    if steps > MAX_STEPS:
        raise InputError(f"steps: expected 1..{MAX_STEPS} (the schedulers' 1000 training timesteps), got {steps}")
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
    vae_factor: int  # pixels per latent side
    output: str = "pil"  # one of OUTPUTS

    @property
    def use_guidance(self) -> bool:
        return self.negative_prompts is not None and self.guidance > 1.0

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.height // self.vae_factor, self.width // self.vae_factor


def as_prompts(prompt, what: str = "prompt") -> tuple[str, ...]:
    try:
        prompts = (prompt,) if isinstance(prompt, str) else tuple(prompt) if prompt is not None else ()
    except TypeError:  # not iterable: a number, an object
        prompts = ()
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError(f"{what}: expected a string or a non-empty list of strings, got {prompt!r}")
    return prompts


def make_request(prompt, negative_prompt, width, height, steps, guidance, seed, default_size, *,
                 vae_factor: int, output: str = "pil") -> Request:
    prompts = as_prompts(prompt)
    negatives = None
    if negative_prompt is not None:
        negatives = as_prompts(negative_prompt, "negative_prompt")
        if len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise InputError(f"negative_prompt: expected 1 or {len(prompts)} prompts, got {len(negatives)}")
    if output not in OUTPUTS:
        raise InputError(f"output: expected one of {list(OUTPUTS)}, got {output!r}")
    w, h = resolve_size(width, height, default_size, multiple=2 * vae_factor)
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**31))
    elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed: expected a non-negative integer, got {seed!r}")
    return Request(prompts, negatives, w, h, check_steps(steps), check_guidance(guidance), int(seed), vae_factor,
                   output)


def sampling_defaults(schedule, steps, guidance, negative_prompt):
    """``(steps, guidance, negative_prompt)`` with the model's defaults where None: the schedule's
    step count (its fixed sigmas' count, else ``num_steps``), guidance, and its negative prompt
    when guidance > 1 and the caller gives none."""
    if steps is None:
        steps = schedule.default_steps
    if guidance is None:
        guidance = schedule.guidance_scale
    if negative_prompt is None and isinstance(guidance, (int, float)) and guidance > 1:
        negative_prompt = schedule.default_negative_prompt
    return steps, guidance, negative_prompt


def resolve_request(prompt, negative_prompt, width, height, steps, guidance, seed, *, default_size: tuple[int, int],
                    schedule, vae_factor: int, output: str = "pil") -> Request:
    """A request with the model's defaults filled in (both pipelines call this).

    ``schedule`` (a :class:`~qwen_image_edge.runtime.sections.ScheduleSection`) gives the default
    steps (its fixed sigmas' count, else ``num_steps``), guidance, and the negative prompt used when
    guidance > 1 and the caller gives none.
    """
    steps, guidance, negative_prompt = sampling_defaults(schedule, steps, guidance, negative_prompt)
    request = make_request(prompt, negative_prompt, width, height, steps, guidance, seed, default_size,
                           vae_factor=vae_factor, output=output)
    if request.negative_prompts is not None and not request.use_guidance:
        log.warning("negative_prompt is ignored: guidance %.2f <= 1 disables it", request.guidance)
    if schedule.guidance_distilled and request.use_guidance:
        log.warning("this model has guidance distilled in; negative_prompt/guidance double-apply it")
    return request


def to_unit(pixels: np.ndarray) -> np.ndarray:
    """``[B, C, H, W]`` in [-1, 1] -> ``[B, H, W, C]`` float32 in [0, 1] (clamped)."""
    if pixels.ndim != 4 or pixels.shape[1] not in (3, 4):
        raise ShapeError(f"decoded pixels: expected [B, 4, H, W], got {list(pixels.shape)}")
    return np.clip(pixels.astype(np.float32).transpose(0, 2, 3, 1) / 2 + 0.5, 0.0, 1.0)


def convert_pixels(pixels: np.ndarray, output: str):
    """Decoded pixels in the form ``output`` asks for: ``"np"`` -> :func:`to_unit`, ``"pil"`` -> :func:`to_images`."""
    return to_unit(pixels) if output == "np" else to_images(pixels)


def one_or_list(result, prompt, output: str):
    """The return convention: one PIL image for a prompt given as a string, else what was made."""
    return result[0] if isinstance(prompt, str) and output == "pil" else result


def to_images(pixels: np.ndarray) -> list[Image.Image]:
    """``[B, 4, H, W]`` in [-1, 1] -> RGBA PIL images (diffusers' postprocess: round, not floor)."""
    arr = np.round(to_unit(pixels) * 255).astype(np.uint8)  # [B, H, W, 4]
    return [Image.fromarray(a) for a in arr]
