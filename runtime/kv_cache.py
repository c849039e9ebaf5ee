"""The condition KV cache in the runtime: the transformer as ``transformer_prefill`` + ``transformer_step``.

Text and condition-image tokens are modulated at t=0 and, block-causally, never attend to the
target, so their keys/values at every layer are the same at every step. ``transformer_prefill``
computes them once per prompt set (and condition images); ``transformer_step`` then runs only the
target tokens against them. Under guidance the negative prompts have their own layout and cache.

Feeds come from the same numpy layout as the single graph's: the prefix rows of the rope tables
and the prefix block of the block-causal mask for the prefill; the target rows and the key mask
``[B, L_prefix + N_t]`` (target queries see every valid key) for the step.

Where the backend can keep an output on the device (TensorRT's ``run_kept``), the cache stays
there and every step binds it by address; otherwise it is a numpy array fed at each step. The
device loop (``qwen_image_edge.runtime.device_loop``) prefills into a device buffer instead, on
every backend with a device (onnxruntime's CUDA / TensorRT providers included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qwen_image_edge.runtime.layout import JointLayout, attention_mask
from qwen_image_edge.runtime.manifest import KV_CACHE_GRAPHS, Manifest

PREFILL, STEP = KV_CACHE_GRAPHS


def has_pair(manifest: Manifest) -> bool:
    return all(g in manifest.graphs for g in KV_CACHE_GRAPHS)


def pair_feeds(layout: JointLayout, cos: np.ndarray, sin: np.ndarray) -> tuple[dict, dict]:
    """Layout feeds of (prefill, step) from the full rope tables ``[L, Dh/2]``."""
    lp = layout.prefix_len
    prefill = {
        "prefix_index": layout.prefix_index,
        "rope_cos": np.ascontiguousarray(cos[:lp]),  # [L_prefix, Dh/2]
        "rope_sin": np.ascontiguousarray(sin[:lp]),
        # the mask is elementwise in (query, key): its prefix block is the prefix's own mask
        "attn_mask": attention_mask(layout.block_ids[:lp], layout.key_valid[:, :lp]),  # [B, Lp, Lp]
    }
    step = {
        "rope_cos": np.ascontiguousarray(cos[lp:]),  # [N_t, Dh/2]
        "rope_sin": np.ascontiguousarray(sin[lp:]),
        "key_mask": layout.key_valid,  # [B, L]
    }
    return prefill, step


@dataclass
class KVCache:
    """A prefilled cache: a numpy array, or a device array with the memory that holds it."""

    value: Any  # np.ndarray | qwen_image_edge.runtime.backends.tensorrt.DeviceArray
    buffer: Any = None  # cuda.DeviceBuffer when on the device

    @property
    def on_device(self) -> bool:
        return self.buffer is not None

    def release(self) -> None:
        if self.buffer is not None:
            self.buffer.free()
            self.buffer = None


def prefill(session, feeds: dict[str, np.ndarray], device: bool = True) -> KVCache:
    """Run the prefill graph; the cache stays on the device when the session can keep it there."""
    if device and hasattr(session, "run_kept"):
        value, buffer = session.run_kept(feeds, "kv_cache")
        return KVCache(value, buffer)
    return KVCache(session.run(feeds)["kv_cache"])
