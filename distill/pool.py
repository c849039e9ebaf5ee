"""Teacher trajectories: the latents a many-step teacher passes through, at the student grids' points.

A pool holds one or two groups (text-to-image; edits when edit examples are given). Every sample
of a group shares the target size and the layout of its condition-image slots, so training
batches are plain stacks. Each rank computes its share of the samples and the shares are
gathered, so every rank trains on the same pool.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from qwen_image2_ref.demo.stage_io import load_stage, ragged_arrays, ragged_tensors, save_stage
from qwen_image_edge.runtime import images as rimages
from qwen_image_edge.runtime import schedule
from qwen_image_edge.runtime.errors import ConfigError
from qwen_image_edge.runtime.layout import image_slot_prefix
from qwen_image_edge.runtime.sampling import initial_noise

log = logging.getLogger(__name__)


def student_sigmas(steps: int, n_tokens: int, scheduler) -> np.ndarray:
    """A student's sampling sigmas ``[steps + 1]``: the base grid ``default_sigmas(steps)`` through
    the teacher's scheduler (shift, terminal stretch), exactly what the runtime will use."""
    return schedule.make_sigmas(steps, n_tokens, scheduler)


def teacher_grid(student_steps: tuple[int, ...], teacher_steps: int, n_tokens: int, scheduler):
    """The teacher's sampling grid: every student sigma, with ``teacher_steps`` Euler steps spread
    over the intervals between them (in proportion to their length, at least one each).

    Returns ``(grid [teacher_steps + 1], points)``: ``points`` are the distinct student sigmas
    (descending, ending at 0) and every one of them is an entry of ``grid``.
    """
    if any(s < 1 for s in student_steps) or teacher_steps < 1:
        raise ConfigError(f"steps: expected positive step counts, got students {student_steps}, teacher {teacher_steps}")
    points = np.unique(np.concatenate([student_sigmas(s, n_tokens, scheduler) for s in student_steps]))[::-1]
    gaps = -np.diff(points)
    if teacher_steps < len(gaps):
        raise ConfigError(f"teacher steps {teacher_steps}: fewer than the {len(gaps)} student intervals")
    counts = np.maximum(1, np.floor(gaps / gaps.sum() * teacher_steps).astype(int))
    while counts.sum() < teacher_steps:  # hand out the remainder to the longest sub-steps
        counts[np.argmax(gaps / counts)] += 1
    while counts.sum() > teacher_steps:
        counts[np.argmax(np.where(counts > 1, counts, 0))] -= 1
    grid = np.concatenate([np.linspace(a, b, c, endpoint=False) for a, b, c in zip(points[:-1], points[1:], counts)]
                          + [points[-1:]]).astype(np.float32)
    return grid, points.astype(np.float32)


@dataclasses.dataclass
class Group:
    """``points[i, j]``: sample i's latent at the pool's ``sigmas[j]`` (packed, normalised)."""

    points: torch.Tensor  # [N, P, N_t, C] float32
    states: list[np.ndarray]  # N x [L_i, D] encoder states of the positive prompt
    target_shape: tuple[int, int]  # latent (h, w)
    cond_latents: torch.Tensor | None = None  # [N, N_c, C]
    pad_prefix: np.ndarray | None = None  # [K] bool: image-slot pattern at the start of every prompt


@dataclasses.dataclass
class Pool:
    groups: dict[str, Group]
    sigmas: np.ndarray  # [P] the recorded sigmas: every student grid point, descending, ending at 0
    grid: np.ndarray  # [teacher_steps + 1] the teacher's sampling grid (contains ``sigmas``)
    guidance: float


@dataclasses.dataclass(frozen=True)
class PoolSpec:
    prompts: tuple[str, ...]
    edits: tuple[tuple[np.ndarray, str], ...] = ()  # (RGBA uint8 image, instruction)
    teacher_steps: int = 40
    guidance: float = 4.0
    student_steps: tuple[int, ...] = (4, 8)
    seed: int = 0
    batch: int = 16

    def digest(self) -> str:
        h = hashlib.sha256(json.dumps([self.prompts, self.teacher_steps, self.guidance, self.student_steps,
                                       self.seed]).encode())
        for img, text in self.edits:
            h.update(img.tobytes())
            h.update(text.encode())
        return h.hexdigest()[:16]


def _trim(states: torch.Tensor, mask: torch.Tensor) -> list[np.ndarray]:
    return [s[: int(m.sum())].float().cpu().numpy() for s, m in zip(states, mask)]


@torch.no_grad()
def teacher_run(pipe, positive, negative, cond_latents, noise: np.ndarray, grid: np.ndarray, guidance: float,
                keep: np.ndarray) -> torch.Tensor:
    """The reference pipeline's Euler loop with guidance over ``grid``; the latents at the grid
    entries in ``keep`` -> ``[B, len(keep), N_t, C]`` (float32)."""
    x = torch.from_numpy(noise.astype(np.float32)).to(pipe.device, pipe.dtype)
    kept = {}
    for i in range(len(grid)):
        if grid[i] in keep:
            kept[float(grid[i])] = x.float().cpu()
        if i == len(grid) - 1:
            break
        v = pipe._velocity(positive, x, cond_latents, float(grid[i]))
        if negative is not None:
            v_neg = pipe._velocity(negative, x, cond_latents, float(grid[i]))
            v = v_neg + guidance * (v - v_neg)
        x = (x.float() + float(grid[i + 1] - grid[i]) * v.float()).to(pipe.dtype)
    return torch.stack([kept[float(s)] for s in keep], dim=1)


def build_pool(pipe, spec: PoolSpec, rank: int = 0, world: int = 1, progress: bool = True) -> Pool:
    """Sample the teacher on this rank's share of the prompts (and edits); gather when ``world > 1``."""
    pcfg = pipe.config.pipeline
    res = pcfg.output_resolution
    grid, points = teacher_grid(spec.student_steps, spec.teacher_steps, (res // 16) ** 2, pcfg.scheduler)
    groups = {"t2i": _text_group(pipe, spec, grid, points, rank, world, progress)}
    if spec.edits:
        groups["edit"] = _edit_group(pipe, spec, grid, points, rank, world, progress)
    return Pool(groups, points, grid, spec.guidance)


def _negative_prompt(pipe) -> str:
    pcfg = pipe.config.pipeline
    return pcfg.default_negative_prompt if pcfg.default_negative_prompt is not None else " "


def _text_group(pipe, spec: PoolSpec, grid, points, rank: int, world: int, progress: bool) -> Group:
    """Teacher trajectories of the text-to-image prompts, gathered over ranks."""
    res = pipe.config.pipeline.output_resolution
    channels = pipe.transformer.config.in_channels
    neg_prompt, target = _negative_prompt(pipe), (res // 16, res // 16)
    # Whole batches per rank: padding to a batch's longest prompt moves the image's rope positions,
    # so a sample's trajectory depends on its batch; fixed global batches make it independent of
    # the number of processes.
    n = len(spec.prompts)
    batches = [list(range(k, min(k + spec.batch, n))) for k in range(0, n, spec.batch)]
    out, states = [], []
    for ids in tqdm(batches[rank::world], desc="teacher t2i", disable=not progress or rank > 0):
        prompts = [spec.prompts[i] for i in ids]
        noise = np.concatenate([initial_noise(spec.seed + i, 1, res, res, channels) for i in ids])
        with torch.no_grad():
            s, m, pad = pipe.encoder.encode(prompts)
            pos = pipe._condition(s, m, pad, [], target)
            neg = pipe._encode([neg_prompt] * len(ids), [], [], target) if spec.guidance > 1 else None
            empty = torch.zeros(len(ids), 0, channels, device=pipe.device, dtype=pipe.dtype)
            out.append(teacher_run(pipe, pos, neg, empty, noise, grid, spec.guidance, points))
        states.append(_trim(s, m))
    return _gather([Group(o, st, target) for o, st in zip(out, states)], len(batches), rank, world)


def _edit_group(pipe, spec: PoolSpec, grid, points, rank: int, world: int, progress: bool) -> Group:
    """Teacher trajectories of the edit examples (one square condition image each), gathered over ranks."""
    res = pipe.config.pipeline.output_resolution
    channels = pipe.transformer.config.in_channels
    neg_prompt, target = _negative_prompt(pipe), (res // 16, res // 16)
    n_e = len(spec.edits)
    parts, prefix = [], None
    for i in tqdm(range(rank, n_e, world), desc="teacher edits", disable=not progress or rank > 0):
        image, instruction = spec.edits[i]
        pil = rimages.load_image(image)
        size = rimages.calculate_dimensions(res * res, pil.width / pil.height)
        if size != (res, res):
            raise ConfigError(f"distillation edits: condition images must be square ({res}x{res} after resize)")
        vl = [rimages.resize_rgba(pil, res, res)]
        noise = initial_noise(spec.seed + 100_000 + i, 1, res, res, channels)
        with torch.no_grad():
            s, m, pad = pipe.encoder.encode([instruction], vl)
            pos = pipe._condition(s, m, pad, [target], target)
            neg = pipe._encode([neg_prompt], vl, [target], target) if spec.guidance > 1 else None
            cond = pipe._condition_latents([pil], [(res, res)], 1)
            traj = teacher_run(pipe, pos, neg, cond, noise, grid, spec.guidance, points)
        prefix = image_slot_prefix(pad[0].cpu().numpy() if torch.is_tensor(pad) else pad[0], prefix)
        parts.append(Group(traj, _trim(s, m), target, cond.float().cpu(), prefix))
    return _gather(parts, n_e, rank, world)


def _gather(parts: list[Group], n_parts: int, rank: int, world: int) -> Group:
    """Concatenate the parts (batches) of every rank in global order: part k came from rank k % world."""
    if world > 1:
        shares: list = [None] * world
        dist.all_gather_object(shares, parts)
        parts = [shares[k % world][k // world] for k in range(n_parts)]
    first = parts[0]
    cond = None if first.cond_latents is None else torch.cat([p.cond_latents for p in parts])
    return Group(torch.cat([p.points for p in parts]), [s for p in parts for s in p.states], first.target_shape,
                 cond, first.pad_prefix)


# ------------------------------------------------------------------------------------------ files

def save_pool(path: Path, pool: Pool, digest: str) -> None:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {"digest": digest, "sigmas": [float(s) for s in pool.sigmas], "grid": [float(s) for s in pool.grid],
                  "guidance": pool.guidance, "groups": {}}
    for name, g in pool.groups.items():
        tensors[f"{name}/points"] = g.points
        tensors.update(ragged_tensors(f"{name}/states", g.states))
        if g.cond_latents is not None:
            tensors[f"{name}/cond_latents"] = g.cond_latents
            tensors[f"{name}/pad_prefix"] = torch.from_numpy(g.pad_prefix.astype(np.uint8))
        meta["groups"][name] = {"target_shape": list(g.target_shape)}
    save_stage(path, tensors, meta)


def load_pool(path: Path, digest: str) -> Pool | None:
    """The saved pool, or None when there is none or it was made for another spec/teacher."""
    if not Path(path).with_suffix(".json").is_file():
        return None
    tensors, meta = load_stage(path)
    if meta.get("digest") != digest:
        log.info("pool at %s was built for another teacher or spec; rebuilding", path)
        return None
    groups = {}
    for name, info in meta["groups"].items():
        pad = tensors.get(f"{name}/pad_prefix")
        groups[name] = Group(tensors[f"{name}/points"], ragged_arrays(tensors, f"{name}/states"),
                             tuple(info["target_shape"]),
                             tensors.get(f"{name}/cond_latents"), None if pad is None else pad.numpy().astype(bool))
    return Pool(groups, np.asarray(meta["sigmas"], np.float32), np.asarray(meta["grid"], np.float32),
                meta["guidance"])
