"""The joint text/image sequence of Qwen-Image-2.x: its layout, rope tables and attention mask.

Pure numpy, shared by the reference and the runtime. The condition encoder's sequence holds text
tokens and, for every condition image, a run of ``<|image_pad|>`` slots; each slot stands for a
2x2 group of latent tokens, so the joint sequence expands every slot to 4 positions and fills
them with that image's latent tokens (row-major). The target image's tokens are appended last.
The whole batch shares one layout (prompts are right-padded after the template prefix is
dropped); only the key mask differs per sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qwen_image_edge.runtime.errors import ShapeError

TOKENS_PER_SLOT = 4  # one vision slot = 2x2 latent tokens (vision patch 16 x merge 2, VAE 16x)


@dataclass(frozen=True)
class JointLayout:
    """Where every token of the joint sequence comes from, shared by the batch.

    ``prefix_index`` indexes the concatenation ``[text rows (L_enc), condition latent rows (N_c)]``
    and gives the source of every prefix position (text and condition images, in sequence order);
    the target image's ``N_t`` tokens follow the prefix.
    """

    prefix_index: np.ndarray  # [L_prefix] int64
    block_ids: np.ndarray  # [L] int64: -1 text, k for the k-th image block (target last)
    position_ids: np.ndarray  # [L, 3] int64: (frame, height, width) rope positions
    key_valid: np.ndarray  # [B, L] bool: False at padded text positions
    cond_shapes: tuple[tuple[int, int], ...]  # latent (h, w) per condition image
    target_shape: tuple[int, int]  # latent (h, w) of the target image
    text_len: int  # L_enc: rows of the condition encoder's states

    @property
    def seq_len(self) -> int:
        return int(self.block_ids.shape[0])

    @property
    def num_target(self) -> int:
        return self.target_shape[0] * self.target_shape[1]

    @property
    def prefix_len(self) -> int:
        return int(self.prefix_index.shape[0])


def build_layout(
    image_pad_mask: np.ndarray,
    text_mask: np.ndarray,
    cond_shapes: Sequence[tuple[int, int]],
    target_shape: tuple[int, int],
) -> JointLayout:
    """Lay out the joint sequence.

    Args:
        image_pad_mask: ``[L_enc]`` bool, True at the encoder's ``<|image_pad|>`` slots (shared by the batch).
        text_mask: ``[B, L_enc]`` bool/int, 1 at valid encoder positions, 0 at right padding.
        cond_shapes: latent ``(h, w)`` of each condition image, in prompt order.
        target_shape: latent ``(h, w)`` of the image being generated.
    """
    image_pad_mask = np.asarray(image_pad_mask, dtype=bool)
    text_mask = np.asarray(text_mask).astype(bool)
    if image_pad_mask.ndim != 1:
        raise ShapeError(f"layout image_pad_mask: expected bool[L_enc], got shape {image_pad_mask.shape}")
    if text_mask.ndim != 2 or text_mask.shape[1] != image_pad_mask.shape[0]:
        raise ShapeError(
            f"layout text_mask: expected [B, {image_pad_mask.shape[0]}] to match image_pad_mask, got {text_mask.shape}"
        )
    th, tw = (int(v) for v in target_shape)
    if th < 1 or tw < 1:
        raise ShapeError(f"layout target_shape: expected positive latent (h, w), got {target_shape}")
    cond_shapes = tuple((int(h), int(w)) for h, w in cond_shapes)
    cond_tokens = [h * w for h, w in cond_shapes]
    num_slots = int(image_pad_mask.sum())
    if sum(cond_tokens) != num_slots * TOKENS_PER_SLOT:
        raise ShapeError(
            f"layout: condition images of latent shapes {list(cond_shapes)} need {sum(cond_tokens)} tokens, "
            f"but the prompt has {num_slots} image slots x {TOKENS_PER_SLOT} = {num_slots * TOKENS_PER_SLOT}"
        )

    # Joint prefix: text positions map to their encoder row, image slots to 4 condition-latent rows.
    l_enc = image_pad_mask.shape[0]
    repeats = np.where(image_pad_mask, TOKENS_PER_SLOT, 1)
    enc_pos = np.repeat(np.arange(l_enc), repeats)  # [L_prefix]
    is_image = np.repeat(image_pad_mask, repeats)  # [L_prefix]
    prefix_index = enc_pos.copy()
    prefix_index[is_image] = l_enc + np.arange(int(is_image.sum()))

    # Image block ids from the declared token counts, not from runs of slots: two condition images
    # with no text between them are still two blocks.
    block_ids = np.full(prefix_index.shape[0], -1, dtype=np.int64)
    block_ids[is_image] = np.repeat(np.arange(len(cond_shapes)), cond_tokens)
    n_target = th * tw
    block_ids = np.concatenate([block_ids, np.full(n_target, len(cond_shapes), dtype=np.int64)])  # [L]

    key_valid = np.ones((text_mask.shape[0], block_ids.shape[0]), dtype=bool)  # [B, L]
    text_pos = ~is_image
    key_valid[:, : prefix_index.shape[0]][:, text_pos] = text_mask[:, enc_pos[text_pos]]

    shapes = list(cond_shapes) + [(th, tw)]
    return JointLayout(
        prefix_index=prefix_index.astype(np.int64),
        block_ids=block_ids,
        position_ids=position_ids(block_ids, shapes),
        key_valid=key_valid,
        cond_shapes=cond_shapes,
        target_shape=(th, tw),
        text_len=l_enc,
    )


def padded_batch(
    rows: Sequence[np.ndarray],
    target_shape: tuple[int, int],
    image_slots: np.ndarray | None = None,
    cond_shapes: Sequence[tuple[int, int]] = (),
    length: int | None = None,
) -> tuple[np.ndarray, JointLayout]:
    """Per-prompt encoder states ``[L_i, D]`` right-padded into one batch, and its layout.

    ``image_slots``: the ``<|image_pad|>`` pattern every prompt starts with (edits), placed at the
    front of the shared slot mask. ``length``: pad to this many rows (default: the longest row); the
    image's rope positions follow the padded length, so batches meant to match must pad alike.
    Returns float32 states ``[B, L, D]`` and the ``build_layout`` of the batch.
    """
    length = max(len(r) for r in rows) if length is None else length
    states = np.zeros((len(rows), length, rows[0].shape[1]), np.float32)
    mask = np.zeros((len(rows), length), bool)
    for j, r in enumerate(rows):
        states[j, : len(r)] = r
        mask[j, : len(r)] = True
    pad = np.zeros(length, bool)
    if image_slots is not None:
        pad[: len(image_slots)] = image_slots
    return states, build_layout(pad, mask, cond_shapes, target_shape)


def image_slot_prefix(pad_row: np.ndarray, expected: np.ndarray | None = None) -> np.ndarray:
    """A prompt's ``<|image_pad|>`` mask up to its last slot: the ``image_slots`` of ``padded_batch``.
    With ``expected`` (a group's first prefix), raises unless the two match, since a batch shares one
    slot mask."""
    pad_row = np.asarray(pad_row, dtype=bool)
    prefix = pad_row[: int(np.flatnonzero(pad_row).max()) + 1]
    if expected is not None and not np.array_equal(prefix, expected):
        raise ShapeError("edit prompts: image slots are expected at the same positions in every prompt")
    return prefix


def position_ids(block_ids: np.ndarray, shapes: Sequence[tuple[int, int]]) -> np.ndarray:
    """Rope positions ``[L, 3]``: text advances one shared position on all three axes; an image
    block of ``h x w`` sits at the current frame position with height/width centred on zero,
    then the position advances by ``max(h, w)``."""
    out = np.empty((block_ids.shape[0], 3), dtype=np.int64)
    pos, i, n = 0, 0, block_ids.shape[0]
    while i < n:
        block = int(block_ids[i])
        if block < 0:
            out[i] = pos
            pos += 1
            i += 1
            continue
        h, w = shapes[block]
        hh = np.arange(-(h - h // 2), h // 2)
        ww = np.arange(-(w - w // 2), w // 2)
        out[i : i + h * w, 0] = pos
        out[i : i + h * w, 1] = np.repeat(hh, w)
        out[i : i + h * w, 2] = np.tile(ww, h)
        pos += max(h, w)
        i += h * w
    return out


def rope_tables(
    position_ids: np.ndarray, axes_dims: Sequence[int], theta: float = 10000.0
) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin ``[L, head_dim/2]`` float32 for interleaved-pair rope over 3 axes.

    Angles are formed in float32 as diffusers' frequency tables are, so both sides round alike.
    """
    angles = []
    for axis, dim in enumerate(axes_dims):
        exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
        inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)
        angles.append(position_ids[:, axis].astype(np.float32)[:, None] * inv_freq[None, :])  # [L, dim/2]
    angle = np.concatenate(angles, axis=1)  # [L, head_dim/2]
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def attention_mask(block_ids: np.ndarray, key_valid: np.ndarray) -> np.ndarray:
    """Block-causal mask ``[B, L, L]`` bool (True = may attend).

    A query sees every earlier key and every key of its own image block; padded text keys are
    never seen. Padded positions stay as queries (their rows are never empty: position 0 is valid).
    """
    n = block_ids.shape[0]
    q = np.arange(n)[:, None]
    k = np.arange(n)[None, :]
    same_block = (block_ids[:, None] == block_ids[None, :]) & (block_ids[:, None] >= 0)
    allowed = (q >= k) | same_block  # [L, L]
    return allowed[None, :, :] & key_valid[:, None, :].astype(bool)  # [B, L, L]
