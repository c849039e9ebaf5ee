"""Output images of the command line: path checks before any work, formats, atomic writes.

Every failure here is an ``InputError`` (one line on the command line) and leaves nothing behind:
no partial image, no temporary file.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from qwen_image_edge.runtime.errors import InputError

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
JPEG_QUALITY = 95
# Bytes an RGBA image may take on disk, per pixel, at worst: PNG's filtered-but-incompressible data
# is 4 bytes per pixel plus a filter byte per row; 5 covers it with room for the text chunks.
WORST_BYTES_PER_PIXEL = 5
SLACK_BYTES = 1 << 16


def output_paths(output: str | os.PathLike, count: int) -> list[Path]:
    """``count`` target paths: ``output`` itself for one image, ``stem-0``, ``stem-1``, ... for several."""
    out = Path(output)
    if count == 1:
        return [out]
    width = len(str(count - 1))
    return [out.with_name(f"{out.stem}-{i:0{width}d}{out.suffix}") for i in range(count)]


def check_output(path: Path, max_pixels: int) -> None:
    """Refuse, before any work, an output that cannot be written: unknown suffix, a directory, a
    missing, read-only or (nearly) full folder. ``max_pixels``: the largest image it may receive."""
    if path.suffix.lower() not in FORMATS:
        raise InputError(f"output {path}: expected a .png, .jpg/.jpeg or .webp path, got {path.suffix or 'no suffix'!r}")
    check_writable_file(path, "output")
    need = max_pixels * WORST_BYTES_PER_PIXEL + SLACK_BYTES
    folder = path.parent
    free = _free_bytes(folder)
    if free is not None and free < need:
        raise InputError(f"output {path}: folder {folder} has {free:,} bytes free; the image may need up to {need:,}")


def check_writable_file(path: Path, what: str) -> None:
    """A file another stage writes at the end (a report): its folder must exist and take a file now."""
    if path.is_dir():
        raise InputError(f"{what} {path}: is a directory; expected a file path")
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"{what} {path}: folder {folder} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot write in folder {folder} ({_reason(exc)})") from None


def parse_color(text: str) -> tuple[int, int, int]:
    """An RGB colour from a name (``white``) or hex (``#808080``), as Pillow's ImageColor reads them."""
    from PIL import ImageColor

    try:
        rgb = ImageColor.getrgb(text)
    except ValueError:
        raise InputError(f"--background: expected a colour name or #rrggbb, got {text!r}") from None
    return tuple(rgb[:3])


def save_image(image, path: Path, *, params: dict | None = None, background: tuple[int, int, int] = (255, 255, 255)) -> None:
    """Write ``image`` (RGBA) as ``path``'s suffix says, atomically (temporary file, then rename).

    PNG: lossless, alpha kept, ``params`` as text chunks. WebP: lossless, alpha kept, and the colour of
    fully transparent pixels too (``exact``). JPEG has no alpha: the image is composited onto ``background``.
    """
    fmt = FORMATS[path.suffix.lower()]
    options: dict = {}
    if fmt == "PNG" and params is not None:
        from qwen_image_edge.runtime.metadata import png_info

        options["pnginfo"] = png_info(params)
    elif fmt == "WEBP":
        options.update(lossless=True, exact=True, quality=100)
    elif fmt == "JPEG":
        image = flatten(image, background)
        options.update(quality=JPEG_QUALITY, subsampling=0)  # 4:4:4: small coloured shapes keep their edges
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as fh:
            image.save(fh, format=fmt, **options)
            fh.flush()
            os.fsync(fh.fileno())  # ENOSPC on a delayed write shows here, not after the rename
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a saved image gets the usual mode
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"output {path}: could not be written ({_reason(exc)}); nothing was saved") from None
    finally:
        tmp.unlink(missing_ok=True)


def flatten(image, background: tuple[int, int, int]):
    """RGB: an RGBA image composited ("over") onto an opaque ``background`` colour."""
    from PIL import Image

    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs (Windows): the write itself reports a full disk
        return None
    return st.f_bavail * st.f_frsize


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return exc.strerror or str(exc)
