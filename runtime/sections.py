"""The typed sections of ``manifest.json``: model, prompt, schedule, image, provenance.

Each section is a frozen dataclass read and written by :mod:`qwen_image_edge.runtime.fields`, so a
missing or mistyped field is a ManifestError naming its path. The model section types what the
runtime reads (the transformer's channels and rope, the VAE's latent statistics and scale factor)
and keeps the rest of the reference's ModelConfig as it was written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qwen_image_edge.runtime.errors import ManifestError
from qwen_image_edge.runtime.fields import EXTRA
from qwen_image_edge.runtime.images import VisionConfig
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
            raise ManifestError(f"axes_dims_rope {list(self.axes_dims_rope)} sum to {sum(self.axes_dims_rope)}, "
                                f"expected head_dim {self.head_dim}")


@dataclass(frozen=True)
class VaeSection:
    """Latent statistics (per channel) and the pixels per latent side."""

    z_dim: int
    scale_factor_spatial: int
    latents_mean: tuple[float, ...]
    latents_std: tuple[float, ...]
    extra: dict[str, Any] = field(default_factory=dict, metadata=EXTRA)

    def __post_init__(self) -> None:
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ManifestError(f"latents_mean/latents_std: expected {self.z_dim} values each (z_dim), "
                                f"got {len(self.latents_mean)} and {len(self.latents_std)}")
        if min(self.latents_std, default=1.0) <= 0:
            raise ManifestError("latents_std: expected every value > 0")
        if self.scale_factor_spatial < 1:
            raise ManifestError(f"scale_factor_spatial: expected >= 1, got {self.scale_factor_spatial}")


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


@dataclass(frozen=True)
class TargetRange:
    """Output sizes the export takes: a longest side and a latent token count."""

    max_side: int  # pixels
    max_tokens: int  # N_t


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
        if self.vae_scale_factor < 1 or self.multiple % self.vae_scale_factor:
            raise ManifestError(f"vae_scale_factor {self.vae_scale_factor}: expected >= 1 and to divide "
                                f"multiple {self.multiple}")


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
