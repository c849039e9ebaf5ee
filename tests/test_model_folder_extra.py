"""save_model's extra files (a LoRA student's adapter) are written into the staging folder, so the
folder appears whole or not at all."""

from __future__ import annotations

import pytest

from qwen_image2_ref.model_folder import load_model, save_model


def _save(model, folder, write_extra, overwrite=False):
    return save_model(folder, model.config, model.transformer, model.vae, model.encoder, overwrite=overwrite,
                      write_extra=write_extra)


def test_extra_files_are_in_the_folder_when_it_appears(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir)
    seen = []

    def write(staging):
        seen.append(staging)
        (staging / "extra.bin").write_bytes(b"adapter")

    folder = _save(model, tmp_path / "student", write)
    assert seen[0] != folder and seen[0].parent == folder.parent  # written while staging, not after
    assert (folder / "extra.bin").read_bytes() == b"adapter"
    assert load_model(folder).config.transformer == model.config.transformer


def test_a_failing_extra_file_leaves_the_previous_folder(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir)
    folder = _save(model, tmp_path / "student", lambda d: (d / "extra.bin").write_bytes(b"old"))

    def fail(staging):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _save(model, folder, fail, overwrite=True)
    assert (folder / "extra.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no staging folder left
