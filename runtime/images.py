"""Image rules for Qwen-Image-2.x, in numpy + Pillow: load, size, RGBA, VAE input, vision patches.

Shared by the reference and the runtime. The rules follow diffusers' ``QwenImage21Pipeline``
(condition images resized with LANCZOS to about ``output_resolution**2`` pixels in multiples of 32;
RGBA kept for the VAE and composited on white for the vision encoder) and transformers'
``Qwen2VLImageProcessorPil`` as ``Qwen3VLProcessor`` drives it (``smart_resize`` to multiples of
``patch * merge``, BICUBIC, rescale 1/255, normalize, patchify).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from qwen_image_edge.runtime.errors import ConfigError, InputError

log = logging.getLogger(__name__)

ImageLike = Any  # str | Path | PIL.Image.Image | np.ndarray


def calculate_dimensions(target_area: float, ratio: float) -> tuple[int, int]:
    """(width, height) with about ``target_area`` pixels and aspect ``ratio = w / h``, multiples of 32."""
    if target_area <= 0 or ratio <= 0:
        raise InputError(
            f"image size: expected a positive area and aspect ratio, got {target_area} and {ratio}"
        )
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


# Modes every consumer here converts correctly (Pillow's own RGB/RGBA conversions of 8-bit data).
_EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA"})
# Pillow's 16-bit greyscale modes (16-bit PNG, TIFF, PGM). Pillow's own conversion to "L" clips
# them at 255 instead of scaling: every value above 255 (all but the darkest 0.4%) became white.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ARRAY_DTYPES = "uint8, uint16 (0..65535) or float16/32/64 (0..1)"


def load_image(source: ImageLike) -> Image.Image:
    """An 8-bit PIL image from a path, a PIL image or an array [H, W], [H, W, 3] or [H, W, 4].

    High bit depths are scaled to 8 bits, never clipped: 16-bit data (uint16 arrays, Pillow's
    ``I;16*`` modes of 16-bit PNG/TIFF files, and mode ``I``, taken as 16-bit) by 255/65535, float
    data (float arrays, mode ``F``) from [0, 1] (values outside are an InputError, not clipped). 16-bit
    RGB(A) PNGs come out of Pillow already scaled (it keeps the high byte). An animated image (GIF,
    APNG, WebP) gives its first frame, with a warning on the log. A path's EXIF orientation is
    applied, as diffusers' ``load_image`` does, so a phone photo is not edited on its side.
    """
    if isinstance(source, Image.Image):
        return _eight_bit(_first_frame(source, "image"), "image")
    if isinstance(source, np.ndarray):
        return Image.fromarray(_array_to_uint8(source))
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"image {path}: no such file")
        try:
            with Image.open(path) as img:
                frame = _first_frame(img, f"image {path}")
                frame.load()
                frame = ImageOps.exif_transpose(frame)
        except Image.DecompressionBombError as exc:
            raise InputError(f"image {path}: too large to decode safely ({exc})") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
            raise InputError(f"image {path}: not a readable image file ({exc})") from None
        return _eight_bit(frame, f"image {path}")
    raise InputError(f"image: expected a path, a PIL image or a numpy array, got {type(source).__name__}")


def _first_frame(img: Image.Image, where: str) -> Image.Image:
    """Frame 0 of an animated image (a copy, the caller's position kept), with a warning; else ``img``."""
    frames = getattr(img, "n_frames", 1)
    if frames <= 1:
        return img
    log.warning("%s: animated (%d frames); using its first frame", where, frames)
    position = img.tell()
    img.seek(0)
    first = img.copy()
    img.seek(position)
    return first


def _array_to_uint8(arr: np.ndarray) -> np.ndarray:
    """uint8 [H, W(, 3|4)] from uint8, uint16 or float data, by the rules of :func:`load_image`."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]  # [H, W]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))) or 0 in arr.shape:
        raise InputError(f"image array: expected [H, W], [H, W, 3] or [H, W, 4] with H, W > 0, "
                         f"got {arr.dtype}{list(arr.shape)}")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return _scale_to_uint8(arr, 65535.0)
    if arr.dtype.kind == "f":
        return _float_to_uint8(arr, "image array")
    raise InputError(f"image array: expected {_ARRAY_DTYPES}, got {arr.dtype}{list(arr.shape)}")


def _scale_to_uint8(arr: np.ndarray, full_scale: float) -> np.ndarray:
    # float64: every 16-bit value maps exactly; round to nearest as an 8-bit re-encoder would.
    return np.rint(arr.astype(np.float64) * (255.0 / full_scale)).astype(np.uint8)


def _float_to_uint8(arr: np.ndarray, where: str) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise InputError(f"{where}: expected finite values in [0, 1], found NaN or Inf")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise InputError(f"{where}: float pixels must lie in [0, 1] (scaled to 0..255), found {lo:g}..{hi:g}")
    return _scale_to_uint8(arr, 1.0)


def _eight_bit(img: Image.Image, where: str) -> Image.Image:
    """``img`` itself when it is 8-bit in a mode the pipeline converts, else an 8-bit copy."""
    mode = img.mode
    if mode in _EIGHT_BIT_MODES:
        return img
    if img.width == 0 or img.height == 0:
        raise InputError(f"{where}: empty image ({img.width}x{img.height})")
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        arr = np.asarray(img).astype(np.int64)  # [H, W]
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise InputError(f"{where}: mode {mode} taken as 16-bit needs values 0..65535, found {lo}..{hi}")
        return Image.fromarray(_scale_to_uint8(arr, 65535.0), "L")
    if mode == "F":
        return Image.fromarray(_float_to_uint8(np.asarray(img), f"{where} (mode F)"), "L")
    target = "RGBA" if mode in ("RGBa", "La") else "RGB"  # premultiplied alpha; CMYK, YCbCr, LAB, HSV, RGBX
    try:
        return img.convert(target)
    except ValueError as exc:
        raise InputError(f"{where}: mode {mode} cannot be converted to {target} ({exc})") from None


def condition_size(image: Image.Image, output_resolution: int) -> tuple[int, int]:
    """(width, height) a condition image is resized to: about ``output_resolution**2`` pixels."""
    return calculate_dimensions(output_resolution * output_resolution, image.width / image.height)


# Condition images an export must take by default: every aspect ratio from 1:4 to 4:1 (photos are
# 4:3, 3:2, 16:9; panoramas and phone screenshots reach 4:1 and 1:4).
CONDITION_MAX_ASPECT = 4.0


def condition_sizes(output_resolution: int, max_aspect: float = CONDITION_MAX_ASPECT) -> set[tuple[int, int]]:
    """Every (width, height) that :func:`condition_size` gives for an aspect ratio in
    ``[1/max_aspect, max_aspect]`` at ``output_resolution``: the sizes an export must hold.

    ``calculate_dimensions`` is piecewise constant in the ratio; it changes only where
    ``sqrt(A r) / 32`` or ``sqrt(A / r) / 32`` crosses a half-integer. Evaluating it at each such
    ratio, at the two ends and between neighbours therefore visits every size it can give.
    """
    area = float(output_resolution) ** 2
    lo, hi = 1.0 / max_aspect, float(max_aspect)
    cuts = {lo, hi}
    k = 0.5
    while k * 32 <= math.sqrt(area * hi) + 32:
        for r in ((k * 32) ** 2 / area, area / (k * 32) ** 2):
            if lo < r < hi:
                cuts.add(r)
        k += 1.0
    ordered = sorted(cuts)
    ratios = ordered + [(a + b) / 2 for a, b in zip(ordered, ordered[1:])]
    return {calculate_dimensions(area, r) for r in ratios}


def nearest_supported_size(width: int, height: int, max_aspect: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """For an image outside ``1:max_aspect .. max_aspect:1``: the sizes that reach the limit by
    cropping the long side or by padding the short side, ``((crop_w, crop_h), (pad_w, pad_h))``."""
    if width >= height:
        return (min(width, math.floor(height * max_aspect)), height), (width, max(height, math.ceil(width / max_aspect)))
    return (width, min(height, math.floor(width * max_aspect))), (max(width, math.ceil(height / max_aspect)), height)


def resize_rgba(image: Image.Image, width: int, height: int) -> Image.Image:
    """RGBA copy resized with LANCZOS, as diffusers' ``VaeImageProcessor.resize`` does (PIL input)."""
    if image.mode != "RGBA":
        image = image.convert("RGBA")
    return image.resize((width, height), resample=Image.Resampling.LANCZOS)


def vae_input(image: Image.Image, width: int | None = None, height: int | None = None) -> np.ndarray:
    """float32 [1, 4, H, W] in [-1, 1] from all four RGBA channels (non-RGBA images get alpha 255)."""
    if image.mode != "RGBA":
        image = image.convert("RGBA")
    width = image.width if width is None else width
    height = image.height if height is None else height
    image = resize_rgba(image, width - width % 16, height - height % 16)
    pixels = np.asarray(image).astype(np.float32) / 255.0  # [H, W, 4]
    return (2.0 * pixels - 1.0).transpose(2, 0, 1)[None]  # [1, 4, H, W]


def vision_rgb(image: Image.Image) -> Image.Image:
    """RGB copy for the vision encoder: RGBA pasted on white by its alpha (diffusers), other modes
    with transparency alpha-composited on white, the rest converted (transformers)."""
    if image.mode == "RGBA":
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.getchannel("A"))
        return white
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class VisionConfig:
    """Qwen3-VL image preprocessing (the ``image_processor`` of the processor folder)."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ConfigError(
                f"vision image_mean/std: expected 3 values each, got {self.image_mean}, {self.image_std}"
            )
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"vision min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VisionConfig:
        """From ``preprocessor_config.json`` or the ``image_processor`` entry of ``processor_config.json``.

        Keys it lacks take ``Qwen2VLImageProcessor``'s class defaults, as transformers would.
        """
        data = dict(data.get("image_processor", data))
        size = data.get("size") or {}
        return cls(
            patch_size=int(data.get("patch_size", 14)),
            temporal_patch_size=int(data.get("temporal_patch_size", 2)),
            merge_size=int(data.get("merge_size", 2)),
            min_pixels=int(data.get("min_pixels") or size.get("shortest_edge") or 56 * 56),
            max_pixels=int(data.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280),
            image_mean=tuple(data.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
            image_std=tuple(data.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
            rescale_factor=float(data.get("rescale_factor", 1 / 255)),
            resample=int(data.get("resample", int(Image.Resampling.BICUBIC))),
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``image_processor`` entry transformers writes for ``Qwen2VLImageProcessor``."""
        return {
            "image_processor_type": "Qwen2VLImageProcessor",
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "merge_size": self.merge_size,
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "size": {"longest_edge": self.max_pixels, "shortest_edge": self.min_pixels},
        }


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) in multiples of ``factor`` near the input aspect, with a pixel count in range."""
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"image {width}x{height}: aspect ratio over 200 cannot be encoded")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _patchify(chw: np.ndarray, cfg: VisionConfig) -> np.ndarray:
    """[C, H, W] -> [gh * gw, C * T * P * P], patches in merge-window order (transformers' layout)."""
    c, height, width = chw.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = height // p, width // p
    x = chw.reshape(c, gh // m, m, p, gw // m, m, p)  # [C, gh/m, m, P, gw/m, m, P]
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, P, P]
    # A still image fills all T temporal slots of a patch with the same frame.
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))  # [gh/m, gw/m, m, m, C, T, P, P]
    return x.reshape(gh * gw, c * t * p * p)  # [N, C*T*P*P]


def vision_patches(images: Sequence[Image.Image], cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """``pixel_values`` float32 [N_patches, 3 * T * P * P] and ``image_grid_thw`` int64 [n_images, 3]."""
    if not images:
        raise InputError("vision patches: expected at least one image, got none")
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    patches, grids = [], []
    for image in images:
        rgb = vision_rgb(load_image(image))
        h, w = smart_resize(rgb.height, rgb.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
        rgb = rgb.resize((w, h), resample=cfg.resample)
        # Rescale in float64 then store float32, normalize in float32: transformers' arithmetic.
        x = (np.asarray(rgb).astype(np.float64) * cfg.rescale_factor).astype(np.float32)  # [H, W, 3]
        x = ((x - mean) / std).transpose(2, 0, 1)  # [3, H, W]
        patches.append(_patchify(x, cfg))
        grids.append((1, h // cfg.patch_size, w // cfg.patch_size))
    pixel_values = np.ascontiguousarray(np.concatenate(patches, axis=0), dtype=np.float32)  # [N, C*T*P*P]
    return pixel_values, np.asarray(grids, dtype=np.int64)
