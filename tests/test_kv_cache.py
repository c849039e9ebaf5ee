"""The condition KV cache: prefill once + cached steps equal the single forward, and diffusers' cached path."""

from __future__ import annotations

import pytest
import torch

from qwen_image2_ref.transformer import QwenImageTransformer, cache_inputs, layout_inputs
from tests.test_transformer import CONFIGS, LAYOUTS
from tests.transformer_peer import make_case, make_peer


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request):
    cfg = CONFIGS[request.param]
    peer = make_peer(cfg, seed=2)
    ours = QwenImageTransformer(cfg).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    return cfg, peer, ours


def rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_cached_steps_equal_the_single_forward(models, name):
    cfg, _, ours = models
    inputs, layout, _ = make_case(cfg, *LAYOUTS[name], seed=3)
    prefill_kw, step_kw = cache_inputs(layout, cfg)
    with torch.no_grad():
        kv = ours.prefill(inputs["text_states"], inputs["cond_latents"], **prefill_kw)
        assert kv.shape == (cfg.num_layers, 2, len(LAYOUTS[name][0]), layout.prefix_len, cfg.num_heads, cfg.head_dim)
        for t in (0.9, 0.3):  # two steps reuse one cache
            timestep = torch.full_like(inputs["timestep"], t)
            full = ours(**{**inputs, "timestep": timestep}, **layout_inputs(layout, cfg))
            cached = ours.step(inputs["latents"], timestep, kv, **step_kw)
            assert rel_l2(cached, full) <= 1e-5


def test_cache_does_not_depend_on_the_target(models):
    """The premise of the cache: prefix activations ignore the timestep and the target latents."""
    cfg, _, ours = models
    inputs, layout, _ = make_case(cfg, [6], [(4, 4)], (4, 4), seed=5)
    prefill_kw, step_kw = cache_inputs(layout, cfg)
    with torch.no_grad():
        kv = ours.prefill(inputs["text_states"], inputs["cond_latents"], **prefill_kw)
        a = ours.step(inputs["latents"], inputs["timestep"], kv, **step_kw)
        b = ours(**inputs, **layout_inputs(layout, cfg))
        wrong = ours.step(inputs["latents"], inputs["timestep"], torch.zeros_like(kv), **step_kw)
    assert rel_l2(a, b) <= 1e-5
    assert rel_l2(wrong, b) > 1e-2  # the cache carries the condition


@pytest.mark.parametrize("name", ["text-only", "two-conditions", "batch2-padded-condition"])
def test_cached_path_matches_diffusers_cached_path(models, name):
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    cfg, peer, ours = models
    inputs, layout, peer_kwargs = make_case(cfg, *LAYOUTS[name], seed=7)
    prefill_kw, step_kw = cache_inputs(layout, cfg)
    n_t = layout.num_target
    cache = QwenImage21KVCache(cfg.num_layers)
    later_t = inputs["timestep"] * 0.5
    later_latents = torch.randn_like(inputs["latents"])
    with torch.no_grad():
        peer(**peer_kwargs, kv_cache=cache, kv_cache_mode="extract")
        cond = peer_kwargs["hidden_states"][:, : peer_kwargs["hidden_states"].shape[1] - n_t]
        ref = peer(**{**peer_kwargs, "hidden_states": torch.cat([cond, later_latents], 1), "timestep": later_t},
                   kv_cache=cache, kv_cache_mode="cached")[0][:, -n_t:]
        kv = ours.prefill(inputs["text_states"], inputs["cond_latents"], **prefill_kw)
        out = ours.step(later_latents, later_t, kv, **step_kw)
    assert (out - ref).abs().max().item() <= 1e-5
