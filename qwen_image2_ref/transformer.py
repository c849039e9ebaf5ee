"""The single-stream MMDiT of Qwen-Image-2.x, loadable by diffusers' key names.

One joint sequence holds text, condition-image and target-image tokens. Every block reads its
scales and gates from one shared modulation; text and condition tokens are modulated at t=0
(``causal_condition``), so their activations do not depend on the step. Attention is
block-causal; the layout (which rows are text, which are images), rope cos/sin and the mask are
inputs, computed by ``qwen_image_edge.runtime.layout`` in numpy, so this module exports to ONNX as it is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qwen_image2_ref.config import TransformerConfig
from qwen_image_edge.runtime.errors import ShapeError
from qwen_image_edge.runtime.layout import JointLayout, attention_mask, rope_tables

# ----------------------------------------------------------------------------- pure functions


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of ``1000 * t`` (t = sigma in [0, 1]): cos half first, then sin."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None, :]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, dim]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 (the q/k norms)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def zero_centred_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm whose stored weight is ``scale - 1`` (txt_in's text_norm), in fp32."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (weight.float() + 1.0)).to(x.dtype)


def layer_norm(x: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    """LayerNorm without affine parameters over the last ``dim`` features.

    The width is a Python int from the config, not ``x.shape[-1]``: the TorchScript exporter
    needs a constant normalized_shape.
    """
    return F.layer_norm(x, (dim,), eps=eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs ``(x[2j], x[2j+1])`` by the angle whose cos/sin are given, in fp32.

    x: ``[B, L, H, D]``; cos, sin: ``[L, D/2]``. Real arithmetic (no complex tensors) so it exports.
    """
    xf = x.float().unflatten(-1, (-1, 2))  # [B, L, H, D/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    c = cos[None, :, None, :]  # [1, L, 1, D/2]
    s = sin[None, :, None, :]
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)  # [B, L, H, D/2, 2]
    return out.flatten(-2).to(x.dtype)  # [B, L, H, D]


def split_modulation(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One modulation chunk -> (scale, gate)."""
    scale, gate = params.chunk(2, dim=-1)
    return scale, gate


def per_token(real: torch.Tensor, zero: torch.Tensor | None, seq_len: int, num_target: int) -> torch.Tensor:
    """Broadcast per-sample parameters over the joint sequence.

    real: ``[B, D]`` from the sampled timestep; zero: ``[1, D]`` from t=0 (None without
    causal_condition). The prefix (text and condition tokens) reads ``zero``, the target ``real``.
    Returns ``[B, L, D]`` or ``[B, 1, D]``.
    """
    if zero is None:
        return real[:, None, :]  # [B, 1, D]
    b, d = real.shape
    prefix = zero[:, None, :].expand(b, seq_len - num_target, d)  # [B, L_prefix, D]
    target = real[:, None, :].expand(b, num_target, d)  # [B, N_t, D]
    return torch.cat([prefix, target], dim=1)  # [B, L, D]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention. q, k, v: ``[B, L, H, D]``; mask: bool ``[B, L_q, L_k]``."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None])
    return out.transpose(1, 2).flatten(2)  # [B, L, H*D]


# ----------------------------------------------------------------------------- modules


class _TimestepMLP(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim, bias=False)
        self.linear_2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.in_dim = in_dim
        self.timestep_embedder = _TimestepMLP(in_dim, dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(timestep_features(t, self.in_dim).to(dtype))


class TextNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return zero_centred_rms_norm(x, self.weight, self.eps)


class TextProjection(nn.Module):
    """txt_in: zero-centred RMSNorm, then a GELU-tanh MLP."""

    def __init__(self, context_dim: int, dim: int, eps: float):
        super().__init__()
        self.text_norm = TextNorm(context_dim, eps)
        self.in_layer = nn.Linear(context_dim, dim, bias=False)
        self.out_layer = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.gelu(self.in_layer(self.text_norm(x)), approximate="tanh"))


class HeadNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_k = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_v = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim, bias=False)])
        self.norm_q = HeadNorm(head_dim, eps)
        self.norm_k = HeadNorm(head_dim, eps)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        q = self.to_q(x).unflatten(-1, (self.heads, self.head_dim))  # [B, L, H, Dh]
        k = self.to_k(x).unflatten(-1, (self.heads, self.head_dim))
        v = self.to_v(x).unflatten(-1, (self.heads, self.head_dim))
        q = apply_rope(self.norm_q(q), cos, sin)
        k = apply_rope(self.norm_k(k), cos, sin)
        return q, k, v


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden, bias=False)
        self.gate_layer = nn.Linear(dim, hidden, bias=False)
        self.out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.gate_layer(x)) * self.proj(x))


class Block(nn.Module):
    """``x += tanh(g1) * Attn(LN(x)(1+s1)); x += tanh(g2) * MLP(LN(x)(1+s2))``; no shift term."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.dim, self.eps = cfg.hidden_size, cfg.eps
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.eps)
        self.img_mlp = SwiGLU(cfg.hidden_size, cfg.hidden_size * cfg.mlp_ratio)

    def forward(self, x, mod, cos, sin, mask, past=None):
        """mod: ``(scale1, gate1, scale2, gate2)``, each ``[B, L or 1, D]``.

        ``past``: the prefix's ``(k, v)`` ``[B, L_prefix, H, Dh]`` put before this call's keys (the
        cached step). Returns the new hidden states and this call's ``(k, v)``.
        """
        scale1, gate1, scale2, gate2 = mod
        q, k, v = self.attn.qkv(layer_norm(x, self.dim, self.eps) * (1 + scale1), cos, sin)
        kv = (k, v)
        if past is not None:
            k = torch.cat([past[0], k], dim=1)  # [B, L_prefix + N_t, H, Dh]
            v = torch.cat([past[1], v], dim=1)
        x = x + torch.tanh(gate1) * self.attn.to_out[0](attention(q, k, v, mask))
        x = x + torch.tanh(gate2) * self.img_mlp(layer_norm(x, self.dim, self.eps) * (1 + scale2))
        if x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        return x, kv


class NormOut(nn.Module):
    """Scale-only final adaptive norm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.linear = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.dim, self.eps) * (1 + scale)


class QwenImageTransformer(nn.Module):
    """Qwen-Image-2.x MMDiT. Parameter names equal diffusers' ``QwenImage21Transformer2DModel``."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.time_text_embed = TimeEmbedding(config.timestep_dim, d)
        self.txt_in = TextProjection(config.context_dim, d, config.eps)
        self.img_in = nn.Linear(config.in_channels, d, bias=False)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 4 * d, bias=False))
        self.transformer_blocks = nn.ModuleList([Block(config) for _ in range(config.num_layers)])
        self.norm_out = NormOut(d, config.eps)
        self.proj_out = nn.Linear(d, config.out_channels, bias=False)

    def forward(
        self,
        latents: torch.Tensor,
        text_states: torch.Tensor,
        timestep: torch.Tensor,
        cond_latents: torch.Tensor,
        prefix_index: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        attn_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Velocity for the target tokens.

        Args:
            latents: ``[B, N_t, C]`` noisy target latents (packed, row-major).
            text_states: ``[B, L_enc, ctx]`` condition-encoder states (image-slot rows are ignored).
            timestep: ``[B]`` sigma in [0, 1].
            cond_latents: ``[B, N_c, C]`` normalised condition-image latents (``N_c`` may be 0).
            prefix_index: ``[L_prefix]`` int64 into ``cat([text rows, condition rows])``.
            rope_cos, rope_sin: ``[L, head_dim/2]`` with ``L = L_prefix + N_t``.
            attn_mask: ``[B, L, L]`` bool, True where a query may attend a key.
        Returns:
            ``[B, N_t, C_out]``.
        """
        n_target = latents.shape[1]
        x = torch.cat([self.embed_prefix(text_states, cond_latents, prefix_index), self.img_in(latents)], dim=1)
        seq_len = x.shape[1]  # [B, L, D]
        temb, real, zero = self.modulation_params(timestep, x.dtype)
        params = tuple(per_token(r, z, seq_len, n_target) for r, z in zip(real, zero or (None,) * 4))
        for block in self.transformer_blocks:
            x = block(x, params, rope_cos, rope_sin, attn_mask)[0]
        # norm_out and proj_out are per token: only the target tokens are needed.
        return self.output(x[:, seq_len - n_target :], temb[: latents.shape[0]])  # [B, N_t, C]

    # ------------------------------------------------------------------ pieces shared by both paths

    def embed_prefix(self, text_states, cond_latents, prefix_index) -> torch.Tensor:
        """Text rows and condition-latent rows in joint-sequence order: ``[B, L_prefix, D]``."""
        txt = self.txt_in(text_states)  # [B, L_enc, D]
        cond = self.img_in(cond_latents)  # [B, N_c, D]
        return torch.cat([txt, cond], dim=1).index_select(1, prefix_index)  # [B, L_prefix, D]

    def modulation_params(self, timestep: torch.Tensor, dtype: torch.dtype):
        """``temb [B(+1), D]``, the per-sample ``(scale1, gate1, scale2, gate2)`` ``[B, D]`` each,
        and the same four from t=0 ``[1, D]`` (None without causal_condition)."""
        causal = self.config.causal_condition
        t = torch.cat([timestep, timestep.new_zeros(1)]) if causal else timestep  # [B(+1)]
        temb = self.time_text_embed(t, dtype)  # [B(+1), D]
        mod = self.modulation(temb)  # [B(+1), 4D]

        def four(m):
            mod1, mod2 = m.chunk(2, dim=-1)
            return (*split_modulation(mod1), *split_modulation(mod2))

        if not causal:
            return temb, four(mod), None
        return temb, four(mod[:-1]), four(mod[-1:])

    def output(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale = self.norm_out.linear(F.silu(temb).to(x.dtype))  # [B, D]
        return self.proj_out(self.norm_out(x, scale[:, None, :]))

    # ------------------------------------------------------------------ condition KV cache

    def prefill(self, text_states, cond_latents, prefix_index, rope_cos, rope_sin, attn_mask) -> torch.Tensor:
        """Per-layer keys and values of the prefix (text + condition tokens), computed once.

        Valid because the prefix is modulated at t=0 and, block-causally, never attends to the
        target: its activations do not depend on the step. rope and mask cover the prefix only.
        Returns ``[layers, 2, B, L_prefix, H, Dh]``.
        """
        if not self.config.causal_condition:
            raise ValueError("the condition KV cache needs causal_condition=True")
        x = self.embed_prefix(text_states, cond_latents, prefix_index)  # [B, L_prefix, D]
        zero = self.modulation_params(x.new_zeros(x.shape[0]), x.dtype)[2]
        params = tuple(z[:, None, :] for z in zero)  # [1, 1, D] each
        cache = []
        for block in self.transformer_blocks:
            x, (k, v) = block(x, params, rope_cos, rope_sin, attn_mask)
            cache.append(torch.stack([k, v]))  # [2, B, L_prefix, H, Dh]
        return torch.stack(cache)  # [layers, 2, B, L_prefix, H, Dh]

    def step(self, latents, timestep, kv_cache, rope_cos, rope_sin, key_mask) -> torch.Tensor:
        """Velocity from the target tokens and the prefix cache.

        rope: ``[N_t, head_dim/2]`` (the target rows); key_mask: ``[B, L_prefix + N_t]`` bool
        (False at padded text). Target queries see every valid key, so no block structure is needed.
        """
        x = self.img_in(latents)  # [B, N_t, D]
        temb, real, _ = self.modulation_params(timestep, x.dtype)
        params = tuple(r[:, None, :] for r in real)  # [B, 1, D] each
        mask = key_mask[:, None, :]  # [B, 1, L_prefix + N_t] -> broadcast over the target queries
        for i, block in enumerate(self.transformer_blocks):
            x = block(x, params, rope_cos, rope_sin, mask, past=(kv_cache[i, 0], kv_cache[i, 1]))[0]
        return self.output(x, temb[: latents.shape[0]])


def layout_inputs(layout: JointLayout, config: TransformerConfig, device=None) -> dict[str, torch.Tensor]:
    """The layout-derived forward inputs (prefix_index, rope_cos/sin, attn_mask) as tensors."""
    cos, sin = rope_tables(layout.position_ids, config.axes_dims_rope, config.rope_theta)
    return {
        "prefix_index": torch.from_numpy(layout.prefix_index).to(device),
        "rope_cos": torch.from_numpy(cos).to(device),
        "rope_sin": torch.from_numpy(sin).to(device),
        "attn_mask": torch.from_numpy(attention_mask(layout.block_ids, layout.key_valid)).to(device),
    }


def cache_inputs(layout: JointLayout, config: TransformerConfig, device=None) -> tuple[dict, dict]:
    """Layout inputs of the cached path: ``(prefill kwargs, step kwargs)`` without the tensors
    that change per call (text states, latents, timestep, cache)."""
    full = layout_inputs(layout, config, device)
    lp = layout.prefix_len
    prefill = {
        "prefix_index": full["prefix_index"],
        "rope_cos": full["rope_cos"][:lp],
        "rope_sin": full["rope_sin"][:lp],
        "attn_mask": full["attn_mask"][:, :lp, :lp],
    }
    step = {
        "rope_cos": full["rope_cos"][lp:],
        "rope_sin": full["rope_sin"][lp:],
        "key_mask": torch.from_numpy(layout.key_valid).to(device),
    }
    return prefill, step


def check_inputs(
    layout: JointLayout, latents: torch.Tensor, text_states: torch.Tensor, cond_latents: torch.Tensor
) -> None:
    """Shape checks whose messages say which input, what was expected and what was found."""
    b = layout.key_valid.shape[0]
    n_cond = sum(h * w for h, w in layout.cond_shapes)
    expected = {
        "latents": (latents, (b, layout.num_target)),
        "text_states": (text_states, (b, layout.text_len)),
        "cond_latents": (cond_latents, (b, n_cond)),
    }
    for name, (tensor, lead) in expected.items():
        if tensor.ndim != 3 or tuple(tensor.shape[:2]) != lead:
            raise ShapeError(
                f"transformer input {name!r}: expected [{lead[0]}, {lead[1]}, C], got {list(tensor.shape)}"
            )
