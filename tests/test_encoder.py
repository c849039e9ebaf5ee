"""Condition encoder parity with diffusers' QwenImage21Pipeline prompt encoding.

The peer is the real pipeline method (``_get_qwen_prompt_embeds``) running transformers'
Qwen3VLProcessor (without its video processor: it needs torchvision) on the same saved folders.
The tiny Qwen3-VL is random with scaled weights so layers, images and the final norm all matter.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_image2_ref.config import QWEN_IMAGE_21, TINY
from qwen_image2_ref.encoder import (
    ConditionEncoder,
    build_qwen3vl_config,
    encoder_config_from_hf,
)
from qwen_image_edge.runtime.errors import CheckpointError, InputError
from qwen_image_edge.runtime.tokens import mrope_position_ids, postprocess_hidden_states
from tests.tiny_parts import VISION, tiny_encoder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder")
    _, encoder = tiny_encoder(root, seed=0)
    encoder.save_pretrained(root / "text_encoder", root / "processor")
    return root


@pytest.fixture(scope="module")
def ours(folders):
    return ConditionEncoder.from_pretrained(folders / "text_encoder", folders / "processor")


@pytest.fixture(scope="module")
def peer(folders):
    from diffusers import QwenImage21Pipeline
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    class ImageOnlyProcessor(Qwen3VLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    processor = ImageOnlyProcessor.from_pretrained(folders / "processor")
    text_encoder = Qwen3VLForConditionalGeneration.from_pretrained(folders / "text_encoder").eval()
    return QwenImage21Pipeline(
        scheduler=None, vae=None, text_encoder=text_encoder, processor=processor, transformer=None
    )


def _images(seed, sizes, mode="RGB"):
    rng = np.random.default_rng(seed)
    out = []
    for w, h in sizes:
        data = rng.integers(0, 256, size=(h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8)
        out.append(Image.fromarray(data, mode))
    return out


def _peer_encode(peer, prompts, images):
    with torch.no_grad():
        return peer._get_qwen_prompt_embeds(prompts, images, torch.device("cpu"))


def _assert_parity(ours, peer, prompts, images=None):
    embeds, mask, image_mask = ours.encode(prompts, images)
    ref_embeds, ref_mask, ref_image_mask = _peer_encode(peer, prompts, images)
    assert embeds.dtype == torch.float32 and embeds.shape == ref_embeds.shape
    torch.testing.assert_close(embeds, ref_embeds, atol=1e-5, rtol=0)  # same fp32 math, same kernels
    assert torch.equal(mask, ref_mask) and torch.equal(image_mask, ref_image_mask)

    # Token-level parity with the processor, and the numpy post-processing the runtime uses.
    batch, pixel_values = ours.tokenize(prompts, images)
    kwargs = {"text": _peer_texts(peer, prompts, images), "padding": True, "padding_side": "left"}
    if images:
        kwargs["images"] = [ours_img for _ in prompts for ours_img in _peer_vision_images(images)]
    ref = peer.processor(**kwargs, return_tensors="np")
    np.testing.assert_array_equal(batch.input_ids, ref["input_ids"])
    np.testing.assert_array_equal(batch.attention_mask, ref["attention_mask"])
    np.testing.assert_array_equal(batch.mm_token_type_ids, ref["mm_token_type_ids"])
    if images:
        np.testing.assert_array_equal(pixel_values, ref["pixel_values"])
        np.testing.assert_array_equal(batch.image_grid_thw, ref["image_grid_thw"])
    np_embeds, np_mask, np_image_mask = postprocess_hidden_states(
        ours.hidden_states(batch, pixel_values), batch
    )
    np.testing.assert_array_equal(np_embeds, embeds.numpy())
    np.testing.assert_array_equal(np_mask, mask.numpy())
    np.testing.assert_array_equal(np_image_mask, image_mask.numpy())
    return embeds, mask, image_mask


def _peer_texts(peer, prompts, images):
    if not images:
        return [peer.prompt_template_t2i.format(p or " ") for p in prompts]
    slot = "<|vision_start|><|image_pad|><|vision_end|>"
    prefix = "<image1>" + slot + "".join(f" <image{i}>{slot}" for i in range(2, len(images) + 1))
    return [peer.prompt_template_ti2i.replace("<image1>" + slot, prefix).format(p or " ") for p in prompts]


def _peer_vision_images(images):
    out = []
    for img in images:
        if img.mode == "RGBA":  # what the pipeline does before its processor call
            white = Image.new("RGB", img.size, (255, 255, 255))
            white.paste(img, mask=img.getchannel("A"))
            img = white
        out.append(img)
    return out


def test_drop_idx_matches_chat_template(ours, peer):
    assert ours.tokenizer.drop_idx == peer._drop_idx


def test_text_prompt(ours, peer):
    embeds, mask, image_mask = _assert_parity(ours, peer, ["a red circle on the left"])
    assert mask.all() and not image_mask.any()


def test_batch_of_two_lengths(ours, peer):
    prompts = ["a blue square", "the green triangle is at the top right, next to a red circle!"]
    _, mask, _ = _assert_parity(ours, peer, prompts)
    assert mask[0].sum() < mask[1].sum() and mask[1].all()
    _assert_parity(ours, peer, ["", "make it purple"])  # empty prompt is read as " "


def test_prompt_at_token_limit(ours, peer):
    prompt = "a" + " a" * 1023
    assert ours.tokenizer.count_prompt_tokens(prompt) == 1024
    embeds, _, _ = _assert_parity(ours, peer, [prompt])
    assert embeds.shape[1] > 1024


def test_prompt_over_limit_raises(ours):
    prompt = "a" + " a" * 1024
    with pytest.raises(InputError, match=r"1025 tokens, over the limit of 1024"):
        ours.encode([prompt])
    with pytest.raises(InputError, match="reserved vision token"):
        ours.encode(["draw <|image_pad|> here"])


def test_edit_one_rgba_image(ours, peer):
    (image,) = _images(3, [(96, 64)], mode="RGBA")
    _, _, image_mask = _assert_parity(ours, peer, ["make the sky purple"], [image])
    assert image_mask.sum() == (64 // 32) * (96 // 32)


def test_edit_two_images_batch(ours, peer):
    images = _images(4, [(64, 64), (200, 90)])  # the second is downscaled by max_pixels
    prompts = ["keep the cat from image 2", "turn image 1 into a sketch and add 3 stars"]
    _, _, image_mask = _assert_parity(ours, peer, prompts, images)
    batch, _ = ours.tokenize(prompts, images)
    assert batch.image_grid_thw.tolist() == [[1, 4, 4], [1, 4, 10]] * 2
    assert image_mask.sum(dim=1).tolist() == [4 + 10] * 2  # each prompt sees both images


def test_condition_image_changes_text_tokens(ours):
    """Guards against a vacuous parity: the image must reach the text tokens after it."""
    a, b = _images(5, [(64, 64)]), _images(6, [(64, 64)])
    ea, _, ma = ours.encode(["make it blue"], a)
    eb, _, _ = ours.encode(["make it blue"], b)
    text_after = ~ma[0] & (torch.arange(ma.shape[1]) > torch.nonzero(ma[0]).max())
    delta = (ea[0, text_after] - eb[0, text_after]).abs().max()
    assert delta > 1e-2 * ea[0, text_after].abs().max()


def test_post_norm_state_fails_parity(ours, peer):
    """Reading transformers' last_hidden_state (after the final norm) must not pass the check."""
    prompts = ["a red circle on the left"]
    batch, _ = ours.tokenize(prompts)
    with torch.no_grad():
        post = ours.model.model(
            input_ids=torch.from_numpy(batch.input_ids), attention_mask=torch.from_numpy(batch.attention_mask)
        ).last_hidden_state
    wrong, _, _ = postprocess_hidden_states(post, batch)
    ref, _, _ = _peer_encode(peer, prompts, None)
    assert np.abs(wrong - ref.numpy()).max() > 1e-2


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_mrope_position_ids_match_transformers(ours, n_images):
    """The numpy positions (for graphs that take them as input) equal what the model computes."""
    prompts = ["a blue square", "turn image 1 into a sketch and add 3 stars"]
    images = _images(8, [(96, 64), (64, 160)][:n_images]) or None
    batch, pixel_values = ours.tokenize(prompts, images)
    ids = mrope_position_ids(batch, ours.vision.merge_size)
    inner = ours.model.model
    if images:
        ref, _ = inner.get_rope_index(
            torch.from_numpy(batch.input_ids),
            torch.from_numpy(batch.mm_token_type_ids),
            image_grid_thw=torch.from_numpy(batch.image_grid_thw),
            attention_mask=torch.from_numpy(batch.attention_mask),
        )
        np.testing.assert_array_equal(ids, ref.numpy())
    # Feeding them explicitly leaves the encoder output unchanged.
    captured = []
    handle = inner.language_model.norm.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    try:
        with torch.no_grad():
            inner(
                input_ids=torch.from_numpy(batch.input_ids),
                attention_mask=torch.from_numpy(batch.attention_mask),
                position_ids=torch.from_numpy(ids),
                pixel_values=None if pixel_values is None else torch.from_numpy(pixel_values),
                image_grid_thw=None if pixel_values is None else torch.from_numpy(batch.image_grid_thw),
                mm_token_type_ids=torch.from_numpy(batch.mm_token_type_ids),
                use_cache=False,
            )
    finally:
        handle.remove()
    valid = torch.from_numpy(batch.attention_mask).bool()
    reference = ours.hidden_states(batch, pixel_values)
    torch.testing.assert_close(captured[0][valid], reference[valid], atol=1e-5, rtol=0)


def test_config_round_trip():
    for cfg in (TINY.encoder, QWEN_IMAGE_21.encoder):
        hf = build_qwen3vl_config(cfg)
        assert encoder_config_from_hf(hf) == cfg
        assert encoder_config_from_hf(json.loads(hf.to_json_string())) == cfg
    # transformers 4.57 layout: rope_theta + rope_scaling in text_config.
    legacy = build_qwen3vl_config(TINY.encoder).to_dict()
    rope = legacy["text_config"].pop("rope_parameters")
    legacy["text_config"]["rope_theta"] = rope.pop("rope_theta")
    legacy["text_config"]["rope_scaling"] = rope
    assert encoder_config_from_hf(legacy) == TINY.encoder


def test_saved_processor_loads_in_transformers(folders, peer):
    ip = peer.processor.image_processor
    assert (ip.patch_size, ip.merge_size, ip.size["shortest_edge"], ip.size["longest_edge"]) == (
        VISION.patch_size,
        VISION.merge_size,
        VISION.min_pixels,
        VISION.max_pixels,
    )
    assert list(ip.image_mean) == list(VISION.image_mean)


def test_loads_folder_saved_by_diffusers_pipeline(peer, tmp_path):
    peer.save_pretrained(tmp_path)
    loaded = ConditionEncoder.from_pretrained(tmp_path / "text_encoder", tmp_path / "processor")
    assert loaded.vision == VISION
    _assert_parity(loaded, peer, ["a blue square", "make it purple"], _images(7, [(96, 32)]))


def test_mismatched_token_ids_raise(ours):
    cfg = dataclasses.replace(ours.config, image_token_id=ours.config.image_token_id - 1)
    with pytest.raises(CheckpointError, match="image_token_id"):
        ConditionEncoder.from_config(cfg, ours.tokenizer, ours.vision)


def test_saving_and_loading_draw_no_transformers_bars(ours, tmp_path, capfd):
    """transformers' per-shard / per-tensor bars stay off (a --no-progress run writes none), and the
    caller's setting is restored."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    ours.save_pretrained(tmp_path / "text_encoder", tmp_path / "processor")
    ConditionEncoder.from_pretrained(tmp_path / "text_encoder", tmp_path / "processor")
    err = capfd.readouterr().err
    assert "Writing model shards" not in err and "Loading weights" not in err and "it/s" not in err, err
    assert hf_logging.is_progress_bar_enabled()
