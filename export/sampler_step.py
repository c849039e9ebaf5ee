"""The ``sampler_step`` graph: guidance, the Euler update and the decoder's input, on the device.

A loop that keeps its latents on the device (``qwen_image_edge.runtime.device_loop``) cannot run
the numpy update, so this tiny graph runs it with the same backend. It computes exactly what the
host loop does (``qwen_image_edge.runtime.schedule.apply_guidance`` and ``euler_step``), in float32:

    v = velocity_uncond + guidance * (velocity - velocity_uncond)
    latents_next = latents + (sigma_next - sigma) * v

and, from ``latents_next``, the VAE decoder's input: unpacked ``[B, C, h, w]`` and denormalised
with the VAE's latent statistics (``Pipeline.decode_pixels`` on the host), so the final latents go
to the decoder without leaving the device. ``latent_grid`` is a shape-only input: its dims give
``h, w`` (its values are never read). Without guidance the loop feeds ``velocity`` twice and
``guidance = 1``: ``v + 1 * 0`` is ``v`` exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen_image2_ref.config import ModelConfig
from qwen_image2_ref.vae import QwenImageVAE
from qwen_image_edge.export.iospec import GraphIO, _t, transformer_io, vae_decoder_io
from qwen_image_edge.runtime.manifest import GraphSpec, Manifest


def sampler_step_io(cfg: ModelConfig, max_resolution: int) -> GraphIO:
    c = cfg.transformer.in_channels
    full, vae = transformer_io(cfg, max_resolution), vae_decoder_io(cfg, max_resolution)
    latents = _t("latents", "float32", "B", "N_t", c)
    return GraphIO(
        "sampler_step",
        inputs=(
            latents,
            _t("velocity", "float32", "B", "N_t", c),
            _t("velocity_uncond", "float32", "B", "N_t", c),  # = velocity without guidance
            _t("guidance", "float32", 1),
            _t("sigma", "float32", 1),
            _t("sigma_next", "float32", 1),
            _t("latent_grid", "bool", "h", "w"),  # shape only: h * w = N_t
        ),
        outputs=(
            _t("latents_next", "float32", "B", "N_t", c),
            _t("vae_latents", "float32", "B", cfg.vae.z_dim, "h", "w"),  # the vae_decoder's input
        ),
        dim_ranges={"B": full.dim_ranges["B"], "N_t": full.dim_ranges["N_t"],
                    "h": vae.dim_ranges["h"], "w": vae.dim_ranges["w"]},
    )


class SamplerStepGraph(nn.Module):
    """See the module docstring. Holds no weights: the VAE's latent mean/std are constants."""

    def __init__(self, vae: QwenImageVAE) -> None:
        super().__init__()
        cfg = vae.config
        # [1, C, 1, 1]: fp32 whatever the VAE's dtype, as the host's decode_pixels computes it
        self.register_buffer("mean", torch.tensor(cfg.latents_mean, dtype=torch.float32).reshape(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(cfg.latents_std, dtype=torch.float32).reshape(1, -1, 1, 1),
                             persistent=False)

    def forward(self, latents, velocity, velocity_uncond, guidance, sigma, sigma_next, latent_grid):
        v = velocity_uncond + guidance * (velocity - velocity_uncond)  # [B, N_t, C]
        x = latents + (sigma_next - sigma) * v
        b, _, c = x.shape
        h, w = latent_grid.shape
        z = x.transpose(1, 2).reshape(b, c, h, w) * self.std + self.mean  # [B, C, h, w]
        return x, z


def sampler_step_inputs(cfg: ModelConfig, batch: int, h: int, w: int, guidance: float = 4.0,
                        sigmas: tuple[float, float] = (0.75, 0.5), seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    c = cfg.transformer.in_channels
    x, v, vu = (torch.randn(batch, h * w, c, generator=gen) for _ in range(3))
    scalar = lambda s: torch.tensor([s], dtype=torch.float32)  # noqa: E731
    return x, v, vu, scalar(guidance), scalar(sigmas[0]), scalar(sigmas[1]), torch.zeros(h, w, dtype=torch.bool)


def sampler_step_example(cfg: ModelConfig) -> tuple:
    return sampler_step_inputs(cfg, 2, 3, 5)


def sampler_step_cases(model, spec: GraphSpec, export_dir=None, manifest: Manifest | None = None):
    """Batch, grid and guidance at several values (guidance 1: the no-guidance feed), inside the
    declared ranges; the reference is the torch module (the host loop's formula in float32)."""
    module = SamplerStepGraph(model.vae).eval()
    r = spec.dim_ranges
    for b, h, w, g in [(1, 2, 2, 1.0), (2, 4, 3, 4.5), (1, 3, 4, 2.0), (1, 8, 8, 1.0)]:
        if not all(r[k][0] <= n <= r[k][2] for k, n in (("B", b), ("h", h), ("w", w), ("N_t", h * w))):
            continue
        args = sampler_step_inputs(model.config, b, h, w, guidance=g, sigmas=(0.9 - 0.1 * h, 0.4), seed=h + b)
        feeds = {t.name: a.numpy() for t, a in zip(spec.inputs, args)}
        yield f"B={b} h={h} w={w} guidance={g}", feeds, (lambda a=args: module(*a)), None

