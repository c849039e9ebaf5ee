"""Typed errors shared by the runtime and the reference.

Every message says what was expected, what was found and where, e.g.
``transformer input 'timestep': expected float32[B], got float16[2]``.
"""

from __future__ import annotations


class QwenImageEdgeError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(QwenImageEdgeError, ValueError):
    """A configuration value is invalid or inconsistent with another."""


class ShapeError(QwenImageEdgeError, ValueError):
    """A tensor or image has the wrong shape, dtype or size."""


class InputError(QwenImageEdgeError, ValueError):
    """A user input (prompt, image, size, step count) cannot be used."""


class CheckpointError(QwenImageEdgeError):
    """A checkpoint folder is missing, malformed, unsafe or does not match the model."""


class ManifestError(QwenImageEdgeError):
    """An export directory's manifest is missing, invalid or does not match its files."""


class BackendError(QwenImageEdgeError):
    """An inference backend is unavailable or failed to run a graph."""


class NumericalError(QwenImageEdgeError):
    """A graph produced NaN or Inf (the step is named, nothing is saved)."""
