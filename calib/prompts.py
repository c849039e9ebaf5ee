"""Calibration prompt sets shipped with the project.

- ``general``: 336 prompts for real text-to-image models (subjects x settings x styles, some
  with text to render), the role ``calibration-prompts.txt`` plays in TensorRT's demo;
- ``demo``: 512 captions in the demo model's first language (v1), sampled from its training split
  (``qwen_image2_ref.demo.data``, seed 20261126), never from the held-out evaluation prompts;
- ``demo-v2``: 512 captions in the v2 language (optional background phrase, more word orders),
  ``qwen_image2_ref.demo.captions.calibration_captions(512, 20261126)``, training split too.

A demo-trained folder gets the set of the language its ``model_index.json`` records.

Any other name is read as a UTF-8 text file with one prompt per line.

Edits (:func:`calibration_edits`): a demo-trained folder edits rendered training-split scenes with
the data generator's instructions; any other model edits the images it draws for its calibration
prompts with ``general_edits.txt`` (40 everyday instructions).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwen_image2_ref.demo import caption_style
from qwen_image_edge.runtime.errors import ConfigError, InputError

DATA_DIR = Path(__file__).resolve().parent / "data"
PROMPT_SETS = {"general": DATA_DIR / "general_prompts.txt", "demo": DATA_DIR / "demo_captions.txt",
               "demo-v2": DATA_DIR / "demo_captions_v2.txt"}
# The prompt set of each demo caption language (a folder's ``demo_caption_style``).
DEMO_SETS = {"v1": "demo", "v2": "demo-v2"}
GENERAL_EDITS = DATA_DIR / "general_edits.txt"
DEMO_EDIT_SEED = 20261126


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
    """The demo set in the caption language of a demo-trained folder (the shipped ones, or one the
    demo trainer saved), ``general`` otherwise."""
    style = caption_style(model_path)
    return "general" if style is None else DEMO_SETS[style]


def is_demo_folder(model_path: str | Path) -> bool:
    """Whether ``model_path`` holds a demo-trained model: one of the shipped demo folders, or a folder
    the demo trainer saved (it records its caption language); its data generator then applies."""
    return caption_style(model_path) is not None


def demo_edits(n: int, seed: int = DEMO_EDIT_SEED) -> list[tuple[np.ndarray, str]]:
    """n edit examples of the demo data generator's training split: (rendered source, RGBA uint8
    ``[128, 128, 4]``; instruction). The held-out split stays for evaluation."""
    from qwen_image2_ref.demo import data

    rng = np.random.default_rng(seed)
    examples = [data.sample_edit(rng, 128, 128, "train") for _ in range(n)]
    return [(data.render(e.source), e.instruction) for e in examples]


def calibration_edits(model_path: str | Path, n: int) -> list[tuple[np.ndarray | None, str]]:
    """n ``(condition image, instruction)`` pairs to calibrate a model's edits on: the demo data
    generator's for a demo-trained folder; else the first n of ``general_edits.txt`` (cycled), each
    with None: the image the model draws for a calibration prompt (``run_calibration``)."""
    if n < 0:
        raise ConfigError(f"calibration edits: expected >= 0, got {n}")
    if is_demo_folder(model_path):
        return demo_edits(n)
    lines = [line.strip() for line in GENERAL_EDITS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(None, lines[k % len(lines)]) for k in range(n)]


def check_calibration_size(calib_size: int, calib_edits: int | None) -> None:
    """The prompt and edit counts, checked before anything loads."""
    if calib_size < 1:
        raise InputError(f"calibration size: expected >= 1 prompt, got {calib_size}")
    if calib_edits is not None and calib_edits < 0:
        raise InputError(f"calibration edits: expected >= 0, got {calib_edits}")
