"""The torch reference sampling loop: text-to-image and edit.

Everything that is not network math comes from ``runtime`` (request resolution, condition-image
checks, noise, schedule, Euler step, guidance, layout, image rules, pixels -> PIL), so the runtime
reproduces this loop image for image. Same return convention as the runtime: for
``output="pil"`` one image for a prompt string, a list for a list; ``"np"``/``"latent"`` batched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from qwen_image2_ref.config import ModelConfig
from qwen_image2_ref.transformer import QwenImageTransformer, cache_inputs, check_inputs, layout_inputs
from qwen_image2_ref.vae import QwenImageVAE, pack_latents, unpack_latents
from qwen_image_edge.runtime import images as rimages
from qwen_image_edge.runtime import schedule
from qwen_image_edge.runtime.edit import condition_images
from qwen_image_edge.runtime.errors import InputError, NumericalError
from qwen_image_edge.runtime.layout import build_layout
from qwen_image_edge.runtime.sampling import (
    Request,
    convert_pixels,
    diffusers_aliases,
    initial_noise,
    one_or_list,
    resolve_request,
)

log = logging.getLogger(__name__)


@dataclass
class Condition:
    """One prompt set encoded for the transformer (positive or negative)."""

    text_states: torch.Tensor  # [B, L_enc, ctx]
    layout_inputs: dict[str, torch.Tensor]
    layout: object
    kv_cache: torch.Tensor | None = None  # [layers, 2, B, L_prefix, H, Dh] once prefilled
    step_inputs: dict[str, torch.Tensor] | None = None


class QwenImagePipeline:
    def __init__(self, config: ModelConfig, transformer: QwenImageTransformer, vae: QwenImageVAE, encoder,
                 *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 use_kv_cache: bool = False):
        self.config = config
        self.transformer = transformer.eval()
        self.vae = vae.eval()
        self.encoder = encoder
        self.device = torch.device(device)
        self.dtype = dtype
        # Text and condition keys/values computed once instead of at every step (causal_condition models).
        self.use_kv_cache = use_kv_cache

    # ------------------------------------------------------------------ public API

    @torch.inference_mode()
    def generate(self, prompt: str | Sequence[str], *, negative_prompt: str | Sequence[str] | None = None,
                 width: int | None = None, height: int | None = None, steps: int | None = None,
                 guidance: float | None = None, seed: int | None = None, latents: np.ndarray | None = None,
                 callback: Callable[[int, int, np.ndarray], None] | None = None, progress: bool = True,
                 output: str = "pil", **diffusers_names):
        """Text to image: one PIL RGBA image for a prompt string, a list for a list of prompts
        (``output="np"``: ``[B, H, W, 4]`` in [0, 1]; ``"latent"``: packed latents). diffusers'
        ``num_inference_steps`` / ``guidance_scale`` are accepted for ``steps`` / ``guidance``."""
        steps, guidance = diffusers_aliases("generate", diffusers_names, steps=steps, guidance=guidance)
        res = self.config.pipeline.output_resolution
        request = self._request(prompt, negative_prompt, width, height, steps, guidance, seed, (res, res), output)
        return one_or_list(self._sample(request, [], [], latents, callback, progress), prompt, output)

    @torch.inference_mode()
    def edit(self, images, instruction: str | Sequence[str], *, negative_prompt=None, width: int | None = None,
             height: int | None = None, steps: int | None = None, guidance: float | None = None,
             seed: int | None = None, latents: np.ndarray | None = None, callback=None, progress: bool = True,
             output: str = "pil", **diffusers_names):
        """Edit one or more condition images as the instruction says. Output size follows the last image;
        returns as :meth:`generate` does."""
        steps, guidance = diffusers_aliases("edit", diffusers_names, steps=steps, guidance=guidance)
        pcfg = self.config.pipeline
        pil_images, sizes = condition_images(images, pcfg.max_condition_images, pcfg.output_resolution)
        request = self._request(instruction, negative_prompt, width, height, steps, guidance, seed, sizes[-1], output)
        return one_or_list(self._sample(request, pil_images, sizes, latents, callback, progress), instruction, output)

    # ------------------------------------------------------------------ internals

    def _request(self, prompt, negative_prompt, width, height, steps, guidance, seed, default_size, output) -> Request:
        # the sampling defaults as an export writes them
        return resolve_request(prompt, negative_prompt, width, height, steps, guidance, seed, default_size=default_size,
                               schedule=self.config.pipeline.schedule_section(),
                               vae_factor=self.config.vae.scale_factor_spatial, output=output)

    def _encode(self, prompts, vl_images, cond_shapes, target_shape) -> Condition:
        return self._condition(*self.encoder.encode(list(prompts), vl_images or None), cond_shapes, target_shape)

    def _condition(self, states, mask, pad, cond_shapes, target_shape) -> Condition:
        """Encoder output (states, mask, image-slot mask) -> the transformer's condition inputs."""
        pad = np.asarray(pad.cpu().numpy() if torch.is_tensor(pad) else pad, dtype=bool)
        mask = np.asarray(mask.cpu().numpy() if torch.is_tensor(mask) else mask, dtype=bool)
        if not (pad == pad[:1]).all():
            raise InputError("prompts in one batch must place their condition images at the same positions")
        layout = build_layout(pad[0], mask, cond_shapes, target_shape)
        inputs = layout_inputs(layout, self.transformer.config, self.device)
        return Condition(states.to(self.device, self.dtype), inputs, layout)

    def _condition_latents(self, pil_images, sizes, batch: int) -> torch.Tensor:
        packed = []
        for im, (w, h) in zip(pil_images, sizes):
            pixels = torch.from_numpy(rimages.vae_input(im, w, h)).to(self.device, self.dtype)  # [1, 4, H, W]
            packed.append(pack_latents(self.vae.encode_normalized(pixels)))  # [1, h*w, C]
        cond = torch.cat(packed, dim=1) if packed else torch.zeros(1, 0, self.transformer.config.in_channels)
        return cond.to(self.device, self.dtype).expand(batch, -1, -1)  # [B, N_c, C]

    def _velocity(self, cond: Condition, x: torch.Tensor, cond_latents: torch.Tensor, sigma: float) -> torch.Tensor:
        # sigma stays fp32: the transformer takes 1000 * sigma into its sinusoids, where bf16's rounding
        # of sigma (2^-9 relative) would move the phases by up to ~2 rad (the exported graph's timestep is fp32 too)
        t = torch.full((x.shape[0],), float(sigma), device=self.device, dtype=torch.float32)
        x = x.to(self.dtype)
        if cond.kv_cache is not None:
            return self.transformer.step(x, t, cond.kv_cache, **cond.step_inputs)
        return self.transformer(x, cond.text_states, t, cond_latents, **cond.layout_inputs)

    def _prefill(self, cond: Condition, cond_latents: torch.Tensor) -> None:
        """Text and condition-image keys/values once per prompt set, reused by every step."""
        prefill_kw, cond.step_inputs = cache_inputs(cond.layout, self.transformer.config, self.device)
        cond.kv_cache = self.transformer.prefill(cond.text_states, cond_latents, **prefill_kw)

    def _sample(self, request: Request, pil_images, sizes, latents, callback, progress):
        batch = len(request.prompts)
        target_shape = request.latent_shape
        f = request.vae_factor
        cond_shapes = [(h // f, w // f) for w, h in sizes]
        vl_images = [rimages.resize_rgba(im, w, h) for im, (w, h) in zip(pil_images, sizes)]
        positive = self._encode(request.prompts, vl_images, cond_shapes, target_shape)
        negative = None
        if request.use_guidance:
            negative = self._encode(request.negative_prompts, vl_images, cond_shapes, target_shape)
        cond_latents = self._condition_latents(pil_images, sizes, batch)

        channels = self.transformer.config.in_channels
        if latents is None:
            latents = initial_noise(request.seed, batch, request.height, request.width, channels, f)
        # the latent state is kept in fp32 between steps, as the runtime keeps it; only the transformer's
        # input is cast to the model's dtype (a bf16 state would round every Euler update by 2^-9)
        x = torch.from_numpy(np.asarray(latents, dtype=np.float32)).to(self.device)
        check_inputs(positive.layout, x, positive.text_states, cond_latents)
        if self.use_kv_cache and self.transformer.config.causal_condition:
            for cond in (positive, negative):
                if cond is not None:
                    self._prefill(cond, cond_latents)

        pcfg = self.config.pipeline
        sigmas = schedule.make_sigmas(request.steps, x.shape[1], pcfg.scheduler, fixed_sigmas=pcfg.sample_sigmas)
        for i in tqdm(range(request.steps), desc="denoising", disable=not progress, leave=False):
            # velocities in fp32 from here on (guidance and the update), as the runtime computes them
            v = _finite(self._velocity(positive, x, cond_latents, sigmas[i]), "transformer output 'velocity'", i).float()
            if negative is not None:
                v_neg = _finite(self._velocity(negative, x, cond_latents, sigmas[i]), "transformer output 'velocity'",
                                i).float()
                v = schedule.apply_guidance(v, v_neg, request.guidance)
            x = schedule.euler_step(x.float(), v.float(), sigmas[i], sigmas[i + 1])  # fp32 in, fp32 out
            if callback is not None:
                callback(i, request.steps, x.float().cpu().numpy())
        if request.output == "latent":
            return x.float().cpu().numpy()
        return convert_pixels(self.decode_pixels(x, request.height, request.width), request.output)

    def decode_pixels(self, packed: torch.Tensor, height: int, width: int) -> np.ndarray:
        """Packed normalised latents -> float32 pixels ``[B, 4, H, W]`` in [-1, 1]."""
        f = self.config.vae.scale_factor_spatial
        z = unpack_latents(packed, height // f, width // f)  # [B, C, h, w]
        return _finite(self.vae.decode_normalized(z.to(self.dtype)), "vae_decoder output 'image'").float().cpu().numpy()


def _finite(t: torch.Tensor, what: str, step: int | None = None) -> torch.Tensor:
    """``t``, or a NumericalError naming the output and the step, as the runtime stops: a NaN would
    otherwise reach the pixels and come out as an all-black image."""
    if not bool(torch.isfinite(t).all()):
        where = f" at step {step}" if step is not None else ""
        raise NumericalError(f"{what}: NaN or Inf{where}; refusing to continue")
    return t
