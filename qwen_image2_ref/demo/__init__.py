"""The embedded demo model: a small Qwen-Image-2.1-architecture model trained by this project
(``python -m qwen_image2_ref.demo.train``) and shipped in ``weights/`` as a diffusers-layout
checkpoint folder; ``--model demo`` resolves to it. Beside it, ``student/``: its 4-step distilled
student (``qwen-image-edge distill --teacher demo``), ``--model demo-4step``."""

from __future__ import annotations

import json
from pathlib import Path

from qwen_image_edge.runtime.errors import CheckpointError, ConfigError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
STUDENT_DIR = Path(__file__).resolve().parent / "student"
# model_index.json's qwen_image_edge entry naming the caption language a demo-trained folder learned
# (captions.CaptionStyle value); the trainer writes it, distillation carries it to the student.
CAPTION_STYLE_KEY = "demo_caption_style"
# Guidance needs an unconditional branch; the demo model learned it from captions dropped to this.
NEGATIVE_PROMPT = " "


def _shipped(folder: Path, what: str, how: str) -> Path:
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{what}: expected the shipped checkpoint at {folder}/model_index.json, not found ({how})")
    return folder


def weights_path() -> Path:
    """The shipped checkpoint folder (``model_index.json``, ``transformer/``, ``vae/``, ...)."""
    return _shipped(WEIGHTS_DIR, "demo model", "train it with `python -m qwen_image2_ref.demo.train --weights <that folder>`")


def student_path() -> Path:
    """The shipped 4-step distilled student of the demo model (same folder layout)."""
    return _shipped(STUDENT_DIR, "demo student", "make it with `qwen-image-edge distill --teacher demo --steps 4,8 "
                    "--out DIR` and copy DIR/student")


# The names ``--model`` accepts for the shipped folders, and where each resolves.
SHIPPED_MODELS = {"demo": weights_path, "demo-4step": student_path}


def is_shipped(model) -> bool:
    """Whether ``model`` (a name or a path) names one of the shipped demo folders."""
    return str(model) in SHIPPED_MODELS


def caption_style(folder: str | Path) -> str | None:
    """The caption language of a demo-trained checkpoint folder: what its ``model_index.json``
    records, else "v1" for the shipped folders (trained before the key existed); None for a folder
    that is not the demo model's (a real checkpoint, a tiny test model). A recorded language this
    code does not know is a ConfigError, so no caller meets it as a bare ValueError."""
    from qwen_image2_ref.demo.captions import CaptionStyle  # the package's modules import this one

    folder = Path(folder)
    try:  # model_folder's MODEL_INDEX / EDGE_KEY, spelled out: model_folder imports this package
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    entry = index.get("qwen_image_edge") if isinstance(index, dict) else None
    style = entry.get(CAPTION_STYLE_KEY) if isinstance(entry, dict) else None
    if style is not None:
        known = [s.value for s in CaptionStyle]
        if style not in known:
            raise ConfigError(f"{folder}: demo caption style {style!r}, expected one of {known}")
        return style
    shipped = {WEIGHTS_DIR.resolve(), STUDENT_DIR.resolve()}
    return "v1" if folder.resolve() in shipped else None
