"""The Qwen-Image-2.x f16c64 RGBA VAE on single images.

Architecture and parameter names are those of diffusers' ``AutoencoderKLQwenImage21``, so its
checkpoints (``vae/diffusion_pytorch_model.safetensors``) load with ``strict=True``. The peer
works on video tensors [B, C, T, H, W]; this module takes [B, C, H, W] images only, which is
all the image pipeline uses (T = 1), and so has no feature cache, chunking or tiling.

Latents: ``encode`` returns the posterior mode (its mean), unnormalised, [B, z, H/16, W/16];
``decode`` returns images clamped to [-1, 1] as the peer's decode does. ``normalize`` /
``denormalize`` apply the per-channel ``latents_mean`` / ``latents_std`` the pipeline uses, and
``pack_latents`` / ``unpack_latents`` convert to and from the packed [B, L, C] token layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen_image2_ref.config import VAEConfig
from qwen_image2_ref.vae_blocks import DownBlock, MidBlock, RMSNorm, UpBlock
from qwen_image_edge.runtime.errors import ConfigError, ShapeError

__all__ = [
    "QwenImageVAE",
    "pack_latents",
    "unpack_latents",
    "patchify",
    "unpatchify",
]


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] latents -> [B, h*w, C] tokens, row-major (diffusers' 2.1 packed layout)."""
    if z.dim() != 4:
        raise ShapeError(f"pack_latents: expected latents [B, C, h, w], got shape {tuple(z.shape)}")
    b, c = z.shape[0], z.shape[1]
    return z.reshape(b, c, -1).transpose(1, 2)  # [B, L, C]


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, h*w, C] tokens -> [B, C, h, w] latents; the inverse of :func:`pack_latents`."""
    if x.dim() != 3 or x.shape[1] != h * w:
        raise ShapeError(
            f"unpack_latents: expected tokens [B, {h}*{w}={h * w}, C], got shape {tuple(x.shape)}"
        )
    b, c = x.shape[0], x.shape[2]
    return x.transpose(1, 2).reshape(b, c, h, w)  # [B, C, h, w]


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C*p*p, H/p, W/p]; channel order (c, column offset, row offset) as the peer's."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    x = x.permute(0, 1, 5, 3, 2, 4)  # [B, C, p_col, p_row, h, w]
    return x.reshape(b, c * p * p, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: [B, C*p*p, h, w] -> [B, C, h*p, w*p]."""
    b, cpp, h, w = x.shape
    x = x.reshape(b, cpp // (p * p), p, p, h, w)  # [B, C, p_col, p_row, h, w]
    x = x.permute(0, 1, 4, 3, 5, 2)  # [B, C, h, p_row, w, p_col]
    return x.reshape(b, cpp // (p * p), h * p, w * p)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        last = len(cfg.dim_mult) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, dims[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(
                dims[i],
                dims[i + 1],
                cfg.num_res_blocks,
                temporal=cfg.temperal_downsample[i] if i != last else False,
                down=i != last,
            )
            for i in range(len(cfg.dim_mult))
        )
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = nn.Conv2d(dims[-1], cfg.z_dim * 2, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        base = cfg.decoder_base_dim if cfg.decoder_base_dim is not None else cfg.base_dim
        dims = [base * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temporal_up = cfg.temperal_downsample[::-1]
        last = len(cfg.dim_mult) - 1
        self.conv_in = nn.Conv2d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        self.up_blocks = nn.ModuleList(
            UpBlock(
                dims[i],
                dims[i + 1],
                cfg.num_res_blocks,
                temporal=temporal_up[i] if i != last else False,
                up=i != last,
            )
            for i in range(len(cfg.dim_mult))
        )
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = nn.Conv2d(dims[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class QwenImageVAE(nn.Module):
    """Encoder + decoder of ``AutoencoderKLQwenImage21`` for [B, C, H, W] images in [-1, 1]."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        if not config.is_residual:
            raise ConfigError(
                "vae is_residual: Qwen-Image-2.x uses residual down/up blocks (True), got False "
                "(the non-residual Wan2.1 layout is not implemented)"
            )
        self.config = config
        self.patch = config.patch_size or 1
        for name in ("in_channels", "out_channels"):
            if getattr(config, name) % (self.patch * self.patch):
                raise ConfigError(
                    f"vae {name}: expected a multiple of patch_size^2 = {self.patch**2}, got {getattr(config, name)}"
                )
        self.image_channels = config.in_channels // (self.patch * self.patch)
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.z_dim * 2, config.z_dim * 2, 1)
        self.post_quant_conv = nn.Conv2d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the latent statistics; called again after a meta-device load."""
        # not persistent: the checkpoint keeps them in config.json, not in the state dict
        stats = torch.tensor([self.config.latents_mean, self.config.latents_std], dtype=torch.float32)
        self.register_buffer("latents_mean", stats[0].reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("latents_std", stats[1].reshape(1, -1, 1, 1), persistent=False)

    @property
    def scale_factor(self) -> int:
        return self.config.scale_factor_spatial

    def _check(self, t: torch.Tensor, what: str, channels: int, multiple: int) -> None:
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return  # exporters: sizes are symbolic there, and the graph's IOSpec owns the shape contract
        if t.dim() != 4 or t.shape[1] != channels or t.shape[2] % multiple or t.shape[3] % multiple:
            raise ShapeError(
                f"vae {what}: expected [B, {channels}, H, W] with H and W multiples of {multiple}, "
                f"got shape {tuple(t.shape)}"
            )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 4, H, W] in [-1, 1] -> unnormalised posterior mode [B, z, H/16, W/16]."""
        self._check(x, "encode input", self.image_channels, self.scale_factor)
        if self.patch > 1:
            x = patchify(x, self.patch)
        moments = self.quant_conv(self.encoder(x))  # [B, 2z, h, w]: mean then log-variance
        return moments[:, : self.config.z_dim]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unnormalised latents [B, z, h, w] -> images [B, 4, 16h, 16w] clamped to [-1, 1]."""
        self._check(z, "decode input", self.config.z_dim, 1)
        x = self.decoder(self.post_quant_conv(z))
        if self.patch > 1:
            x = unpatchify(x, self.patch)
        return x.clamp(-1.0, 1.0)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the transformer's latent space: (z - mean) / std per channel."""
        return (z - self.latents_mean.to(z.dtype)) / self.latents_std.to(z.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`: z * std + mean per channel."""
        return z * self.latents_std.to(z.dtype) + self.latents_mean.to(z.dtype)

    def encode_normalized(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.encode(x))

    def decode_normalized(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(self.denormalize(z))
