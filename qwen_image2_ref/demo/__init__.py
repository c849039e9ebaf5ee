"""The embedded demo model: a small Qwen-Image-2.1-architecture model trained by this project
(``python -m qwen_image2_ref.demo.train``) and shipped in ``weights/`` as a diffusers-layout
checkpoint folder; ``--model demo`` resolves to it."""

from __future__ import annotations

from pathlib import Path

from runtime.errors import CheckpointError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# Guidance needs an unconditional branch; the demo model learned it from captions dropped to this.
NEGATIVE_PROMPT = " "


def weights_path() -> Path:
    """The shipped checkpoint folder (``model_index.json``, ``transformer/``, ``vae/``, ...)."""
    if not (WEIGHTS_DIR / "model_index.json").is_file():
        raise CheckpointError(
            f"demo model: expected the shipped checkpoint at {WEIGHTS_DIR}/model_index.json, not found "
            "(train it with `python -m qwen_image2_ref.demo.train --weights <that folder>`)"
        )
    return WEIGHTS_DIR
