"""The torch-free denoising loop over exported graphs: ``Pipeline.load(...).generate(...)``.

Everything here is numpy plus a backend: tokenization and templates, rope tables and masks,
the seeded noise, the sigma schedule, the Euler update, guidance, latent normalisation and the
PIL image. The reference pipeline calls the same numpy functions, so the two agree image for image.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from runtime import schedule
from runtime.backends import make_backend
from runtime.errors import InputError, ManifestError, NumericalError
from runtime.layout import JointLayout, attention_mask, build_layout, rope_tables
from runtime.manifest import Manifest, load_manifest, resolve_path, sha256_file
from runtime.sampling import Request, initial_noise, make_request, to_images
from runtime.tokens import PromptTokenizer, mrope_position_ids, postprocess_hidden_states

log = logging.getLogger(__name__)

REQUIRED_GRAPHS = ("text_encoder", "transformer", "vae_decoder")


@dataclass
class StageTimes:
    """Wall time per stage of the last call (seconds), for benchmarks."""

    stages: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.stages.setdefault(name, []).append(seconds)


@dataclass(frozen=True)
class _Condition:
    text_states: np.ndarray  # [B, L_enc, ctx]
    layout: JointLayout
    feeds: dict[str, np.ndarray]  # prefix_index, rope_cos, rope_sin, attn_mask


class Pipeline:
    """Generation from an export directory. Thread-safe: calls share only read-only state."""

    def __init__(self, export_dir: Path, manifest: Manifest, sessions: dict, tokenizer: PromptTokenizer):
        self.export_dir = export_dir
        self.manifest = manifest
        self.sessions = sessions
        self.tokenizer = tokenizer
        model = manifest.model
        self._axes = tuple(model["transformer"]["axes_dims_rope"])
        self._theta = float(model["transformer"]["rope_theta"])
        self._channels = int(model["transformer"]["in_channels"])
        vae = model["vae"]
        self._mean = np.asarray(vae["latents_mean"], np.float32).reshape(1, -1, 1, 1)
        self._std = np.asarray(vae["latents_std"], np.float32).reshape(1, -1, 1, 1)
        self._scheduler = schedule.SchedulerConfig.from_dict(manifest.schedule["scheduler"])
        img = manifest.image
        self._res = int(img["output_resolution"])
        self._min_res, self._max_res = int(img["min_resolution"]), int(img["max_resolution"])
        self.last_times = StageTimes()

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, export_dir: str | os.PathLike, backend: str = "onnxruntime", *, providers: list[str] | None = None,
             threads: int | None = None, verify_hashes: bool = True) -> Pipeline:
        """Verify the manifest (hashes included by default) and open every graph."""
        export_dir = Path(export_dir)
        manifest = load_manifest(export_dir, verify_hashes=verify_hashes)
        missing = [g for g in REQUIRED_GRAPHS if g not in manifest.graphs]
        if missing:
            raise ManifestError(f"{export_dir}: graphs {missing} are required to generate; found {sorted(manifest.graphs)}")
        prompt = manifest.prompt
        tok_path = resolve_path(export_dir, prompt["tokenizer"])
        if verify_hashes and sha256_file(tok_path) != prompt["tokenizer_sha256"]:
            raise ManifestError(f"{tok_path}: sha256 does not match the manifest")
        tokenizer = PromptTokenizer.from_file(
            tok_path, system_prompt=prompt["system_prompt"], max_prompt_tokens=int(prompt["max_prompt_tokens"]),
            merge_size=int(manifest.image["vision"]["merge_size"]),
        )
        if tokenizer.drop_idx != int(prompt["drop_idx"]):
            raise ManifestError(
                f"{tok_path}: the system turn tokenizes to {tokenizer.drop_idx} tokens, manifest says {prompt['drop_idx']}"
            )
        options = {"providers": providers, "threads": threads} if backend == "onnxruntime" else {}
        be = make_backend(backend, **options)
        start = time.perf_counter()
        sessions = {name: be.open(spec, resolve_path(export_dir, spec.file)) for name, spec in manifest.graphs.items()}
        log.info("opened %d graphs in %.2f s", len(sessions), time.perf_counter() - start)
        return cls(export_dir, manifest, sessions, tokenizer)

    # ------------------------------------------------------------------ public API

    def generate(self, prompt: str | Sequence[str], *, negative_prompt: str | Sequence[str] | None = None,
                 width: int | None = None, height: int | None = None, steps: int | None = None,
                 guidance: float | None = None, seed: int | None = None,
                 callback: Callable[[int, int, np.ndarray], None] | None = None, latents: np.ndarray | None = None,
                 output: str = "pil") -> Image.Image | list[Image.Image]:
        """Text to image. One prompt gives one PIL image, a list of prompts a list."""
        request = self._request(prompt, negative_prompt, width, height, steps, guidance, seed, (self._res, self._res))
        images = self._sample(request, callback, latents, output)
        return images[0] if isinstance(prompt, str) and output == "pil" else images

    # ------------------------------------------------------------------ internals

    def _request(self, prompt, negative_prompt, width, height, steps, guidance, seed, default_size) -> Request:
        sched = self.manifest.schedule
        sigmas = sched.get("sigmas")
        if steps is None:
            steps = len(sigmas) if sigmas else int(sched["num_steps"])
        if guidance is None:
            guidance = float(sched["guidance_scale"])
        if negative_prompt is None and isinstance(guidance, (int, float)) and guidance > 1:
            negative_prompt = sched.get("default_negative_prompt")
        request = make_request(prompt, negative_prompt, width, height, steps, guidance, seed, default_size)
        for name, value in (("width", request.width), ("height", request.height)):
            if not self._min_res <= value <= self._max_res:
                raise InputError(
                    f"{name} {value}: outside the exported range {self._min_res}..{self._max_res} pixels "
                    "(re-export with a larger --max-resolution)"
                )
        if sched.get("guidance_distilled") and request.use_guidance:
            log.warning("this export has guidance distilled in; negative_prompt/guidance double-apply it")
        return request

    def _run(self, graph: str, feeds: dict[str, np.ndarray], step: int | None = None) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        out = self.sessions[graph].run(feeds)
        self.last_times.add(graph, time.perf_counter() - start)
        for name, arr in out.items():
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                where = f" at step {step}" if step is not None else ""
                raise NumericalError(f"{graph} output {name!r}: NaN or Inf{where}; refusing to continue")
        return out

    def _encode(self, prompts: Sequence[str], target_shape: tuple[int, int]) -> _Condition:
        start = time.perf_counter()
        batch = self.tokenizer.encode(list(prompts))
        positions = mrope_position_ids(batch, self.tokenizer.merge_size)
        self.last_times.add("tokenize", time.perf_counter() - start)
        hidden = self._run("text_encoder", {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                                            "position_ids": positions})["hidden_states"]
        start = time.perf_counter()
        states, mask, pad = postprocess_hidden_states(hidden, batch)
        layout = build_layout(pad[0], mask, [], target_shape)
        cos, sin = rope_tables(layout.position_ids, self._axes, self._theta)
        feeds = {"prefix_index": layout.prefix_index, "rope_cos": cos, "rope_sin": sin,
                 "attn_mask": attention_mask(layout.block_ids, layout.key_valid)}
        self.last_times.add("layout", time.perf_counter() - start)
        return _Condition(states.astype(np.float32), layout, feeds)

    def _velocity(self, cond: _Condition, x: np.ndarray, cond_latents: np.ndarray, sigma: float, step: int):
        feeds = {"latents": x, "text_states": cond.text_states,
                 "timestep": np.full((x.shape[0],), sigma, dtype=np.float32), "cond_latents": cond_latents,
                 **cond.feeds}
        return self._run("transformer", feeds, step)["velocity"]

    def _sample(self, request: Request, callback, latents, output):
        self.last_times = StageTimes()
        batch = len(request.prompts)
        h, w = request.latent_shape
        positive = self._encode(request.prompts, (h, w))
        negative = self._encode(request.negative_prompts, (h, w)) if request.use_guidance else None
        if request.negative_prompts is not None and not request.use_guidance:
            log.warning("negative_prompt is ignored: guidance %.2f <= 1 disables it", request.guidance)
        cond_latents = np.zeros((batch, 0, self._channels), np.float32)
        if latents is None:
            latents = initial_noise(request.seed, batch, request.height, request.width, self._channels)
        x = np.asarray(latents, dtype=np.float32)
        if x.shape != (batch, h * w, self._channels):
            raise InputError(f"latents: expected float32[{batch}, {h * w}, {self._channels}], got {list(x.shape)}")
        sched = self.manifest.schedule
        sigmas = schedule.make_sigmas(request.steps, h * w, self._scheduler, fixed_sigmas=sched.get("sigmas"))
        for i in range(request.steps):
            v = self._velocity(positive, x, cond_latents, sigmas[i], i)
            start = time.perf_counter()
            if negative is not None:
                v_neg = self._velocity(negative, x, cond_latents, sigmas[i], i)
                start = time.perf_counter()
                v = schedule.apply_guidance(v, v_neg, request.guidance)
            x = schedule.euler_step(x, v, sigmas[i], sigmas[i + 1])
            self.last_times.add("update", time.perf_counter() - start)
            if callback is not None:
                callback(i, request.steps, x)
        if output == "latent":
            return x
        pixels = self.decode_pixels(x, h, w)
        if output == "np":
            return np.clip(pixels.transpose(0, 2, 3, 1) / 2 + 0.5, 0.0, 1.0)
        start = time.perf_counter()
        images = to_images(pixels)
        self.last_times.add("to_image", time.perf_counter() - start)
        return images

    def decode_pixels(self, packed: np.ndarray, h: int, w: int) -> np.ndarray:
        """Packed normalised latents ``[B, h*w, C]`` -> pixels ``[B, 4, H, W]`` in [-1, 1]."""
        b, _, c = packed.shape
        z = packed.transpose(0, 2, 1).reshape(b, c, h, w) * self._std + self._mean  # [B, C, h, w]
        return self._run("vae_decoder", {"latents": z.astype(np.float32)})["image"]


def load(export_dir: str | os.PathLike, **kwargs) -> Pipeline:
    return Pipeline.load(export_dir, **kwargs)


__all__ = ["Pipeline", "load", "NumericalError"]
