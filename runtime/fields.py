"""JSON objects <-> frozen dataclasses, every field checked against its annotation.

The manifest's sections are frozen dataclasses; this module reads them from parsed JSON and
writes them back, so a section is declared once (its fields and their types) and the checks,
the writer and the list of required fields all follow from that declaration.

Rules, per dataclass field:

- required, unless its metadata is :data:`OPTIONAL` (then its default applies when absent);
- ``X | None``: the key must be present, its value may be ``null``;
- :data:`EXTRA`: a ``dict`` field that keeps the keys no other field names (a section that types
  only what the runtime reads, e.g. the model config); without one, an unknown key is an error;
- :data:`KEY`: filled from the key the object has in its parent (a graph's name), never written.

A problem is a :class:`FieldError` carrying the dotted path of the field
(``schedule.guidance_scale``, ``graphs.transformer.inputs[0].dims``); the manifest turns it into
a one-line :class:`~qwen_image_edge.runtime.errors.ManifestError`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from collections.abc import Iterator
from typing import Any, Union, get_args, get_origin

from qwen_image_edge.runtime.errors import ConfigError, InputError, ManifestError

OPTIONAL = {"optional": True}
EXTRA = {"extra": True}
KEY = {"key": True}

_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


class FieldError(ManifestError):
    """A field's problem; ``path`` is relative to the object being read (the reader prefixes it).
    A section's own invariant checks raise it naming their field."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path, self.message = path, message


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in get_args(tp))
    if origin is tuple:
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "an object"
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _scalar(tp, value, path: str):
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str)}
    if tp not in ok:
        raise TypeError(f"fields: unsupported annotation {tp!r} at {path}")
    if not ok[tp]:
        raise FieldError(path, f"expected {_NAMES[tp]}, got {_short(value)}")
    return float(value) if tp is float else value


def _matches(tp, value) -> bool:
    try:
        _parse(tp, value, "")
    except FieldError:
        return False
    return True


def _parse(tp, value, path: str, key: str | None = None):
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(options) < len(get_args(tp)):
            return None
        if len(options) == 1:
            return _parse(options[0], value, path)
        for option in options:
            if _matches(option, value):
                return _parse(option, value, path)
        raise FieldError(path, f"expected {_describe(tp)}, got {_short(value)}")
    if dataclasses.is_dataclass(tp):
        return from_json(tp, value, path, key)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise FieldError(path, f"expected one of {[m.value for m in tp]}, got {_short(value)}") from None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise FieldError(path, f"expected a list, got {_short(value)}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(value) != len(args):
            raise FieldError(path, f"expected a list of {len(args)} items, got {len(value)}")
        return tuple(_parse(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise FieldError(path, f"expected an object, got {_short(value)}")
        _, vt = get_args(tp)
        return {k: _parse(vt, v, _join(path, k), key=k) for k, v in value.items()}
    return _scalar(tp, value, path)


def from_json(cls: type, data, path: str = "", key: str | None = None):
    """An instance of dataclass ``cls`` from a parsed JSON object (see the module docstring)."""
    if not isinstance(data, dict):
        raise FieldError(path or "(top level)", f"expected an object, got {_short(data)}")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    known: set[str] = set()
    extra = None
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.metadata.get("key"):
            kwargs[f.name] = key
            continue
        if f.metadata.get("extra"):
            extra = f.name
            continue
        known.add(f.name)
        sub = _join(path, f.name)
        if f.name not in data:
            if f.metadata.get("optional"):
                continue
            raise FieldError(sub, "required field missing")
        kwargs[f.name] = _parse(hints[f.name], data[f.name], sub)
    unknown = [k for k in data if k not in known]
    if extra is not None:
        kwargs[extra] = {k: data[k] for k in unknown}
    elif unknown:
        raise FieldError(path or "(top level)", f"unknown fields {unknown}; expected only {sorted(known)}")
    try:
        return cls(**kwargs)
    except FieldError as exc:  # an invariant of the section, naming its field
        raise FieldError(_join(path, exc.path), exc.message) from None
    except (ConfigError, InputError, ManifestError, ValueError) as exc:  # e.g. SchedulerConfig's own checks
        raise FieldError(path or "(top level)", str(exc)) from None


def to_json(value) -> Any:
    """The JSON form of a dataclass (recursively), enum, tuple or dict; other values as they are."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            if f.metadata.get("key"):
                continue
            v = getattr(value, f.name)
            if f.metadata.get("extra"):
                out.update(to_json(v))
            else:
                out[f.name] = to_json(v)
        return out
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


def required_fields(cls: type, path: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, annotation) of every required field of ``cls`` and of the dataclasses inside it;
    ``*`` stands for any key of a dict or index of a list (``graphs.*.inputs[*].name``)."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("key") or f.metadata.get("extra") or f.metadata.get("optional"):
            continue
        sub = _join(path, f.name)
        yield sub, hints[f.name]
        yield from _nested(hints[f.name], sub)


def required_paths(cls: type) -> list[str]:
    return [p for p, _ in required_fields(cls)]


def accepts(tp, value) -> bool:
    """Whether ``value`` (parsed JSON) is of the annotation ``tp``."""
    return _matches(tp, value)


def _nested(tp, path: str) -> Iterator[tuple[str, Any]]:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        yield from required_fields(tp, path)
    elif origin is dict:
        yield from _nested(get_args(tp)[1], _join(path, "*"))
    elif origin is tuple and len(get_args(tp)) == 2 and get_args(tp)[1] is Ellipsis:
        yield from _nested(get_args(tp)[0], f"{path}[*]")
