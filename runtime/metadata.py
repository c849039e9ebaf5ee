"""Generation parameters stored in an output PNG's text chunks, and read back.

One function, :func:`generation_parameters`, builds the record for the runtime and the reference
alike, so both write the same fields. Two chunks carry it (UTF-8 ``iTXt``):

- ``qwen-image-edge``: the record as JSON, exact (what :func:`read_parameters` returns);
- ``parameters``: the same values in the one-text layout that common image-generation tools write
  and read (prompt; ``Negative prompt: ...``; ``Steps: ..., CFG scale: ..., Seed: ..., Size: WxH, ...``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from qwen_image_edge.runtime.errors import InputError

JSON_KEY = "qwen-image-edge"
TEXT_KEY = "parameters"
FIELDS = ("task", "prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height",
          "model", "model_sha256", "export_sha256", "pipeline", "version")
TASKS = ("generate", "edit")
PIPELINES = ("runtime", "reference")


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qwen-image-edge")
    except PackageNotFoundError:
        return "unknown"


def model_digest(component_digests: Mapping[str, str]) -> str:
    """One sha256 over a checkpoint's per-component digests (``{"transformer": hex, ...}``): the
    export's provenance and the reference's folder give the same value for the same weights."""
    if not component_digests:
        raise InputError("model digest: expected per-component checkpoint digests, got none")
    text = "".join(f"{name}={component_digests[name]}\n" for name in sorted(component_digests))
    return hashlib.sha256(text.encode()).hexdigest()


def generation_parameters(*, task: str, prompt: str, negative_prompt: str | None, seed: int, steps: int,
                          guidance: float, width: int, height: int, model: str, model_sha256: str,
                          export_sha256: str | None, pipeline: str) -> dict:
    """The record written into an output image: what was asked, what ran, and on which weights."""
    if task not in TASKS or pipeline not in PIPELINES:
        raise InputError(f"parameters: expected task in {TASKS} and pipeline in {PIPELINES}, got {task!r}, {pipeline!r}")
    record = {"task": task, "prompt": str(prompt), "negative_prompt": negative_prompt, "seed": int(seed),
              "steps": int(steps), "guidance": float(guidance), "width": int(width), "height": int(height),
              "model": str(model), "model_sha256": str(model_sha256), "export_sha256": export_sha256,
              "pipeline": pipeline, "version": package_version()}
    return record


def parameters_text(params: Mapping) -> str:
    """The record in the ``parameters`` layout other tools show (prompt, negative prompt, settings)."""
    settings = [f"Steps: {params['steps']}", "Sampler: Euler (flow matching)", f"CFG scale: {params['guidance']}",
                f"Seed: {params['seed']}", f"Size: {params['width']}x{params['height']}",
                f"Model hash: {params['model_sha256'][:10]}", f"Model: {params['model']}"]
    if params.get("export_sha256"):
        settings.append(f"Export hash: {params['export_sha256'][:10]}")
    settings.append(f"Version: qwen-image-edge {params['version']}")
    lines = [params["prompt"]]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    lines.append(", ".join(settings))
    return "\n".join(lines)


def png_info(params: Mapping) -> PngImagePlugin.PngInfo:
    """Text chunks for ``Image.save(..., pnginfo=...)``."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt(JSON_KEY, json.dumps(dict(params), ensure_ascii=False))
    info.add_itxt(TEXT_KEY, parameters_text(params))
    return info


def read_parameters(path: str | os.PathLike) -> dict:
    """The record a qwen-image-edge PNG carries, or an InputError that says why there is none."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image {path}: no such file")
    try:
        with Image.open(path) as img:
            img.load()  # text chunks after the image data are read only with the pixels
            text = getattr(img, "text", {}).get(JSON_KEY)
            fmt = img.format
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"image {path}: not a readable image file ({exc})") from None
    if text is None:
        raise InputError(f"image {path}: no '{JSON_KEY}' parameters ({fmt or 'unknown'} file; only PNGs written by "
                         "qwen-image-edge carry them, and some tools drop text chunks when they re-save)")
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"image {path}: '{JSON_KEY}' chunk is not valid JSON ({exc})") from None
    if not isinstance(params, dict) or set(params) != set(FIELDS):
        found = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise InputError(f"image {path}: '{JSON_KEY}' chunk: expected the fields {list(FIELDS)}, found {found}")
    return params


def format_parameters(params: Mapping) -> str:
    """One ``field: value`` line per field, in the record's order."""
    return "\n".join(f"{name}: {'' if params[name] is None else params[name]}" for name in FIELDS)
