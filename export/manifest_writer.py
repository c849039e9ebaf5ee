"""Writing an export directory: manifest sections from a loaded model, atomic staging.

Everything is written into a hidden staging directory next to the output
(``.<name>.tmp-<id>``); the manifest is written last, then the staging directory is renamed
into place. An export that fails or is killed leaves at most a hidden staging directory, never
a directory at ``out`` that looks complete. A failing export removes its own staging directory;
one that was killed cannot, so each export holds a ``flock`` on ``.<name>.tmp-<id>.lock`` and
the next export to the same ``out`` removes the staging directories whose lock nobody holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: killed exports' staging is not swept
    fcntl = None

from qwen_image_edge.export.graphs import vision_tower
from qwen_image_edge.export.iospec import condition_range, target_range
from qwen_image_edge.runtime.errors import ManifestError
from qwen_image_edge.runtime.manifest import MANIFEST_NAME, GraphSpec, Manifest, parse_section, sha256_file
from qwen_image_edge.runtime.sections import (
    ImageSection,
    ModelSection,
    PromptSection,
    Provenance,
    ScheduleSection,
)
from qwen_image_edge.runtime.tokens import prompt_text

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"
TOOLS = ("qwen-image-edge", "torch", "transformers", "onnx", "onnxruntime", "onnx-graphsurgeon")


def tool_versions() -> dict[str, str]:
    out = {}
    for name in TOOLS:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _lock(path: Path):
    """Create ``path`` and hold an exclusive ``flock`` on it; returns the open file (None without fcntl).
    The kernel drops the lock when the process dies, however it dies."""
    if fcntl is None:
        return None
    f = open(path, "x")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def _unlock(f, path: Path) -> None:
    if f is not None:
        path.unlink(missing_ok=True)
        f.close()


def sweep_stale_staging(out: Path) -> list[Path]:
    """Remove staging directories of exports to ``out`` that were killed: each staging directory has a
    ``.lock`` file next to it that its export holds locked; a lock nobody holds means the export is gone.
    Staging of a running export, and a staging directory without a lock file, stay."""
    out = Path(out)
    if fcntl is None or not out.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(out.name)}\.tmp-[0-9a-f]{{8}}\.lock")
    removed = []
    for lock in out.parent.iterdir():
        if pattern.fullmatch(lock.name) is None:
            continue
        try:
            f = open(lock)
        except OSError:
            continue  # removed meanwhile
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # held: that export is running
            staging = lock.with_name(lock.name[: -len(".lock")])
            if staging.exists():
                log.warning("removing %s: staging of an export to %s that was killed", staging, out)
                shutil.rmtree(staging, ignore_errors=True)
                removed.append(staging)
            lock.unlink(missing_ok=True)
    return removed


@contextlib.contextmanager
def staging_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh hidden directory next to ``out``; rename it to ``out`` when the block succeeds."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ManifestError(f"export directory {out} already exists; choose another --out or allow overwriting")
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_staging(out)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    lock_path = tmp.with_name(tmp.name + ".lock")
    lock = _lock(lock_path)
    try:
        tmp.mkdir()
        yield tmp
        if not (tmp / MANIFEST_NAME).is_file():
            raise ManifestError(f"export staging {tmp}: no {MANIFEST_NAME} was written; refusing to publish")
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _unlock(lock, lock_path)


def copy_tokenizer(model_path: Path, staging: Path) -> dict[str, str]:
    """Copy ``processor/tokenizer.json`` (+ tokenizer_config.json) into ``tokenizer/``."""
    src, dst = model_path / "processor", staging / TOKENIZER_DIR
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    rel = f"{TOKENIZER_DIR}/tokenizer.json"
    return {"tokenizer": rel, "tokenizer_sha256": sha256_file(staging / rel)}


def prompt_section(model, tokenizer_files: dict[str, str]) -> PromptSection:
    tok = model.encoder.tokenizer
    p = model.config.pipeline
    return PromptSection(
        tokenizer=tokenizer_files["tokenizer"],
        tokenizer_sha256=tokenizer_files["tokenizer_sha256"],
        template=prompt_text("{prompt}", 0, tok.system_prompt),
        system_prompt=tok.system_prompt,
        drop_rule="after left padding, drop the first drop_idx tokens (the system turn)",
        drop_idx=tok.drop_idx,
        pad_token=tok.tokenizer.id_to_token(tok.pad_id),
        max_prompt_tokens=p.max_prompt_tokens,
        max_condition_images=p.max_condition_images,
    )


def schedule_section(model) -> ScheduleSection:
    return model.config.pipeline.schedule_section()


def image_section(model, min_resolution: int, max_resolution: int, multiple: int) -> ImageSection:
    cfg = model.config
    condition, target = condition_range(cfg), target_range(cfg, max_resolution)
    return ImageSection(
        output_resolution=cfg.pipeline.output_resolution,
        min_resolution=min_resolution,
        max_resolution=max_resolution,
        multiple=multiple,
        vae_scale_factor=cfg.vae.scale_factor_spatial,
        # condition images (editing): the aspect ratios and resized sizes the graphs were sized for
        condition=condition,
        # output sizes: squares up to max_resolution and every condition aspect at the output area
        target=target,
        latent_channels=cfg.vae.z_dim,
        vision=model.encoder.vision,
        vision_tower=vision_tower(model.encoder.model),
        # Editing: condition images go through vision_encoder, then the same text_encoder graph as
        # text prompts (its visual inputs are empty for text); vae_encoder gives condition latents.
        text_encoder_visual_inputs="shared",
    )


EXPORTERS = {
    False: "torch.onnx TorchScript (dynamo=False) + onnx-graphsurgeon clean-up",
    True: "lean: torch.onnx dynamo exporter under FakeTensorMode (no weights traced), initializers attached "
          "from the checkpoint shards as external data",
}


def provenance_section(model, lean: bool = False) -> Provenance:
    from qwen_image2_ref.checkpoint import checkpoint_digest

    digests = {c: checkpoint_digest(model.path / c) for c in ("transformer", "vae", "text_encoder")}
    index_file = Path(model.path) / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    return Provenance(
        source={"path": str(model.path), "name": model.config.name, "checkpoint_sha256": digests,
                # LoRA adapters fused into the transformer (file, sha256, scale, rank, layers touched)
                **({"loras": [a.provenance() for a in model.loras]} if getattr(model, "loras", ()) else {})},
        tool_versions=tool_versions(),
        exporter=EXPORTERS[bool(lean)],
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        calibration=None,
        # a distilled student's folder says what it was distilled from (qwen_image_edge.distill.trainer)
        distillation=(index.get("qwen_image_edge") or {}).get("distilled_from"),
    )


def model_section(model) -> ModelSection:
    """The ModelConfig as JSON, typed where the runtime reads it."""
    config = json.loads(json.dumps(dataclasses.asdict(model.config)))  # tuples -> lists
    return parse_section(ModelSection, config, "model", where="export")


def build_manifest(model, graphs: dict[str, GraphSpec], prompt: PromptSection, image: ImageSection,
                   lean: bool = False) -> Manifest:
    return Manifest(
        model=model_section(model),
        prompt=prompt,
        schedule=schedule_section(model),
        image=image,
        graphs=graphs,
        provenance=provenance_section(model, lean),
    )


def write_manifest(staging: Path, manifest: Manifest) -> Path:
    """The last write of an export."""
    path = staging / MANIFEST_NAME
    write_text_atomic(path, manifest.to_json())
    log.info("wrote %s (%d graphs)", path, len(manifest.graphs))
    return path
