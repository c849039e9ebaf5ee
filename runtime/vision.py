"""Numpy inputs of the exported Qwen3-VL vision tower and of the text encoder's visual slots.

transformers' vision tower derives four things from ``image_grid_thw`` in Python (loops,
``repeat_interleave``, ``tolist``): the bilinear resampling of its learned square position table
to each image's patch grid, the 2-D rotary angles of every patch, and the per-image attention
segments. A trace would bake them for the example grid, so they are graph inputs computed here
from the same formulas (``transformers.vision_utils``: ``get_vision_interpolation_indices_and_weights``
with bilinear + align_corners, ``get_vision_position_ids``; ``Qwen3VLVisionRotaryEmbedding``).
Patches are in transformers' merge-window order: (block row, block col, row in block, col in block).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qwen_image_edge.runtime.errors import ShapeError
from qwen_image_edge.runtime.tokens import TokenBatch


@dataclass(frozen=True)
class VisionTower:
    """What the tables depend on: merge size, rope head dim and theta, learned grid side."""

    merge_size: int
    head_dim: int
    rope_theta: float
    grid_side: int  # sqrt(num_position_embeddings)


def patch_coords(grid_thw: np.ndarray, merge: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row, column and patch-grid (h, w) of every patch, int64 [N_patches] each, merge-window order."""
    rows, cols, heights, widths = [], [], [], []
    for t, h, w in np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3).tolist():
        if h % merge or w % merge:
            raise ShapeError(f"vision grid {t, h, w}: h and w must be multiples of the merge size {merge}")
        br, bc, ir, ic = np.meshgrid(np.arange(h // merge), np.arange(w // merge), np.arange(merge),
                                     np.arange(merge), indexing="ij")  # [h/m, w/m, m, m] each
        row = np.tile((br * merge + ir).ravel(), t)  # [t*h*w]
        col = np.tile((bc * merge + ic).ravel(), t)  # [t*h*w]
        rows.append(row)
        cols.append(col)
        heights.append(np.full(row.shape, h))
        widths.append(np.full(row.shape, w))
    return (np.concatenate(rows), np.concatenate(cols), np.concatenate(heights), np.concatenate(widths))


def _axis_taps(index: np.ndarray, size: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    # align_corners: target 0..size-1 maps onto source 0..side-1; float32 as transformers computes it
    src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)  # [N, 2]
    distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))  # [N, 2]
    return taps, np.maximum(np.float32(1) - distance, np.float32(0)).astype(np.float32)


def position_taps(grid_thw: np.ndarray, tower: VisionTower) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear taps into the flattened learned position table: int64 [N, 4] and float32 [N, 4]."""
    row, col, height, width = patch_coords(grid_thw, tower.merge_size)
    h_taps, h_w = _axis_taps(row, height, tower.grid_side)
    w_taps, w_w = _axis_taps(col, width, tower.grid_side)
    index = (h_taps[:, :, None] * tower.grid_side + w_taps[:, None, :]).reshape(-1, 4)  # [N, 4]
    weight = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)  # [N, 4]
    return index.astype(np.int64), weight.astype(np.float32)


def rope_tables(grid_thw: np.ndarray, tower: VisionTower) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [N, head_dim]: (h angles, w angles) over a quarter of the head each, twice."""
    row, col, _, _ = patch_coords(grid_thw, tower.merge_size)
    spatial = tower.head_dim // 2
    inv_freq = (np.float32(1) / np.power(np.float32(tower.rope_theta),
                                         np.arange(0, spatial, 2, dtype=np.float32) / np.float32(spatial)))
    freqs = np.stack([row, col], axis=1).astype(np.float32)[..., None] * inv_freq.astype(np.float32)  # [N, 2, hd/4]
    half = freqs.reshape(freqs.shape[0], -1)  # [N, hd/2]: h angles then w angles
    angles = np.concatenate([half, half], axis=1)  # [N, hd]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def segment_mask(grid_thw: np.ndarray) -> np.ndarray:
    """bool [N, N]: a patch attends to the patches of its own frame only (transformers' cu_seqlens)."""
    sizes = [h * w for t, h, w in np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3).tolist() for _ in range(t)]
    segment = np.repeat(np.arange(len(sizes)), sizes)  # [N]
    return segment[:, None] == segment[None, :]  # [N, N]


def vision_feeds(pixel_values: np.ndarray, grid_thw: np.ndarray, tower: VisionTower) -> dict[str, np.ndarray]:
    """Every input of the ``vision_encoder`` graph."""
    n = int(np.asarray(grid_thw).reshape(-1, 3).prod(axis=1).sum())
    if pixel_values.ndim != 2 or pixel_values.shape[0] != n:
        raise ShapeError(f"vision pixel_values: expected [{n}, C*T*P*P] for grids {grid_thw.tolist()}, "
                         f"got {list(pixel_values.shape)}")
    index, weight = position_taps(grid_thw, tower)
    cos, sin = rope_tables(grid_thw, tower)
    return {"pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32), "pos_index": index,
            "pos_weight": weight, "rope_cos": cos, "rope_sin": sin, "attn_mask": segment_mask(grid_thw)}


def visual_index(batch: TokenBatch, n_visual: int) -> np.ndarray:
    """int64 [B, L_tok]: 0 on text, k + 1 at a row's k-th image pad (rows of the visual embeddings).

    Every prompt of a batch shows the same images, so the vision tower runs once and each row
    reads the same ``n_visual`` embeddings.
    """
    pads = batch.image_pad_mask  # [B, L_tok]
    counts = pads.sum(axis=1)
    if (counts != n_visual).any():
        raise ShapeError(f"token batch: every row needs {n_visual} image pads (one per visual token), "
                         f"got {counts.tolist()}")
    return np.where(pads, np.cumsum(pads, axis=1), 0).astype(np.int64)  # [B, L_tok]
