"""Export a checkpoint once and reuse it: what ``qwen-image-edge demo`` runs before the runtime."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from qwen_image_edge.runtime.errors import ManifestError
from qwen_image_edge.runtime.manifest import GRAPH_NAMES, MANIFEST_NAME, load_manifest

log = logging.getLogger(__name__)

DEMO_MAX_RESOLUTION = 256  # the demo model trains at 128 px and one other aspect; leave headroom
COMPONENTS = ("transformer", "vae", "text_encoder")


def cache_dir() -> Path:
    root = os.environ.get("QWEN_IMAGE_EDGE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(root) / "qwen-image-edge"


def ensure_export(model: str | os.PathLike = "demo", out: str | os.PathLike | None = None,
                  max_resolution: int | None = DEMO_MAX_RESOLUTION, overwrite: bool = False) -> Path:
    """An export directory of ``model``: reused when its manifest verifies and its recorded source
    checkpoint digests equal the model's, otherwise (re-)exported.

    Only an export made from the same source (the same checkpoint folder, or the same weights) is
    replaced without ``overwrite``: one whose weights changed, that lacks graphs or no longer
    verifies. Anything else at ``out`` (an export of another model, files that are not an export)
    is refused with a ManifestError, and left untouched, unless ``overwrite``. In the default cache
    folder (``out`` None), which only this function writes, an export without a readable source is redone.
    """
    from qwen_image2_ref.checkpoint import checkpoint_digest
    from qwen_image2_ref.demo import is_shipped
    from qwen_image2_ref.model_folder import resolve_model_path

    path = resolve_model_path(model)
    ours = out is None
    out = Path(out) if out is not None else cache_dir() / f"{model if is_shipped(model) else path.name}-export"
    digests = {c: checkpoint_digest(path / c) for c in COMPONENTS}
    if out.exists() and _reusable(out, path, digests, overwrite, ours):
        return out
    return _export(path, out, max_resolution)


def _reusable(out: Path, path: Path, digests: dict[str, str], overwrite: bool, ours: bool) -> bool:
    """True: reuse ``out``; False: it may be replaced; raises when it must be kept."""
    if not out.is_dir():
        raise ManifestError(f"export directory {out}: exists and is not a directory; choose another --export-dir")
    if not any(out.iterdir()):
        return False  # an empty folder: nothing to lose
    source = _recorded_source(out)
    same = source is not None and (_same_path(source.get("path"), path) or source.get("checkpoint_sha256") == digests)
    if not same:
        if overwrite or (ours and source is None):
            log.warning("replacing %s (%s)", out, _describe(out, source))
            return False
        raise ManifestError(f"export directory {out}: {_describe(out, source)}, not an export of {path}; "
                            "choose another --export-dir, or pass --overwrite to replace it")
    try:
        manifest = load_manifest(out, verify_hashes=True)
    except ManifestError as exc:
        log.warning("export %s does not verify (%s); exporting again", out, exc)
        return False
    missing = set(GRAPH_NAMES) - set(manifest.graphs)
    if missing:
        log.info("export %s lacks graphs %s; exporting again", out, sorted(missing))
        return False
    if source.get("checkpoint_sha256") != digests:
        log.info("export %s is from other weights of %s; exporting again", out, path)
        return False
    log.info("reusing export %s", out)
    return True


def _recorded_source(out: Path) -> dict | None:
    """``provenance.source`` of the manifest as written (readable even when the export does not verify)."""
    try:
        raw = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
        source = raw["provenance"]["source"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    return source if isinstance(source, dict) else None


def _same_path(recorded, path: Path) -> bool:
    try:
        return recorded is not None and Path(recorded).resolve() == path.resolve()
    except (OSError, TypeError, ValueError):
        return False


def _describe(out: Path, source: dict | None) -> str:
    if source is None:
        return f"holds files but no readable {MANIFEST_NAME} with a source"
    return f"holds an export of {source.get('name', '?')} ({source.get('path', '?')})"


def _export(path: Path, out: Path, max_resolution: int | None) -> Path:
    """Export, creating missing parent folders; a failure removes the folders it created."""
    from qwen_image_edge.export.onnx_export import export_model

    created = []
    for parent in reversed(out.parents):
        if not parent.exists():
            created.append(parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        export_model(str(path), out, max_resolution=max_resolution, overwrite=True)
    except BaseException:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:  # not empty (another process wrote there): leave it
                break
        raise
    return out
