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
from qwen_image_edge.export.manifest_writer import write_text_atomic
from qwen_image_edge.export.registry import validation_cases
from qwen_image_edge.runtime.errors import ManifestError
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


# ----------------------------------------------------------------------------- run


def session_io(session) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """An onnxruntime session's inputs/outputs as TensorSpecs (to check against the manifest)."""
    conv = lambda a: TensorSpec(a.name, _ORT_DTYPES.get(a.type, a.type), tuple(a.shape))  # noqa: E731
    return [conv(a) for a in session.get_inputs()], [conv(a) for a in session.get_outputs()]


def validate_graph(export_dir: Path, manifest: Manifest, name: str, model) -> GraphResult:
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


def validate(export_dir: str | Path, model: ModelSource = "demo", report: str | Path | None = None,
             graphs: list[str] | None = None, verify_hashes: bool = True) -> ValidationReport:
    """Validate every graph (or ``graphs``) of an export against ``model`` (a folder, "demo" or a
    ``LoadedModel``); writes the JSON report (default ``<export_dir>/validation.json``)."""
    names = check_graph_names(graphs, where="validate graphs") if graphs else None
    export_dir = Path(export_dir)
    manifest = load_manifest(export_dir, verify_hashes=verify_hashes)
    names = names or list(manifest.graphs)
    for name in names:
        manifest.graph(name)  # a known graph this export lacks: ManifestError before any work
    model = open_model(model)
    results = [validate_graph(export_dir, manifest, n, model) for n in tqdm(names, desc="validate", unit="graph")]
    out = ValidationReport(str(export_dir), results)
    report_path = Path(report) if report else export_dir / REPORT_NAME
    write_text_atomic(report_path, json.dumps(out.to_dict(), indent=2) + "\n")
    log.info("validation %s: report %s", "passed" if out.passed else "FAILED", report_path)
    return out
