"""Torch modules that become the exported graphs, and example inputs that trace them.

Each wrapper's ``forward`` takes exactly the inputs of its IOSpec, in order, so the same module
is traced for export and run as the torch side of ``validate``. Example inputs are built at a
small, generic shape (batch 2, every dynamic dim > 1 and distinct) so tracing does not
specialise a dim to 0 or 1; the exported graph is then checked at other shapes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from export.iospec import image_channels
from qwen_image2_ref.config import ModelConfig
from qwen_image2_ref.transformer import QwenImageTransformer, layout_inputs
from qwen_image2_ref.vae import QwenImageVAE
from runtime.layout import build_layout


class TextEncoderGraph(nn.Module):
    """Qwen3-VL language model, text path: ids + mask + M-RoPE positions -> final-norm input.

    The position ids are an input (``runtime.tokens.mrope_position_ids``), so the graph does not
    contain transformers' Python rope-index code, and the vision path can later feed positions
    of image tokens through the same input.
    """

    def __init__(self, qwen3vl) -> None:
        super().__init__()
        self.language_model = qwen3vl.model.language_model

    def forward(self, input_ids, attention_mask, position_ids):
        captured: list[torch.Tensor] = []
        # The MMDiT reads the final norm's input; transformers only returns its output.
        handle = self.language_model.norm.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
        try:
            self.language_model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
        finally:
            handle.remove()
        return captured[0]  # [B, L, D]


class TransformerGraph(nn.Module):
    def __init__(self, transformer: QwenImageTransformer) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, latents, text_states, timestep, cond_latents, prefix_index, rope_cos, rope_sin, attn_mask):
        return self.transformer(latents, text_states, timestep, cond_latents, prefix_index, rope_cos, rope_sin,
                                attn_mask)


class VAEDecoderGraph(nn.Module):
    """Denormalised latents [B, z, h, w] -> RGBA [B, 4, 16h, 16w] in [-1, 1]."""

    def __init__(self, vae: QwenImageVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents)


class VAEEncoderGraph(nn.Module):
    """RGBA [B, 4, H, W] in [-1, 1] -> posterior mode [B, z, H/16, W/16], unnormalised."""

    def __init__(self, vae: QwenImageVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, image):
        return self.vae.encode(image)


def graph_module(name: str, model) -> nn.Module:
    """The module of graph ``name`` for a ``LoadedModel``."""
    if name == "text_encoder":
        return TextEncoderGraph(model.encoder.model).eval()
    if name == "transformer":
        return TransformerGraph(model.transformer).eval()
    if name == "vae_decoder":
        return VAEDecoderGraph(model.vae).eval()
    return VAEEncoderGraph(model.vae).eval()


# ----------------------------------------------------------------------------- inputs


def text_encoder_inputs(cfg: ModelConfig, batch: int, length: int, pad: int, seed: int = 0) -> tuple:
    """Random token ids with ``pad`` left-padded positions in row 0, arange M-RoPE positions."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.encoder.vocab_size, size=(batch, length), dtype=np.int64)
    mask = np.ones((batch, length), dtype=np.int64)
    mask[0, :pad] = 0
    pos = np.broadcast_to(np.arange(length, dtype=np.int64), (3, batch, length)).copy()  # [3, B, L]
    return tuple(torch.from_numpy(a) for a in (ids, mask, pos))


def transformer_inputs(
    cfg: ModelConfig,
    batch: int,
    text_len: int,
    target: tuple[int, int],
    cond: tuple[tuple[int, int], ...] = (),
    pad: int = 0,
    seed: int = 0,
) -> tuple:
    """A consistent set of transformer inputs from ``runtime.layout`` (condition images get image
    slots after the first text token; the last ``pad`` text positions of row 0 are padding)."""
    n_slots = [h * w // 4 for h, w in cond]
    image_pad = np.zeros(text_len + sum(n_slots), dtype=bool)
    image_pad[1 : 1 + sum(n_slots)] = True
    text_mask = np.ones((batch, image_pad.shape[0]), dtype=np.int64)
    if pad:
        text_mask[0, -pad:] = 0
    layout = build_layout(image_pad, text_mask, cond, target)
    g = torch.Generator().manual_seed(seed)
    t = cfg.transformer
    n_c = sum(h * w for h, w in cond)
    latents = torch.randn(batch, layout.num_target, t.in_channels, generator=g)
    text = torch.randn(batch, layout.text_len, t.context_dim, generator=g)
    text = text * torch.from_numpy(text_mask)[..., None]  # zeros on padding, as the encoder's post-processing
    timestep = torch.rand(batch, generator=g)
    cond_latents = torch.randn(batch, n_c, t.in_channels, generator=g)
    lay = layout_inputs(layout, t)
    return (latents, text, timestep, cond_latents, lay["prefix_index"], lay["rope_cos"], lay["rope_sin"],
            lay["attn_mask"])


def vae_decoder_inputs(cfg: ModelConfig, batch: int, h: int, w: int, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, cfg.vae.z_dim, h, w, generator=g),)


def vae_encoder_inputs(cfg: ModelConfig, batch: int, height: int, width: int, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    channels = image_channels(cfg.vae.in_channels, cfg)
    return (torch.rand(batch, channels, height, width, generator=g) * 2 - 1,)


def example_inputs(name: str, cfg: ModelConfig) -> tuple:
    """Tracing inputs: batch 2, every dynamic dim > 1 and different from the others."""
    if name == "text_encoder":
        return text_encoder_inputs(cfg, batch=2, length=9, pad=3)
    if name == "transformer":
        return transformer_inputs(cfg, batch=2, text_len=8, target=(2, 3), cond=((2, 2),), pad=2)
    if name == "vae_decoder":
        return vae_decoder_inputs(cfg, 2, 2, 3)
    return vae_encoder_inputs(cfg, 2, 32, 48)
