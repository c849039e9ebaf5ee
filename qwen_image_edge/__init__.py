"""qwen-image-edge: Qwen-Image-2 on small GPUs.

The public, torch-free API (numpy, Pillow, tokenizers and onnxruntime or TensorRT)::

    from qwen_image_edge import Pipeline, InputError

    pipe = Pipeline.load("demo-export")
    image = pipe.generate("a red circle on the left on a white background", seed=0)

The stages that need torch live in the subpackages ``qwen_image_edge.export``, ``.calib`` and
``.distill`` (and the reference, ``qwen_image2_ref``); importing this package loads none of them.
Names are resolved on first use, so ``import qwen_image_edge`` (and the CLI's ``--help``) stays
light.
"""

from __future__ import annotations

_ERRORS = ("QwenImageEdgeError", "ConfigError", "ShapeError", "InputError", "CheckpointError", "ManifestError",
           "BackendError", "NumericalError")
__all__ = ["Pipeline", "GenerationStats", "Manifest", "load_manifest", *_ERRORS]


def __getattr__(name: str):
    if name in __all__:
        from qwen_image_edge import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'qwen_image_edge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
