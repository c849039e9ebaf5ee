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
import onnxruntime as ort
import torch
from tqdm.auto import tqdm

from qwen_image2_ref.model_folder import ModelSource, open_model
from qwen_image_edge.export.endtoend import EndToEndBound, EndToEndResult, end_to_end
from qwen_image_edge.export.manifest_writer import write_text_atomic
from qwen_image_edge.export.registry import validation_cases
from qwen_image_edge.runtime.errors import ConfigError, ManifestError
from qwen_image_edge.runtime.graphs import check_graph_names
from qwen_image_edge.runtime.manifest import Manifest, Precision, TensorSpec, check_io, load_manifest

log = logging.getLogger(__name__)

REPORT_NAME = "validation.json"
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(bool)": "bool",
               "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16", "tensor(int32)": "int32"}


@dataclass(frozen=True)
class Threshold:
    max_rel_l2: float
    min_cosine: float


# Each bound and why (relative L2 over valid elements; cosine follows as about 1 - rel^2 / 2).
# fp32: same math, different kernels (summation order) -> ~1e-7..1e-6 relative; 1e-5 leaves 10x.
# fp16/bf16: rounding of activations, 11 / 8 significant bits (unit roundoff 4.9e-4 / 3.9e-3) over a
#   few dozen accumulating ops; ~10x / ~5x the unit roundoff.
# int8/fp8 (W8A8): a sanity bound; image quality is gated end to end (ENDTOEND below). Measured on
#   the demo model: the exported graph equals modelopt's simulated quantization to 1e-4 relative
#   (the export is faithful) and each layer errs as its grids predict (tests/test_quant.py,
#   step^2 / 12 per rounding); the whole transformer errs 2..6 % (int8) / 2..5 % (fp8) on these
#   random cases and 1.2..8.7 % (int8) / up to 7.7 % (fp8) on its own denoising inputs, the latest
#   steps worst; the tiny random model calibrated on 2 prompts x 2 steps errs 12 % here (random
#   inputs outside its few calibrated ranges clip) yet its images reach 46 dB. So the old 5e-2
#   failed sound quantizations. 0.25 (cosine 0.97) passes them and stops a broken graph (a wrong
#   scale axis, layout or zero point: far outside the grids' band per layer, tests/test_quant.py).
THRESHOLDS: dict[Precision, Threshold] = {
    Precision.FP32: Threshold(1e-5, 0.99999),
    Precision.FP16: Threshold(5e-3, 0.9999),
    Precision.BF16: Threshold(2e-2, 0.9995),
    Precision.INT8: Threshold(0.25, 0.97),
    Precision.FP8: Threshold(0.25, 0.97),
    # int4 weight-only (the text encoder's language model, AWQ): the same sanity bound; the encoder's
    # own figure is its hidden states' cosine over the calibration prompts (>= 0.99, measured in
    # tests/test_encoder_quant.py with outlier channels), and images are gated end to end.
    Precision.INT4: Threshold(0.25, 0.97),
}

# End to end: runtime vs reference images, same seed, PSNR over RGBA in [0, 1]. fp32: measured
# 125..144 dB on the demo model (float summation order only); 60 dB is still 1e-3 rms. Quantized:
# measured 30.3..51 dB (int8, default calibration); 25 dB (rms 5.6 % of full scale) lets the
# quantization through and stops a broken graph (noise or a wrong layout gives ~10 dB). Adherence
# (demo model, judge on 8 held-out prompts): at most one image in eight (12.5 points) flips per key.
ENDTOEND: dict[Precision, EndToEndBound] = {
    Precision.FP32: EndToEndBound(60.0, 12.5),
    Precision.FP16: EndToEndBound(40.0, 12.5),
    Precision.BF16: EndToEndBound(35.0, 12.5),
    Precision.INT8: EndToEndBound(25.0, 12.5),
    Precision.FP8: EndToEndBound(25.0, 12.5),
    Precision.INT4: EndToEndBound(25.0, 12.5),
}


# What a comparison against a reference run in a lower dtype can promise: the reference's own
# rounding (u = 2^-8 bf16, 2^-11 fp16). Measured on this CPU, worst graph: demo fp32 export 2.3 u
# (bf16, the transformer) and 2.5 u (fp16); the tiny random model 4.2 u (bf16, the VAE decoder,
# the longest chain of rounded ops). The bound is 8 u, about twice the worst; cosine 1 - (8 u)^2 / 2.
# End to end: the 35 dB for bf16 images; fp16 (8x finer) 45 dB.
# A graph's bound is the looser of its precision's and its reference's.
REFERENCE_BOUNDS: dict[torch.dtype, tuple[Threshold, float]] = {
    torch.float32: (Threshold(0.0, 1.0), float("inf")),
    torch.bfloat16: (Threshold(8 * 2.0 ** -8, 0.9995), 35.0),
    torch.float16: (Threshold(8 * 2.0 ** -11, 0.99999), 45.0),
}


def bound_for(precision: Precision, reference: torch.dtype) -> Threshold:
    graph, (ref, _) = THRESHOLDS[precision], REFERENCE_BOUNDS[reference]
    return Threshold(max(graph.max_rel_l2, ref.max_rel_l2), min(graph.min_cosine, ref.min_cosine))


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
    end_to_end: EndToEndResult | None = None
    report_path: str = ""

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.graphs) and (self.end_to_end is None or self.end_to_end.passed)

    def to_dict(self) -> dict:
        return {
            "export_dir": self.export_dir,
            "passed": self.passed,
            "graphs": [{**asdict(g), "passed": g.passed} for g in self.graphs],
            "end_to_end": self.end_to_end.to_dict() if self.end_to_end else None,
        }

    def table(self) -> str:
        """One screen: failing cases first, then one line per graph (its worst case), the end-to-end
        check, the verdict and where the JSON report went. Each bound names its metric."""
        rows = [("graph", "precision", "case", "rel L2", "cosine", "bound", "ok")]
        bound = lambda t: f"rel L2 <= {t.max_rel_l2:g}, cosine >= {t.min_cosine:g}"  # noqa: E731
        for g in self.graphs:
            for c in g.cases:
                if not c.passed:
                    rows.append((g.graph, g.precision, c.shape, f"{c.rel_l2:.2e}", f"{c.cosine:.6f}",
                                 bound(g.threshold), "FAIL"))
        for g in sorted(self.graphs, key=lambda g: g.passed):
            worst = max(g.cases, key=lambda c: c.rel_l2, default=None)
            if worst is not None and g.passed:
                rows.append((g.graph, g.precision, f"worst of {len(g.cases)}: {worst.shape}",
                             f"{worst.rel_l2:.2e}", f"{worst.cosine:.6f}", bound(g.threshold), "ok"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        if self.end_to_end is not None:
            lines.extend(_end_to_end_lines(self.end_to_end))
        lines.append(f"{'PASSED' if self.passed else 'FAILED'}: {self.export_dir}")
        if self.report_path:
            lines.append(f"JSON report: {self.report_path}")
        return "\n".join(lines)


def _end_to_end_lines(e: EndToEndResult) -> list[str]:
    ok = "ok" if e.min_psnr >= e.bound.min_psnr_db else "FAIL"
    lines = [f"end to end ({e.prompts} prompts, seed {e.seed}): PSNR min {e.min_psnr:.1f} dB, mean "
             f"{np.mean(e.psnr_db):.1f} dB (bound: PSNR >= {e.bound.min_psnr_db:.0f} dB) {ok}"]
    for k, drop in e.adherence_drop.items():
        ok = "ok" if drop <= e.bound.max_adherence_drop else "FAIL"
        lines.append(f"  adherence {k}: runtime {e.adherence_runtime[k]:.1f} vs reference "
                     f"{e.adherence_reference[k]:.1f} points (bound: drop <= {e.bound.max_adherence_drop}) {ok}")
    return lines


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


# ----------------------------------------------------------------------------- run


def session_io(session) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """An onnxruntime session's inputs/outputs as TensorSpecs (to check against the manifest)."""
    conv = lambda a: TensorSpec(a.name, _ORT_DTYPES.get(a.type, a.type), tuple(a.shape))  # noqa: E731
    return [conv(a) for a in session.get_inputs()], [conv(a) for a in session.get_outputs()]


def validate_graph(export_dir: Path, manifest: Manifest, name: str, model) -> GraphResult:
    spec = manifest.graph(name)
    threshold = bound_for(spec.precision, model.dtype)
    session = ort.InferenceSession(str(export_dir / spec.file), providers=["CPUExecutionProvider"])
    check_io(spec, *session_io(session), source="onnxruntime session")
    result = GraphResult(name, spec.precision.value, threshold)
    for label, feeds, reference, valid in validation_cases(name, model, spec, export_dir, manifest):
        with torch.no_grad():
            refs = reference()
        refs = refs if isinstance(refs, tuple) else (refs,)
        gots = session.run([t.name for t in spec.outputs[: len(refs)]], feeds)
        for out_spec, ref, got in zip(spec.outputs, refs, gots):
            max_abs, rel, cos = compare(ref.float().cpu().numpy(), got, valid)
            ok = rel <= threshold.max_rel_l2 and cos >= threshold.min_cosine
            case = label if len(refs) == 1 else f"{label} {out_spec.name}"
            result.cases.append(CaseResult(case, max_abs, rel, cos, ok))
            log.info("%s %s: max abs %.2e, rel L2 %.2e, cosine %.8f%s", name, case, max_abs, rel, cos,
                     "" if ok else "  OUT OF BOUNDS")
    return result


def check_adapters(export_dir: Path, manifest: Manifest, model) -> None:
    """The reference must carry the LoRA adapters the export fused (same files by sha256, same scales,
    same order): else every graph would be compared against other weights, and a gate that fails
    (or passes) for that reason says nothing. The manifest names the files but not where they are,
    so the user passes them again with ``--lora``; the error says which."""
    recorded = manifest.provenance.source.get("loras") or []
    fused = getattr(model, "loras", ()) or ()
    want = [(a.get("sha256"), float(a.get("scale", 1.0))) for a in recorded]
    have = [(a.sha256, float(a.scale)) for a in fused]
    if want == have:
        return
    need = " ".join(f"--lora {a.get('file')}:{float(a.get('scale', 1.0)):g}" for a in recorded) or "no --lora"
    got = ", ".join(f"{a.path.name}:{a.scale:g}" for a in fused) or "none"
    raise ConfigError(f"validate {export_dir}: the export fused LoRA adapters the reference lacks or does not match "
                      f"(reference: {got}); pass {need}")


def _precision_of(manifest: Manifest) -> Precision:
    """The export's precision for the end-to-end bound: the lowest of its graphs'."""
    order = [Precision.FP32, Precision.BF16, Precision.FP16, Precision.FP8, Precision.INT8, Precision.INT4]
    return max((g.precision for g in manifest.graphs.values()), key=order.index)


def validate(export_dir: str | Path, model: ModelSource = "demo", report: str | Path | None = None,
             graphs: list[str] | None = None, verify_hashes: bool = True,
             end_to_end_prompts: int = 8) -> ValidationReport:
    """Validate every graph (or ``graphs``) of an export against ``model`` (a folder, "demo" or a
    ``LoadedModel``), then (with every graph of an export that generates, and ``end_to_end_prompts``
    > 0) the runtime's images
    against the reference's; writes the JSON report (default ``<export_dir>/validation.json``)."""
    names = check_graph_names(graphs, where="validate graphs") if graphs else None
    export_dir = Path(export_dir)
    manifest = load_manifest(export_dir, verify_hashes=verify_hashes)
    names = names or list(manifest.graphs)
    for name in names:
        manifest.graph(name)  # a known graph this export lacks: ManifestError before any work
    model = open_model(model)
    check_adapters(export_dir, manifest, model)
    results = [validate_graph(export_dir, manifest, n, model) for n in tqdm(names, desc="validate", unit="graph")]
    report_path = Path(report) if report else export_dir / REPORT_NAME
    out = ValidationReport(str(export_dir), results, report_path=str(report_path))
    generates = {"text_encoder", "vae_decoder"} <= set(manifest.graphs) and (
        "transformer" in manifest.graphs or "transformer_step" in manifest.graphs)
    if end_to_end_prompts > 0 and generates and set(names) == set(manifest.graphs):
        bound = ENDTOEND[_precision_of(manifest)]
        bound = EndToEndBound(min(bound.min_psnr_db, REFERENCE_BOUNDS[model.dtype][1]), bound.max_adherence_drop)
        out.end_to_end = end_to_end(export_dir, model, bound, prompts=end_to_end_prompts)
        log.info("end to end: PSNR min %.1f dB; adherence drop %s", out.end_to_end.min_psnr,
                 out.end_to_end.adherence_drop)
    write_text_atomic(report_path, json.dumps(out.to_dict(), indent=2) + "\n")
    log.info("validation %s: report %s", "passed" if out.passed else "FAILED", report_path)
    return out
