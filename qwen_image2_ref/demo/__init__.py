"""The embedded demo model: a small Qwen-Image-2.1-architecture model trained by this project
(``python -m qwen_image2_ref.demo.train``) and shipped in ``weights/`` as a diffusers-layout
checkpoint folder; ``--model demo`` resolves to it. Beside it, ``student/``: its 4-step distilled
student (``qwen-image-edge distill --teacher demo``), ``--model demo-4step``."""

from __future__ import annotations

from pathlib import Path

from qwen_image_edge.runtime.errors import CheckpointError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
STUDENT_DIR = Path(__file__).resolve().parent / "student"
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
