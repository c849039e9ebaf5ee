"""A LoRA file made by peft + diffusers for the tiny Qwen-Image-2.1 pipeline: fused by us, it gives the
image diffusers' ``QwenImage21Pipeline.load_lora_weights`` gives (unfused adapter layers) for the
same initial noise, and the exported, fused transformer matches in the runtime.

Bounds: ours fuses ``W + s*B@A`` then multiplies, diffusers computes ``x@W + s*(x@A)@B``; both fp32,
so the images differ by summation order only (as in test_pipeline.py, where 1e-5 max abs holds).
The issue's acceptance bound is PSNR >= 40 dB (images in [0, 1]); the 1e-5 max abs is the stricter one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen_image2_ref.model_folder import load_pipeline
from qwen_image_edge.cli import main
from qwen_image_edge.runtime.sampling import initial_noise
from tests.test_runtime import psnr
from tests.tiny_model import load_peer_pipeline

peft = pytest.importorskip("peft")  # the `lora` extra (in `dev`)

STEPS = 3
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out", "img_in"]


@pytest.fixture(scope="module")
def peft_lora(tiny_model_dir, tmp_path_factory):
    """``pytorch_lora_weights.safetensors`` as diffusers writes it from a peft adapter (rank 4, alpha 8)."""
    from diffusers import QwenImage21Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    peer = load_peer_pipeline(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="gaussian")
    peer.transformer.add_adapter(config)
    torch.manual_seed(0)
    with torch.no_grad():  # peft starts B at zero (no change): give it weights that move the image
        for name, p in peer.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("peft-lora")
    QwenImage21Pipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(peer.transformer),
                                          transformer_lora_adapter_metadata=config.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


def _peer_image(tiny_model_dir, lora, scale: float, seed: int):
    peer = load_peer_pipeline(tiny_model_dir)
    peer.load_lora_weights(str(lora), adapter_name="test")
    peer.set_adapters(["test"], [scale])
    noise = torch.from_numpy(initial_noise(seed, 1, 64, 64, 64))
    with torch.no_grad():
        return peer("a red circle", height=64, width=64, num_inference_steps=STEPS, latents=noise, output_type="np",
                    use_kv_cache=False, output_resolution=64).images


@pytest.mark.slow
@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_fused_matches_diffusers_load_lora_weights(tiny_model_dir, peft_lora, scale):
    ref = _peer_image(tiny_model_dir, peft_lora, scale, seed=3)
    kw = dict(width=64, height=64, steps=STEPS, seed=3, output="np", progress=False)
    ours = load_pipeline(tiny_model_dir, loras=[(peft_lora, scale)]).generate("a red circle", **kw)
    plain = load_pipeline(tiny_model_dir).generate("a red circle", **kw)
    assert np.abs(ours - plain).mean() > 1e-3  # the adapter changed the image: the match is not vacuous
    assert psnr(ours, ref) >= 40.0
    assert np.abs(ours - ref).max() <= 1e-5  # measured 9e-7 (PSNR 139 dB)


@pytest.mark.slow
def test_exported_fused_graphs_match_in_the_runtime(tiny_model_dir, peft_lora, tmp_path):
    """``export --lora FILE:0.6`` then the torch-free runtime: the diffusers image, fp32 graphs vs eager
    (measured 1.1e-6 max abs in test_runtime.py; the issue asks >= 35 dB, we keep test_runtime's 1e-5)."""
    from qwen_image_edge.runtime.pipeline import Pipeline

    out = tmp_path / "export"
    assert main(["export", "--model", str(tiny_model_dir), "--out", str(out), "--lora", f"{peft_lora}:0.6",
                 "--max-resolution", "64", "--no-lean"]) == 0
    ref = _peer_image(tiny_model_dir, peft_lora, 0.6, seed=3)
    ours = Pipeline.load(out, threads=1).generate("a red circle", width=64, height=64, steps=STEPS, seed=3,
                                                  output="np")
    assert psnr(ours, ref) >= 35.0
    assert np.abs(ours - ref).max() <= 1e-5
