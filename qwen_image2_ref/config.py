"""Frozen configs for the Qwen-Image-2.x reference and its named presets.

Presets are ``dataclasses.replace`` of the published full-size config. ``to_diffusers`` /
``from_diffusers`` map to the ``config.json`` that diffusers writes for each component, so a
checkpoint folder round-trips through either library.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qwen_image_edge.runtime.errors import ConfigError
from qwen_image_edge.runtime.schedule import SchedulerConfig
from qwen_image_edge.runtime.sections import ScheduleSection

# AutoencoderKLQwenImage21 defaults (diffusers), one value per latent channel.
QWEN21_LATENTS_MEAN = (
    0.5126, 0.7721, -0.0631, 1.3506, -0.7855, -2.1025, -0.3458, 1.3722, 1.8873, -1.7177, -0.6510, 0.2732,
    0.7562, -0.6163, -1.0277, 3.8363, 2.0210, 0.0472, 0.9320, 2.0087, 2.4954, -0.1391, -1.4249, 1.8464,
    -0.5236, 1.2826, 3.7046, -1.3035, 2.7286, -1.4518, -1.9036, -1.9955, -0.0342, -1.0265, -0.7636, 3.0555,
    0.0746, -3.0751, -0.1076, 1.7376, -1.0914, -1.9435, -0.2784, -1.3680, 0.4809, -0.4433, 0.3764, 0.5729,
    -2.0595, 1.0960, -1.3260, -2.0211, -5.0179, 0.5275, 4.0162, 1.8505, 0.3026, 1.9373, 1.4937, 0.2632,
    0.5547, -1.7121, -0.1562, 0.0304,
)  # fmt: skip
QWEN21_LATENTS_STD = (
    3.2001, 3.2936, 3.4321, 3.0091, 3.1061, 4.0379, 4.0705, 3.7910, 3.0785, 3.6500, 3.9308, 3.0904, 2.8778,
    3.7675, 3.7320, 5.0756, 3.2864, 4.0397, 3.1317, 4.0443, 2.9249, 3.9454, 3.0988, 4.2489, 3.4896, 3.8513,
    3.9323, 3.4719, 3.7498, 4.2830, 3.5694, 4.2467, 3.9037, 3.2947, 5.0770, 3.5075, 3.2700, 3.4767, 2.8063,
    5.1125, 3.5327, 4.7833, 3.1286, 4.1819, 3.8527, 3.8312, 3.5605, 4.3875, 3.9624, 4.0168, 3.5643, 4.0550,
    5.5614, 4.2963, 4.4080, 3.4959, 3.8747, 3.7608, 3.5735, 3.1490, 3.7662, 3.6746, 3.4563, 3.8161,
)  # fmt: skip


def _pick(cls, data: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass(frozen=True)
class TransformerConfig:
    """The single-stream MMDiT (diffusers ``QwenImage21Transformer2DModel``)."""

    in_channels: int = 64
    out_channels: int = 64
    patch_size: int = 1
    num_layers: int = 32
    num_heads: int = 32
    head_dim: int = 128
    context_dim: int = 4096
    mlp_ratio: int = 3
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    rope_theta: float = 10000.0
    eps: float = 1e-6
    causal_condition: bool = True
    timestep_dim: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        for name in ("in_channels", "out_channels", "num_layers", "num_heads", "head_dim", "context_dim", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ConfigError(f"transformer {name}: expected >= 1, got {getattr(self, name)}")
        if self.patch_size != 1:
            raise ConfigError(f"transformer patch_size: Qwen-Image-2.x uses 1, got {self.patch_size}")
        if len(self.axes_dims_rope) != 3:
            raise ConfigError(f"transformer axes_dims_rope: expected 3 axes (frame, h, w), got {self.axes_dims_rope}")
        if sum(self.axes_dims_rope) != self.head_dim:
            raise ConfigError(
                f"transformer axes_dims_rope {self.axes_dims_rope} sum to {sum(self.axes_dims_rope)}, "
                f"expected head_dim {self.head_dim}"
            )
        if any(d % 2 for d in self.axes_dims_rope):
            raise ConfigError(f"transformer axes_dims_rope {self.axes_dims_rope}: every axis must be even")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    def to_diffusers(self) -> dict[str, Any]:
        return {
            "_class_name": "QwenImage21Transformer2DModel",
            "patch_size": self.patch_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_layers": self.num_layers,
            "attention_head_dim": self.head_dim,
            "num_attention_heads": self.num_heads,
            "context_in_dim": self.context_dim,
            "mlp_ratio": self.mlp_ratio,
            "axes_dims_rope": list(self.axes_dims_rope),
            "eps": self.eps,
            "causal_condition": self.causal_condition,
        }

    @classmethod
    def from_diffusers(cls, data: Mapping[str, Any]) -> TransformerConfig:
        renamed = {
            "attention_head_dim": "head_dim",
            "num_attention_heads": "num_heads",
            "context_in_dim": "context_dim",
        }
        values = {renamed.get(k, k): v for k, v in data.items()}
        if values.get("out_channels") is None:
            values["out_channels"] = values.get("in_channels", cls.in_channels)
        return cls(**_pick(cls, values))


@dataclass(frozen=True)
class VAEConfig:
    """The f16c64 RGBA VAE (diffusers ``AutoencoderKLQwenImage21``)."""

    base_dim: int = 96
    decoder_base_dim: int | None = 144
    z_dim: int = 64
    dim_mult: tuple[int, ...] = (1, 2, 4, 8, 8)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True, True)
    is_residual: bool = True
    in_channels: int = 4
    out_channels: int = 4
    patch_size: int | None = None
    scale_factor_spatial: int = 16
    latents_mean: tuple[float, ...] = QWEN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = QWEN21_LATENTS_STD

    def __post_init__(self) -> None:
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ConfigError(
                f"vae latents_mean/std: expected {self.z_dim} values each (z_dim), "
                f"got {len(self.latents_mean)} and {len(self.latents_std)}"
            )
        if any(s <= 0 for s in self.latents_std):
            raise ConfigError("vae latents_std: every value must be > 0")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ConfigError(
                f"vae temperal_downsample: expected {len(self.dim_mult) - 1} flags (len(dim_mult) - 1), "
                f"got {len(self.temperal_downsample)}"
            )
        down = 2 ** (len(self.dim_mult) - 1) * (self.patch_size or 1)
        if down != self.scale_factor_spatial:
            raise ConfigError(
                f"vae: dim_mult {self.dim_mult} with patch_size {self.patch_size} downsamples {down}x, "
                f"expected scale_factor_spatial {self.scale_factor_spatial}"
            )

    def to_diffusers(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            out[name] = list(out[name])
        return {"_class_name": "AutoencoderKLQwenImage21", **out}

    @classmethod
    def from_diffusers(cls, data: Mapping[str, Any]) -> VAEConfig:
        return cls(**_pick(cls, data))


@dataclass(frozen=True)
class EncoderConfig:
    """The Qwen3-VL condition encoder: sizes of its text and vision towers and its token ids."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_layers: int = 36
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 12288
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    vision_depth: int = 27
    vision_hidden_size: int = 1152
    vision_num_heads: int = 16
    vision_intermediate_size: int = 4304
    vision_patch_size: int = 16
    vision_temporal_patch_size: int = 2
    vision_spatial_merge_size: int = 2
    vision_num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def __post_init__(self) -> None:
        object.__setattr__(self, "mrope_section", tuple(self.mrope_section))
        object.__setattr__(self, "deepstack_visual_indexes", tuple(self.deepstack_visual_indexes))
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"encoder num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ConfigError(
                f"encoder mrope_section {self.mrope_section} sums to {sum(self.mrope_section)}, "
                f"expected head_dim/2 = {self.head_dim // 2}"
            )
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.vision_depth]
        if bad:
            raise ConfigError(f"encoder deepstack_visual_indexes {bad} outside vision depth {self.vision_depth}")


@dataclass(frozen=True)
class PipelineConfig:
    """Sampling defaults and prompt handling (diffusers ``QwenImage21Pipeline``)."""

    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    num_steps: int = 40
    guidance_scale: float = 1.0
    sample_sigmas: tuple[float, ...] | None = None
    guidance_distilled: bool = False
    output_resolution: int = 1024
    max_prompt_tokens: int = 1024
    max_condition_images: int = 10
    system_prompt: str = "Comprehend and analyze the provided prompt."
    # Used for the unconditional branch when guidance > 1 and the caller gives no negative prompt
    # (a model trained with caption dropout learned its unconditional state from this text).
    default_negative_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.sample_sigmas is not None:
            object.__setattr__(self, "sample_sigmas", tuple(float(s) for s in self.sample_sigmas))
        if self.num_steps < 1:
            raise ConfigError(f"pipeline num_steps: expected >= 1, got {self.num_steps}")
        if self.sample_sigmas is not None and len(self.sample_sigmas) != self.num_steps:
            raise ConfigError(
                f"pipeline sample_sigmas has {len(self.sample_sigmas)} values, expected num_steps={self.num_steps}"
            )
        if self.output_resolution % 32:
            raise ConfigError(f"pipeline output_resolution: expected a multiple of 32, got {self.output_resolution}")

    def schedule_section(self) -> ScheduleSection:
        """The sampling defaults as an export's manifest records them (and the reference uses them)."""
        return ScheduleSection(self.scheduler, self.num_steps, self.sample_sigmas, float(self.guidance_scale),
                               self.guidance_distilled, self.default_negative_prompt)


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines one Qwen-Image-2.x model."""

    name: str
    transformer: TransformerConfig
    vae: VAEConfig
    encoder: EncoderConfig
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self) -> None:
        if self.encoder.hidden_size != self.transformer.context_dim:
            raise ConfigError(
                f"encoder hidden_size {self.encoder.hidden_size} != transformer context_dim "
                f"{self.transformer.context_dim}"
            )
        if self.vae.z_dim != self.transformer.in_channels:
            raise ConfigError(
                f"vae z_dim {self.vae.z_dim} != transformer in_channels {self.transformer.in_channels}"
            )


QWEN_IMAGE_21 = ModelConfig(
    name="qwen-image-2.1",
    transformer=TransformerConfig(),
    vae=VAEConfig(),
    encoder=EncoderConfig(),
)

TINY = dataclasses.replace(
    QWEN_IMAGE_21,
    name="tiny",
    transformer=TransformerConfig(num_layers=2, num_heads=2, head_dim=16, context_dim=32, axes_dims_rope=(4, 6, 6)),
    vae=VAEConfig(
        base_dim=8,
        decoder_base_dim=8,
        dim_mult=(1, 1, 2, 2, 2),
        num_res_blocks=1,
        latents_mean=QWEN21_LATENTS_MEAN,
        latents_std=QWEN21_LATENTS_STD,
    ),
    encoder=EncoderConfig(
        vocab_size=320,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=64,
        rope_theta=10000.0,
        mrope_section=(2, 1, 1),
        max_position_embeddings=4096,
        vision_depth=1,
        vision_hidden_size=16,
        vision_num_heads=2,
        vision_intermediate_size=32,
        vision_num_position_embeddings=64,
        deepstack_visual_indexes=(0,),
        image_token_id=310,
        video_token_id=311,
        vision_start_token_id=312,
        vision_end_token_id=313,
    ),
    pipeline=PipelineConfig(output_resolution=128),
)

# The embedded demo model (qwen_image2_ref/demo): 128 px scenes, 8x8 latents. The VAE's 4x4
# patchify does part of the 16x so it trains on CPU; latents_mean/std are placeholders that the
# trainer replaces with measured statistics; encoder token ids are the demo tokenizer's (ids 0-6).
DEMO = dataclasses.replace(
    QWEN_IMAGE_21,
    name="demo",
    transformer=TransformerConfig(num_layers=4, num_heads=4, head_dim=64, context_dim=64, axes_dims_rope=(8, 28, 28)),
    vae=VAEConfig(
        base_dim=32, decoder_base_dim=32, dim_mult=(1, 2, 2), num_res_blocks=1, temperal_downsample=(False, True),
        in_channels=64, out_channels=64, patch_size=4, latents_mean=(0.0,) * 64, latents_std=(1.0,) * 64,
    ),
    encoder=EncoderConfig(
        vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=128, rope_theta=10000.0, mrope_section=(2, 3, 3), max_position_embeddings=4096,
        vision_depth=1, vision_hidden_size=32, vision_num_heads=2, vision_intermediate_size=64,
        vision_num_position_embeddings=64, deepstack_visual_indexes=(0,),
        image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4,
    ),
    pipeline=PipelineConfig(output_resolution=128, num_steps=40),
)

PRESETS: dict[str, ModelConfig] = {c.name: c for c in (TINY, DEMO, QWEN_IMAGE_21)}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None
