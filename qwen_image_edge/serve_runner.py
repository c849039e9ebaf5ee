"""What a serving replica does with validated jobs, without Ray: one Pipeline, the model's defaults
filled in as ``run`` fills them, batched generation that gives each job its own image, and the
parameters each PNG carries.

Batching: jobs with the same size, steps, guidance and prompt token counts go into one
``Pipeline.generate`` call with a list of prompts. Each row gets the noise its seed gives alone
(``initial_noise(seed, 1, ...)`` rows stacked and passed as ``latents``): the runtime draws one
``[B, L, C]`` block from a single seed otherwise. The token counts are part of the key because the
runtime pads a batch's prompts to the longest, and the image's rope positions follow the padded
length: a longer neighbour would change a prompt's image.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from qwen_image_edge.runtime.errors import QwenImageEdgeError
from qwen_image_edge.runtime.graphs import EDIT_GRAPHS
from qwen_image_edge.runtime.metadata import generation_parameters
from qwen_image_edge.runtime.sampling import initial_noise, resolve_size, sampling_defaults
from qwen_image_edge.serve_http import Job, png_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    png: bytes
    params: dict
    batch_size: int  # jobs in the Pipeline call that made it (1: alone)


class Runner:
    """One replica's pipeline and the source record its images carry.

    Pipeline calls run one at a time (a lock): a replica uses the ``--threads`` cores Ray reserved for
    it, however many requests it holds; throughput comes from replicas and batches, not from
    oversubscribing those cores with concurrent calls."""

    def __init__(self, pipe):
        from qwen_image_edge.cli import _export_source  # the digests `run` records, from the same manifest

        self.pipe = pipe
        self.source = _export_source(pipe)
        self.max_rows = max_rows(pipe.manifest)
        self._busy = threading.Lock()

    @classmethod
    def load(cls, export_dir, **load_options) -> Runner:
        from qwen_image_edge.runtime.pipeline import Pipeline

        return cls(Pipeline.load(export_dir, **load_options))

    # ------------------------------------------------------------------ jobs

    def resolve(self, job: Job) -> Job:
        """The model's defaults written into the job, as ``run`` does, and a random seed if none: what
        runs is what the PNG records. A generate job also gets its size."""
        steps, guidance, negative = sampling_defaults(self.pipe.manifest.schedule, job.steps, job.guidance,
                                                      job.negative_prompt)
        seed = secrets.randbelow(2**31) if job.seed is None else job.seed
        job = replace(job, steps=steps, guidance=guidance, negative_prompt=negative, seed=seed)
        if job.task == "generate":
            res = self.pipe.manifest.image.output_resolution
            width, height = resolve_size(job.width, job.height, (res, res))
            job = replace(job, width=width, height=height)
        return job

    def batch_key(self, job: Job) -> tuple:
        """Jobs with equal keys can share one generate call (checks the prompts' token limit)."""
        lengths = tuple(self._length(p) for p in (job.prompt, job.negative_prompt) if p is not None)
        return job.width, job.height, job.steps, job.guidance, job.negative_prompt is None, lengths

    def _length(self, prompt: str) -> int:
        return self.pipe.tokenizer.encode([prompt]).input_ids.shape[1]  # an InputError over the limit

    def edit(self, job: Job) -> Result:
        with self._busy:
            image = self.pipe.edit(list(job.images), job.prompt, **_sampling(job))
        return self._result(job, image, 1)

    def generate(self, jobs: Sequence[Job]) -> list[Result | QwenImageEdgeError]:
        """Each job's result, in order; a job that fails is its error (the others still run).

        Jobs are grouped by :meth:`batch_key`, at most :attr:`max_rows` to a call; a call that fails
        is run job by job, so one bad job fails alone."""
        out: list[Result | QwenImageEdgeError | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            try:
                groups.setdefault(self.batch_key(job), []).append(i)
            except QwenImageEdgeError as exc:
                out[i] = exc
        chunks = [rows[i:i + self.max_rows] for rows in groups.values() for i in range(0, len(rows), self.max_rows)]
        for rows in chunks:
            try:
                for i, result in zip(rows, self._generate_group([jobs[i] for i in rows])):
                    out[i] = result
            except QwenImageEdgeError as exc:
                if len(rows) == 1:
                    out[rows[0]] = exc
                    continue
                log.info("a batch of %d failed (%s); running its jobs one by one", len(rows), exc)
                for i in rows:
                    out[i] = self._alone(jobs[i])
        return out

    def _alone(self, job: Job) -> Result | QwenImageEdgeError:
        try:
            return self._generate_group([job])[0]
        except QwenImageEdgeError as exc:
            return exc

    def _generate_group(self, jobs: Sequence[Job]) -> list[Result]:
        first = jobs[0]
        f = self.pipe.manifest.image.vae_scale_factor
        channels = self.pipe.manifest.model.transformer.in_channels
        noise = np.concatenate([initial_noise(j.seed, 1, first.height, first.width, channels, f)
                                for j in jobs])  # [B, L, C]: row i as seed i alone draws it
        negatives = None if first.negative_prompt is None else [j.negative_prompt for j in jobs]
        with self._busy:
            images = self.pipe.generate([j.prompt for j in jobs], negative_prompt=negatives, width=first.width,
                                        height=first.height, steps=first.steps, guidance=first.guidance,
                                        seed=first.seed, latents=noise)
        return [self._result(j, im, len(jobs)) for j, im in zip(jobs, images)]

    # ------------------------------------------------------------------ outputs

    def _result(self, job: Job, image: Image.Image, batch_size: int) -> Result:
        s = self.source
        params = generation_parameters(
            task=job.task, prompt=job.prompt, negative_prompt=job.negative_prompt, seed=job.seed, steps=job.steps,
            guidance=job.guidance, width=image.width, height=image.height, model=s.model,
            model_sha256=s.model_sha256, export_sha256=s.export_sha256, pipeline=s.pipeline)
        return Result(png_bytes(image, params), params, batch_size)

    def model_summary(self) -> dict:
        """``GET /v1/model``: what the export is and what requests it takes."""
        m = self.pipe.manifest
        img, sched = m.image, m.schedule
        return {
            "model": self.source.model, "model_sha256": self.source.model_sha256,
            "export_sha256": self.source.export_sha256, "format_version": m.format_version,
            "graphs": {name: g.precision.value for name, g in sorted(m.graphs.items())},
            "engines": sorted(m.engines), "can_edit": all(g in m.graphs for g in EDIT_GRAPHS),
            "sizes": {"default": img.output_resolution, "min": img.min_resolution, "max": img.max_resolution,
                      "multiple": img.multiple},
            "defaults": {"steps": sched.default_steps, "guidance": sched.guidance_scale,
                         "negative_prompt": sched.default_negative_prompt},
            "max_prompt_tokens": m.prompt.max_prompt_tokens, "max_batch": self.max_rows,
            "max_condition_images": m.prompt.max_condition_images,
        }


def max_rows(manifest) -> int:
    """The most prompts one call takes: the smallest batch range (``B``) among the export's graphs and
    engines (4 for exports today: export/iospec.py); the runtime refuses more with a ShapeError."""
    specs = [*manifest.graphs.values(), *manifest.engines.values()]
    return min((s.dim_ranges["B"][2] for s in specs if "B" in s.dim_ranges), default=1)


def _sampling(job: Job) -> dict:
    return dict(negative_prompt=job.negative_prompt, width=job.width, height=job.height, steps=job.steps,
                guidance=job.guidance, seed=job.seed)
