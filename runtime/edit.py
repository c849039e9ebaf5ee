"""Condition images of an edit request: loading, sizing and range checks, before any graph runs.

A condition image's own pixel size does not matter: like the reference, every image is resized to
about ``output_resolution**2`` pixels with its aspect ratio kept (sides in multiples of 32). An
export sizes its condition ranges by that area over the aspect ratios it records
(``image.condition.max_aspect``, 1:4 to 4:1 by default), so what it limits is the aspect ratio: an
image outside that range is refused with the range and the nearest sizes that fit (crop or pad).
All images together must also fit the exported token ranges (vision patches, condition latent
tokens). Each case is an :class:`InputError` that says what was found and what the export holds.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from qwen_image_edge.runtime import images as rimages
from qwen_image_edge.runtime.errors import InputError
from qwen_image_edge.runtime.manifest import GraphSpec, Manifest

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
    sides = _side_range(manifest)
    max_aspect = float((manifest.image.get("condition") or {}).get("max_aspect", 0)) or None
    pil, sizes = [], []
    for i, item in enumerate(items):
        try:
            im = rimages.load_image(item)
        except InputError as exc:
            raise InputError(f"condition image {i}: {exc}") from None
        if im.width < 1 or im.height < 1:
            raise InputError(f"condition image {i}: expected a non-empty image, got {im.width}x{im.height} pixels")
        if max_aspect is not None and max(im.width / im.height, im.height / im.width) > max_aspect:
            raise InputError(_aspect_message(i, im, max_aspect))
        w, h = rimages.condition_size(im, output_resolution)
        lo, hi = sides
        if not (lo <= w <= hi and lo <= h <= hi):
            raise InputError(
                f"condition image {i} ({im.width}x{im.height}): resized to {w}x{h} (about {output_resolution}^2 "
                f"pixels, aspect kept), a side outside the exported range {lo}..{hi}; use a less extreme "
                "aspect ratio or re-export"
            )
        pil.append(im)
        sizes.append((w, h))
    n_c = sum((w // VAE_TOKEN) * (h // VAE_TOKEN) for w, h in sizes)
    check_range(manifest.graph("transformer"), "N_c", n_c, "condition latent tokens", len(items))
    return pil, sizes


def _side_range(manifest: Manifest) -> tuple[int, int]:
    """Pixel sides the ``vae_encoder`` graph takes (``Hc``/``Wc``; ``H``/``W`` in exports made
    before condition ranges were sized by area, where they equal the target range)."""
    ranges = manifest.graph("vae_encoder").dim_ranges
    for h, w in (("Hc", "Wc"), ("H", "W")):
        if h in ranges and w in ranges:
            return max(ranges[h][0], ranges[w][0]), min(ranges[h][2], ranges[w][2])
    return int(manifest.image["min_resolution"]), int(manifest.image["max_resolution"])


def _aspect_message(i: int, im: Image.Image, max_aspect: float) -> str:
    (cw, ch), (pw, ph) = rimages.nearest_supported_size(im.width, im.height, max_aspect)
    limit = f"{max_aspect:g}"
    return (
        f"condition image {i} ({im.width}x{im.height}, aspect {max(im.width, im.height) / min(im.width, im.height):.2f}:1): "
        f"this export edits aspect ratios from 1:{limit} to {limit}:1; the nearest supported sizes are "
        f"{cw}x{ch} (crop) or {pw}x{ph} (pad)"
    )
