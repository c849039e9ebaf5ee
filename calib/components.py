"""One precision per component: parse a policy, quantize / convert each part, write one export.

``quantize --precision`` takes:

- ``int8`` / ``fp8``: the transformer only (the meaning it always had);
- ``part=precision,...``: e.g. ``transformer=fp8,text_encoder=int4,vae=fp16``; parts not named stay fp32;
- a preset name, :data:`PRESETS` (``edge``: the recommended edge policy);
- a JSON file holding an object ``{"transformer": "fp8", ...}``.

Parts and the precisions each takes (:data:`ALLOWED`): the transformer graphs (int8 / fp8 through
``qwen_image_edge.calib.quantize``), the text encoder's language model (int8 SmoothQuant / int4
AWQ through ``qwen_image_edge.calib.encoder_quant``), the vision tower and the VAE (fp16 through
``qwen_image_edge.export.half``, which keeps fp32 where fp16 would overflow). Everything is
checked before anything loads or is written; the manifest records each graph's precision and
provenance ``calibration.components`` what each part got and why.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from qwen_image_edge.runtime.errors import ConfigError
from qwen_image_edge.runtime.manifest import Precision

log = logging.getLogger(__name__)

PARTS = ("transformer", "text_encoder", "vision_encoder", "vae")
PART_GRAPHS = {
    "transformer": ("transformer", "transformer_prefill", "transformer_step"),
    "text_encoder": ("text_encoder",),
    "vision_encoder": ("vision_encoder",),
    "vae": ("vae_decoder", "vae_encoder"),
}
ALLOWED: dict[str, tuple[Precision, ...]] = {
    "transformer": (Precision.FP32, Precision.INT8, Precision.FP8, Precision.INT4),
    "text_encoder": (Precision.FP32, Precision.INT8, Precision.INT4),
    "vision_encoder": (Precision.FP32, Precision.FP16),
    "vae": (Precision.FP32, Precision.FP16),
}


@dataclass(frozen=True)
class ComponentPolicy:
    """A precision per part (``PARTS``); ``name`` is the preset's or the text it was parsed from."""

    transformer: Precision = Precision.FP32
    text_encoder: Precision = Precision.FP32
    vision_encoder: Precision = Precision.FP32
    vae: Precision = Precision.FP32
    name: str = "custom"

    def __post_init__(self) -> None:
        for part in PARTS:
            object.__setattr__(self, part, _precision(part, getattr(self, part)))

    def precision(self, part: str) -> Precision:
        return getattr(self, part)

    def graph_precision(self, graph: str) -> Precision:
        """A graph's precision; a graph no part names (e.g. a weightless sampler graph) stays fp32."""
        return next((self.precision(p) for p, graphs in PART_GRAPHS.items() if graph in graphs), Precision.FP32)

    def to_dict(self) -> dict:
        return {"name": self.name, **{p: self.precision(p).value for p in PARTS}}

    @property
    def transformer_only(self) -> bool:
        return all(self.precision(p) is Precision.FP32 for p in PARTS if p != "transformer")


def _precision(part: str, value) -> Precision:
    try:
        p = Precision(value)
    except ValueError:
        raise ConfigError(f"quantize --precision {part}={value}: unknown precision; expected one of "
                          f"{[q.value for q in ALLOWED[part]]}") from None
    if p not in ALLOWED[part]:
        raise ConfigError(f"quantize --precision {part}={p.value}: the {part} cannot take {p.value}; expected one "
                          f"of {[q.value for q in ALLOWED[part]]}")
    return p


# The recommended edge mix: every large GEMM in 4 bits, the rest in half precision. The transformer
# int4 weight-only (AWQ-lite, blocks of 32, its other linears fp16: calib.policy.Int4Policy) and the language model int4 AWQ
# (blocks of 128) with its embedding table as int8 rows: the full-size bytes (bench/footprint.py)
# reach 0.35x bf16 at most, where an fp8 transformer (W8A8, TensorRT's E4M3 GEMMs) stays at 0.44x; the
# vision tower and the VAE fp16 (the VAE's decoder checked for overflow, export/half.py).
PRESETS = {
    "edge": ComponentPolicy(Precision.INT4, Precision.INT4, Precision.FP16, Precision.FP16, name="edge"),
}


def _from_mapping(mapping: dict, name: str, where: str) -> ComponentPolicy:
    unknown = [k for k in mapping if k not in PARTS]
    if unknown:
        raise ConfigError(f"{where}: unknown component {unknown[0]!r}; expected some of {list(PARTS)}")
    return ComponentPolicy(**mapping, name=name)


def parse_component_policy(text: str | os.PathLike | ComponentPolicy) -> ComponentPolicy:
    """``--precision``'s value as a :class:`ComponentPolicy` (see the module docstring); ConfigError otherwise."""
    if isinstance(text, ComponentPolicy):
        return text
    text = str(text).strip()
    if text in PRESETS:
        return PRESETS[text]
    if text.endswith(".json"):
        data = read_json_object(text, f"precision policy file {text}")
        return _from_mapping(data, Path(text).stem, f"precision policy file {text}")
    if "=" not in text:
        if text in (Precision.INT8.value, Precision.FP8.value):
            return ComponentPolicy(transformer=Precision(text), name=text)
        raise ConfigError(f"quantize --precision {text!r}: expected one of ['int8', 'fp8'] (the transformer), a "
                          f"preset {sorted(PRESETS)}, part=precision pairs (transformer=fp8,text_encoder=int4,vae=fp16) "
                          "or a .json file")
    mapping: dict[str, str] = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        part, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not part or not value:
            raise ConfigError(f"quantize --precision {item!r}: expected part=precision, e.g. text_encoder=int4")
        if part in mapping:
            raise ConfigError(f"quantize --precision: {part} given twice")
        mapping[part] = value
    return _from_mapping(mapping, text, "quantize --precision")


def read_json_object(path: str | Path, what: str) -> dict:
    """A JSON object from a file; anything else is a one-line ConfigError starting with ``what``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{what}: expected a readable JSON object ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: expected a JSON object, got {type(data).__name__}")
    return data
