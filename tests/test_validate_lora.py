"""validate refuses a reference whose LoRA adapters differ from the ones the export fused."""

from __future__ import annotations

import pytest

from qwen_image2_ref.checkpoint import iter_tensors
from qwen_image2_ref.model_folder import load_model
from qwen_image_edge.export.onnx_export import export_model
from qwen_image_edge.export.validate import validate
from qwen_image_edge.runtime.errors import ConfigError
from tests.test_lora import MODULES, _pairs, write_lightning


@pytest.fixture(scope="module")
def adapted_export(tiny_model_dir, tmp_path_factory):
    base = {k: v.double() for k, v in iter_tensors(tiny_model_dir / "transformer")}
    folder = tmp_path_factory.mktemp("validate_lora")
    lora = write_lightning(folder / "lightning.safetensors", _pairs(base, seed=5), {m: 2.0 for m in MODULES})
    other = write_lightning(folder / "other.safetensors", _pairs(base, seed=6), {m: 2.0 for m in MODULES})
    export_model(tiny_model_dir, folder / "export", graphs=["transformer"], lean=False, loras=[(lora, 0.8)])
    return folder / "export", lora, other


@pytest.mark.parametrize("loras", [None, "scale", "other"])
def test_validate_refuses_a_reference_without_the_exports_adapters(tiny_model_dir, adapted_export, loras):
    export, lora, other = adapted_export
    adapters = {None: None, "scale": [(lora, 0.5)], "other": [(other, 0.8)]}[loras]
    model = load_model(tiny_model_dir, loras=adapters)
    with pytest.raises(ConfigError, match=r"pass --lora lightning\.safetensors:0\.8$") as err:
        validate(export, model, end_to_end_prompts=0)
    assert "\n" not in str(err.value)
    assert not (export / "validation.json").exists()  # nothing written


def test_validate_passes_with_the_same_adapters(tiny_model_dir, adapted_export):
    export, lora, _ = adapted_export
    report = validate(export, load_model(tiny_model_dir, loras=[(lora, 0.8)]), end_to_end_prompts=0)
    assert report.passed
