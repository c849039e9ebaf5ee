"""The torch-free runtime: an export directory's manifest, its graphs over onnxruntime or TensorRT,
and the denoising loop in numpy. ``Pipeline`` is the entry point; the errors are the ones to catch.

Imported lazily: the reference imports this package's pure numpy modules (schedule, layout,
tokens, images) without loading the pipeline or a backend.
"""

from __future__ import annotations

from qwen_image_edge.runtime.errors import (
    BackendError,
    CheckpointError,
    ConfigError,
    InputError,
    ManifestError,
    NumericalError,
    QwenImageEdgeError,
    ShapeError,
)

__all__ = ["Pipeline", "GenerationStats", "Manifest", "load_manifest", "QwenImageEdgeError", "ConfigError", "ShapeError", "InputError",
           "CheckpointError", "ManifestError", "BackendError", "NumericalError"]


def __getattr__(name: str):
    if name == "Pipeline":
        from qwen_image_edge.runtime.pipeline import Pipeline

        return Pipeline
    if name == "GenerationStats":
        from qwen_image_edge.runtime.stats import GenerationStats

        return GenerationStats
    if name in ("Manifest", "load_manifest"):
        from qwen_image_edge.runtime import manifest

        return getattr(manifest, name)
    raise AttributeError(f"module 'qwen_image_edge.runtime' has no attribute {name!r}")
