"""The Qwen3-VL condition encoder: prompt (+ condition images) -> hidden states for the MMDiT.

The LLM and the vision tower are transformers' ``Qwen3VLForConditionalGeneration``; this module
only prepares its inputs with the shared numpy code (``qwen_image_edge.runtime.tokens``, ``qwen_image_edge.runtime.images``) and
reads the output the way diffusers' ``QwenImage21Pipeline._get_qwen_prompt_embeds`` does: the last
decoder layer's output BEFORE the language model's final RMSNorm, without padding and without the
system message, right padded to the batch max.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from qwen_image2_ref.config import EncoderConfig
from qwen_image_edge.runtime.errors import CheckpointError, ConfigError
from qwen_image_edge.runtime.images import VisionConfig, load_image, vision_patches
from qwen_image_edge.runtime.tokens import (
    MAX_PROMPT_TOKENS,
    SYSTEM_PROMPT,
    PromptTokenizer,
    TokenBatch,
    prompt_index,
)

logger = logging.getLogger(__name__)

# A plain ChatML template, enough for ``apply_chat_template`` on text messages (diffusers renders
# the system message with it to find ``drop_idx``). Image and video parts are not rendered.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_qwen3vl_config(cfg: EncoderConfig) -> Qwen3VLConfig:
    """The transformers config of the encoder (text hidden size = vision output size)."""
    text = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "attention_bias": False,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": cfg.rope_theta,
            "mrope_section": list(cfg.mrope_section),
            "mrope_interleaved": True,
        },
    }
    vision = {
        "depth": cfg.vision_depth,
        "hidden_size": cfg.vision_hidden_size,
        "intermediate_size": cfg.vision_intermediate_size,
        "num_heads": cfg.vision_num_heads,
        "hidden_act": "gelu_pytorch_tanh",
        "in_channels": 3,
        "patch_size": cfg.vision_patch_size,
        "temporal_patch_size": cfg.vision_temporal_patch_size,
        "spatial_merge_size": cfg.vision_spatial_merge_size,
        "out_hidden_size": cfg.hidden_size,
        "num_position_embeddings": cfg.vision_num_position_embeddings,
        "deepstack_visual_indexes": list(cfg.deepstack_visual_indexes),
    }
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=cfg.image_token_id,
        video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id,
        vision_end_token_id=cfg.vision_end_token_id,
        tie_word_embeddings=False,
    )


def _as_dict(config: Any) -> dict[str, Any]:
    return dict(config) if isinstance(config, Mapping) else config.to_dict()


def encoder_config_from_hf(hf: Qwen3VLConfig | Mapping[str, Any]) -> EncoderConfig:
    """EncoderConfig from a ``Qwen3VLConfig`` or its ``config.json`` (transformers 4.57 or 5.x layout)."""
    data = _as_dict(hf)
    text, vision = _as_dict(data.get("text_config") or {}), _as_dict(data.get("vision_config") or {})
    # 5.x writes rope_parameters; 4.57 checkpoints have rope_theta + rope_scaling.
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    theta = rope.get("rope_theta", text.get("rope_theta"))
    if theta is None or "mrope_section" not in rope:
        raise ConfigError(
            f"text_encoder config: expected rope theta and mrope_section, got rope settings {rope}"
        )
    if not rope.get("mrope_interleaved", False):
        raise ConfigError(
            "text_encoder config: Qwen3-VL uses interleaved M-RoPE, got mrope_interleaved false"
        )
    if vision.get("out_hidden_size", text.get("hidden_size")) != text.get("hidden_size"):
        raise ConfigError(
            f"text_encoder config: vision out_hidden_size {vision.get('out_hidden_size')} != "
            f"text hidden_size {text.get('hidden_size')}"
        )
    try:
        return EncoderConfig(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=text["num_attention_heads"],
            num_kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
            head_dim=text["head_dim"],
            intermediate_size=text["intermediate_size"],
            rope_theta=float(theta),
            mrope_section=tuple(rope["mrope_section"]),
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            max_position_embeddings=text["max_position_embeddings"],
            vision_depth=vision["depth"],
            vision_hidden_size=vision["hidden_size"],
            vision_num_heads=vision["num_heads"],
            vision_intermediate_size=vision["intermediate_size"],
            vision_patch_size=vision["patch_size"],
            vision_temporal_patch_size=vision["temporal_patch_size"],
            vision_spatial_merge_size=vision["spatial_merge_size"],
            vision_num_position_embeddings=vision["num_position_embeddings"],
            deepstack_visual_indexes=tuple(vision["deepstack_visual_indexes"]),
            image_token_id=data["image_token_id"],
            video_token_id=data["video_token_id"],
            vision_start_token_id=data["vision_start_token_id"],
            vision_end_token_id=data["vision_end_token_id"],
        )
    except KeyError as exc:
        raise ConfigError(f"text_encoder config: missing key {exc.args[0]!r}") from None


def _check_compatible(model_cfg: Qwen3VLConfig, tokenizer: PromptTokenizer, vision: VisionConfig) -> None:
    ids = {
        "image_token_id": (model_cfg.image_token_id, tokenizer.image_pad_id),
        "video_token_id": (model_cfg.video_token_id, tokenizer.video_pad_id),
        "vision_start_token_id": (
            model_cfg.vision_start_token_id,
            tokenizer.tokenizer.token_to_id("<|vision_start|>"),
        ),
        "vision_end_token_id": (
            model_cfg.vision_end_token_id,
            tokenizer.tokenizer.token_to_id("<|vision_end|>"),
        ),
        "vision patch_size": (model_cfg.vision_config.patch_size, vision.patch_size),
        "vision merge_size": (model_cfg.vision_config.spatial_merge_size, vision.merge_size),
        "vision temporal_patch_size": (
            model_cfg.vision_config.temporal_patch_size,
            vision.temporal_patch_size,
        ),
        "merge_size (tokenizer)": (vision.merge_size, tokenizer.merge_size),
    }
    bad = {k: v for k, v in ids.items() if v[0] != v[1]}
    if bad:
        detail = ", ".join(f"{k}: model {a}, processor {b}" for k, (a, b) in bad.items())
        raise CheckpointError(f"text encoder and processor disagree: {detail}")


class ConditionEncoder(torch.nn.Module):
    """Qwen3-VL + tokenizer + image settings; ``encode`` gives the MMDiT's text condition."""

    def __init__(
        self, model: Qwen3VLForConditionalGeneration, tokenizer: PromptTokenizer, vision: VisionConfig
    ) -> None:
        super().__init__()
        _check_compatible(model.config, tokenizer, vision)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.vision = vision

    @classmethod
    def from_config(
        cls,
        cfg: EncoderConfig,
        tokenizer: PromptTokenizer,
        vision: VisionConfig | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> ConditionEncoder:
        """Random-init encoder (seed torch first for reproducible weights)."""
        vision = vision or VisionConfig(
            patch_size=cfg.vision_patch_size,
            temporal_patch_size=cfg.vision_temporal_patch_size,
            merge_size=cfg.vision_spatial_merge_size,
        )
        model = Qwen3VLForConditionalGeneration(build_qwen3vl_config(cfg)).to(dtype)
        return cls(model, tokenizer, vision)

    @property
    def config(self) -> EncoderConfig:
        return encoder_config_from_hf(self.model.config)

    @classmethod
    def from_pretrained(
        cls,
        text_encoder_dir: str | Path,
        processor_dir: str | Path,
        dtype: torch.dtype | None = None,
        system_prompt: str = SYSTEM_PROMPT,
        max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    ) -> ConditionEncoder:
        """Load the ``text_encoder/`` and ``processor/`` folders of a diffusers-format checkpoint."""
        text_encoder_dir, processor_dir = Path(text_encoder_dir), Path(processor_dir)
        if not (text_encoder_dir / "config.json").is_file():
            raise CheckpointError(f"text encoder: expected {text_encoder_dir}/config.json, not found")
        vision = VisionConfig.from_dict(read_image_processor_config(processor_dir))
        tokenizer = PromptTokenizer.from_file(
            processor_dir / "tokenizer.json",
            system_prompt=system_prompt,
            max_prompt_tokens=max_prompt_tokens,
            merge_size=vision.merge_size,
        )
        try:
            with _no_transformers_bars():
                model = Qwen3VLForConditionalGeneration.from_pretrained(
                    text_encoder_dir, use_safetensors=True, dtype=dtype or "auto"
                )
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"text encoder {text_encoder_dir}: cannot load safetensors weights ({exc})"
            ) from exc
        logger.info("loaded Qwen3-VL encoder from %s (%s)", text_encoder_dir, model.dtype)
        return cls(model, tokenizer, vision)

    def save_pretrained(self, text_encoder_dir: str | Path, processor_dir: str | Path) -> None:
        """Write the transformers model folder and a processor folder diffusers' pipeline loads."""
        with _no_transformers_bars():
            self.model.save_pretrained(text_encoder_dir)
        processor_dir = Path(processor_dir)
        processor_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer.tokenizer.save(str(processor_dir / "tokenizer.json"))
        pad = self.tokenizer.tokenizer.id_to_token(self.tokenizer.pad_id)
        tokenizer_config = {
            "tokenizer_class": "Qwen2Tokenizer",
            "processor_class": "Qwen3VLProcessor",
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": pad,
            "unk_token": None,
            "add_prefix_space": False,
            "model_max_length": 262144,
        }
        processor_config = {"image_processor": self.vision.to_dict(), "processor_class": "Qwen3VLProcessor"}
        (processor_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        (processor_dir / "processor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n")
        (processor_dir / "chat_template.jinja").write_text(CHATML_TEMPLATE)

    def tokenize(
        self, prompts: Sequence[str], images: Sequence | None = None
    ) -> tuple[TokenBatch, np.ndarray | None]:
        """Token batch and ``pixel_values`` (one copy of the images per prompt, as diffusers feeds them)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not images:
            return self.tokenizer.encode(prompts), None
        pixel_values, grid = vision_patches([load_image(i) for i in images], self.vision)
        batch = self.tokenizer.encode(prompts, grid)
        return batch, np.concatenate([pixel_values] * len(prompts), axis=0)  # [B * N_patches, C*T*P*P]

    @torch.no_grad()
    def hidden_states(self, batch: TokenBatch, pixel_values: np.ndarray | None = None) -> torch.Tensor:
        """[B, L, D] input of the language model's final norm, for the padded batch."""
        device = next(self.model.parameters()).device
        inputs = {
            "input_ids": torch.from_numpy(batch.input_ids).to(device),
            "attention_mask": torch.from_numpy(batch.attention_mask).to(device),
            "mm_token_type_ids": torch.from_numpy(batch.mm_token_type_ids).to(device),
        }
        if pixel_values is not None:
            inputs["pixel_values"] = torch.from_numpy(pixel_values).to(device, self.model.dtype)
            inputs["image_grid_thw"] = torch.from_numpy(batch.image_grid_thw).to(device)
        captured: list[torch.Tensor] = []
        norm = self.model.model.language_model.norm
        # The state the MMDiT reads is the final norm's input; transformers 5 only exposes its output.
        handle = norm.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            self.model.model(**inputs, use_cache=False)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"encoder: expected the final norm to run once, it ran {len(captured)} times")
        return captured[0]

    def encode(
        self, prompts: Sequence[str], images: Sequence | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt embeddings float32 [B, L, D], mask int64 [B, L], image_pad_mask bool [B, L]."""
        batch, pixel_values = self.tokenize(prompts, images)
        hidden = self.hidden_states(batch, pixel_values)
        return postprocess_hidden_states_torch(hidden, batch)


def postprocess_hidden_states_torch(
    hidden: torch.Tensor, batch: TokenBatch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch twin of ``qwen_image_edge.runtime.tokens.postprocess_hidden_states`` (same index, same zeros)."""
    index = prompt_index(batch)
    device = hidden.device
    rows, cols = torch.from_numpy(index.rows).to(device), torch.from_numpy(index.cols).to(device)
    mask = torch.from_numpy(index.mask).to(device)
    gathered = hidden[rows, cols]  # [B, L', D]
    embeds = torch.where(mask[..., None].bool(), gathered, torch.zeros((), dtype=hidden.dtype, device=device))
    return embeds.float(), mask, torch.from_numpy(index.image_pad_mask).to(device)


def read_image_processor_config(processor_dir: Path) -> dict[str, Any]:
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = processor_dir / name
        if path.is_file():
            data = json.loads(path.read_text())
            if name == "preprocessor_config.json" or "image_processor" in data:
                return data
    raise CheckpointError(
        f"processor {processor_dir}: expected processor_config.json with an image_processor entry "
        "or preprocessor_config.json, found neither"
    )


@contextlib.contextmanager
def _no_transformers_bars():
    """transformers draws a bar per tensor on load and per shard on save; our own logging says what is
    loading or being written (-v shows it), and a --no-progress run stays free of bars."""
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
