"""Torch modules that become the exported graphs, and example inputs that trace them.

Each wrapper's ``forward`` takes exactly the inputs of its IOSpec, in order, so the same module
is traced for export and run as the torch side of ``validate``; each wraps one component's module
(``LoadedModel.component``). ``qwen_image_edge.export.registry`` says which wrapper and which
example inputs belong to which graph name. Example inputs are built at a
small, generic shape (batch 2, every dynamic dim > 1 and distinct) so tracing does not
specialise a dim to 0 or 1; the exported graph is then checked at other shapes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

from qwen_image2_ref.config import ModelConfig
from qwen_image2_ref.transformer import QwenImageTransformer, layout_inputs
from qwen_image2_ref.vae import QwenImageVAE
from qwen_image_edge.export.iospec import image_channels
from qwen_image_edge.runtime.errors import ConfigError
from qwen_image_edge.runtime.layout import build_layout
from qwen_image_edge.runtime.vision import VisionTower, vision_feeds


class TextEncoderGraph(nn.Module):
    """Qwen3-VL language model: ids + mask + M-RoPE positions + visual rows -> final-norm input.

    One graph serves text-to-image and edit prompts (``N_vis = 0`` for text): two graphs would
    hold the language model's weights twice (most of the encoder), and the visual inputs cost two
    gathers and a select per deepstack layer. ``visual_index`` [B, L_tok] is 0 on text and k + 1 at
    the k-th image pad of a row; the pad's embedding is replaced by ``visual_embeds[k]`` and, after
    each of the first ``n_deepstack`` decoder layers, ``deepstack_embeds[layer, k]`` is added there
    (transformers' masked_scatter and ``_deepstack_process``, without data-dependent shapes). The
    position ids are an input (``qwen_image_edge.runtime.tokens.mrope_position_ids``): no rope-index code in the graph.
    """

    def __init__(self, qwen3vl) -> None:
        super().__init__()
        self.language_model = qwen3vl.model.language_model

    def forward(self, input_ids, attention_mask, position_ids, visual_embeds, deepstack_embeds, visual_index):
        lm = self.language_model
        dim = visual_embeds.shape[-1]
        is_visual = (visual_index > 0).unsqueeze(-1)  # [B, L, 1]
        table = torch.cat([visual_embeds.new_zeros(1, dim), visual_embeds], dim=0)  # [1 + N_vis, D]
        embeds = torch.where(is_visual, table[visual_index], lm.embed_tokens(input_ids))  # [B, L, D]
        deep = torch.cat([deepstack_embeds.new_zeros(deepstack_embeds.shape[0], 1, dim), deepstack_embeds],
                         dim=1)  # [n_ds, 1 + N_vis, D]

        def inject(layer: int):
            return lambda module, args, out: torch.where(is_visual, out + deep[layer][visual_index], out)

        captured: list[torch.Tensor] = []
        handles = [lm.layers[i].register_forward_hook(inject(i)) for i in range(deepstack_embeds.shape[0])]
        # The MMDiT reads the final norm's input; transformers only returns its output.
        handles.append(lm.norm.register_forward_pre_hook(lambda m, args: captured.append(args[0])))
        try:
            lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return captured[0]  # [B, L, D]


class VisionEncoderGraph(nn.Module):
    """Qwen3-VL vision tower: patches + numpy position/rope/mask tables -> merged visual embeddings
    [N_vis, D] and deepstack features [n_deepstack, N_vis, D].

    transformers computes the position-table resampling, the rotary angles and the per-image
    attention segments from ``grid_thw`` in Python (``qwen_image_edge.runtime.vision`` explains); here they are
    inputs, and the blocks run on the tower's own modules with one masked attention over all
    patches instead of a Python loop over images.
    """

    def __init__(self, qwen3vl) -> None:
        super().__init__()
        self.visual = qwen3vl.model.visual
        if not self.visual.deepstack_visual_indexes:
            raise ConfigError("vision_encoder: expected a Qwen3-VL tower with deepstack layers, got none")

    def forward(self, pixel_values, pos_index, pos_weight, rope_cos, rope_sin, attn_mask):
        v = self.visual
        x = v.patch_embed(pixel_values)  # [N, Dv]
        x = x + (v.pos_embed(pos_index) * pos_weight.unsqueeze(-1)).sum(1)  # [N, Dv]
        deep = []
        for i, block in enumerate(v.blocks):
            x = _vision_block(block, x, rope_cos, rope_sin, attn_mask)
            if i in v.deepstack_visual_indexes:
                deep.append(v.deepstack_merger_list[v.deepstack_visual_indexes.index(i)](x))  # [N/4, D]
        return v.merger(x), torch.stack(deep)  # [N/4, D], [n_ds, N/4, D]


def _vision_block(block, x, cos, sin, mask):
    """One ``Qwen3VLVisionBlock`` on its own modules; attention masked to each image's patches."""
    attn = block.attn
    q, k, v = attn.qkv(block.norm1(x)).reshape(-1, 3, attn.num_heads, attn.head_dim).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)  # [N, H, hd]
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [H, N, hd]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)  # [H, N, hd]
    x = x + attn.proj(out.transpose(0, 1).reshape(x.shape[0], -1))  # [N, Dv]
    return x + block.mlp(block.norm2(x))


class TransformerGraph(nn.Module):
    def __init__(self, transformer: QwenImageTransformer) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, latents, text_states, timestep, cond_latents, prefix_index, rope_cos, rope_sin, attn_mask):
        return self.transformer(latents, text_states, timestep, cond_latents, prefix_index, rope_cos, rope_sin,
                                attn_mask)


class TransformerPrefillGraph(nn.Module):
    """Prefix -> per-layer keys/values ``[layers, 2, B, L_prefix, H, Dh]`` (the condition KV cache)."""

    def __init__(self, transformer: QwenImageTransformer) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, text_states, cond_latents, prefix_index, rope_cos, rope_sin, attn_mask):
        return self.transformer.prefill(text_states, cond_latents, prefix_index, rope_cos, rope_sin, attn_mask)


class TransformerStepGraph(nn.Module):
    """Target latents + the prefix cache -> velocity; ``key_mask`` ``[B, L_prefix + N_t]``."""

    def __init__(self, transformer: QwenImageTransformer) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, latents, timestep, kv_cache, rope_cos, rope_sin, key_mask):
        return self.transformer.step(latents, timestep, kv_cache, rope_cos, rope_sin, key_mask)


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


# ----------------------------------------------------------------------------- inputs


def vision_tower(qwen3vl) -> VisionTower:
    """The facts ``qwen_image_edge.runtime.vision`` needs about a transformers Qwen3-VL vision tower."""
    vc = qwen3vl.config.vision_config
    return VisionTower(merge_size=vc.spatial_merge_size, head_dim=vc.hidden_size // vc.num_heads,
                       rope_theta=float(vc.rope_parameters["rope_theta"]),
                       grid_side=int(vc.num_position_embeddings**0.5))


def text_encoder_inputs(cfg: ModelConfig, batch: int, length: int, pad: int, n_visual: int = 0,
                        seed: int = 0) -> tuple:
    """Random token ids with ``pad`` left-padded positions in row 0, arange M-RoPE positions and
    ``n_visual`` random visual rows read by the last ``n_visual`` tokens of every row."""
    rng = np.random.default_rng(seed)
    enc = cfg.encoder
    ids = rng.integers(0, enc.vocab_size, size=(batch, length), dtype=np.int64)
    mask = np.ones((batch, length), dtype=np.int64)
    mask[0, :pad] = 0
    pos = np.broadcast_to(np.arange(length, dtype=np.int64), (3, batch, length)).copy()  # [3, B, L]
    index = np.zeros((batch, length), dtype=np.int64)
    if n_visual:
        index[:, -n_visual:] = np.arange(1, n_visual + 1)
        ids[:, -n_visual:] = enc.image_token_id
    visual = rng.standard_normal((n_visual, enc.hidden_size), dtype=np.float32)
    deep = rng.standard_normal((len(enc.deepstack_visual_indexes), n_visual, enc.hidden_size), dtype=np.float32)
    return tuple(torch.from_numpy(a) for a in (ids, mask, pos, visual, deep, index))


def vision_encoder_inputs(cfg: ModelConfig, tower: VisionTower, grids, seed: int = 0) -> tuple:
    """Random patches for the images of ``grids`` [(t, h, w), ...] and their numpy tables."""
    enc = cfg.encoder
    grid_thw = np.asarray(grids, dtype=np.int64).reshape(-1, 3)
    width = 3 * enc.vision_temporal_patch_size * enc.vision_patch_size**2
    pixels = np.random.default_rng(seed).standard_normal((int(grid_thw.prod(1).sum()), width), dtype=np.float32)
    feeds = vision_feeds(pixels, grid_thw, tower)
    return tuple(torch.from_numpy(a) for a in feeds.values())


def transformer_inputs(
    cfg: ModelConfig,
    batch: int,
    text_len: int,
    target: tuple[int, int],
    cond: tuple[tuple[int, int], ...] = (),
    pad: int = 0,
    seed: int = 0,
) -> tuple:
    """A consistent set of transformer inputs from ``qwen_image_edge.runtime.layout`` (condition images get image
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


def pair_inputs(args: tuple) -> tuple[tuple, tuple]:
    """The single graph's inputs split for the pair: (prefill inputs, step inputs without the cache).

    The last query row of the block-causal mask is a target token's: it sees every valid key, so
    it is the step's key mask ``[B, L]``.
    """
    latents, text, timestep, cond, prefix_index, cos, sin, mask = args
    lp = prefix_index.shape[0]
    prefill = (text, cond, prefix_index, cos[:lp], sin[:lp], mask[:, :lp, :lp])  # [L_prefix, ...], [B, Lp, Lp]
    step = (latents, timestep, cos[lp:], sin[lp:], mask[:, -1, :])  # [N_t, Dh/2], [B, L]
    return prefill, step


def vae_decoder_inputs(cfg: ModelConfig, batch: int, h: int, w: int, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, cfg.vae.z_dim, h, w, generator=g),)


def vae_encoder_inputs(cfg: ModelConfig, batch: int, height: int, width: int, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    channels = image_channels(cfg.vae.in_channels, cfg)
    return (torch.rand(batch, channels, height, width, generator=g) * 2 - 1,)


# Tracing inputs (``qwen_image_edge.export.registry``): batch 2, every dynamic dim > 1 and different
# from the others.


def text_encoder_example(cfg: ModelConfig) -> tuple:
    return text_encoder_inputs(cfg, batch=2, length=9, pad=3, n_visual=3)


def transformer_example(cfg: ModelConfig) -> tuple:
    return transformer_inputs(cfg, batch=2, text_len=8, target=(2, 3), cond=((2, 2),), pad=2)


def transformer_prefill_example(cfg: ModelConfig) -> tuple:
    return pair_inputs(transformer_example(cfg))[0]


def transformer_step_example(cfg: ModelConfig) -> tuple:
    prefill, step = pair_inputs(transformer_example(cfg))
    t, b, lp = cfg.transformer, step[0].shape[0], prefill[2].shape[0]
    kv = torch.randn(t.num_layers, 2, b, lp, t.num_heads, t.head_dim, generator=torch.Generator().manual_seed(1))
    return (step[0], step[1], kv, *step[2:])


def vision_encoder_example(cfg: ModelConfig) -> tuple:
    enc = cfg.encoder  # the tables' values do not shape the trace; rope theta is transformers' default
    tower = VisionTower(enc.vision_spatial_merge_size, enc.vision_hidden_size // enc.vision_num_heads, 10000.0,
                        int(enc.vision_num_position_embeddings**0.5))
    return vision_encoder_inputs(cfg, tower, [(1, 4, 6), (1, 2, 4)])  # N = 32 patches, 8 visual rows


def vae_decoder_example(cfg: ModelConfig) -> tuple:
    return vae_decoder_inputs(cfg, 2, 2, 3)


def vae_encoder_example(cfg: ModelConfig) -> tuple:
    return vae_encoder_inputs(cfg, 2, 32, 48)
