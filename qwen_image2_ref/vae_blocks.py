"""Building blocks of the Qwen-Image-2.x VAE, specialised to single images ([B, C, H, W]).

Module and parameter names follow diffusers' ``AutoencoderKLQwenImage21`` so that its
``state_dict`` loads with ``strict=True``. The diffusers model runs 5-D video tensors through
2-D convolutions one frame at a time; for one frame its temporal parts reduce to:

- the ``time_conv`` of the "3d" resamplers is never applied (first chunk), but its weights
  exist in the checkpoint, so it is kept as an unused parameter holder;
- the average-down shortcut of a temporally downsampling block zero-pads the time axis to two
  frames before averaging, so half of every group it averages is zeros;
- the duplicate-up shortcut of a temporally upsampling block keeps only the last of the two
  frames it makes.

Everything here is traceable for ONNX: shape arithmetic only, no branches on tensor values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen_image_edge.runtime.errors import ConfigError


def avg_down(
    x: torch.Tensor, in_channels: int, out_channels: int, factor_s: int, factor_t: int
) -> torch.Tensor:
    """Space-to-depth by ``factor_s`` then average channel groups down to ``out_channels``.

    ``factor_t == 2`` reproduces the one-frame temporal fold: a zero frame is placed before the
    real one, so each output channel averages ``group`` values of which half are zeros.
    Channel counts are passed as Python ints so a traced graph holds them as constants.
    """
    b, c, h, w = x.shape[0], in_channels, x.shape[2], x.shape[3]
    group = c * factor_t * factor_s * factor_s // out_channels
    x = x.reshape(b, c, h // factor_s, factor_s, w // factor_s, factor_s)
    x = x.permute(0, 1, 3, 5, 2, 4)  # [B, C, fs, fs, h, w]
    x = x.reshape(b, c, 1, factor_s * factor_s, h // factor_s, w // factor_s)
    if factor_t == 2:
        x = torch.cat([torch.zeros_like(x), x], dim=2)  # [B, C, 2, fs*fs, h, w]; the pad frame comes first
    x = x.reshape(b, out_channels, group, h // factor_s, w // factor_s)  # [B, C_out, group, h, w]
    return x.mean(dim=2)


def dup_up(
    x: torch.Tensor, in_channels: int, out_channels: int, factor_s: int, factor_t: int
) -> torch.Tensor:
    """Repeat every channel, then depth-to-space by ``factor_s``; keeps the last temporal slot.

    The peer repeats each channel ``repeats`` times into C_out*ft*fs*fs channels ordered
    (o, t, row, col) and keeps t = ft - 1. Only the kept channels are gathered here, by index,
    so the discarded frame is never materialised (half the memory when ft = 2).
    """
    b, h, w = x.shape[0], x.shape[2], x.shape[3]
    per_out = factor_t * factor_s * factor_s
    repeats = out_channels * per_out // in_channels
    first = (factor_t - 1) * factor_s * factor_s
    src = [
        (o * per_out + first + s) // repeats for o in range(out_channels) for s in range(factor_s * factor_s)
    ]
    x = x.index_select(1, torch.tensor(src, device=x.device))  # [B, C_out*fs*fs, h, w]
    x = x.reshape(b, out_channels, factor_s, factor_s, h, w)
    x = x.permute(0, 1, 4, 2, 5, 3)  # [B, C_out, h, fs, w, fs]
    return x.reshape(b, out_channels, h * factor_s, w * factor_s)


def check_avg_down(in_channels: int, out_channels: int, factor: int) -> None:
    if in_channels * factor % out_channels:
        raise ConfigError(
            f"vae average-down shortcut: in_channels*factor = {in_channels}*{factor} must be a multiple of "
            f"out_channels {out_channels}"
        )


def check_dup_up(in_channels: int, out_channels: int, factor: int) -> None:
    if out_channels * factor % in_channels:
        raise ConfigError(
            f"vae duplicate-up shortcut: out_channels*factor = {out_channels}*{factor} must be a multiple of "
            f"in_channels {in_channels}"
        )


class RMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(C) and a per-channel gain.

    ``gamma`` keeps diffusers' shape: [C, 1, 1, 1] in residual blocks (a video norm) and
    [C, 1, 1] in attention blocks, so it is reshaped to [C, 1, 1] before use.
    """

    def __init__(self, dim: int, video_shape: bool = True) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1, 1) if video_shape else (dim, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # half-precision inputs are normalised in fp32, as the peer does
        half = x.dtype in (torch.float16, torch.bfloat16)
        y = F.normalize(x.float(), dim=1).to(x.dtype) if half else F.normalize(x, dim=1)
        return y * (self.scale * self.gamma.reshape(-1, 1, 1))


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = nn.Conv2d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.conv_shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each image."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.scale = dim**-0.5
        self.norm = RMSNorm(dim, video_shape=False)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape[0], self.dim, x.shape[2], x.shape[3]  # static C: the q/k/v split stays constant
        qkv = self.to_qkv(self.norm(x)).reshape(b, 3 * c, h * w).transpose(1, 2)  # [B, HW, 3C]
        q, k, v = qkv[..., :c], qkv[..., c : 2 * c], qkv[..., 2 * c :]  # each [B, HW, C]
        # written out rather than SDPA: the traced ONNX graph then has no If / Sqrt nodes
        weights = torch.softmax(torch.matmul(q, k.transpose(1, 2)) * self.scale, dim=-1)  # [B, HW, HW]
        y = torch.matmul(weights, v).transpose(1, 2).reshape(b, c, h, w)  # [B, C, H, W]
        return self.proj(y) + x


class MidBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        return self.resnets[1](self.attentions[0](x))


class Resample(nn.Module):
    """2x down (pad right/bottom, stride-2 conv) or 2x up (nearest, conv).

    ``temporal`` only adds the unused ``time_conv`` weights that diffusers' "3d" modes carry.
    """

    def __init__(self, dim: int, up: bool, temporal: bool) -> None:
        super().__init__()
        if up:
            # nearest-exact and nearest pick the same source pixels at an integer 2x scale
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(dim, dim, 3, padding=1)
            )
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if temporal:
            self.time_conv = nn.Conv2d(dim, dim * 2 if up else dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


class DownBlock(nn.Module):
    """Residual blocks, optional 2x downsample, plus an average-down shortcut around them."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, down: bool) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.factor_s = 2 if down else 1
        self.factor_t = 2 if temporal else 1
        check_avg_down(in_dim, out_dim, self.factor_t * self.factor_s**2)
        dims = [in_dim] + [out_dim] * num_res_blocks
        self.resnets = nn.ModuleList([ResidualBlock(i, o) for i, o in zip(dims[:-1], dims[1:])])
        self.downsampler = Resample(out_dim, up=False, temporal=temporal) if down else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = avg_down(x, self.in_dim, self.out_dim, self.factor_s, self.factor_t)
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsampler is not None:
            x = self.downsampler(x)
        return x + shortcut


class UpBlock(nn.Module):
    """``num_res_blocks + 1`` residual blocks, optional 2x upsample, duplicate-up shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, up: bool) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.factor_t = 2 if temporal else 1
        if up:
            check_dup_up(in_dim, out_dim, self.factor_t * 4)
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nn.ModuleList([ResidualBlock(i, o) for i, o in zip(dims[:-1], dims[1:])])
        self.upsampler = Resample(out_dim, up=True, temporal=temporal) if up else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = (
            dup_up(x, self.in_dim, self.out_dim, 2, self.factor_t) if self.upsampler is not None else None
        )
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsampler is not None:
            x = self.upsampler(x) + shortcut
        return x
