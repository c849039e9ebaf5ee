"""Export a checkpoint once and reuse it: what ``qwen-image-edge demo`` runs before the runtime."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from qwen_image_edge.runtime.errors import ManifestError
from qwen_image_edge.runtime.manifest import GRAPH_NAMES, load_manifest

log = logging.getLogger(__name__)

DEMO_MAX_RESOLUTION = 256  # the demo model trains at 128 px and one other aspect; leave headroom


def cache_dir() -> Path:
    root = os.environ.get("QWEN_IMAGE_EDGE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(root) / "qwen-image-edge"


def ensure_export(model: str | os.PathLike = "demo", out: str | os.PathLike | None = None,
                  max_resolution: int | None = DEMO_MAX_RESOLUTION) -> Path:
    """An export directory of ``model``: reused when its manifest verifies and its recorded source
    checkpoint digests equal the model's, otherwise (re-)exported."""
    from qwen_image_edge.export.onnx_export import export_model
    from qwen_image2_ref.checkpoint import checkpoint_digest
    from qwen_image2_ref.demo import is_shipped
    from qwen_image2_ref.model_folder import resolve_model_path

    path = resolve_model_path(model)
    out = Path(out) if out is not None else cache_dir() / f"{model if is_shipped(model) else path.name}-export"
    digests = {c: checkpoint_digest(path / c) for c in ("transformer", "vae", "text_encoder")}
    if (out / "manifest.json").is_file():
        try:
            manifest = load_manifest(out, verify_hashes=True)
            missing = set(GRAPH_NAMES) - set(manifest.graphs)
            if missing:
                log.info("export %s lacks graphs %s; exporting again", out, sorted(missing))
            elif manifest.provenance.get("source", {}).get("checkpoint_sha256") == digests:
                log.info("reusing export %s", out)
                return out
            else:
                log.info("export %s is from another checkpoint; exporting again", out)
        except ManifestError as exc:
            log.warning("export %s does not verify (%s); exporting again", out, exc)
    out.parent.mkdir(parents=True, exist_ok=True)
    export_model(str(path), out, max_resolution=max_resolution, overwrite=True)
    return out
