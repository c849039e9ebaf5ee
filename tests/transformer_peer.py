"""Build a diffusers QwenImage21Transformer2DModel peer and matching inputs for parity tests."""

from __future__ import annotations

import numpy as np
import torch

from qwen_image2_ref.config import TransformerConfig
from qwen_image_edge.runtime.layout import TOKENS_PER_SLOT, build_layout


def make_peer(cfg: TransformerConfig, seed: int = 0):
    """A random-init diffusers transformer whose blocks visibly move the output.

    Default init leaves tanh gates ~0.03 and norm weights constant, so a wrong block could still
    match; scale the modulation and perturb the norm weights (toolchain notes section 9).
    """
    from diffusers import QwenImage21Transformer2DModel

    torch.manual_seed(seed)
    peer = QwenImage21Transformer2DModel(**{k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"})
    with torch.no_grad():
        peer.modulation[1].weight.mul_(30.0)
        peer.norm_out.linear.weight.mul_(10.0)
        for name, p in peer.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.add_(0.5 * torch.randn_like(p))
    return peer.eval()


def make_case(cfg: TransformerConfig, text_lens, cond_shapes, target_shape, seed=0):
    """Encoder states with image slots after a short text run, right-padded per sample.

    Returns our forward's raw inputs, the layout, and the diffusers kwargs for the same case.
    """
    rng = np.random.default_rng(seed)
    b = len(text_lens)
    n_slots = [h * w // TOKENS_PER_SLOT for h, w in cond_shapes]
    head = 3  # text before the first image
    # Encoder sequence: head text, then each image's slots separated by 2 text tokens, then the prompt.
    pad_mask = [False] * head
    for k, n in enumerate(n_slots):
        pad_mask += [True] * n + ([False] * 2 if k < len(n_slots) - 1 else [])
    fixed = len(pad_mask)
    l_enc = fixed + max(text_lens)
    image_pad_mask = np.array(pad_mask + [False] * max(text_lens))
    text_mask = np.zeros((b, l_enc), dtype=bool)
    for i, n in enumerate(text_lens):
        text_mask[i, : fixed + n] = True
    states = rng.standard_normal((b, l_enc, cfg.context_dim)).astype(np.float32)
    states[~text_mask] = 0.0  # padding rows are zero in diffusers' encode_prompt
    n_cond = sum(h * w for h, w in cond_shapes)
    cond = rng.standard_normal((b, n_cond, cfg.in_channels)).astype(np.float32)
    n_t = target_shape[0] * target_shape[1]
    lat = rng.standard_normal((b, n_t, cfg.in_channels)).astype(np.float32)
    t = rng.uniform(0.05, 0.95, size=b).astype(np.float32)
    layout = build_layout(image_pad_mask, text_mask, cond_shapes, target_shape)

    img_mask = np.concatenate([image_pad_mask, np.ones(n_t // TOKENS_PER_SLOT, dtype=bool)])
    peer_kwargs = dict(
        hidden_states=torch.from_numpy(np.concatenate([cond, lat], axis=1)),
        encoder_hidden_states=torch.from_numpy(states),
        encoder_hidden_states_mask=None if text_mask.all() else torch.from_numpy(text_mask),
        timestep=torch.from_numpy(t),
        img_shapes=[[(1, h, w) for h, w in [*cond_shapes, target_shape]]] * b,
        img_mask=torch.from_numpy(np.tile(img_mask, (b, 1))),
        return_dict=False,
    )
    ours = dict(
        latents=torch.from_numpy(lat),
        text_states=torch.from_numpy(states),
        timestep=torch.from_numpy(t),
        cond_latents=torch.from_numpy(cond),
    )
    return ours, layout, peer_kwargs
