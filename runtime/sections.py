"""The typed sections of ``manifest.json``: model, prompt, schedule, image, provenance.

Each section is a frozen dataclass read and written by :mod:`qwen_image_edge.runtime.fields`, so a
missing or mistyped field is a ManifestError naming its path. The model section types what the
runtime reads (the transformer's channels and rope, the VAE's latent statistics and scale factor)
and keeps the rest of the reference's ModelConfig as it was written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qwen_image_edge.runtime.fields import EXTRA, FieldError
from qwen_image_edge.runtime.images import VisionConfig
from qwen_image_edge.runtime.sampling import MAX_SIZE
from qwen_image_edge.runtime.schedule import SchedulerConfig
from qwen_image_edge.runtime.vision import VisionTower

# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class TransformerSection:
    """The transformer config fields the runtime reads; ``extra`` holds the others as written."""

    in_channels: int
    num_layers: int
    num_heads: int
    head_dim: int
    context_dim: int
    axes_dims_rope: tuple[int, int, int]
    rope_theta: float
    causal_condition: bool
    extra: dict[str, Any] = field(default_factory=dict, metadata=EXTRA)

    def __post_init__(self) -> None:
        if sum(self.axes_dims_rope) != self.head_dim:
            raise FieldError("axes_dims_rope", f"{list(self.axes_dims_rope)} sum to {sum(self.axes_dims_rope)}, "
                                               f"expected head_dim {self.head_dim}")
        _positive(self, ("in_channels", "num_layers", "num_heads", "head_dim", "context_dim"))


@dataclass(frozen=True)
class VaeSection:
    """Latent statistics (per channel) and the pixels per latent side."""

    z_dim: int
    scale_factor_spatial: int
    latents_mean: tuple[float, ...]
    latents_std: tuple[float, ...]
    extra: dict[str, Any] = field(default_factory=dict, metadata=EXTRA)

    def __post_init__(self) -> None:
        _positive(self, ("z_dim", "scale_factor_spatial"))
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise FieldError(name, f"expected {self.z_dim} values (z_dim), got {len(getattr(self, name))}")
        if min(self.latents_std) <= 0:
            raise FieldError("latents_std", f"expected every value > 0, got {min(self.latents_std)}")


@dataclass(frozen=True)
class ModelSection:
    """The reference's ModelConfig; ``encoder`` and ``pipeline`` are kept as written (the runtime
    reads the prompt and schedule sections instead)."""

    name: str
    transformer: TransformerSection
    vae: VaeSection
    encoder: dict[str, Any]
    pipeline: dict[str, Any]


# ----------------------------------------------------------------------------- prompt, schedule


@dataclass(frozen=True)
class PromptSection:
    tokenizer: str  # relative path of tokenizer.json
    tokenizer_sha256: str
    template: str
    system_prompt: str
    drop_rule: str
    drop_idx: int  # tokens of the system turn, dropped from the encoder's output
    pad_token: str
    max_prompt_tokens: int
    max_condition_images: int


@dataclass(frozen=True)
class ScheduleSection:
    scheduler: SchedulerConfig
    num_steps: int
    sigmas: tuple[float, ...] | None  # a distilled model's fixed grid (without the terminal 0)
    guidance_scale: float
    guidance_distilled: bool
    default_negative_prompt: str | None

    @property
    def default_steps(self) -> int:
        return len(self.sigmas) if self.sigmas else self.num_steps


# ----------------------------------------------------------------------------- image


@dataclass(frozen=True)
class ConditionRange:
    """What one condition image can be after the runtime resizes it (see ``export.iospec``)."""

    max_aspect: float
    min_side: int  # pixels
    max_side: int
    max_latent_tokens: int
    max_patches: int

    def __post_init__(self) -> None:
        if not self.max_aspect >= 1.0:
            raise FieldError("max_aspect", f"expected a ratio >= 1 (longest side / shortest), got {self.max_aspect}")
        _positive(self, ("min_side", "max_side", "max_latent_tokens", "max_patches"))
        if self.min_side > self.max_side:
            raise FieldError("min_side", f"{self.min_side} is above max_side {self.max_side}")


@dataclass(frozen=True)
class TargetRange:
    """Output sizes the export takes: a longest side and a latent token count."""

    max_side: int  # pixels
    max_tokens: int  # N_t

    def __post_init__(self) -> None:
        _positive(self, ("max_side", "max_tokens"))


@dataclass(frozen=True)
class ImageSection:
    output_resolution: int
    min_resolution: int
    max_resolution: int
    multiple: int
    vae_scale_factor: int  # pixels per latent token side
    condition: ConditionRange
    target: TargetRange
    latent_channels: int
    vision: VisionConfig
    vision_tower: VisionTower
    text_encoder_visual_inputs: str

    def __post_init__(self) -> None:
        _positive(self, ("vae_scale_factor", "multiple", "latent_channels"))
        if self.multiple % self.vae_scale_factor:
            raise FieldError("multiple", f"expected a multiple of vae_scale_factor {self.vae_scale_factor}, "
                                         f"got {self.multiple}")
        # the sizes this runtime makes: multiples of `multiple` up to sampling.MAX_SIZE pixels a side
        for name in ("min_resolution", "output_resolution", "max_resolution"):
            value = getattr(self, name)
            if not self.multiple <= value <= MAX_SIZE or value % self.multiple:
                raise FieldError(name, f"expected a multiple of {self.multiple} in {self.multiple}..{MAX_SIZE} "
                                       f"pixels, got {value}")
        if self.min_resolution > min(self.output_resolution, self.max_resolution):
            raise FieldError("min_resolution", f"{self.min_resolution} is above output_resolution "
                                               f"{self.output_resolution} or max_resolution {self.max_resolution}")
        if self.target.max_side < self.max_resolution:
            raise FieldError("target.max_side", f"{self.target.max_side} is below max_resolution {self.max_resolution}")


# ----------------------------------------------------------------------------- provenance


@dataclass(frozen=True)
class Provenance:
    """Where an export came from; the nested summaries stay free-form."""

    source: dict[str, Any]  # path, name, checkpoint_sha256 per component
    tool_versions: dict[str, str]
    exporter: str
    created: str  # ISO 8601, UTC
    calibration: dict[str, Any] | None
    distillation: dict[str, Any] | None


def _positive(section, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(section, name) < 1:
            raise FieldError(name, f"expected >= 1, got {getattr(section, name)}")
