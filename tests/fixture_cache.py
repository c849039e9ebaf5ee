"""The session fixtures' artifacts (tiny model, tiny and demo exports), and their reuse across the
pytest sessions of one mutation run.

tests/mutate.py runs each mutation's tests in a new pytest session, which would rebuild the tiny
model and the exports every time. It sets ``QIE_FIXTURE_CACHE`` to a folder of its workspace; then
an artifact is built once, in a fresh interpreter that imports only what building it needs, and
stored with the sha256 of every project source file that interpreter loaded and of every file the
artifact holds. A later session reuses it only while all those files are unchanged: the mutation
touched no source the build ran (so the mutated code would build these same bytes) and no test
wrote into it. Otherwise that session builds its own, in-process, exactly as without the cache.

    python -m tests.fixture_cache NAME DEST [DEPS_JSON]     # what the cache runs to build one
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE_ENV = "QIE_FIXTURE_CACHE"


def _tiny_model(dest: Path) -> Path:
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(dest)[1]


def _tiny_export(dest: Path, model: str) -> Path:
    from qwen_image2_ref.model_folder import load_model
    from qwen_image_edge.export.onnx_export import export_model

    export_model(load_model(Path(model)), dest / "export", max_resolution=128)
    return dest / "export"


def _demo_export(dest: Path, max_resolution: int | None = None) -> Path:
    from qwen_image_edge.export.onnx_export import export_model

    if max_resolution is None:  # default options, as `qwen-image-edge export --model demo` has them
        export_model("demo", dest / "export")
    else:
        export_model("demo", dest / "export", max_resolution=max_resolution)
    return dest / "export"


# name -> builder(dest folder, **deps) -> the artifact's path (inside dest)
BUILDERS: dict[str, Callable[..., Path]] = {
    "tiny-model": _tiny_model,
    "tiny-export": _tiny_export,
    "demo-export": lambda dest: _demo_export(dest, 256),
    "demo-default": _demo_export,
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): _sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _loaded_sources() -> dict[str, str]:
    """sha256 of every module file this interpreter loaded from the repository."""
    found = {}
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if not file:
            continue
        path = Path(file).resolve()
        if ROOT in path.parents and ".venv" not in path.relative_to(ROOT).parts and path.is_file():
            found[str(path.relative_to(ROOT))] = _sha256(path)
    return found


def _still_valid(entry: Path, deps: dict[str, str]) -> Path | None:
    """The cached artifact's path, or None when a recorded source or artifact file changed."""
    meta = json.loads((entry / "meta.json").read_text())
    if meta["deps"] != deps:
        return None
    for rel, digest in meta["sources"].items():
        if not (ROOT / rel).is_file() or _sha256(ROOT / rel) != digest:
            return None
    out = entry / "out"
    if _tree_hashes(out) != meta["files"]:
        return None
    return out / meta["result"]


def _build_in_fresh_interpreter(name: str, entry: Path, deps: dict[str, str]) -> None:
    tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "tests.fixture_cache", name, str(tmp), json.dumps(deps)],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"fixture_cache: building {name!r} in {tmp} failed (exit {proc.returncode}): "
                           f"{proc.stderr[-2000:]}")
    os.replace(tmp, entry)


def artifact(name: str, tmp_path_factory, **deps: str) -> Path:
    """The artifact ``name``: built into a new session temp folder, or, under a mutation run
    (``QIE_FIXTURE_CACHE`` set), the cached one while it is still what this code would build."""
    cache = os.environ.get(CACHE_ENV)
    if not cache:
        return BUILDERS[name](tmp_path_factory.mktemp(name), **deps)
    entry = Path(cache) / name
    if not entry.is_dir():
        entry.parent.mkdir(parents=True, exist_ok=True)
        _build_in_fresh_interpreter(name, entry, deps)
    found = _still_valid(entry, deps)
    return found if found is not None else BUILDERS[name](tmp_path_factory.mktemp(name), **deps)


def _main(argv: list[str]) -> None:
    name, tmp = argv[0], Path(argv[1])
    deps = json.loads(argv[2]) if len(argv) > 2 else {}
    out = tmp / "out"
    out.mkdir(parents=True)
    result = BUILDERS[name](out, **deps)
    meta = {"deps": deps, "result": str(result.relative_to(out)), "sources": _loaded_sources(),
            "files": _tree_hashes(out)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))


if __name__ == "__main__":
    _main(sys.argv[1:])
