"""modelopt's quantization package, imported on first use with a one-line install hint (the
transformer's and the text encoder's quantization both need it; neither imports the other for it)."""

from __future__ import annotations

from qwen_image_edge.runtime.errors import ConfigError


def load_modelopt():
    """``modelopt.torch.quantization``, or a ConfigError naming the extra to install."""
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise ConfigError(
            f"quantization needs nvidia-modelopt ({exc}); install the 'quant' extra: "
            "pip install nvidia-modelopt onnxslim 'onnxconverter-common~=1.16.0' lief cppimport"
        ) from None
    return mtq
