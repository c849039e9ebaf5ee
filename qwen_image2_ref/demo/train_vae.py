"""Stage 1 of the demo trainer: the f16c64 RGBA VAE on rendered scenes.

What made a small VAE sharp (reference/demo-model-notes.md): deterministic latents (the posterior
mode, which ``QwenImageVAE.encode`` returns), a per-pixel weight of 1 + 10 on shape pixels + 10 on
a ~4 px band along every outline (a plain L1+L2 loss washes the colors out: the background
dominates the pixel count), and an L1 loss on x/y finite differences, which rewards crisp edges
and so keeps triangle corners from coming back rounded.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qwen_image2_ref.config import VAEConfig
from qwen_image2_ref.demo import data, judge
from qwen_image2_ref.demo.resume import TrainState, run_steps
from qwen_image2_ref.demo.resume import start as resume_or_start
from qwen_image2_ref.vae import QwenImageVAE, unpatchify

log = logging.getLogger(__name__)

FG_WEIGHT = 10.0
EDGE_WEIGHT = 10.0
EDGE_RADIUS = 2  # band of 2 * 2 + 1 ~ 4-5 px along every outline
FD_WEIGHT = 1.0


@dataclass(frozen=True)
class VAESettings:
    steps: int = 900
    batch: int = 24
    lr: float = 2e-3
    warmup: int = 50
    pool_128: int = 6000  # 128x128 renders
    pool_other: int = 800  # per other aspect ratio (192x128, 128x192)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 RGBA [N, H, W, 4] -> float32 [N, 4, H, W] in [-1, 1] (``qwen_image_edge.runtime.images.vae_input`` at
    the image's own size, without the PIL round trip)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [N, 4, H, W]


def pixel_weights(x: torch.Tensor) -> torch.Tensor:
    """[B, 4, H, W] targets -> [B, 1, H, W] weights: 1 + FG on non-background + EDGE near outlines."""
    bg = x[:, :, :1, :1]  # renders have a uniform background: the corner pixel is its colour
    fg = ((x - bg).abs().amax(dim=1, keepdim=True) > 0.1).float()  # [B, 1, H, W]
    k = 2 * EDGE_RADIUS + 1
    dilated = F.max_pool2d(fg, k, stride=1, padding=EDGE_RADIUS)
    eroded = -F.max_pool2d(-fg, k, stride=1, padding=EDGE_RADIUS)
    return 1.0 + FG_WEIGHT * fg + EDGE_WEIGHT * (dilated - eroded)


def vae_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Weighted L1 + L2 on pixels plus weighted L1 on x/y finite differences."""
    w = pixel_weights(target)
    d = pred - target
    pix = (w * (d.abs() + d.square())).mean()
    dx = (pred.diff(dim=3) - target.diff(dim=3)).abs() * w[..., 1:]
    dy = (pred.diff(dim=2) - target.diff(dim=2)).abs() * w[..., 1:, :]
    return pix + FD_WEIGHT * (dx.mean() + dy.mean())


def reconstruct_train(vae: QwenImageVAE, x: torch.Tensor) -> torch.Tensor:
    """Encode (mode) and decode without the final clamp, so saturated pixels still get gradients."""
    z = vae.encode(x)  # [B, z, h, w]
    out = vae.decoder(vae.post_quant_conv(z))
    return unpatchify(out, vae.patch) if vae.patch > 1 else out


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def render_pool(settings: VAESettings, seed: int) -> list[np.ndarray]:
    """Image pools, one per size, from training scenes only (held-out combinations never appear)."""
    pools = [data.make_dataset(settings.pool_128, seed, 128, 128).images]
    for i, (w, h) in enumerate(data.SIZES[1:]):
        if settings.pool_other:
            pools.append(data.make_dataset(settings.pool_other, seed + 1 + i, w, h).images)
    return pools


def train_vae(config: VAEConfig, settings: VAESettings, seed: int, progress: bool = True,
              checkpoint: Path | None = None, resume: bool = False,
              every_s: float = 600.0) -> tuple[QwenImageVAE, list[float], dict]:
    """Train a VAE from scratch, or continue ``checkpoint`` (``resume``), for ``settings.steps`` steps."""
    t0 = time.time()
    pools = render_pool(settings, seed)
    log.info("vae: rendered %s images in %.1f s", [len(p) for p in pools], time.time() - t0)
    torch.manual_seed(seed)
    vae = QwenImageVAE(config)
    opt = torch.optim.Adam(vae.parameters(), lr=settings.lr, betas=(0.9, 0.99))
    state = TrainState({"vae": vae}, opt, np.random.default_rng(seed + 100), torch.Generator().manual_seed(seed),
                       settings.steps, {"seed": seed, **dataclasses.asdict(settings)})

    def step(st: TrainState) -> float:
        # every 6th batch (when there is one) is another aspect ratio
        i = st.step
        pool = pools[1 + (i // 6) % (len(pools) - 1)] if len(pools) > 1 and i % 6 == 5 else pools[0]
        x = to_pixels(pool[st.rng.integers(len(pool), size=settings.batch)])
        for g in opt.param_groups:
            g["lr"] = lr_at(i, st.total, settings.lr, settings.warmup)
        loss = vae_loss(reconstruct_train(vae, x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return loss.item()

    vae.train()
    if not resume_or_start(state, checkpoint, resume):
        run_steps(state, step, checkpoint, every_s, "vae", progress, log_every=100)
    vae.eval()
    return vae, state.losses, {"steps": state.step, "seconds": round(time.time() - t0, 1)}


@torch.no_grad()
def evaluate_vae(vae: QwenImageVAE, n: int = 96, seed: int = 12345) -> dict[str, float]:
    """PSNR and the judge's readback of reconstructions of held-out single-object scenes."""
    ds = data.make_dataset(n, seed, split="heldout", n_objects=1, glyph_prob=0.3)
    x = to_pixels(ds.images)
    y = torch.cat([vae.decode(vae.encode(x[i:i + 32])) for i in range(0, n, 32)])
    mse = float((y - x).square().mean())
    imgs = np.round(((y.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()).astype(np.uint8)
    scores = [judge.score(judge.judge(im), sc) for im, sc in zip(imgs, ds.scenes)]
    out = {"psnr_db": round(10 * math.log10(4.0 / max(mse, 1e-12)), 2)}
    for key in ("color", "shape", "position", "background", "glyph"):
        out[key] = round(float(np.mean([s[key] for s in scores])), 3)
    return out
