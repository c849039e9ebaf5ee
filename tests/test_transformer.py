"""Parity of the reference MMDiT with diffusers' QwenImage21Transformer2DModel (random weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qwen_image2_ref.transformer as tr
from qwen_image2_ref.config import TransformerConfig
from qwen_image2_ref.transformer import QwenImageTransformer, check_inputs, layout_inputs
from qwen_image_edge.runtime.errors import ShapeError
from qwen_image_edge.runtime.layout import attention_mask, build_layout, rope_tables
from tests.transformer_peer import make_case, make_peer

CONFIGS = {
    "h2x16": TransformerConfig(num_layers=2, num_heads=2, head_dim=16, context_dim=32, axes_dims_rope=(4, 6, 6)),
    "h4x8-l3": TransformerConfig(
        num_layers=3, num_heads=4, head_dim=8, context_dim=24, mlp_ratio=2, axes_dims_rope=(2, 2, 4)
    ),
}
# (prompt lengths per sample, condition latent shapes, target latent shape)
LAYOUTS = {
    "text-only": ([5], [], (4, 4)),
    "one-condition": ([6], [(4, 4)], (4, 6)),
    "two-conditions": ([7], [(4, 4), (2, 6)], (6, 4)),
    "batch2-padded": ([3, 9], [], (4, 6)),
    "batch2-padded-condition": ([8, 2], [(2, 4)], (2, 2)),
}
# fp32 through a few layers of O(1) activations: rounding differences stay near 1e-6.
TOL = 1e-5


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request):
    cfg = CONFIGS[request.param]
    peer = make_peer(cfg, seed=1)
    ours = QwenImageTransformer(cfg).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    return cfg, peer, ours


def run_both(cfg, peer, ours, case, seed=0):
    inputs, layout, peer_kwargs = make_case(cfg, *case, seed=seed)
    with torch.no_grad():
        ref = peer(**peer_kwargs)[0][:, -layout.num_target :]
        out = ours(**inputs, **layout_inputs(layout, cfg))
    return ref, out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_parity_with_diffusers(models, name):
    cfg, peer, ours = models
    ref, out = run_both(cfg, peer, ours, LAYOUTS[name])
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= TOL


def test_inputs_visibly_change_the_output(models):
    """Guards against inert random weights: text and condition tokens must matter."""
    cfg, _, ours = models
    inputs, layout, _ = make_case(cfg, [6], [(4, 4)], (4, 4))
    extra = layout_inputs(layout, cfg)
    with torch.no_grad():
        base = ours(**inputs, **extra)
        other_text = ours(**{**inputs, "text_states": inputs["text_states"].flip(1)}, **extra)
        other_cond = ours(**{**inputs, "cond_latents": -inputs["cond_latents"]}, **extra)
    scale = base.abs().mean()
    assert (other_text - base).abs().mean() > 0.05 * scale
    assert (other_cond - base).abs().mean() > 0.05 * scale


def _plain_rms(x, weight, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


WRONG_VARIANTS = {
    "swapped-scale-gate": ("split_modulation", lambda p: tuple(reversed(p.chunk(2, dim=-1)))),
    "plain-rmsnorm-text": ("zero_centred_rms_norm", _plain_rms),
    "no-causal-mask": ("attention", None),
}


@pytest.mark.parametrize("variant", list(WRONG_VARIANTS))
def test_wrong_variants_fail_parity(models, monkeypatch, variant):
    """The parity check has teeth: each deliberately wrong variant is caught."""
    cfg, peer, ours = models
    name, fn = WRONG_VARIANTS[variant]
    if variant == "no-causal-mask":
        real = tr.attention
        fn = lambda q, k, v, mask: real(q, k, v, None)  # noqa: E731
    monkeypatch.setattr(tr, name, fn)
    ref, out = run_both(cfg, peer, ours, LAYOUTS["two-conditions"])
    assert (out - ref).abs().max().item() > 100 * TOL


def test_rope_tables_match_diffusers_at_large_positions():
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21Rope

    cond, target = [(32, 48)], (64, 40)
    n_slots = 32 * 48 // 4
    pad = np.array([False] * 20 + [True] * n_slots + [False] * 300)
    layout = build_layout(pad, np.ones((1, pad.size), bool), cond, target)
    rope = QwenImage21Rope(theta=10000, axes_dim=[16, 56, 56])
    joint_pad = torch.from_numpy(layout.block_ids >= 0)
    freqs = rope([(1, *s) for s in [*cond, target]], joint_pad, torch.device("cpu"))
    cos, sin = rope_tables(layout.position_ids, (16, 56, 56), 10000.0)
    np.testing.assert_allclose(cos, freqs.real.numpy(), atol=2e-6)
    np.testing.assert_allclose(sin, freqs.imag.numpy(), atol=2e-6)


def test_block_causal_mask_structure():
    pad = np.array([False, False, True, True, False])
    layout = build_layout(pad, np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]), [(2, 4)], (2, 2))
    mask = attention_mask(layout.block_ids, layout.key_valid)
    n_prefix = layout.prefix_len
    assert n_prefix == 2 + 8 + 1
    # The condition block is bidirectional, text before it cannot see it, the target sees everything.
    assert mask[0, 2, 9] and mask[0, 9, 2]
    assert not mask[0, 1, 2]
    assert mask[0, n_prefix:, :].all()
    # Sample 1's padded last text token is hidden from every query but remains a query itself.
    assert not mask[1, :, n_prefix - 1].any()
    assert mask[1, n_prefix - 1, : n_prefix - 1].all()


def test_shape_errors_name_the_input():
    cfg = CONFIGS["h2x16"]
    inputs, layout, _ = make_case(cfg, [4], [(2, 2)], (2, 2))
    with pytest.raises(ShapeError, match="'latents'.*expected \\[1, 4, C\\]"):
        check_inputs(layout, inputs["latents"][:, :3], inputs["text_states"], inputs["cond_latents"])
    with pytest.raises(ShapeError, match="'cond_latents'"):
        check_inputs(layout, inputs["latents"], inputs["text_states"], inputs["cond_latents"][:, :1])
    with pytest.raises(ShapeError, match="image slots"):
        build_layout(np.array([False, True]), np.ones((1, 2)), [(4, 4)], (2, 2))
