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
from qwen_image_edge.runtime.errors import InputError, ManifestError
from qwen_image_edge.runtime.manifest import GraphSpec, Manifest


def check_range(spec: GraphSpec, symbol: str, value: int, what: str, n_images: int) -> None:
    """InputError when ``value`` is above the declared range of ``symbol`` in ``spec``."""
    hi = spec.dim_ranges.get(symbol, (0, 0, value))[2]
    if value > hi:
        raise InputError(
            f"edit: {n_images} condition image(s) need {value} {what}, but this export holds at most {hi} "
            f"({spec.name} {symbol}); pass fewer images or re-export with a larger --max-resolution"
        )


def condition_images(images, max_images: int, output_resolution: int) -> tuple[list[Image.Image], list[tuple[int, int]]]:
    """The checks every edit makes, before any model runs (the reference calls this too): one or
    more readable, non-empty images, at most ``max_images``; returns them as PIL images with the
    (width, height) each is resized to (about ``output_resolution**2`` pixels, aspect kept)."""
    items: Sequence = images if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise InputError("edit: expected at least one condition image, got none")
    if len(items) > max_images:
        raise InputError(f"edit: the model takes at most {max_images} condition images, got {len(items)}")
    pil, sizes = [], []
    for i, item in enumerate(items):
        try:
            im = rimages.load_image(item)
        except InputError as exc:
            raise InputError(f"condition image {i}: {exc}") from None
        if im.width < 1 or im.height < 1:
            raise InputError(f"condition image {i}: expected a non-empty image, got {im.width}x{im.height} pixels")
        pil.append(im)
        sizes.append(rimages.condition_size(im, output_resolution))
    return pil, sizes


def load_condition_images(images, manifest: Manifest, output_resolution: int) -> tuple[list[Image.Image], list[tuple[int, int]]]:
    """PIL images and their condition sizes (width, height), checked against the model and the export."""
    pil, sizes = condition_images(images, manifest.prompt.max_condition_images, output_resolution)
    lo, hi = _side_range(manifest)
    max_aspect = manifest.image.condition.max_aspect
    for i, (im, (w, h)) in enumerate(zip(pil, sizes)):
        if max(im.width / im.height, im.height / im.width) > max_aspect:
            raise InputError(_aspect_message(i, im, max_aspect))
        if not (lo <= w <= hi and lo <= h <= hi):
            raise InputError(
                f"condition image {i} ({im.width}x{im.height}): resized to {w}x{h} (about {output_resolution}^2 "
                f"pixels, aspect kept), a side outside the exported range {lo}..{hi}; use a less extreme "
                "aspect ratio or re-export"
            )
    f = manifest.vae_scale_factor
    n_c = sum((w // f) * (h // f) for w, h in sizes)
    check_range(manifest.graph("transformer"), "N_c", n_c, "condition latent tokens", len(pil))
    return pil, sizes


def _side_range(manifest: Manifest) -> tuple[int, int]:
    """Pixel sides the ``vae_encoder`` graph takes (its ``Hc``/``Wc`` ranges)."""
    ranges = manifest.graph("vae_encoder").dim_ranges
    if "Hc" not in ranges or "Wc" not in ranges:
        raise ManifestError(f"graph 'vae_encoder': expected ranges for Hc and Wc, got {sorted(ranges)}; re-export")
    return max(ranges["Hc"][0], ranges["Wc"][0]), min(ranges["Hc"][2], ranges["Wc"][2])


def _aspect_message(i: int, im: Image.Image, max_aspect: float) -> str:
    (cw, ch), (pw, ph) = rimages.nearest_supported_size(im.width, im.height, max_aspect)
    limit = f"{max_aspect:g}"
    return (
        f"condition image {i} ({im.width}x{im.height}, aspect {max(im.width, im.height) / min(im.width, im.height):.2f}:1): "
        f"this export edits aspect ratios from 1:{limit} to {limit}:1; the nearest supported sizes are "
        f"{cw}x{ch} (crop) or {pw}x{ph} (pad)"
    )
