"""The torch-free denoising loop over exported graphs: ``Pipeline.load(...).generate(...)``.

Everything here is numpy plus a backend: tokenization and templates, rope tables and masks,
the seeded noise, the sigma schedule, the Euler update, guidance, latent normalisation and the
PIL image. The reference pipeline calls the same numpy functions (request resolution, condition
image checks, schedule, Euler step, guidance, pixel conversion), so the two agree image for image.

Return convention (both pipelines): for ``output="pil"``, one image for a prompt given as a string,
a list for a list of prompts; ``"np"`` and ``"latent"`` give batched arrays. With
``return_stats=True`` a call returns ``(result, GenerationStats)``, its own timings.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from qwen_image_edge.runtime import images as rimages
from qwen_image_edge.runtime import kv_cache as kv
from qwen_image_edge.runtime import schedule
from qwen_image_edge.runtime.backends import make_backend
from qwen_image_edge.runtime.device_loop import DeviceLoop
from qwen_image_edge.runtime.edit import check_range, load_condition_images
from qwen_image_edge.runtime.errors import BackendError, InputError, ManifestError, NumericalError
from qwen_image_edge.runtime.graphs import EDIT_GRAPHS, SAMPLER_GRAPH
from qwen_image_edge.runtime.layout import JointLayout, attention_mask, build_layout, rope_tables
from qwen_image_edge.runtime.manifest import (
    KV_CACHE_GRAPHS,
    Manifest,
    load_manifest,
    resolve_path,
    sha256_file,
)
from qwen_image_edge.runtime.sampling import (
    Request,
    convert_pixels,
    diffusers_aliases,
    initial_noise,
    one_or_list,
    resolve_request,
)
from qwen_image_edge.runtime.staging import Memory, StagedSessions, parse_memory
from qwen_image_edge.runtime.stats import GenerationStats
from qwen_image_edge.runtime.tokens import PromptTokenizer, mrope_position_ids, postprocess_hidden_states
from qwen_image_edge.runtime.vision import vision_feeds, visual_index

log = logging.getLogger(__name__)

REQUIRED_GRAPHS = ("text_encoder", "transformer", "vae_decoder")
VISUAL_INPUTS = ("visual_embeds", "deepstack_embeds", "visual_index")


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
    """Generation from an export directory. Thread-safe: calls share only read-only state (each
    call keeps its own timings)."""

    def __init__(self, export_dir: Path, manifest: Manifest, sessions: dict, tokenizer: PromptTokenizer,
                 *, backend=None, device=None):
        self.export_dir = export_dir
        self.backend = backend
        self.device = device  # DeviceOps: the device loop (qwen_image_edge.runtime.device_loop); None: numpy
        self.manifest = manifest
        self.sessions = sessions
        self.tokenizer = tokenizer
        self.uses_kv_cache = all(g in sessions for g in KV_CACHE_GRAPHS)  # else the single transformer graph
        vae = manifest.model.vae
        self._mean = np.asarray(vae.latents_mean, np.float32).reshape(1, -1, 1, 1)
        self._std = np.asarray(vae.latents_std, np.float32).reshape(1, -1, 1, 1)

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, export_dir: str | os.PathLike, backend: str = "onnxruntime", *, providers: list[str] | None = None,
             threads: int | None = None, verify_hashes: bool = True,
             backend_options: dict | None = None, kv_cache: bool | None = None,
             device_loop: bool | None = None, memory: str = "default") -> Pipeline:
        """Verify the manifest (hashes included by default) and open the graphs a generation uses.

        ``kv_cache``: None uses the condition KV cache pair (``transformer_prefill`` +
        ``transformer_step``) when the export has it, the single ``transformer`` graph otherwise;
        False forces the single graph (benchmarks); True requires the pair. Only one of the two
        transformer forms is opened.

        ``device_loop``: None keeps the loop's tensors on the device when the backend has one
        (onnxruntime's CUDA / TensorRT providers, TensorRT, the counting test backend) and the
        export has the ``sampler_step`` graph (exports before it: the numpy loop); True requires
        both; False always runs the numpy update on the host.

        ``verify_hashes=False`` (the CLI's ``--no-verify``) skips the sha256 of every graph, its
        external data and the tokenizer: a faster start, but a truncated, swapped or tampered file is
        then no longer caught here and may run, giving a wrong image or an onnxruntime/TensorRT error
        instead of a ManifestError. The manifest's structure and the graphs' declared inputs and
        outputs are still checked.

        ``memory="low"`` opens each graph when its stage starts and releases the other stages' graphs
        (``qwen_image_edge.runtime.staging``), with the single transformer graph unless ``kv_cache=True``;
        "default" keeps them all open from here on.
        """
        memory = parse_memory(memory)
        export_dir = Path(export_dir)
        manifest = load_manifest(export_dir, verify_hashes=verify_hashes)
        missing = [g for g in REQUIRED_GRAPHS if g not in manifest.graphs]
        if missing:
            raise ManifestError(f"{export_dir}: graphs {missing} are required to generate; found {sorted(manifest.graphs)}")
        pair = kv.has_pair(manifest)
        if kv_cache and not pair:
            raise ManifestError(f"{export_dir}: kv_cache=True needs the graphs {list(KV_CACHE_GRAPHS)}; found "
                                f"{sorted(manifest.graphs)}; re-export to add them")
        # low memory: the pair holds the transformer's weights twice, so the single graph by default
        use_pair = (pair and memory is Memory.DEFAULT) if kv_cache is None else kv_cache
        unused = {"transformer"} if use_pair else set(KV_CACHE_GRAPHS)
        if device_loop and SAMPLER_GRAPH not in manifest.graphs:
            raise ManifestError(f"{export_dir}: device_loop=True needs the graph {SAMPLER_GRAPH!r}; found "
                                f"{sorted(manifest.graphs)}; re-export to add it")
        prompt = manifest.prompt
        tok_path = resolve_path(export_dir, prompt.tokenizer)
        if verify_hashes and sha256_file(tok_path) != prompt.tokenizer_sha256:
            raise ManifestError(f"{tok_path}: sha256 does not match the manifest")
        tokenizer = PromptTokenizer.from_file(
            tok_path, system_prompt=prompt.system_prompt, max_prompt_tokens=prompt.max_prompt_tokens,
            merge_size=manifest.image.vision.merge_size,
        )
        if tokenizer.drop_idx != prompt.drop_idx:
            raise ManifestError(
                f"{tok_path}: the system turn tokenizes to {tokenizer.drop_idx} tokens, manifest says {prompt.drop_idx}"
            )
        if backend in ("onnxruntime", "counting"):
            options = {"providers": providers, "threads": threads}
        else:  # engines are listed in the manifest, which is already verified here
            options = {"export_dir": export_dir, "manifest": manifest, **(backend_options or {})}
        be = make_backend(backend, **options)
        device = be.device_ops() if device_loop is not False and hasattr(be, "device_ops") else None
        if device_loop and device is None:
            raise BackendError(f"device_loop=True: backend {backend!r} has no device here (providers: {providers})")
        if device is None or SAMPLER_GRAPH not in manifest.graphs:
            unused.add(SAMPLER_GRAPH)
            device = None
        start = time.perf_counter()
        specs = {name: (spec, resolve_path(export_dir, spec.file)) for name, spec in manifest.graphs.items()
                 if name not in unused}
        sessions = StagedSessions(be.open, specs) if memory is Memory.LOW else {
            name: be.open(*spec) for name, spec in specs.items()}
        log.info("opened %d graphs in %.2f s", len(sessions), time.perf_counter() - start)
        log.info("denoising loop: %s", f"on the device ({device.name})" if device is not None else "numpy on the host")
        return cls(export_dir, manifest, sessions, tokenizer, backend=be, device=device)

    # ------------------------------------------------------------------ public API

    def generate(self, prompt: str | Sequence[str], *, negative_prompt: str | Sequence[str] | None = None,
                 width: int | None = None, height: int | None = None, steps: int | None = None,
                 guidance: float | None = None, seed: int | None = None,
                 callback: Callable[[int, int, np.ndarray], None] | None = None, latents: np.ndarray | None = None,
                 output: str = "pil", return_stats: bool = False, **diffusers_names):
        """Text to image. One prompt string gives one PIL image, a list of prompts a list
        (``output="np"``/``"latent"``: batched arrays); ``return_stats=True``: ``(that, GenerationStats)``.
        diffusers' ``num_inference_steps`` / ``guidance_scale`` are accepted for ``steps`` / ``guidance``."""
        steps, guidance = diffusers_aliases("generate", diffusers_names, steps=steps, guidance=guidance)
        stats, start = GenerationStats(), time.perf_counter()
        res = self.manifest.image.output_resolution
        request = self._request(prompt, negative_prompt, width, height, steps, guidance, seed, (res, res), output)
        out = one_or_list(self._sample(request, callback, latents, stats), prompt, output)
        stats.wall = time.perf_counter() - start
        return (out, stats) if return_stats else out

    def edit(self, images, instruction: str | Sequence[str], *, negative_prompt: str | Sequence[str] | None = None,
             width: int | None = None, height: int | None = None, steps: int | None = None,
             guidance: float | None = None, seed: int | None = None,
             callback: Callable[[int, int, np.ndarray], None] | None = None, latents: np.ndarray | None = None,
             output: str = "pil", return_stats: bool = False, **diffusers_names):
        """Edit one or more condition images (paths, PIL images or uint8 arrays) as the instruction says.

        Each image is resized to about ``output_resolution**2`` pixels (multiples of 32, its aspect
        kept), so its own pixel size does not matter; the output size follows the last image unless
        ``width``/``height`` are given. Refused with an InputError: an unreadable or empty image, a
        resized side outside the exported range (an extreme aspect ratio), more images than the
        model takes or than the exported token ranges hold. Returns as :meth:`generate` does.
        """
        steps, guidance = diffusers_aliases("edit", diffusers_names, steps=steps, guidance=guidance)
        missing = [g for g in EDIT_GRAPHS if g not in self.manifest.graphs]
        te_inputs = [t.name for t in self.manifest.graph("text_encoder").inputs]
        if missing or not set(VISUAL_INPUTS) <= set(te_inputs):
            raise ManifestError(f"{self.export_dir}: this export cannot edit: it lacks graphs {missing} or the text "
                                "encoder's visual inputs; re-export with the vision_encoder and vae_encoder graphs")
        stats, start = GenerationStats(), time.perf_counter()
        with stats.time("preprocess"):
            pil, sizes = load_condition_images(images, self.manifest, self.manifest.image.output_resolution)
            request = self._request(instruction, negative_prompt, width, height, steps, guidance, seed, sizes[-1],
                                    output)
        encoded = self._encode_images(pil, sizes, stats)
        out = one_or_list(self._sample(request, callback, latents, stats, encoded), instruction, output)
        stats.wall = time.perf_counter() - start
        return (out, stats) if return_stats else out

    # ------------------------------------------------------------------ internals

    def _request(self, prompt, negative_prompt, width, height, steps, guidance, seed, default_size, output) -> Request:
        """The shared request resolution, then what this export holds (sizes, latent tokens)."""
        img = self.manifest.image
        request = resolve_request(prompt, negative_prompt, width, height, steps, guidance, seed,
                                  default_size=default_size, schedule=self.manifest.schedule,
                                  vae_factor=img.vae_scale_factor, output=output)
        for name, value in (("width", request.width), ("height", request.height)):
            if not img.min_resolution <= value <= img.target.max_side:
                raise InputError(
                    f"{name} {value}: outside the exported range {img.min_resolution}..{img.target.max_side} pixels "
                    "(re-export with a larger --max-resolution)"
                )
        h, w = request.latent_shape
        if h * w > img.target.max_tokens:
            raise InputError(
                f"size {request.width}x{request.height}: {h * w} latent tokens, but this export holds at most "
                f"{img.target.max_tokens} (squares up to {img.max_resolution} px, other aspects at about "
                f"{img.output_resolution}^2 pixels); re-export with a larger --max-resolution"
            )
        return request

    def _run(self, graph: str, feeds: dict[str, np.ndarray], stats: GenerationStats,
             step: int | None = None) -> dict[str, np.ndarray]:
        with stats.time(graph):
            out = self.sessions[graph].run(feeds)
        for name, arr in out.items():
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                where = f" at step {step}" if step is not None else ""
                raise NumericalError(f"{graph} output {name!r}: NaN or Inf{where}; refusing to continue")
        return out

    def _encode_images(self, pil: list[Image.Image], sizes: list[tuple[int, int]], stats: GenerationStats) -> _Images:
        """vision_encoder on the images resized as the reference does (RGBA composited on white for
        the vision tower, all four channels for the VAE), vae_encoder -> normalised packed latents."""
        img = self.manifest.image
        with stats.time("preprocess"):
            resized = [rimages.resize_rgba(im, w, h) for im, (w, h) in zip(pil, sizes)]
            pixel_values, grid = rimages.vision_patches(resized, img.vision)
            feeds = vision_feeds(pixel_values, grid, img.vision_tower)
        check_range(self.manifest.graph("vision_encoder"), "N_p", pixel_values.shape[0], "vision patches", len(pil))
        vis = self._run("vision_encoder", feeds, stats)
        packed = []
        for im, (w, h) in zip(pil, sizes):
            z = self._run("vae_encoder", {"image": rimages.vae_input(im, w, h)}, stats)["latents"]  # [1, C, h, w]
            z = (z - self._mean) / self._std
            packed.append(z.reshape(1, z.shape[1], -1).transpose(0, 2, 1))  # [1, h*w, C]
        latents = np.concatenate(packed, axis=1).astype(np.float32)  # [1, N_c, C]
        f = img.vae_scale_factor
        shapes = tuple((h // f, w // f) for w, h in sizes)
        return _Images(grid, vis["visual_embeds"], vis["deepstack_embeds"], latents, shapes)

    def _visual_feeds(self, batch, images: _Images | None) -> dict[str, np.ndarray]:
        spec = self.manifest.graph("text_encoder")
        named = {t.name: t for t in spec.inputs}
        if "visual_embeds" not in named:  # an export without the vision graphs: text only
            return {}
        if images is not None:
            return {"visual_embeds": images.visual_embeds, "deepstack_embeds": images.deepstack_embeds,
                    "visual_index": visual_index(batch, images.visual_embeds.shape[0])}
        n_ds, _, dim = named["deepstack_embeds"].dims
        return {"visual_embeds": np.zeros((0, dim), np.float32),
                "deepstack_embeds": np.zeros((n_ds, 0, dim), np.float32),
                "visual_index": np.zeros_like(batch.input_ids)}

    def _encode(self, prompts: Sequence[str], target_shape: tuple[int, int], stats: GenerationStats,
                images: _Images | None = None) -> _Condition:
        with stats.time("tokenize"):
            batch = self.tokenizer.encode(list(prompts), None if images is None else images.grid_thw)
            positions = mrope_position_ids(batch, self.tokenizer.merge_size)
            feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "position_ids": positions,
                     **self._visual_feeds(batch, images)}
        hidden = self._run("text_encoder", feeds, stats)["hidden_states"]
        with stats.time("layout"):
            states, mask, pad = postprocess_hidden_states(hidden, batch)
            if not (pad == pad[:1]).all():
                raise InputError("prompts in one batch must place their condition images at the same positions")
            layout = build_layout(pad[0], mask, images.cond_shapes if images is not None else [], target_shape)
            t = self.manifest.model.transformer
            cos, sin = rope_tables(layout.position_ids, t.axes_dims_rope, t.rope_theta)
            if self.uses_kv_cache:
                feeds, step_feeds = kv.pair_feeds(layout, cos, sin)
            else:
                feeds = {"prefix_index": layout.prefix_index, "rope_cos": cos, "rope_sin": sin,
                         "attn_mask": attention_mask(layout.block_ids, layout.key_valid)}
                step_feeds = None
        return _Condition(states.astype(np.float32), layout, feeds, step_feeds)

    def _prefill(self, cond: _Condition, cond_latents: np.ndarray, stats: GenerationStats) -> _Condition:
        """The condition's keys/values, once for the whole loop (device-resident where the backend can)."""
        feeds = {"text_states": cond.text_states, "cond_latents": cond_latents, **cond.feeds}
        with stats.time(kv.PREFILL):
            cache = kv.prefill(self.sessions[kv.PREFILL], feeds)
        if not cache.on_device and not np.isfinite(cache.value).all():
            raise NumericalError(f"{kv.PREFILL} output 'kv_cache': NaN or Inf; refusing to continue")
        return dataclasses.replace(cond, cache=cache)

    def _velocity(self, cond: _Condition, x: np.ndarray, cond_latents: np.ndarray, sigma: float, step: int,
                  stats: GenerationStats):
        timestep = np.full((x.shape[0],), sigma, dtype=np.float32)
        if cond.cache is not None:
            feeds = {"latents": x, "timestep": timestep, "kv_cache": cond.cache.value, **cond.step_feeds}
            return self._run(kv.STEP, feeds, stats, step)["velocity"]
        feeds = {"latents": x, "text_states": cond.text_states, "timestep": timestep, "cond_latents": cond_latents,
                 **cond.feeds}
        return self._run("transformer", feeds, stats, step)["velocity"]

    def _sample(self, request: Request, callback, latents, stats: GenerationStats, images: _Images | None = None):
        if callback is not None and not callable(callback):
            raise InputError(f"callback: expected a callable(step, steps, latents), got {type(callback).__name__}")
        batch = len(request.prompts)
        h, w = request.latent_shape
        channels = self.manifest.model.transformer.in_channels
        positive = self._encode(request.prompts, (h, w), stats, images)
        negative = self._encode(request.negative_prompts, (h, w), stats, images) if request.use_guidance else None
        if images is None:
            cond_latents = np.zeros((batch, 0, channels), np.float32)
        else:
            cond_latents = np.ascontiguousarray(np.broadcast_to(images.latents, (batch, *images.latents.shape[1:])))
        if latents is None:
            latents = initial_noise(request.seed, batch, request.height, request.width, channels, request.vae_factor)
        x = np.asarray(latents, dtype=np.float32)
        if x.shape != (batch, h * w, channels):
            raise InputError(f"latents: expected float32[{batch}, {h * w}, {channels}], got {list(x.shape)}")
        sched = self.manifest.schedule
        sigmas = schedule.make_sigmas(request.steps, h * w, sched.scheduler, fixed_sigmas=sched.sigmas)
        if self.device is not None:
            out = DeviceLoop(self, stats).sample(request, positive, negative, x, cond_latents, sigmas, callback)
            if request.output == "latent":
                return out
            with stats.time("to_image"):
                return convert_pixels(out, request.output)
        try:
            if self.uses_kv_cache:  # released in `finally`, also when the second prefill fails
                positive = self._prefill(positive, cond_latents, stats)
                negative = self._prefill(negative, cond_latents, stats) if negative is not None else None
            x = self._denoise(request, positive, negative, x, cond_latents, sigmas, callback, stats)
        finally:
            for c in (positive, negative):
                if c is not None and c.cache is not None:
                    c.cache.release()
        return self._finish(x, h, w, request.output, stats)

    def _denoise(self, request: Request, positive: _Condition, negative: _Condition | None, x: np.ndarray,
                 cond_latents: np.ndarray, sigmas: np.ndarray, callback, stats: GenerationStats) -> np.ndarray:
        for i in range(request.steps):
            v = self._velocity(positive, x, cond_latents, sigmas[i], i, stats)
            v_neg = self._velocity(negative, x, cond_latents, sigmas[i], i, stats) if negative is not None else None
            with stats.time("update"):
                if v_neg is not None:
                    v = schedule.apply_guidance(v, v_neg, request.guidance)
                x = schedule.euler_step(x, v, sigmas[i], sigmas[i + 1])
            if callback is not None:
                callback(i, request.steps, x)
        return x

    def _finish(self, x, h, w, output, stats: GenerationStats):
        if output == "latent":
            return x
        pixels = self.decode_pixels(x, h, w, stats)
        with stats.time("to_image"):
            return convert_pixels(pixels, output)

    def decode_pixels(self, packed: np.ndarray, h: int, w: int, stats: GenerationStats | None = None) -> np.ndarray:
        """Packed normalised latents ``[B, h*w, C]`` -> pixels ``[B, 4, H, W]`` in [-1, 1]."""
        b, _, c = packed.shape
        z = packed.transpose(0, 2, 1).reshape(b, c, h, w) * self._std + self._mean  # [B, C, h, w]
        return self._run("vae_decoder", {"latents": z.astype(np.float32)}, stats or GenerationStats())["image"]


def load(export_dir: str | os.PathLike, **kwargs) -> Pipeline:
    return Pipeline.load(export_dir, **kwargs)


__all__ = ["Pipeline", "GenerationStats", "load", "NumericalError"]
