"""End-to-end check of an export: the runtime's images against the torch reference's, same seed.

Both pipelines draw the same initial noise from the seed, so any difference is the graphs' (and,
for a quantized export, the quantization's) error accumulated over the denoising loop. Measured
as PSNR over RGBA in [0, 1] per image; for the demo model also as the judge's readings
(``qwen_image2_ref.demo.judge``) on held-out prompts: the share of images whose colour, shape,
position and background match the prompt, for the runtime and for the reference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from qwen_image2_ref.demo import caption_style, judge
from qwen_image2_ref.demo.captions import CaptionStyle, heldout_prompts

JUDGE_KEYS = ("color", "shape", "position", "background")
HELDOUT_SEED = 1000  # the held-out prompt set tests/adherence.py and bench/demo_quality.py use
GENERAL_PROMPTS = (  # any other model: no judge, PSNR only
    "a red apple on a wooden table", "a lighthouse on a rocky coast at sunset", "a cat asleep on a blue sofa",
    "a city street in the rain at night", "a bowl of ramen seen from above", "a snowy mountain under a clear sky",
    "an old bicycle against a yellow wall", "a green parrot on a branch",
)


@dataclass(frozen=True)
class EndToEndBound:
    min_psnr_db: float  # every image, runtime vs reference
    max_adherence_drop: float  # points (percent of images) per judge key, runtime below reference


@dataclass
class EndToEndResult:
    prompts: int
    seed: int
    psnr_db: list[float]
    bound: EndToEndBound
    adherence_reference: dict[str, float] = field(default_factory=dict)  # points per judge key (demo only)
    adherence_runtime: dict[str, float] = field(default_factory=dict)

    @property
    def min_psnr(self) -> float:
        return min(self.psnr_db)

    @property
    def adherence_drop(self) -> dict[str, float]:
        return {k: self.adherence_reference[k] - self.adherence_runtime[k] for k in self.adherence_reference}

    @property
    def passed(self) -> bool:
        return (self.min_psnr >= self.bound.min_psnr_db
                and all(d <= self.bound.max_adherence_drop for d in self.adherence_drop.values()))

    def to_dict(self) -> dict:
        return {**asdict(self), "min_psnr_db": self.min_psnr, "adherence_drop": self.adherence_drop,
                "passed": self.passed}


def psnr(ref: np.ndarray, got: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of ``got`` against ``ref``, both in [0, 1] (inf when equal)."""
    mse = float(np.mean((np.asarray(ref, np.float64) - np.asarray(got, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def _prompts(model, n: int) -> tuple[list[str], list | None]:
    """Captions and their scenes: for a demo-trained folder, held-out demo scenes captioned in the
    language it learned, background named (v1: ``data.heldout_prompts``), so the reference's image
    is fixed by the prompt; else the general set."""
    style = caption_style(model.path) if model.path is not None else None
    if style is not None:
        pairs = heldout_prompts(n, HELDOUT_SEED, CaptionStyle(style), background=True)
        return [c for _, c in pairs], [s for s, _ in pairs]
    return [GENERAL_PROMPTS[i % len(GENERAL_PROMPTS)] for i in range(n)], None


def end_to_end(export_dir: str | Path, model, bound: EndToEndBound, prompts: int = 8, seed: int = 0,
               steps: int | None = None) -> EndToEndResult:
    """Generate ``prompts`` images with the runtime from ``export_dir`` and with ``model`` (an open
    ``LoadedModel``, on its device in its dtype), same seed and settings; PSNR per image and, for the
    demo model, adherence."""
    from qwen_image_edge.runtime.pipeline import Pipeline

    texts, scenes = _prompts(model, prompts)
    reference = model.pipeline()  # on the model's device, in its dtype
    runtime = Pipeline.load(export_dir, verify_hashes=False)
    ref, got = [], []
    for i, text in enumerate(texts):  # one at a time: the export's batch range may be smaller than the set
        with torch.no_grad():
            ref.append(reference.generate([text], seed=seed + i, steps=steps, output="np", progress=False)[0])
        got.append(runtime.generate([text], seed=seed + i, steps=steps, output="np")[0])  # [H, W, 4] in [0, 1]
    ref, got = np.asarray(ref, np.float32), np.asarray(got, np.float32)
    result = EndToEndResult(len(texts), seed, [psnr(r, g) for r, g in zip(ref, got)], bound)
    if scenes is not None:
        to_points = lambda acc: {k: 100 * v for k, v in acc.items()}  # noqa: E731
        result.adherence_reference = to_points(judge.accuracy(_rgba8(ref), scenes, JUDGE_KEYS))
        result.adherence_runtime = to_points(judge.accuracy(_rgba8(got), scenes, JUDGE_KEYS))
    return result


def _rgba8(images: np.ndarray) -> list[np.ndarray]:
    """[B, H, W, 4] floats in [0, 1] -> uint8 images, as the CLI saves them and the judge reads them."""
    return [np.clip(np.rint(im * 255), 0, 255).astype(np.uint8) for im in images]
