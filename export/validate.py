"""Per-graph validation of an export directory: onnxruntime against the torch reference.

Every graph runs at several shapes (at least two values of every dynamic axis, and N_c = 0 for
the transformer) inside the ranges its manifest declares. Errors are measured on valid
elements only (padded query tokens of the text encoder produce garbage rows by design):
max abs error, relative L2 ``||ort - ref|| / ||ref||`` and cosine similarity. Bounds depend on
the graph's precision (:data:`THRESHOLDS`); the JSON report is written next to the manifest.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from qwen_image_edge.export.graphs import (
    graph_module,
    pair_inputs,
    transformer_inputs,
    vae_decoder_inputs,
    vae_encoder_inputs,
    vision_encoder_inputs,
    vision_tower,
)
from qwen_image_edge.export.manifest_writer import write_text_atomic
from qwen_image_edge.runtime.errors import ManifestError
from qwen_image_edge.runtime.manifest import GraphSpec, Manifest, Precision, TensorSpec, check_io, load_manifest
from qwen_image_edge.runtime.tokens import mrope_position_ids
from qwen_image_edge.runtime.vision import visual_index

log = logging.getLogger(__name__)

REPORT_NAME = "validation.json"
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(bool)": "bool",
               "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16", "tensor(int32)": "int32"}


@dataclass(frozen=True)
class Threshold:
    max_rel_l2: float
    min_cosine: float


# fp32: same math, different kernels (summation order) -> ~1e-7..1e-6 relative; 1e-5 leaves 10x.
# The others are budgets for later stages (fp16/bf16 rounding of activations, W8A8 quantization
# measured at 0.14-0.43 % relative L2 on one block; errors grow with depth).
THRESHOLDS: dict[Precision, Threshold] = {
    Precision.FP32: Threshold(1e-5, 0.99999),
    Precision.FP16: Threshold(5e-3, 0.9999),
    Precision.BF16: Threshold(2e-2, 0.9995),
    Precision.INT8: Threshold(5e-2, 0.998),
    Precision.FP8: Threshold(8e-2, 0.995),
}


@dataclass(frozen=True)
class CaseResult:
    shape: str
    max_abs: float
    rel_l2: float
    cosine: float
    passed: bool


@dataclass
class GraphResult:
    graph: str
    precision: str
    threshold: Threshold
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.passed for c in self.cases)


@dataclass
class ValidationReport:
    export_dir: str
    graphs: list[GraphResult]

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.graphs)

    def to_dict(self) -> dict:
        return {
            "export_dir": self.export_dir,
            "passed": self.passed,
            "graphs": [{**asdict(g), "passed": g.passed} for g in self.graphs],
        }

    def table(self) -> str:
        rows = [("graph", "precision", "shape", "max abs", "rel L2", "cosine", "bound", "ok")]
        for g in self.graphs:
            for c in g.cases:
                rows.append((g.graph, g.precision, c.shape, f"{c.max_abs:.2e}", f"{c.rel_l2:.2e}",
                             f"{c.cosine:.8f}", f"<= {g.threshold.max_rel_l2:.0e}", "yes" if c.passed else "NO"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        lines.append(f"{'PASSED' if self.passed else 'FAILED'}: {self.export_dir}")
        return "\n".join(lines)


def compare(ref: np.ndarray, got: np.ndarray, valid: np.ndarray | None = None) -> tuple[float, float, float]:
    """(max abs, relative L2, cosine) over the valid elements, in float64."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref.shape != got.shape:
        raise ManifestError(f"validate: onnxruntime output shape {got.shape} != torch {ref.shape}")
    if valid is not None:
        ref, got = ref[valid], got[valid]
    diff = got - ref
    norm = np.linalg.norm(ref)
    rel = float(np.linalg.norm(diff) / norm) if norm > 0 else float(np.linalg.norm(diff))
    denom = np.linalg.norm(ref) * np.linalg.norm(got)
    cos = float(np.dot(ref.ravel(), got.ravel()) / denom) if denom > 0 else float(norm == np.linalg.norm(got))
    return float(np.abs(diff).max(initial=0.0)), rel, cos


# ----------------------------------------------------------------------------- cases

_PROMPTS = (
    ("a red cat",),
    ("a small blue house on a green hill under a cloudy sky", "sun"),
    ("two birds", "a tall tree beside a quiet lake at dawn", "stone"),
)


def _fits(spec: GraphSpec, **dims: int) -> bool:
    return all(spec.dim_ranges.get(k, (v, v, v))[0] <= v <= spec.dim_ranges.get(k, (v, v, v))[2]
               for k, v in dims.items())


# condition-image vision grids (t, h, w) in patches: one image, two images of different sizes
_VISION_GRIDS = (((1, 4, 4),), ((1, 4, 6), (1, 2, 4)))


def _vision_inputs(model, grids, seed: int):
    """Random patches for ``grids`` and transformers' own tower outputs on them (the reference)."""
    qwen = model.encoder.model
    args = vision_encoder_inputs(model.config, vision_tower(qwen), grids, seed=seed)
    grid_thw = torch.tensor(grids, dtype=torch.int64)
    out = qwen.model.visual(args[0], grid_thw=grid_thw)
    return args, out.pooler_output, torch.stack(out.deepstack_features), grid_thw


def _text_cases(model, spec: GraphSpec):
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


def _vision_cases(model, spec: GraphSpec):
    for i, grids in enumerate(_VISION_GRIDS):
        with torch.no_grad():
            args, embeds, deep, _ = _vision_inputs(model, grids, seed=10 + i)
        if not _fits(spec, N_p=args[0].shape[0], N_vis=embeds.shape[0]):
            continue
        feeds = {t.name: a.numpy() for t, a in zip(spec.inputs, args)}
        label = f"images={len(grids)} grids={[g[1:] for g in grids]} N_p={args[0].shape[0]}"
        yield label, feeds, (lambda e=embeds, d=deep: (e, d)), None  # transformers' tower, not the wrapper


def _transformer_args(model, spec: GraphSpec):
    """(label, torch inputs of the single graph): text-to-image, one and two condition images."""
    cfg = model.config
    for b, text, target, cond, pad in [
        (1, 5, (2, 2), (), 0),
        (2, 9, (3, 4), ((2, 2),), 3),
        (3, 6, (4, 2), ((2, 2), (2, 4)), 1),
    ]:
        args = transformer_inputs(cfg, b, text, target, cond, pad, seed=b)
        n_t, n_c = args[0].shape[1], args[3].shape[1]
        if not _fits(spec, B=b, N_t=n_t, N_c=n_c, L_prefix=args[4].shape[0]):
            continue
        yield f"B={b} L_enc={args[1].shape[1]} N_c={n_c} N_t={n_t} L={args[5].shape[0]}", args


def _transformer_cases(model, spec: GraphSpec):
    module = graph_module("transformer", model)
    names = [t.name for t in spec.inputs]
    for label, args in _transformer_args(model, spec):
        yield label, {n: a.numpy() for n, a in zip(names, args)}, (lambda a=args: module(*a)), None


def _ort_runner(export_dir: Path, manifest: Manifest):
    """``run(graph, args) -> first output``; one onnxruntime session per graph, opened on first use."""
    import onnxruntime as ort

    sessions = {}

    def run(graph: str, args: tuple) -> np.ndarray:
        spec = manifest.graph(graph)
        if graph not in sessions:
            sessions[graph] = ort.InferenceSession(str(export_dir / spec.file), providers=["CPUExecutionProvider"])
        return sessions[graph].run(None, {t.name: np.asarray(a) for t, a in zip(spec.inputs, args)})[0]

    return run


def _pair_cases(model, spec: GraphSpec, export_dir: Path | None, manifest: Manifest | None):
    """The condition-KV-cache pair on the transformer's cases (text-to-image, one and two condition
    images). The prefill's keys/values are checked against torch's prefill. The step is fed the
    *exported* prefill's cache (so the pair is checked as a chain) and compared with the single
    graph's module, the reference the single graph itself is validated against: a broken single
    graph then fails as itself, not as the pair. (onnxruntime pair vs onnxruntime single graph:
    tests/test_kv_cache_export.py.)"""
    prefill = spec.name == "transformer_prefill"
    chained = manifest is not None and export_dir is not None and "transformer_prefill" in manifest.graphs
    module = graph_module("transformer", model)
    run = _ort_runner(export_dir, manifest) if chained else None
    for label, args in _transformer_args(model, spec):
        pre, step = pair_inputs(args)
        if prefill:
            feeds = {t.name: a.numpy() for t, a in zip(spec.inputs, pre)}
            yield label, feeds, (lambda p=pre: model.transformer.prefill(*p)), None
            continue
        if chained:
            kv = torch.from_numpy(run("transformer_prefill", pre))
        else:
            with torch.no_grad():
                kv = model.transformer.prefill(*pre)
        feeds = {t.name: a.numpy() for t, a in zip(spec.inputs, (step[0], step[1], kv, *step[2:]))}
        cache = "exported prefill" if chained else "torch prefill"
        yield f"{label} ({cache} -> step vs single graph)", feeds, (lambda a=args: module(*a)), None


def _vae_cases(model, spec: GraphSpec, decoder: bool):
    cfg = model.config
    f = cfg.vae.scale_factor_spatial
    module = graph_module("vae_decoder" if decoder else "vae_encoder", model)
    for b, h, w in [(1, 2, 2), (2, 4, 3), (1, 3, 4)]:
        if not _fits(spec, B=b, h=h, w=w, H=h * f, W=w * f):
            continue
        args = vae_decoder_inputs(cfg, b, h, w, seed=h) if decoder else vae_encoder_inputs(cfg, b, h * f, w * f, seed=h)
        label = f"B={b} h={h} w={w}" if decoder else f"B={b} H={h * f} W={w * f}"
        yield label, {spec.inputs[0].name: args[0].numpy()}, (lambda a=args: module(*a)), None


def validation_cases(name: str, model, spec: GraphSpec, export_dir: Path | None = None,
                     manifest: Manifest | None = None):
    if name in ("transformer_prefill", "transformer_step"):
        return _pair_cases(model, spec, export_dir, manifest)
    if name == "text_encoder":
        return _text_cases(model, spec)
    if name == "transformer":
        return _transformer_cases(model, spec)
    if name == "vision_encoder":
        return _vision_cases(model, spec)
    return _vae_cases(model, spec, decoder=name == "vae_decoder")


# ----------------------------------------------------------------------------- run


def session_io(session) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """An onnxruntime session's inputs/outputs as TensorSpecs (to check against the manifest)."""
    conv = lambda a: TensorSpec(a.name, _ORT_DTYPES.get(a.type, a.type), tuple(a.shape))  # noqa: E731
    return [conv(a) for a in session.get_inputs()], [conv(a) for a in session.get_outputs()]


def validate_graph(export_dir: Path, manifest: Manifest, name: str, model) -> GraphResult:
    import onnxruntime as ort

    spec = manifest.graph(name)
    threshold = THRESHOLDS[spec.precision]
    session = ort.InferenceSession(str(export_dir / spec.file), providers=["CPUExecutionProvider"])
    check_io(spec, *session_io(session), source="onnxruntime session")
    result = GraphResult(name, spec.precision.value, threshold)
    for label, feeds, reference, valid in validation_cases(name, model, spec, export_dir, manifest):
        with torch.no_grad():
            refs = reference()
        refs = refs if isinstance(refs, tuple) else (refs,)
        gots = session.run([t.name for t in spec.outputs[: len(refs)]], feeds)
        for out_spec, ref, got in zip(spec.outputs, refs, gots):
            max_abs, rel, cos = compare(ref.float().numpy(), got, valid)
            ok = rel <= threshold.max_rel_l2 and cos >= threshold.min_cosine
            case = label if len(refs) == 1 else f"{label} {out_spec.name}"
            result.cases.append(CaseResult(case, max_abs, rel, cos, ok))
            log.info("%s %s: max abs %.2e, rel L2 %.2e, cosine %.8f%s", name, case, max_abs, rel, cos,
                     "" if ok else "  OUT OF BOUNDS")
    return result


def validate(export_dir: str | Path, model="demo", report: str | Path | None = None,
             graphs: list[str] | None = None, verify_hashes: bool = True) -> ValidationReport:
    """Validate every graph (or ``graphs``) of an export against ``model`` (a folder, "demo" or a
    ``LoadedModel``); writes the JSON report (default ``<export_dir>/validation.json``)."""
    from tqdm.auto import tqdm

    export_dir = Path(export_dir)
    manifest = load_manifest(export_dir, verify_hashes=verify_hashes)
    if not hasattr(model, "transformer"):
        from qwen_image2_ref.model_folder import load_model

        model = load_model(model)
    names = graphs or list(manifest.graphs)
    results = [validate_graph(export_dir, manifest, n, model) for n in tqdm(names, desc="validate", unit="graph")]
    out = ValidationReport(str(export_dir), results)
    report_path = Path(report) if report else export_dir / REPORT_NAME
    write_text_atomic(report_path, json.dumps(out.to_dict(), indent=2) + "\n")
    log.info("validation %s: report %s", "passed" if out.passed else "FAILED", report_path)
    return out
