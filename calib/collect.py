"""Timestep-aware activation ranges: run the reference pipeline, record every layer input per step.

A diffusion transformer sees very different activations at sigma = 1 (pure noise) and near 0,
so ranges are kept per denoising step and reduced afterwards (:func:`reduce_ranges`, the choice
is ``QuantPolicy.reduction``). Per layer only two ``[steps, C]`` arrays are kept (the max and the
sum over calibration batches of each step's per-channel abs-max), so memory does not grow with
the number of prompts: ~0.8 GB for the full 60-block model at 50 steps.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from qwen_image_edge.calib.policy import QuantPolicy, Reduction
from qwen_image_edge.runtime.errors import ConfigError, InputError
from qwen_image_edge.runtime.sampling import initial_noise

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationSettings:
    """How the pipeline is sampled during calibration (None: the model's defaults)."""

    batch_size: int = 4
    steps: int | None = None
    guidance: float | None = None
    resolution: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"calibration batch size: expected >= 1, got {self.batch_size}")


@dataclass
class StepRanges:
    """One layer input: per step, the max and sum over batches of the per-channel abs-max."""

    step_max: np.ndarray  # [S, C]
    step_sum: np.ndarray  # [S, C]
    step_count: np.ndarray  # [S] batches that reached each step


class RangeRecorder:
    """Forward pre-hooks on named modules; ``step`` says which denoising step is running."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.names = list(names)
        self.step = 0
        self._batch: dict[str, dict[int, torch.Tensor]] = {}
        self._max: dict[str, dict[int, torch.Tensor]] = {n: {} for n in self.names}
        self._sum: dict[str, dict[int, torch.Tensor]] = {n: {} for n in self.names}
        self._count: dict[int, int] = {}
        self._handles = [model.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def hook(module, args):
            # abs-max is exact in any dtype (no rounding), then kept in fp32 on the model's device
            amax = args[0].detach().abs().flatten(0, -2).amax(dim=0).float()  # [C]; guidance branches fold in
            per_step = self._batch.setdefault(name, {})
            prev = per_step.get(self.step)
            per_step[self.step] = amax if prev is None else torch.maximum(prev, amax)

        return hook

    def begin_batch(self) -> None:
        self.step, self._batch = 0, {}

    def end_batch(self) -> None:
        for name, per_step in self._batch.items():
            for s, amax in per_step.items():
                m, t = self._max[name], self._sum[name]
                m[s] = amax if s not in m else torch.maximum(m[s], amax)
                t[s] = amax.clone() if s not in t else t[s] + amax
        for s in {s for per_step in self._batch.values() for s in per_step}:
            self._count[s] = self._count.get(s, 0) + 1
        self._batch = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def ranges(self) -> dict[str, StepRanges]:
        steps = sorted(self._count)
        if not steps:
            raise InputError("calibration recorded no activations: the pipeline never ran the quantized layers")
        count = np.array([self._count[s] for s in steps], dtype=np.int64)
        out = {}
        for n in self.names:
            if not self._max[n]:
                raise InputError(f"calibration: layer {n!r} was never run, so it has no activation range")
            out[n] = StepRanges(
                np.stack([self._max[n][s].cpu().numpy() for s in steps]),  # fp32 whatever the model's dtype
                np.stack([self._sum[n][s].cpu().numpy() for s in steps]),
                count,
            )
        return out


def reduce_ranges(r: StepRanges, policy: QuantPolicy) -> np.ndarray:
    """Per-channel range ``[C]`` from per-step ranges, as ``policy.reduction`` says (pure numpy)."""
    if policy.reduction is Reduction.MAX:
        return r.step_max.max(axis=0)
    if policy.reduction is Reduction.PERCENTILE:
        return np.percentile(r.step_max, policy.percentile, axis=0).astype(np.float32)
    if policy.reduction is Reduction.MEAN_MAX:
        return r.step_max.mean(axis=0)
    mean = r.step_sum / r.step_count[:, None]  # [S, C]
    first = max(1, int(len(mean) * policy.step_fraction))
    return mean[:first].min(axis=0)


def check_own_images(edits: Sequence[tuple[object | None, str]], n_prompts: int) -> int:
    """How many ``edits`` edit the model's own calibration images (image None); each needs a prompt."""
    own = sum(image is None for image, _ in edits)
    if own > n_prompts:
        raise InputError(f"calibration: {own} edits of the model's own images need as many prompts, "
                         f"got {n_prompts} (--calib-size)")
    return own


def run_calibration(pipe, prompts: Sequence[str], settings: CalibrationSettings, recorder: RangeRecorder,
                    progress: bool = True, edits: Sequence[tuple[object | None, str]] = ()) -> int:
    """Sample ``prompts`` through ``pipe`` (a QwenImagePipeline) with the recorder attached, then
    ``edits``: ``(condition image, instruction)`` pairs, one sample each, so that the condition
    image's tokens (which text-to-image never feeds the transformer) get ranges too. An image of
    None is the image the model drew for calibration prompt ``k`` (the k-th such edit), so a model
    that ships no images calibrates its edits on its own pictures.

    Noise is seeded per sample (``settings.seed + index``; edits ``settings.seed + 100000 + k``) so a
    calibration is reproducible. Returns the number of steps per sample.
    """
    if not prompts:
        raise InputError("calibration: expected at least one prompt, got none")
    edits = list(edits)
    own = check_own_images(edits, len(prompts))
    res = settings.resolution or pipe.config.pipeline.output_resolution
    channels = pipe.transformer.config.in_channels
    steps_seen = 0
    drawn: list = []

    def advance(i, total, _x):
        recorder.step = i + 1

    batches = range(0, len(prompts), settings.batch_size)
    for start in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
        chunk = list(prompts[start:start + settings.batch_size])
        noise = np.concatenate([initial_noise(settings.seed + start + j, 1, res, res, channels)
                                for j in range(len(chunk))])
        recorder.begin_batch()
        out = pipe.generate(chunk, steps=settings.steps, guidance=settings.guidance, width=res, height=res,
                            latents=noise, callback=advance, progress=False,
                            output="pil" if len(drawn) < own else "latent")
        if len(drawn) < own:
            drawn.extend(out)
        steps_seen = recorder.step
        recorder.end_batch()
    for k, (image, instruction) in enumerate(tqdm(edits, desc="calibration edits", unit="edit",
                                                  disable=not progress or not edits)):
        if image is None:
            image, drawn = drawn[0], drawn[1:]
        recorder.begin_batch()
        pipe.edit([image], instruction, steps=settings.steps, guidance=settings.guidance, width=res, height=res,
                  latents=initial_noise(settings.seed + 100_000 + k, 1, res, res, channels), callback=advance,
                  progress=False, output="latent")
        recorder.end_batch()
    log.info("calibration: %d prompts and %d edits, %d steps each", len(prompts), len(edits), steps_seen)
    return steps_seen


def spread_summary(ranges: dict[str, StepRanges]) -> dict[str, float]:
    """How much a layer's per-tensor range moves across steps: max/min over steps of the per-step
    abs-max, summarised over layers (1.0: a step-independent range)."""
    ratios = []
    for r in ranges.values():
        per_step = r.step_max.max(axis=1)  # [S]
        ratios.append(float(per_step.max() / max(per_step.min(), 1e-12)))
    return {"median": float(np.median(ratios)), "max": float(np.max(ratios))}
