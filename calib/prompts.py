"""Calibration prompt sets shipped with the project.

- ``general``: 336 prompts for real text-to-image models (subjects x settings x styles, some
  with text to render), the role ``calibration-prompts.txt`` plays in TensorRT's demo;
- ``demo``: 512 captions in the demo model's language, sampled from its training split
  (``qwen_image2_ref.demo.data``, seed 20261126), never from the held-out evaluation prompts.

Any other name is read as a UTF-8 text file with one prompt per line.
"""

from __future__ import annotations

from pathlib import Path

from qwen_image2_ref.demo import STUDENT_DIR, WEIGHTS_DIR
from qwen_image_edge.runtime.errors import ConfigError

DATA_DIR = Path(__file__).resolve().parent / "data"
PROMPT_SETS = {"general": DATA_DIR / "general_prompts.txt", "demo": DATA_DIR / "demo_captions.txt"}


def load_prompts(source: str | Path = "general", limit: int | None = None) -> list[str]:
    """The first ``limit`` (all when None) non-empty lines of a named set or a text file."""
    path = PROMPT_SETS.get(str(source), Path(source))
    if not path.is_file():
        raise ConfigError(
            f"calibration prompts {str(source)!r}: expected one of {sorted(PROMPT_SETS)} or a text file, not found"
        )
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"calibration size: expected >= 1 prompt, got {limit}")
        prompts = prompts[:limit]
    return prompts


def default_prompt_set(model_path: str | Path) -> str:
    """``demo`` for the folder of the embedded demo model or its student, ``general`` otherwise."""
    return "demo" if is_demo_folder(model_path) else "general"


def is_demo_folder(model_path: str | Path) -> bool:
    """Whether ``model_path`` is one of the shipped demo folders (``resolve_model_path("demo")``)."""
    return Path(model_path).resolve() in (WEIGHTS_DIR.resolve(), STUDENT_DIR.resolve())
