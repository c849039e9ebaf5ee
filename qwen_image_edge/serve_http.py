"""The HTTP side of ``qwen-image-edge serve``, plain and testable without Ray: request bodies ->
validated :class:`Job`s, images -> response bodies, errors -> status codes with one-line messages.

``POST /v1/generate`` takes a JSON object; ``POST /v1/edit`` a multipart form with one or more
``image`` files and the same fields as form values. A response is the PNG that ``run`` would write
(its parameters in the text chunks), or JSON with the PNG in base64 when the client asks for it
(``Accept: application/json`` or the field ``"format": "json"``).
"""

from __future__ import annotations

import base64
import io
import json
import re
import secrets
from dataclasses import dataclass
from email import policy
from email.parser import BytesParser

from PIL import Image, ImageOps, UnidentifiedImageError

from qwen_image_edge.runtime.errors import (
    ConfigError,
    InputError,
    NumericalError,
    QwenImageEdgeError,
    ShapeError,
)
from qwen_image_edge.runtime.sampling import check_guidance, check_steps

# A request body above this is refused before it is parsed (413): a few condition images fit easily.
MAX_BODY_BYTES = 64 << 20
FORMATS = ("png", "json")
# field -> the type a JSON body carries it as (form values are text and are converted)
FIELDS = {"prompt": str, "negative_prompt": str, "seed": int, "steps": int, "width": int, "height": int,
          "guidance": float, "format": str}


@dataclass(frozen=True)
class Job:
    """One request, checked; None leaves a value to the model's defaults (or a random seed)."""

    task: str  # "generate" or "edit"
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    guidance: float | None = None
    images: tuple[Image.Image, ...] = ()  # edit: the condition images, decoded
    as_json: bool = False


class BodyTooLarge(InputError):
    """A request body over :data:`MAX_BODY_BYTES`."""


def one_line(exc: BaseException) -> str:
    """An error's message on one line (as the CLI prints it), also when it quotes a library's text."""
    return re.sub(r"\s*\n\s*", " ", str(exc)).strip() or type(exc).__name__


def error_status(exc: BaseException) -> int:
    """The HTTP status of an error: the client's mistakes are 4xx; anything else is the server's."""
    if isinstance(exc, BodyTooLarge):
        return 413
    if isinstance(exc, (InputError, ShapeError, ConfigError)):
        return 400
    if isinstance(exc, NumericalError):  # these values made the graphs overflow: unprocessable
        return 422
    if isinstance(exc, QwenImageEdgeError):  # the export or the backend: not the request's fault
        return 503
    return 500


def error_body(exc: BaseException) -> bytes:
    """``{"error": "<one line>"}``; an unexpected exception is named, never shown with its traceback."""
    message = one_line(exc) if isinstance(exc, QwenImageEdgeError) else f"internal error ({type(exc).__name__})"
    return json.dumps({"error": message}).encode()


def check_body_size(size: int) -> None:
    if size > MAX_BODY_BYTES:
        raise BodyTooLarge(f"request body: expected at most {MAX_BODY_BYTES} bytes, got {size}")


def parse_generate(body: bytes, accept: str = "") -> Job:
    """A ``/v1/generate`` JSON body -> Job."""
    check_body_size(len(body))
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"/v1/generate body: expected a JSON object, got malformed JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"/v1/generate body: expected a JSON object, got {type(data).__name__}")
    return _job("generate", {k: _typed(k, v) for k, v in _known(data, "/v1/generate").items()}, (), accept)


def parse_edit(body: bytes, content_type: str, accept: str = "") -> Job:
    """A ``/v1/edit`` multipart form -> Job: one or more ``image`` files, the other fields as text."""
    check_body_size(len(body))
    if not content_type.lower().startswith("multipart/form-data"):
        raise InputError(f"/v1/edit body: expected multipart/form-data, got {content_type or 'no content type'!r}")
    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
    message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise InputError("/v1/edit body: expected multipart parts, found none (is the boundary right?)")
    fields: dict[str, str] = {}
    images: list[Image.Image] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if name == "image":
            images.append(decode_image(payload, len(images), part.get_filename()))
        elif name is not None:
            fields[name] = payload.decode("utf-8", "replace")
    if not images:
        raise InputError("/v1/edit: expected one or more 'image' files in the form, got none")
    values = {k: _from_text(k, v) for k, v in _known(fields, "/v1/edit").items()}
    return _job("edit", values, tuple(images), accept)


def decode_image(data: bytes, index: int, filename: str | None = None) -> Image.Image:
    """An uploaded image as ``run`` reads a file: the first frame, its EXIF orientation applied."""
    where = f"image {index}" + (f" ({filename!r})" if filename else "")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.seek(0)
            img.load()
            return ImageOps.exif_transpose(img)  # a copy, detached from the buffer
    except Image.DecompressionBombError as exc:
        raise InputError(f"{where}: too large to decode safely ({exc})") from None
    except UnidentifiedImageError:  # Pillow's message names the buffer object: nothing for the client
        raise InputError(f"{where}: not a readable image file ({len(data)} bytes in no format Pillow reads)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"{where}: not a readable image file ({one_line(exc)})") from None


def encode_multipart(fields: dict[str, object], images: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """The client side of ``/v1/edit`` (tests, bench/serve.py): ``(body, content type)`` of a form with
    the fields as text and each ``(filename, data)`` as an ``image`` file."""
    boundary = f"qwen-image-edge-{secrets.token_hex(12)}"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    for filename, data in images:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _known(data: dict, where: str) -> dict:
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise InputError(f"{where}: unknown field(s) {unknown}; expected some of {list(FIELDS)}")
    return {k: v for k, v in data.items() if v is not None}


def _typed(name: str, value):
    """A JSON value of the field's type (ints where ints are expected: 1.5 steps is refused)."""
    kind = FIELDS[name]
    ok = isinstance(value, str) if kind is str else (
        isinstance(value, (int, float)) if kind is float else isinstance(value, int))
    if not ok or isinstance(value, bool):
        raise InputError(f"{name}: expected {'a string' if kind is str else 'a number' if kind is float else 'an integer'}"
                         f", got {value!r}")
    return value


def _from_text(name: str, text: str):
    kind = FIELDS[name]
    try:
        return kind(text)
    except ValueError:
        raise InputError(f"{name}: expected {'a number' if kind is float else 'an integer'}, got {text!r}") from None


def _job(task: str, values: dict, images: tuple, accept: str) -> Job:
    if "prompt" not in values:
        raise InputError(f"/v1/{task}: expected a 'prompt' field, got none")
    fmt = values.pop("format", "json" if "application/json" in accept.lower() else "png")
    if fmt not in FORMATS:
        raise InputError(f"format: expected one of {list(FORMATS)}, got {fmt!r}")
    # the runtime checks these again; here a bad value fails before the request waits for a batch
    if "steps" in values:
        check_steps(values["steps"])
    if "guidance" in values:
        values["guidance"] = check_guidance(values["guidance"])
    if values.get("seed", 0) < 0:
        raise InputError(f"seed: expected a non-negative integer, got {values['seed']}")
    return Job(task=task, images=images, as_json=fmt == "json", **values)


def png_bytes(image: Image.Image, params: dict) -> bytes:
    """The PNG ``run`` writes for these parameters (the same encoder and text chunks)."""
    from qwen_image_edge.runtime.metadata import png_info

    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(params))
    return buf.getvalue()


def response_body(png: bytes, params: dict, as_json: bool) -> tuple[bytes, str]:
    """``(body, media type)``: the PNG itself, or JSON with it in base64 and the parameters."""
    if not as_json:
        return png, "image/png"
    doc = {"image": base64.b64encode(png).decode("ascii"), "media_type": "image/png", "parameters": params}
    return json.dumps(doc).encode(), "application/json"
