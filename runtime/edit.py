"""Condition images of an edit request: loading, sizing and range checks, before any graph runs.

A condition image's own pixel size does not matter: like the reference, every image is resized to
about ``output_resolution**2`` pixels with its aspect ratio kept (sides in multiples of 32). What an
export limits is the *resized* size: each side must lie in the exported ``min..max_resolution``
(only an extreme aspect ratio leaves it, e.g. 1:8 at 1024 px wants 2880 x 352), and all images
together must fit the exported token ranges (vision patches, condition latent tokens). Each case is
an :class:`InputError` that says what was found and what the export holds.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from runtime import images as rimages
from runtime.errors import InputError
from runtime.manifest import GraphSpec, Manifest

VAE_TOKEN = 16  # pixels per latent token side


def check_range(spec: GraphSpec, symbol: str, value: int, what: str, n_images: int) -> None:
    """InputError when ``value`` is above the declared range of ``symbol`` in ``spec``."""
    hi = spec.dim_ranges.get(symbol, (0, 0, value))[2]
    if value > hi:
        raise InputError(
            f"edit: {n_images} condition image(s) need {value} {what}, but this export holds at most {hi} "
            f"({spec.name} {symbol}); pass fewer images or re-export with a larger --max-resolution"
        )


def load_condition_images(images, manifest: Manifest, output_resolution: int) -> tuple[list[Image.Image], list[tuple[int, int]]]:
    """PIL images and their condition sizes (width, height), checked against the model and the export."""
    items: Sequence = images if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise InputError("edit: expected at least one condition image, got none")
    limit = int(manifest.prompt.get("max_condition_images", len(items)))
    if len(items) > limit:
        raise InputError(f"edit: the model takes at most {limit} condition images, got {len(items)}")
    lo, hi = int(manifest.image["min_resolution"]), int(manifest.image["max_resolution"])
    pil, sizes = [], []
    for i, item in enumerate(items):
        try:
            im = rimages.load_image(item)
        except InputError as exc:
            raise InputError(f"condition image {i}: {exc}") from None
        if im.width < 1 or im.height < 1:
            raise InputError(f"condition image {i}: expected a non-empty image, got {im.width}x{im.height} pixels")
        w, h = rimages.condition_size(im, output_resolution)
        if not (lo <= w <= hi and lo <= h <= hi):
            raise InputError(
                f"condition image {i} ({im.width}x{im.height}): resized to {w}x{h} (about {output_resolution}^2 "
                f"pixels, aspect kept), a side outside the exported range {lo}..{hi}; use a less extreme "
                "aspect ratio or re-export with a larger --max-resolution"
            )
        pil.append(im)
        sizes.append((w, h))
    n_c = sum((w // VAE_TOKEN) * (h // VAE_TOKEN) for w, h in sizes)
    check_range(manifest.graph("transformer"), "N_c", n_c, "condition latent tokens", len(items))
    return pil, sizes
