"""The denoising loop on device-resident tensors, for backends with a device.

``Pipeline`` picks it when its backend has ``device_ops()`` and the export has ``sampler_step``
(``Pipeline.load(device_loop=...)``). Per generation, before the loop, the text states, condition
latents, rope tables and masks are uploaded once (with the KV-cache pair, the prefill writes the
cache into a device buffer instead), and the initial noise is uploaded once. Per step, only the
schedule's scalars cross: ``timestep`` ``[B]`` per transformer call and ``guidance``, ``sigma``,
``sigma_next`` for ``sampler_step``, which writes the next latents into the other of two buffers
(ping-pong: a graph never writes a buffer it reads) and the VAE decoder's input into a third.
After the loop the decoder runs on that input and only the image comes back (or the latents, for
``output="latent"``). A ``callback`` needs the latents on the host: it costs one download per step.

Both loops compute the same float32 update (``sampler_step`` is the numpy formula as a graph), so on
the same backend they give the same images (``tests/test_device_loop.py`` states the bound). The
host loop checks every output for NaN/Inf; here the result is checked once, after the loop, since
a per-step check would bring the tensors to the host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from qwen_image_edge.runtime import kv_cache as kv
from qwen_image_edge.runtime.errors import NumericalError
from qwen_image_edge.runtime.graphs import SAMPLER_GRAPH
from qwen_image_edge.runtime.stats import GenerationStats


class _Buffers:
    """Device tensors of one generation, freed together."""

    def __init__(self, ops):
        self.ops, self.held = ops, []

    def upload(self, arr: np.ndarray):
        self.held.append(self.ops.upload(np.ascontiguousarray(arr)))
        return self.held[-1]

    def empty(self, shape, dtype: str = "float32"):
        self.held.append(self.ops.empty(tuple(int(d) for d in shape), dtype))
        return self.held[-1]

    def free(self) -> None:
        for tensor in self.held:
            self.ops.free(tensor)
        self.held = []


def output_shape(spec, name: str, sizes: dict[str, int]) -> tuple[int, ...]:
    """Graph output ``name``'s shape with its symbols (``B``, ``N_t``, ...) set from ``sizes``."""
    dims = next(t.dims for t in spec.outputs if t.name == name)
    return tuple(d if isinstance(d, int) else sizes[d] for d in dims)


class DeviceLoop:
    """One generation's loop; see the module docstring."""

    def __init__(self, pipe, stats: GenerationStats):
        self.pipe, self.stats = pipe, stats
        self.buffers = _Buffers(pipe.device)

    def run(self, graph: str, feeds: dict[str, Any], outputs: dict[str, Any]) -> None:
        with self.stats.time(graph):
            self.pipe.sessions[graph].run_bound(feeds, outputs)

    def condition(self, cond, cond_latents) -> dict[str, Any]:
        """The transformer's per-generation feeds on the device: uploaded, or the prefilled cache."""
        up = self.buffers.upload
        if not self.pipe.uses_kv_cache:
            return {"text_states": up(cond.text_states), "cond_latents": cond_latents,
                    **{k: up(v) for k, v in cond.feeds.items()}}
        spec = self.pipe.manifest.graph(kv.PREFILL)
        sizes = {"B": cond.text_states.shape[0], "L_prefix": cond.layout.prefix_len}
        cache = self.buffers.empty(output_shape(spec, "kv_cache", sizes))  # [layers, 2, B, L_prefix, heads, Dh]
        feeds = {"text_states": up(cond.text_states), "cond_latents": cond_latents,
                 **{k: up(v) for k, v in cond.feeds.items()}}
        self.run(kv.PREFILL, feeds, {"kv_cache": cache})
        return {"kv_cache": cache, **{k: up(v) for k, v in cond.step_feeds.items()}}

    def velocity(self, feeds: dict[str, Any], x, sigma: float, out) -> None:
        graph = kv.STEP if self.pipe.uses_kv_cache else "transformer"
        timestep = np.full((x.shape[0],), sigma, dtype=np.float32)  # the per-step scalar: B x 4 bytes
        self.run(graph, {"latents": x, "timestep": timestep, **feeds}, {"velocity": out})

    def sample(self, request, positive, negative, x0: np.ndarray, cond_latents: np.ndarray, sigmas: np.ndarray,
               callback: Callable | None) -> np.ndarray:
        """Pixels ``[B, 4, H, W]`` (or the packed latents for ``output="latent"``) on the host."""
        try:
            return self._sample(request, positive, negative, x0, cond_latents, sigmas, callback)
        finally:
            self.buffers.free()

    def _sample(self, request, positive, negative, x0, cond_latents, sigmas, callback) -> np.ndarray:
        ops, pipe = self.pipe.device, self.pipe
        batch, n_t, _ = x0.shape
        h, w = request.latent_shape
        shared = self.buffers.upload(cond_latents)
        pos = self.condition(positive, shared)
        neg = self.condition(negative, shared) if negative is not None else None
        x = [self.buffers.upload(x0), self.buffers.empty(x0.shape)]  # ping-pong latents [B, N_t, C]
        vel = self.buffers.empty(x0.shape)
        vel_neg = self.buffers.empty(x0.shape) if neg is not None else vel
        sampler = pipe.manifest.graph(SAMPLER_GRAPH)
        vae_in = self.buffers.empty(output_shape(sampler, "vae_latents", {"B": batch, "h": h, "w": w}))
        grid = self.buffers.upload(np.zeros((h, w), dtype=bool))  # shape only: h * w bytes, once
        guidance = np.float32([request.guidance if neg is not None else 1.0])
        for i in range(request.steps):
            self.velocity(pos, x[0], sigmas[i], vel)
            if neg is not None:
                self.velocity(neg, x[0], sigmas[i], vel_neg)
            feeds = {"latents": x[0], "velocity": vel, "velocity_uncond": vel_neg, "guidance": guidance,
                     "sigma": np.float32([sigmas[i]]), "sigma_next": np.float32([sigmas[i + 1]]), "latent_grid": grid}
            self.run(SAMPLER_GRAPH, feeds, {"latents_next": x[1], "vae_latents": vae_in})  # the update, as a graph
            x.reverse()
            if callback is not None:
                callback(i, request.steps, ops.download(x[0]))
        if request.output == "latent":
            return self._checked(ops.download(x[0]), "the latents")
        decoder = pipe.manifest.graph("vae_decoder")
        f = request.vae_factor
        image = self.buffers.empty(output_shape(decoder, "image", {"B": batch, "H": h * f, "W": w * f}))
        self.run("vae_decoder", {"latents": vae_in}, {"image": image})
        return self._checked(ops.download(image), "vae_decoder output 'image'")

    @staticmethod
    def _checked(arr: np.ndarray, what: str) -> np.ndarray:
        if not np.isfinite(arr).all():
            raise NumericalError(f"{what}: NaN or Inf after the device loop (it checks once, at the end); "
                                 "refusing to continue")
        return arr
