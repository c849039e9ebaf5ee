"""Validation cases per graph: inputs inside the ranges a manifest declares, and the torch reference.

Each ``*_cases(model, spec, export_dir, manifest)`` yields ``(label, feeds, reference, valid)``:
onnxruntime feeds by input name, a zero-argument callable giving the torch reference output(s),
and a mask of the elements to compare (``None``: all). Every dynamic axis takes at least two
values, and the transformer runs with ``N_c = 0`` too. ``qwen_image_edge.export.registry`` says
which graph uses which; ``qwen_image_edge.export.validate`` runs them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from qwen_image_edge.export.graphs import (
    TransformerGraph,
    VAEDecoderGraph,
    VAEEncoderGraph,
    pair_inputs,
    transformer_inputs,
    vae_decoder_inputs,
    vae_encoder_inputs,
    vision_encoder_inputs,
    vision_tower,
)
from qwen_image_edge.runtime.graphs import KV_CACHE_GRAPHS, KVRole, graph_info
from qwen_image_edge.runtime.manifest import GraphSpec, Manifest
from qwen_image_edge.runtime.tokens import mrope_position_ids
from qwen_image_edge.runtime.vision import visual_index

_PROMPTS = (
    ("a red cat",),
    ("a small blue house on a green hill under a cloudy sky", "sun"),
    ("two birds", "a tall tree beside a quiet lake at dawn", "stone"),
)


def placed(model, args: tuple, cast: tuple[int, ...]) -> tuple:
    """``args`` on the model's device; the floating tensors at ``cast`` in its dtype (activations),
    the others (timestep, rope tables, masks, indices) keep theirs, as the reference pipeline does."""
    dev, dt = model.device, model.dtype
    return tuple(a.to(dev, dt) if i in cast else a.to(dev) if isinstance(a, torch.Tensor) else a
                 for i, a in enumerate(args))


def _fits(spec: GraphSpec, **dims: int) -> bool:
    return all(spec.dim_ranges.get(k, (v, v, v))[0] <= v <= spec.dim_ranges.get(k, (v, v, v))[2]
               for k, v in dims.items())


# condition-image vision grids (t, h, w) in patches: one image, two images of different sizes, and
# one at the demo's 128 px (8x8 patches, 16 merged tokens)
_VISION_GRIDS = (((1, 4, 4),), ((1, 4, 6), (1, 2, 4)), ((1, 8, 8),))


def _vision_inputs(model, grids, seed: int):
    """Random patches for ``grids`` and transformers' own tower outputs on them (the reference)."""
    qwen = model.encoder.model
    args = vision_encoder_inputs(model.config, vision_tower(qwen), grids, seed=seed)
    grid_thw = torch.tensor(grids, dtype=torch.int64)
    pixels, grid = placed(model, (args[0], grid_thw), cast=(0,))
    out = qwen.model.visual(pixels, grid_thw=grid)
    embeds = out.pooler_output.float().cpu()  # [N_vis, D]: fp32 CPU, the ONNX feeds
    return args, embeds, torch.stack(out.deepstack_features).float().cpu(), grid_thw


def text_encoder_cases(model, spec: GraphSpec, export_dir: Path | None = None, manifest: Manifest | None = None):
    enc = model.encoder
    n_ds = len(model.config.encoder.deepstack_visual_indexes)
    visual = "visual_embeds" in [t.name for t in spec.inputs]  # exports before editing had none
    cases = [(p, ()) for p in _PROMPTS] + ([(("make the circle blue",), g) for g in _VISION_GRIDS]
                                          + [(("a", "turn it green and move it to the left"), _VISION_GRIDS[1])]
                                          if visual else [])
    for i, (prompts, grids) in enumerate(cases):
        batch = enc.tokenizer.encode(list(prompts), np.asarray(grids) if grids else None)
        pos = mrope_position_ids(batch, enc.vision.merge_size)
        feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "position_ids": pos}
        pixels = None
        if grids:
            with torch.no_grad():
                args, embeds, deep, _ = _vision_inputs(model, grids, seed=i)
            pixels = np.concatenate([args[0].numpy()] * len(prompts))  # one copy per prompt, as the encoder feeds them
            feeds |= {"visual_embeds": embeds.numpy(), "deepstack_embeds": deep.numpy(),
                      "visual_index": visual_index(batch, embeds.shape[0])}
        elif visual:
            d = model.config.encoder.hidden_size
            feeds |= {"visual_embeds": np.zeros((0, d), np.float32), "deepstack_embeds": np.zeros((n_ds, 0, d), np.float32),
                      "visual_index": np.zeros_like(batch.input_ids)}
        if not _fits(spec, B=batch.input_ids.shape[0], L_tok=batch.input_ids.shape[1],
                     N_vis=feeds.get("visual_embeds", np.zeros((0,))).shape[0]):
            continue
        ref = lambda b=batch, p=pixels: enc.hidden_states(b, p)  # noqa: E731  the reference path, not the wrapper
        label = f"B={batch.input_ids.shape[0]} L_tok={batch.input_ids.shape[1]} images={len(grids)}"
        yield label, feeds, ref, batch.attention_mask.astype(bool)  # padded query rows are garbage


def vision_encoder_cases(model, spec: GraphSpec, export_dir: Path | None = None,
                         manifest: Manifest | None = None):
    for i, grids in enumerate(_VISION_GRIDS):
        with torch.no_grad():
            args, embeds, deep, _ = _vision_inputs(model, grids, seed=10 + i)
        if not _fits(spec, N_p=args[0].shape[0], N_vis=embeds.shape[0]):
            continue
        feeds = {t.name: a.numpy() for t, a in zip(spec.inputs, args)}
        label = f"images={len(grids)} grids={[g[1:] for g in grids]} N_p={args[0].shape[0]}"
        yield label, feeds, (lambda e=embeds, d=deep: (e, d)), None  # transformers' tower, not the wrapper


_ACT = (0, 1, 3)  # the single graph's activations: latents, text_states, cond_latents
_PREFILL_ACT = (0, 1)  # the prefill's: text_states, cond_latents


def _transformer_args(model, spec: GraphSpec):
    """(label, torch inputs of the single graph): text-to-image, one and two condition images."""
    cfg = model.config
    for b, text, target, cond, pad in [
        (1, 5, (2, 2), (), 0),
        (2, 9, (3, 4), ((2, 2),), 3),
        (3, 6, (4, 2), ((2, 2), (2, 4)), 1),
        # the export's real range: a 128 px target (64 tokens); a 256x64 target with two condition
        # images of 80 tokens each (160x128 and 320x64 px: the demo's largest N_c)
        (1, 12, (8, 8), (), 0),
        (2, 7, (16, 4), ((8, 10), (20, 4)), 2),
    ]:
        args = transformer_inputs(cfg, b, text, target, cond, pad, seed=b)
        n_t, n_c = args[0].shape[1], args[3].shape[1]
        if not _fits(spec, B=b, N_t=n_t, N_c=n_c, L_prefix=args[4].shape[0]):
            continue
        yield f"B={b} L_enc={args[1].shape[1]} N_c={n_c} N_t={n_t} L={args[5].shape[0]}", args


def transformer_cases(model, spec: GraphSpec, export_dir: Path | None = None, manifest: Manifest | None = None):
    module = TransformerGraph(model.transformer).eval()
    names = [t.name for t in spec.inputs]
    for label, args in _transformer_args(model, spec):
        yield label, {n: a.numpy() for n, a in zip(names, args)}, (lambda a=args: module(*placed(model, a, _ACT))), None


def _ort_runner(export_dir: Path, manifest: Manifest):
    """``run(graph, args) -> first output``; one onnxruntime session per graph, opened on first use."""
    sessions = {}

    def run(graph: str, args: tuple) -> np.ndarray:
        spec = manifest.graph(graph)
        if graph not in sessions:
            sessions[graph] = ort.InferenceSession(str(export_dir / spec.file), providers=["CPUExecutionProvider"])
        return sessions[graph].run(None, {t.name: np.asarray(a) for t, a in zip(spec.inputs, args)})[0]

    return run


def kv_pair_cases(model, spec: GraphSpec, export_dir: Path | None = None, manifest: Manifest | None = None):
    """The condition-KV-cache pair on the transformer's cases (text-to-image, one and two condition
    images). The prefill's keys/values are checked against torch's prefill. The step is fed the
    *exported* prefill's cache (so the pair is checked as a chain) and compared with the single
    graph's module, the reference the single graph itself is validated against: a broken single
    graph then fails as itself, not as the pair. (onnxruntime pair vs onnxruntime single graph:
    tests/test_kv_cache_export.py.)"""
    prefill_graph = KV_CACHE_GRAPHS[0]
    prefill = graph_info(spec.name).kv_role is KVRole.PREFILL
    chained = manifest is not None and export_dir is not None and prefill_graph in manifest.graphs
    module = TransformerGraph(model.transformer).eval()
    run = _ort_runner(export_dir, manifest) if chained else None
    for label, args in _transformer_args(model, spec):
        pre, step = pair_inputs(args)
        if prefill:
            feeds = {t.name: a.numpy() for t, a in zip(spec.inputs, pre)}
            yield label, feeds, (lambda p=pre: model.transformer.prefill(*placed(model, p, _PREFILL_ACT))), None
            continue
        if chained:
            kv = torch.from_numpy(run(prefill_graph, pre))
        else:
            with torch.no_grad():
                kv = model.transformer.prefill(*placed(model, pre, _PREFILL_ACT)).float().cpu()
        feeds = {t.name: a.numpy() for t, a in zip(spec.inputs, (step[0], step[1], kv, *step[2:]))}
        cache = "exported prefill" if chained else "torch prefill"
        yield (f"{label} ({cache} -> step vs single graph)", feeds, (lambda a=args: module(*placed(model, a, _ACT))),
               None)


def _vae_cases(model, spec: GraphSpec, decoder: bool):
    cfg = model.config
    f = cfg.vae.scale_factor_spatial
    module = (VAEDecoderGraph if decoder else VAEEncoderGraph)(model.vae).eval()
    for b, h, w in [(1, 2, 2), (2, 4, 3), (1, 3, 4), (1, 8, 8), (1, 16, 4)]:  # up to 128 px and 256x64
        if not _fits(spec, B=b, h=h, w=w, H=h * f, W=w * f):
            continue
        args = vae_decoder_inputs(cfg, b, h, w, seed=h) if decoder else vae_encoder_inputs(cfg, b, h * f, w * f, seed=h)
        label = f"B={b} h={h} w={w}" if decoder else f"B={b} H={h * f} W={w * f}"
        yield label, {spec.inputs[0].name: args[0].numpy()}, (lambda a=args: module(*placed(model, a, (0,)))), None


def vae_decoder_cases(model, spec: GraphSpec, export_dir: Path | None = None, manifest: Manifest | None = None):
    return _vae_cases(model, spec, decoder=True)


def vae_encoder_cases(model, spec: GraphSpec, export_dir: Path | None = None, manifest: Manifest | None = None):
    return _vae_cases(model, spec, decoder=False)
