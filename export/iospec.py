"""One IOSpec per graph, defined once (``qwen_image_edge.export.registry.graph_io`` picks it by name).

It names every input and output, its dtype and its dims (ints for sizes fixed by the model,
symbols for dynamic ones) and the declared range of every symbol. It drives the ONNX dynamic
axes, is written into the manifest, and later drives TensorRT optimisation profiles and the
runtime's buffers. Symbols shared between graphs mean the same quantity:

- ``B`` batch (prompts x guidance branches); ``L_tok`` encoder tokens (template + prompt +
  image slots, left padded); ``L_enc`` post-processed encoder rows the transformer reads;
- ``N_p`` vision patches of all condition images, ``N_vis = N_p / merge**2`` their merged
  visual tokens (rows of ``visual_embeds``; 0 for a text-only prompt);
- ``N_t`` target latent tokens (h*w), ``N_c`` condition latent tokens (0 for text-to-image),
  ``L_prefix`` text + condition positions of the joint sequence, ``L = L_prefix + N_t``
  (``transformer_prefill`` / ``transformer_step`` share ``L_prefix``: the KV cache's length);
- ``h, w`` latent size, ``H = 16 h, W = 16 w`` pixel size of a target image; ``hc, wc, Hc, Wc``
  the same for one condition image (``vae_encoder``).

Condition images are resized to about ``output_resolution**2`` pixels whatever the target size,
so their ranges are sized by that area over every aspect ratio from ``1:CONDITION_MAX_ASPECT`` to
``CONDITION_MAX_ASPECT:1`` (:func:`condition_range`), not by the target's ``max_resolution``.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen_image2_ref.config import ModelConfig
from qwen_image_edge.runtime.errors import ConfigError
from qwen_image_edge.runtime.images import CONDITION_MAX_ASPECT, condition_sizes
from qwen_image_edge.runtime.manifest import TensorSpec
from qwen_image_edge.runtime.sections import ConditionRange, TargetRange

# Template tokens around a prompt: ChatML system + user + assistant headers, plus vision markers.
TEMPLATE_TOKEN_ALLOWANCE = 64
RESOLUTION_MULTIPLE = 32  # pixel sizes are multiples of 32 (VAE 16 x rope/vision merge 2)
MIN_RESOLUTION = 32
MAX_BATCH = 4  # two prompts x (conditional, unconditional)
MAX_CONDITION_IMAGES = 2  # exported range of condition tokens: this many target-sized images


@dataclass(frozen=True)
class GraphIO:
    """Inputs, outputs and symbol ranges (min, opt, max) of one graph."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dim_ranges: dict[str, tuple[int, int, int]]

    def __post_init__(self) -> None:
        # the optimum (TensorRT's "opt" shape) is clamped into [min, max]
        clamped = {k: (lo, min(max(opt, lo), hi), hi) for k, (lo, opt, hi) in self.dim_ranges.items()}
        object.__setattr__(self, "dim_ranges", clamped)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export(dynamic_axes=...)``: every symbolic dim of every input and output."""
        return {
            t.name: {i: d for i, d in enumerate(t.dims) if isinstance(d, str)}
            for t in (*self.inputs, *self.outputs)
            if any(isinstance(d, str) for d in t.dims)
        }


def _t(name: str, dtype: str, *dims: str | int) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(dims))


def condition_range(cfg: ModelConfig, max_aspect: float = CONDITION_MAX_ASPECT) -> ConditionRange:
    """Sides and token counts over every size a condition image of aspect ``1:max_aspect`` to
    ``max_aspect:1`` is resized to. Rounding to multiples of 32 can add area: at 128 px a 5:4
    image becomes 160x128, 1.25x the nominal area (1.04x at 1024 px)."""
    sizes = condition_sizes(cfg.pipeline.output_resolution, max_aspect)
    f, p = cfg.vae.scale_factor_spatial, cfg.encoder.vision_patch_size
    return ConditionRange(
        max_aspect=float(max_aspect),
        min_side=min(min(s) for s in sizes),
        max_side=max(max(s) for s in sizes),
        max_latent_tokens=max((w // f) * (h // f) for w, h in sizes),
        max_patches=max((w // p) * (h // p) for w, h in sizes),
    )


def target_range(cfg: ModelConfig, max_resolution: int) -> TargetRange:
    """Output sizes an export takes: squares up to ``max_resolution``, and every aspect ratio that a
    condition image may have at about ``output_resolution**2`` pixels (an edit's output follows
    its last image by default), so each limit is a longest side *and* a token count."""
    cond = condition_range(cfg)
    return TargetRange(max(max_resolution, cond.max_side),
                       max(_latent_tokens(max_resolution, cfg.vae.scale_factor_spatial), cond.max_latent_tokens))


def vision_tokens(cfg: ModelConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """((patches, merged visual tokens) of the largest condition image, the same of a square one at
    ``output_resolution``: the max and opt of the vision ranges, per image)."""
    merge = cfg.encoder.vision_spatial_merge_size**2
    largest = condition_range(cfg).max_patches
    square = (cfg.pipeline.output_resolution // cfg.encoder.vision_patch_size) ** 2
    return (largest, largest // merge), (square, square // merge)


def text_encoder_io(cfg: ModelConfig, max_resolution: int) -> GraphIO:
    """One graph for text-only and edit prompts (``N_vis = 0`` without images; see
    ``qwen_image_edge.export.graphs.TextEncoderGraph`` for why not two graphs)."""
    enc = cfg.encoder
    max_tok = cfg.pipeline.max_prompt_tokens + TEMPLATE_TOKEN_ALLOWANCE
    (_, vis), (_, vis_opt) = vision_tokens(cfg)
    n_vis = MAX_CONDITION_IMAGES * vis
    return GraphIO(
        "text_encoder",
        inputs=(
            _t("input_ids", "int64", "B", "L_tok"),
            _t("attention_mask", "int64", "B", "L_tok"),
            _t("position_ids", "int64", 3, "B", "L_tok"),  # qwen_image_edge.runtime.tokens.mrope_position_ids
            _t("visual_embeds", "float32", "N_vis", enc.hidden_size),  # vision_encoder output
            _t("deepstack_embeds", "float32", len(enc.deepstack_visual_indexes), "N_vis", enc.hidden_size),
            _t("visual_index", "int64", "B", "L_tok"),  # qwen_image_edge.runtime.vision.visual_index
        ),
        outputs=(_t("hidden_states", "float32", "B", "L_tok", enc.hidden_size),),
        dim_ranges={"B": (1, 2, MAX_BATCH), "L_tok": (1, 128, max_tok + n_vis), "N_vis": (0, vis_opt, n_vis)},
    )


def vision_encoder_io(cfg: ModelConfig, max_resolution: int) -> GraphIO:
    """All condition images at once: their patches concatenated, attention kept per image by the mask."""
    enc = cfg.encoder
    (patches, vis), (p_opt, v_opt) = vision_tokens(cfg)
    merge = enc.vision_spatial_merge_size**2
    head_dim = enc.vision_hidden_size // enc.vision_num_heads
    return GraphIO(
        "vision_encoder",
        inputs=(
            _t("pixel_values", "float32", "N_p", 3 * enc.vision_temporal_patch_size * enc.vision_patch_size**2),
            _t("pos_index", "int64", "N_p", 4),  # bilinear taps into the learned position table
            _t("pos_weight", "float32", "N_p", 4),
            _t("rope_cos", "float32", "N_p", head_dim),
            _t("rope_sin", "float32", "N_p", head_dim),
            _t("attn_mask", "bool", "N_p", "N_p"),  # True within one image
        ),
        outputs=(
            _t("visual_embeds", "float32", "N_vis", enc.hidden_size),
            _t("deepstack_embeds", "float32", len(enc.deepstack_visual_indexes), "N_vis", enc.hidden_size),
        ),
        dim_ranges={"N_p": (merge, p_opt, MAX_CONDITION_IMAGES * patches),
                    "N_vis": (1, v_opt, MAX_CONDITION_IMAGES * vis)},
    )


def _latent_tokens(max_resolution: int, vae_factor: int) -> int:
    return (max_resolution // vae_factor) ** 2


def transformer_io(cfg: ModelConfig, max_resolution: int) -> GraphIO:
    t = cfg.transformer
    n_max = target_range(cfg, max_resolution).max_tokens
    n_opt = _latent_tokens(min(cfg.pipeline.output_resolution, max_resolution), cfg.vae.scale_factor_spatial)
    text = cfg.pipeline.max_prompt_tokens + TEMPLATE_TOKEN_ALLOWANCE
    n_c = MAX_CONDITION_IMAGES * condition_range(cfg).max_latent_tokens
    l_enc = text + n_c // 4  # an edit prompt holds one image slot per 2x2 condition latent tokens
    return GraphIO(
        "transformer",
        inputs=(
            _t("latents", "float32", "B", "N_t", t.in_channels),
            _t("text_states", "float32", "B", "L_enc", t.context_dim),
            _t("timestep", "float32", "B"),
            _t("cond_latents", "float32", "B", "N_c", t.in_channels),
            _t("prefix_index", "int64", "L_prefix"),
            _t("rope_cos", "float32", "L", t.head_dim // 2),
            _t("rope_sin", "float32", "L", t.head_dim // 2),
            _t("attn_mask", "bool", "B", "L", "L"),
        ),
        outputs=(_t("velocity", "float32", "B", "N_t", t.out_channels),),
        dim_ranges={
            "B": (1, 2, MAX_BATCH),
            "N_t": (1, n_opt, n_max),
            "N_c": (0, 0, n_c),
            "L_enc": (1, 128, l_enc),
            "L_prefix": (1, 128, text + n_c),  # each slot expands to its 4 latent tokens
            "L": (2, 128 + n_opt, text + n_c + n_max),
        },
    )


def transformer_prefill_io(cfg: ModelConfig, max_resolution: int) -> GraphIO:
    """Prefix (text + condition tokens) -> per-layer keys/values, once per prompt set and images."""
    t = cfg.transformer
    full = transformer_io(cfg, max_resolution)
    inputs = {x.name: x for x in full.inputs}
    return GraphIO(
        "transformer_prefill",
        inputs=(
            inputs["text_states"],
            inputs["cond_latents"],
            inputs["prefix_index"],
            _t("rope_cos", "float32", "L_prefix", t.head_dim // 2),
            _t("rope_sin", "float32", "L_prefix", t.head_dim // 2),
            _t("attn_mask", "bool", "B", "L_prefix", "L_prefix"),
        ),
        outputs=(_t("kv_cache", "float32", t.num_layers, 2, "B", "L_prefix", t.num_heads, t.head_dim),),
        dim_ranges={k: full.dim_ranges[k] for k in ("B", "N_c", "L_enc", "L_prefix")},
    )


def transformer_step_io(cfg: ModelConfig, max_resolution: int) -> GraphIO:
    """Target tokens + the prefix cache -> velocity; ``key_mask`` covers ``L = L_prefix + N_t`` keys."""
    t = cfg.transformer
    full = transformer_io(cfg, max_resolution)
    inputs = {x.name: x for x in full.inputs}
    return GraphIO(
        "transformer_step",
        inputs=(
            inputs["latents"],
            inputs["timestep"],
            _t("kv_cache", "float32", t.num_layers, 2, "B", "L_prefix", t.num_heads, t.head_dim),
            _t("rope_cos", "float32", "N_t", t.head_dim // 2),
            _t("rope_sin", "float32", "N_t", t.head_dim // 2),
            _t("key_mask", "bool", "B", "L"),  # False at padded text keys
        ),
        outputs=full.outputs,
        dim_ranges={k: full.dim_ranges[k] for k in ("B", "N_t", "L_prefix", "L")},
    )


def image_channels(channels: int, cfg: ModelConfig) -> int:
    """Pixel channels: a patchified VAE counts ``channels`` after its p x p patchify."""
    p = cfg.vae.patch_size or 1
    return channels // (p * p)


def vae_decoder_io(cfg: ModelConfig, max_resolution: int) -> GraphIO:
    f = cfg.vae.scale_factor_spatial
    hi = target_range(cfg, max_resolution).max_side // f
    lo, opt = MIN_RESOLUTION // f, min(cfg.pipeline.output_resolution, max_resolution) // f
    return GraphIO(
        "vae_decoder",
        inputs=(_t("latents", "float32", "B", cfg.vae.z_dim, "h", "w"),),  # denormalised
        outputs=(_t("image", "float32", "B", image_channels(cfg.vae.out_channels, cfg), "H", "W"),),  # RGBA
        dim_ranges=_vae_ranges(lo, opt, hi, f),
    )


def vae_encoder_io(cfg: ModelConfig, max_resolution: int) -> GraphIO:
    """One condition image at a time, at any size :func:`condition_range` allows (independent of
    the target's ``max_resolution``)."""
    f = cfg.vae.scale_factor_spatial
    cond = condition_range(cfg)
    lo, opt, hi = min(MIN_RESOLUTION, cond.min_side) // f, cfg.pipeline.output_resolution // f, cond.max_side // f
    return GraphIO(
        "vae_encoder",
        inputs=(_t("image", "float32", "B", image_channels(cfg.vae.in_channels, cfg), "Hc", "Wc"),),
        outputs=(_t("latents", "float32", "B", cfg.vae.z_dim, "hc", "wc"),),  # posterior mode, unnormalised
        dim_ranges=_vae_ranges(lo, opt, hi, f, suffix="c"),
    )


def _vae_ranges(lo: int, opt: int, hi: int, f: int, suffix: str = "") -> dict[str, tuple[int, int, int]]:
    """Batch, latent sides ``h, w`` and pixel sides ``H = f h, W = f w`` (``suffix`` "c": a condition image)."""
    side, pixels = (lo, opt, hi), (lo * f, opt * f, hi * f)
    return {"B": (1, 1, MAX_BATCH), "h" + suffix: side, "w" + suffix: side, "H" + suffix: pixels, "W" + suffix: pixels}


def check_max_resolution(max_resolution: int) -> int:
    if max_resolution % RESOLUTION_MULTIPLE or max_resolution < MIN_RESOLUTION:
        raise ConfigError(
            f"max_resolution: expected a multiple of {RESOLUTION_MULTIPLE} >= {MIN_RESOLUTION}, got {max_resolution}"
        )
    return max_resolution
