"""The torch-free denoising loop over exported graphs: ``Pipeline.load(...).generate(...)``.

Everything here is numpy plus a backend: tokenization and templates, rope tables and masks,
the seeded noise, the sigma schedule, the Euler update, guidance, latent normalisation and the
PIL image. The reference pipeline calls the same numpy functions, so the two agree image for image.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from qwen_image_edge.runtime import images as rimages
from qwen_image_edge.runtime import kv_cache as kv
from qwen_image_edge.runtime import schedule
from qwen_image_edge.runtime.backends import make_backend
from qwen_image_edge.runtime.errors import InputError, ManifestError, NumericalError
from qwen_image_edge.runtime.layout import JointLayout, attention_mask, build_layout, rope_tables
from qwen_image_edge.runtime.manifest import KV_CACHE_GRAPHS, Manifest, load_manifest, resolve_path, sha256_file
from qwen_image_edge.runtime.sampling import Request, initial_noise, make_request, to_images
from qwen_image_edge.runtime.tokens import PromptTokenizer, mrope_position_ids, postprocess_hidden_states
from qwen_image_edge.runtime.vision import VisionTower, vision_feeds, visual_index

log = logging.getLogger(__name__)

REQUIRED_GRAPHS = ("text_encoder", "transformer", "vae_decoder")
EDIT_GRAPHS = ("vision_encoder", "vae_encoder")
VISUAL_INPUTS = ("visual_embeds", "deepstack_embeds", "visual_index")


@dataclass
class StageTimes:
    """Wall time per stage of the last call (seconds), for benchmarks."""

    stages: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.stages.setdefault(name, []).append(seconds)


@dataclass(frozen=True)
class _Images:
    """Condition images of an edit, encoded once for every prompt of the call."""

    grid_thw: np.ndarray  # [n_images, 3] vision grids
    visual_embeds: np.ndarray  # [N_vis, D]
    deepstack_embeds: np.ndarray  # [n_ds, N_vis, D]
    latents: np.ndarray  # [1, N_c, C] packed, normalised
    cond_shapes: tuple[tuple[int, int], ...]  # latent (h, w) per image


@dataclass(frozen=True)
class _Condition:
    text_states: np.ndarray  # [B, L_enc, ctx]
    layout: JointLayout
    feeds: dict[str, np.ndarray]  # single graph: prefix_index, rope_cos, rope_sin, attn_mask; pair: the prefill's
    step_feeds: dict[str, np.ndarray] | None = None  # pair: rope_cos, rope_sin, key_mask of the target rows
    cache: kv.KVCache | None = None  # pair: the prefilled keys/values


class Pipeline:
    """Generation from an export directory. Thread-safe: calls share only read-only state."""

    def __init__(self, export_dir: Path, manifest: Manifest, sessions: dict, tokenizer: PromptTokenizer):
        self.export_dir = export_dir
        self.manifest = manifest
        self.sessions = sessions
        self.tokenizer = tokenizer
        self.uses_kv_cache = all(g in sessions for g in KV_CACHE_GRAPHS)  # else the single transformer graph
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
        target = img.get("target") or {}  # exports before area-sized ranges: squares up to max_resolution
        self._max_side = int(target.get("max_side", self._max_res))
        self._max_tokens = int(target.get("max_tokens", (self._max_res // 16) ** 2))
        self.last_times = StageTimes()

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, export_dir: str | os.PathLike, backend: str = "onnxruntime", *, providers: list[str] | None = None,
             threads: int | None = None, verify_hashes: bool = True,
             backend_options: dict | None = None, kv_cache: bool | None = None) -> Pipeline:
        """Verify the manifest (hashes included by default) and open the graphs a generation uses.

        ``kv_cache``: None uses the condition KV cache pair (``transformer_prefill`` +
        ``transformer_step``) when the export has it, the single ``transformer`` graph otherwise;
        False forces the single graph (benchmarks); True requires the pair. Only one of the two
        transformer forms is opened.
        """
        export_dir = Path(export_dir)
        manifest = load_manifest(export_dir, verify_hashes=verify_hashes)
        missing = [g for g in REQUIRED_GRAPHS if g not in manifest.graphs]
        if missing:
            raise ManifestError(f"{export_dir}: graphs {missing} are required to generate; found {sorted(manifest.graphs)}")
        pair = kv.has_pair(manifest)
        if kv_cache and not pair:
            raise ManifestError(f"{export_dir}: kv_cache=True needs the graphs {list(KV_CACHE_GRAPHS)}; found "
                                f"{sorted(manifest.graphs)}; re-export to add them")
        use_pair = pair if kv_cache is None else kv_cache
        unused = {"transformer"} if use_pair else set(KV_CACHE_GRAPHS)
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
        if backend == "onnxruntime":
            options = {"providers": providers, "threads": threads}
        else:  # engines are listed in the manifest, which is already verified here
            options = {"export_dir": export_dir, "manifest": manifest, **(backend_options or {})}
        be = make_backend(backend, **options)
        start = time.perf_counter()
        sessions = {name: be.open(spec, resolve_path(export_dir, spec.file))
                    for name, spec in manifest.graphs.items() if name not in unused}
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

    def edit(self, images, instruction: str | Sequence[str], *, negative_prompt: str | Sequence[str] | None = None,
             width: int | None = None, height: int | None = None, steps: int | None = None,
             guidance: float | None = None, seed: int | None = None,
             callback: Callable[[int, int, np.ndarray], None] | None = None, latents: np.ndarray | None = None,
             output: str = "pil") -> Image.Image | list[Image.Image]:
        """Edit one or more condition images (paths, PIL images or uint8 arrays) as the instruction says.

        Each image is resized to about ``output_resolution**2`` pixels (multiples of 32, its aspect
        kept), so its own pixel size does not matter; the output size follows the last image unless
        ``width``/``height`` are given. Refused with an InputError: an unreadable or empty image, a
        resized side outside the exported range (an extreme aspect ratio), more images than the
        model takes or than the exported token ranges hold.
        """
        from qwen_image_edge.runtime.edit import load_condition_images

        missing = [g for g in EDIT_GRAPHS if g not in self.manifest.graphs]
        te_inputs = [t.name for t in self.manifest.graph("text_encoder").inputs]
        if missing or not set(VISUAL_INPUTS) <= set(te_inputs):
            raise ManifestError(f"{self.export_dir}: this export cannot edit: it lacks graphs {missing} or the text "
                                "encoder's visual inputs; re-export with the vision_encoder and vae_encoder graphs")
        start = time.perf_counter()
        pil, sizes = load_condition_images(images, self.manifest, self._res)
        request = self._request(instruction, negative_prompt, width, height, steps, guidance, seed, sizes[-1])
        self.last_times = StageTimes()
        self.last_times.add("preprocess", time.perf_counter() - start)
        encoded = self._encode_images(pil, sizes)
        out = self._sample(request, callback, latents, output, encoded, reset_times=False)
        return out[0] if isinstance(instruction, str) and output == "pil" else out

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
            if not self._min_res <= value <= self._max_side:
                raise InputError(
                    f"{name} {value}: outside the exported range {self._min_res}..{self._max_side} pixels "
                    "(re-export with a larger --max-resolution)"
                )
        tokens = (request.width // 16) * (request.height // 16)
        if tokens > self._max_tokens:
            raise InputError(
                f"size {request.width}x{request.height}: {tokens} latent tokens, but this export holds at most "
                f"{self._max_tokens} (squares up to {self._max_res} px, other aspects at about {self._res}^2 pixels); "
                "re-export with a larger --max-resolution"
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

    def _encode_images(self, pil: list[Image.Image], sizes: list[tuple[int, int]]) -> _Images:
        """vision_encoder on the images resized as the reference does (RGBA composited on white for
        the vision tower, all four channels for the VAE), vae_encoder -> normalised packed latents."""
        from qwen_image_edge.runtime.edit import check_range

        start = time.perf_counter()
        resized = [rimages.resize_rgba(im, w, h) for im, (w, h) in zip(pil, sizes)]
        pixel_values, grid = rimages.vision_patches(resized, rimages.VisionConfig.from_dict(self.manifest.image["vision"]))
        feeds = vision_feeds(pixel_values, grid, VisionTower(**self.manifest.image["vision_tower"]))
        self.last_times.add("preprocess", time.perf_counter() - start)
        check_range(self.manifest.graph("vision_encoder"), "N_p", pixel_values.shape[0], "vision patches", len(pil))
        vis = self._run("vision_encoder", feeds)
        packed = []
        for im, (w, h) in zip(pil, sizes):
            z = self._run("vae_encoder", {"image": rimages.vae_input(im, w, h)})["latents"]  # [1, C, h, w]
            z = (z - self._mean) / self._std
            packed.append(z.reshape(1, z.shape[1], -1).transpose(0, 2, 1))  # [1, h*w, C]
        latents = np.concatenate(packed, axis=1).astype(np.float32)  # [1, N_c, C]
        shapes = tuple((h // 16, w // 16) for w, h in sizes)
        return _Images(grid, vis["visual_embeds"], vis["deepstack_embeds"], latents, shapes)

    def _visual_feeds(self, batch, images: _Images | None) -> dict[str, np.ndarray]:
        spec = self.manifest.graph("text_encoder")
        named = {t.name: t for t in spec.inputs}
        if "visual_embeds" not in named:  # an export from before editing: text only
            return {}
        if images is not None:
            return {"visual_embeds": images.visual_embeds, "deepstack_embeds": images.deepstack_embeds,
                    "visual_index": visual_index(batch, images.visual_embeds.shape[0])}
        n_ds, _, dim = named["deepstack_embeds"].dims
        return {"visual_embeds": np.zeros((0, dim), np.float32),
                "deepstack_embeds": np.zeros((n_ds, 0, dim), np.float32),
                "visual_index": np.zeros_like(batch.input_ids)}

    def _encode(self, prompts: Sequence[str], target_shape: tuple[int, int], images: _Images | None = None) -> _Condition:
        start = time.perf_counter()
        batch = self.tokenizer.encode(list(prompts), None if images is None else images.grid_thw)
        positions = mrope_position_ids(batch, self.tokenizer.merge_size)
        feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "position_ids": positions,
                 **self._visual_feeds(batch, images)}
        self.last_times.add("tokenize", time.perf_counter() - start)
        hidden = self._run("text_encoder", feeds)["hidden_states"]
        start = time.perf_counter()
        states, mask, pad = postprocess_hidden_states(hidden, batch)
        if not (pad == pad[:1]).all():
            raise InputError("prompts in one batch must place their condition images at the same positions")
        layout = build_layout(pad[0], mask, images.cond_shapes if images is not None else [], target_shape)
        cos, sin = rope_tables(layout.position_ids, self._axes, self._theta)
        if self.uses_kv_cache:
            feeds, step_feeds = kv.pair_feeds(layout, cos, sin)
        else:
            feeds = {"prefix_index": layout.prefix_index, "rope_cos": cos, "rope_sin": sin,
                     "attn_mask": attention_mask(layout.block_ids, layout.key_valid)}
            step_feeds = None
        self.last_times.add("layout", time.perf_counter() - start)
        return _Condition(states.astype(np.float32), layout, feeds, step_feeds)

    def _prefill(self, cond: _Condition, cond_latents: np.ndarray) -> _Condition:
        """The condition's keys/values, once for the whole loop (device-resident where the backend can)."""
        start = time.perf_counter()
        feeds = {"text_states": cond.text_states, "cond_latents": cond_latents, **cond.feeds}
        cache = kv.prefill(self.sessions[kv.PREFILL], feeds)
        self.last_times.add(kv.PREFILL, time.perf_counter() - start)
        if not cache.on_device and not np.isfinite(cache.value).all():
            raise NumericalError(f"{kv.PREFILL} output 'kv_cache': NaN or Inf; refusing to continue")
        return dataclasses.replace(cond, cache=cache)

    def _velocity(self, cond: _Condition, x: np.ndarray, cond_latents: np.ndarray, sigma: float, step: int):
        timestep = np.full((x.shape[0],), sigma, dtype=np.float32)
        if cond.cache is not None:
            feeds = {"latents": x, "timestep": timestep, "kv_cache": cond.cache.value, **cond.step_feeds}
            return self._run(kv.STEP, feeds, step)["velocity"]
        feeds = {"latents": x, "text_states": cond.text_states, "timestep": timestep, "cond_latents": cond_latents,
                 **cond.feeds}
        return self._run("transformer", feeds, step)["velocity"]

    def _sample(self, request: Request, callback, latents, output, images: _Images | None = None,
                reset_times: bool = True):
        if reset_times:
            self.last_times = StageTimes()
        batch = len(request.prompts)
        h, w = request.latent_shape
        positive = self._encode(request.prompts, (h, w), images)
        negative = self._encode(request.negative_prompts, (h, w), images) if request.use_guidance else None
        if request.negative_prompts is not None and not request.use_guidance:
            log.warning("negative_prompt is ignored: guidance %.2f <= 1 disables it", request.guidance)
        if images is None:
            cond_latents = np.zeros((batch, 0, self._channels), np.float32)
        else:
            cond_latents = np.ascontiguousarray(np.broadcast_to(images.latents, (batch, *images.latents.shape[1:])))
        if latents is None:
            latents = initial_noise(request.seed, batch, request.height, request.width, self._channels)
        x = np.asarray(latents, dtype=np.float32)
        if x.shape != (batch, h * w, self._channels):
            raise InputError(f"latents: expected float32[{batch}, {h * w}, {self._channels}], got {list(x.shape)}")
        sched = self.manifest.schedule
        sigmas = schedule.make_sigmas(request.steps, h * w, self._scheduler, fixed_sigmas=sched.get("sigmas"))
        try:
            if self.uses_kv_cache:  # released in `finally`, also when the second prefill fails
                positive = self._prefill(positive, cond_latents)
                negative = self._prefill(negative, cond_latents) if negative is not None else None
            x = self._denoise(request, positive, negative, x, cond_latents, sigmas, callback)
        finally:
            for c in (positive, negative):
                if c is not None and c.cache is not None:
                    c.cache.release()
        return self._finish(x, h, w, output)

    def _denoise(self, request: Request, positive: _Condition, negative: _Condition | None, x: np.ndarray,
                 cond_latents: np.ndarray, sigmas: np.ndarray, callback) -> np.ndarray:
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
        return x

    def _finish(self, x, h, w, output):
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
