"""Parity of qwen_image2_ref.vae with diffusers' AutoencoderKLQwenImage21 (random weights).

The peer works on [B, C, T, H, W]; we add/remove T = 1. Weights move by loading the peer's
state dict into ours with strict=True, so names and shapes must agree exactly. fp32 with
outputs of order 1 through a few dozen convolutions: the two implementations differ only in
summation order, measured ~1e-6, so 1e-5 is the bound.
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLQwenImage21
from safetensors.torch import load_file

from qwen_image2_ref import vae_blocks
from qwen_image2_ref.config import VAEConfig, get_preset
from qwen_image2_ref.vae import QwenImageVAE, pack_latents, unpack_latents
from qwen_image_edge.runtime.errors import ConfigError, ShapeError

TOL = 1e-5

TINY = get_preset("tiny").vae
# 2x2 patching (RGBA -> 16 channels), 4 levels, a decoder wider than the encoder, z=16, two
# res blocks, and a channel-halving temporal up block (where the kept frame of dup-up matters).
# attn_scales is accepted but, as in the peer's residual layout, adds no blocks.
_g = torch.Generator().manual_seed(7)
PATCHED = VAEConfig(
    base_dim=8,
    decoder_base_dim=12,
    z_dim=16,
    dim_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    attn_scales=(0.5,),
    temperal_downsample=(True, True, False),
    in_channels=16,
    out_channels=16,
    patch_size=2,
    latents_mean=tuple((torch.randn(16, generator=_g)).tolist()),
    latents_std=tuple((1.0 + torch.rand(16, generator=_g) * 3).tolist()),
)
CONFIGS = {"tiny": TINY, "patched": PATCHED}


def _peer(cfg: VAEConfig, seed: int = 0) -> AutoencoderKLQwenImage21:
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"}
    peer = AutoencoderKLQwenImage21(**kwargs).eval()
    # norm gains start at exactly 1; perturb them so a misplaced or ignored gain shows up
    with torch.no_grad():
        for name, p in peer.named_parameters():
            if name.endswith("gamma"):
                p.mul_(0.5 + torch.rand_like(p))
    return peer


def _ours_from(peer: AutoencoderKLQwenImage21, cfg: VAEConfig) -> QwenImageVAE:
    ours = QwenImageVAE(cfg).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    return ours


def _image(b: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 4, h, w, generator=g) * 2 - 1


def _latents(b: int, z: int, h: int, w: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, z, h, w, generator=g) * 2


@torch.no_grad()
def _peer_encode(peer, x):
    return peer.encode(x.unsqueeze(2)).latent_dist.mode().squeeze(2)


@torch.no_grad()
def _peer_decode(peer, z):
    return peer.decode(z.unsqueeze(2)).sample.squeeze(2)


def _diffs(peer, ours, cfg, h, w):
    x = _image(2, h, w)
    z = _latents(2, cfg.z_dim, h // 16, w // 16)
    with torch.no_grad():
        enc = (ours.encode(x) - _peer_encode(peer, x)).abs().max().item()
        dec = (ours.decode(z) - _peer_decode(peer, z)).abs().max().item()
    return enc, dec


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("hw", [(64, 64), (32, 96)])
def test_encode_decode_match_diffusers(name, hw):
    cfg = CONFIGS[name]
    peer = _peer(cfg)
    ours = _ours_from(peer, cfg)
    h, w = hw
    x = _image(2, h, w)
    z = _latents(2, cfg.z_dim, h // 16, w // 16)
    with torch.no_grad():
        mode, ref_mode = ours.encode(x), _peer_encode(peer, x)
        img, ref_img = ours.decode(z), _peer_decode(peer, z)
    assert mode.shape == (2, cfg.z_dim, h // 16, w // 16)
    assert img.shape == (2, 4, h, w)
    assert (mode - ref_mode).abs().max().item() <= TOL
    assert (img - ref_img).abs().max().item() <= TOL
    # the comparison means something only if outputs are not constant or clamped flat
    assert mode.std().item() > 0.05
    assert img.std().item() > 0.05
    assert (img.abs() < 1.0).float().mean().item() > 0.5
    # the peer clamps in decode; so do we
    assert img.abs().max().item() <= 1.0


def test_normalized_paths_match_pipeline_formula():
    peer = _peer(PATCHED)
    ours = _ours_from(peer, PATCHED)
    mean = torch.tensor(peer.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(peer.config.latents_std).view(1, -1, 1, 1)
    x = _image(1, 32, 48)
    z = _latents(1, PATCHED.z_dim, 2, 3)
    with torch.no_grad():
        # the pipeline: (mode - mean) / std on encode, z * std + mean before decode
        assert (ours.encode_normalized(x) - (_peer_encode(peer, x) - mean) / std).abs().max() <= TOL
        assert (ours.decode_normalized(z) - _peer_decode(peer, z * std + mean)).abs().max() <= TOL
    torch.testing.assert_close(ours.denormalize(ours.normalize(z)), z)


def _no_avg_shortcut(x, in_channels, out_channels, factor_s, factor_t):
    return 0.0


def _avg_down_without_zero_frame(x, in_channels, out_channels, factor_s, factor_t):
    return WRONG_BASE["avg_down"](x, in_channels, out_channels, factor_s, 1)


def _dup_up_ignoring_time(x, in_channels, out_channels, factor_s, factor_t):
    return WRONG_BASE["dup_up"](x, in_channels, out_channels, factor_s, 1)


def _norm_without_gain(self, x):
    return torch.nn.functional.normalize(x, dim=1) * self.scale


WRONG_BASE = {"avg_down": vae_blocks.avg_down, "dup_up": vae_blocks.dup_up}
WRONG = {
    "avg-down shortcut removed": ("avg_down", _no_avg_shortcut),
    "avg-down without the zero frame": ("avg_down", _avg_down_without_zero_frame),
    "dup-up ignoring the temporal factor": ("dup_up", _dup_up_ignoring_time),
    "norm gain ignored": ("RMSNorm.forward", _norm_without_gain),
}


@pytest.mark.parametrize("variant", sorted(WRONG))
def test_wrong_variant_fails_parity(variant, monkeypatch):
    target, fn = WRONG[variant]
    if target == "RMSNorm.forward":
        monkeypatch.setattr(vae_blocks.RMSNorm, "forward", fn)
    else:
        monkeypatch.setattr(vae_blocks, target, fn)
    peer = _peer(PATCHED)
    ours = _ours_from(peer, PATCHED)
    enc, dec = _diffs(peer, ours, PATCHED, 64, 64)
    assert max(enc, dec) > 100 * TOL, f"{variant}: encode diff {enc:.2e}, decode diff {dec:.2e}"


def test_loads_save_pretrained_folder(tmp_path):
    peer = _peer(PATCHED, seed=3)
    peer.save_pretrained(tmp_path, safe_serialization=True)
    cfg = VAEConfig.from_diffusers(json.loads((tmp_path / "config.json").read_text()))
    assert cfg == PATCHED  # config.json round-trips through VAEConfig
    ours = QwenImageVAE(cfg).eval()
    ours.load_state_dict(load_file(tmp_path / "diffusion_pytorch_model.safetensors"), strict=True)
    enc, dec = _diffs(peer, ours, cfg, 32, 64)
    assert enc <= TOL and dec <= TOL


def test_full_size_state_dict_names_and_shapes():
    with torch.device("meta"):
        ours = QwenImageVAE(VAEConfig())
        peer = AutoencoderKLQwenImage21()
    want = {k: tuple(v.shape) for k, v in peer.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want


def test_pack_unpack_match_pipeline_layout():
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import QwenImage21Pipeline

    z = _latents(2, 64, 4, 6)
    packed = pack_latents(z)
    assert packed.shape == (2, 24, 64)
    torch.testing.assert_close(packed, QwenImage21Pipeline._pack_latents(z, 2, 64, 4, 6), rtol=0, atol=0)
    # the pipeline unpacks to [B, C, 1, h, w] from pixel sizes, with vae_scale_factor 16
    ref = QwenImage21Pipeline._unpack_latents(packed, 4 * 16, 6 * 16, 16)
    torch.testing.assert_close(unpack_latents(packed, 4, 6), ref.squeeze(2), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(pack_latents(z[:, :, :3, :5]), 3, 5), z[:, :, :3, :5])
    with pytest.raises(ShapeError, match="24"):
        unpack_latents(packed, 4, 4)


def test_invalid_inputs_raise_typed_errors():
    ours = QwenImageVAE(TINY)
    with pytest.raises(ShapeError, match=r"expected \[B, 4, H, W\].*multiples of 16.*\(1, 4, 40, 64\)"):
        ours.encode(torch.zeros(1, 4, 40, 64))
    with pytest.raises(ShapeError, match="expected"):
        ours.encode(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ShapeError, match="64"):
        ours.decode(torch.zeros(1, 16, 4, 4))
    with pytest.raises(ConfigError, match="is_residual"):
        QwenImageVAE(dataclasses.replace(TINY, is_residual=False))
    with pytest.raises(ConfigError, match="patch_size"):
        QwenImageVAE(dataclasses.replace(PATCHED, in_channels=6))


def _onnx_session(module, example, in_name, out_name):
    import onnxruntime as ort

    buf = io.BytesIO()
    axes = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(
        module,
        (example,),
        buf,
        dynamo=False,
        opset_version=19,
        input_names=[in_name],
        output_names=[out_name],
        dynamic_axes={in_name: axes, out_name: axes},
    )
    return ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])


class _Encode(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        return self.vae.encode(x)


class _Decode(_Encode):
    def forward(self, z):
        return self.vae.decode(z)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_onnx_export_matches_torch(name):
    cfg = CONFIGS[name]
    ours = _ours_from(_peer(cfg), cfg)
    enc = _onnx_session(_Encode(ours), _image(1, 64, 64), "image", "latents")
    dec = _onnx_session(_Decode(ours), _latents(1, cfg.z_dim, 4, 4), "latents", "image")
    # fp32 graph vs fp32 torch: different kernels, same math; 1e-4 covers onnxruntime's conv/matmul order
    for b, h, w in [(1, 64, 64), (2, 32, 96)]:
        x = _image(b, h, w, seed=5)
        z = _latents(b, cfg.z_dim, h // 16, w // 16, seed=6)
        with torch.no_grad():
            want_z, want_x = ours.encode(x).numpy(), ours.decode(z).numpy()
        got_z = enc.run(None, {"image": x.numpy()})[0]
        got_x = dec.run(None, {"latents": z.numpy()})[0]
        assert got_z.shape == want_z.shape and got_x.shape == want_x.shape
        assert np.abs(got_z - want_z).max() <= 1e-4
        assert np.abs(got_x - want_x).max() <= 1e-4
