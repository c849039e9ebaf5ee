"""Quantization policy, prompt sets and timestep-aware range collection (no modelopt needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from qwen_image2_ref.config import TINY
from qwen_image2_ref.transformer import QwenImageTransformer
from qwen_image_edge.calib.collect import (
    CalibrationSettings,
    RangeRecorder,
    StepRanges,
    reduce_ranges,
    run_calibration,
)
from qwen_image_edge.calib.policy import Granularity, QuantPolicy, Reduction, parse_precision
from qwen_image_edge.calib.prompts import PROMPT_SETS, load_prompts
from qwen_image_edge.runtime.errors import ConfigError, InputError
from qwen_image_edge.runtime.manifest import Precision

PER_BLOCK = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.proj", "img_mlp.gate_layer",
             "img_mlp.out")


@pytest.fixture(scope="module")
def tiny_transformer():
    return QwenImageTransformer(TINY.transformer)  # 2 blocks


def test_default_policy_selects_block_linears_only(tiny_transformer) -> None:
    chosen = QuantPolicy().select(tiny_transformer)
    assert chosen == [f"transformer_blocks.{b}.{n}" for b in range(2) for n in PER_BLOCK]
    linears = {n for n, m in tiny_transformer.named_modules() if isinstance(m, nn.Linear)}
    kept = linears - set(chosen)
    # everything outside the blocks stays high precision
    assert kept and all(not n.startswith("transformer_blocks.") for n in kept)
    assert {"img_in", "proj_out", "norm_out.linear", "modulation.1"} <= kept


def test_keep_first_and_last_blocks(tiny_transformer) -> None:
    assert QuantPolicy(keep_first=1).select(tiny_transformer) == [f"transformer_blocks.1.{n}" for n in PER_BLOCK]
    assert QuantPolicy(keep_last=1).select(tiny_transformer) == [f"transformer_blocks.0.{n}" for n in PER_BLOCK]
    with pytest.raises(ConfigError, match="selects no layer.*transformer_blocks\\.\\*\\.attn\\.to_q"):
        QuantPolicy(keep_first=1, keep_last=1).select(tiny_transformer)


def test_policy_naming_no_existing_layer_lists_what_exists(tiny_transformer) -> None:
    policy = QuantPolicy(include=("transformer_blocks.*.attn.add_q_proj", "transformer_blocks.*.attn.to_q"))
    with pytest.raises(ConfigError) as err:
        policy.select(tiny_transformer)
    msg = str(err.value)
    assert "add_q_proj" in msg and "names no layer" in msg
    for name in ("transformer_blocks.*.img_mlp.gate_layer", "img_in", "proj_out"):
        assert name in msg
    # an exclude that covers every include also selects nothing
    with pytest.raises(ConfigError, match="selects no layer"):
        QuantPolicy(exclude=("transformer_blocks.*",)).select(tiny_transformer)


@pytest.mark.parametrize("bad", ["int4", "fp16", "FP8", "", Precision.FP32])
def test_unknown_precision_is_a_clear_error(bad) -> None:
    with pytest.raises(ConfigError, match="expected one of \\['int8', 'fp8'\\]"):
        parse_precision(bad)
    with pytest.raises(ConfigError, match="precision"):
        QuantPolicy(precision=bad)


def test_policy_values_are_checked() -> None:
    assert QuantPolicy(precision="int8").weight_granularity is Granularity.PER_CHANNEL
    assert QuantPolicy(precision="fp8").weight_granularity is Granularity.PER_TENSOR
    assert not QuantPolicy(precision="fp8").smoothquant and QuantPolicy().smoothquant
    for kwargs, what in [({"precision": "fp8", "weight_granularity": "per-channel"}, "per-tensor weight"),
                         ({"smoothquant_alpha": 1.5}, "smoothquant_alpha"), ({"reduction": "median"}, "reduction"),
                         ({"percentile": 0}, "percentile"), ({"step_fraction": 2}, "step_fraction"),
                         ({"keep_first": -1}, "keep_first"), ({"include": ()}, "include")]:
        with pytest.raises(ConfigError, match=what):
            QuantPolicy(**kwargs)


def test_policy_round_trips_through_json(tmp_path) -> None:
    policy = QuantPolicy(precision="fp8", keep_last=2, reduction="min-mean", step_fraction=0.5)
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy.to_dict()))
    assert QuantPolicy.from_json(path) == policy
    assert QuantPolicy.from_json(path, precision="int8").precision is Precision.INT8
    with pytest.raises(ConfigError, match="unknown"):
        QuantPolicy.from_dict({**policy.to_dict(), "alpha": 0.5})
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        QuantPolicy.from_json(path)


# ----------------------------------------------------------------------------- reductions


def _ranges(seed: int = 0) -> tuple[np.ndarray, StepRanges]:
    """Per-batch, per-step, per-channel abs-max a[b, s, c] and the recorder's aggregate of it."""
    a = np.random.default_rng(seed).uniform(0.1, 5.0, size=(3, 6, 4)).astype(np.float32)
    return a, StepRanges(a.max(0), a.sum(0), np.full(6, 3))


def test_reductions_follow_their_definitions() -> None:
    a, r = _ranges()
    assert np.array_equal(reduce_ranges(r, QuantPolicy(reduction="max")), a.reshape(-1, 4).max(0))
    assert np.allclose(reduce_ranges(r, QuantPolicy(reduction="percentile", percentile=100)), a.max((0, 1)))
    per_step_max = a.max(0)  # [S, C]
    for c in range(4):  # percentile over steps of the per-step max, linear interpolation
        ranked = np.sort(per_step_max[:, c])
        pos = 0.5 * (len(ranked) - 1)
        want = ranked[int(np.floor(pos))] + (pos - np.floor(pos)) * (ranked[int(np.ceil(pos))] - ranked[int(np.floor(pos))])
        assert reduce_ranges(r, QuantPolicy(reduction="percentile", percentile=50))[c] == pytest.approx(want, rel=1e-6)
    # TensorRT demo min-mean: mean over prompts per step, min over the first fraction of steps
    for fraction, first in [(1.0, 6), (0.5, 3)]:
        want = np.array([min(np.mean(a[:, s, c]) for s in range(first)) for c in range(4)])
        got = reduce_ranges(r, QuantPolicy(reduction=Reduction.MIN_MEAN, step_fraction=fraction))
        assert np.allclose(got, want, rtol=1e-6)
    assert np.allclose(reduce_ranges(r, QuantPolicy(reduction="mean-max")), per_step_max.mean(0))


def test_input_range_is_the_reduced_range_after_smoothing() -> None:
    """qwen_image_edge.calib.quantize's rule, by hand: amax = max_c(reduce(a)_c * pre_quant_scale_c), max_c without
    smoothing. The quantizer gets it and the summary records it; both are fp32 products of the same
    numbers (rel 1e-6), so a range off by 2x either way fails."""
    from types import SimpleNamespace

    from qwen_image_edge.calib.quantize import _set_input_ranges

    a, r = _ranges(1)
    pqs = np.random.default_rng(2).uniform(0.2, 3.0, size=4).astype(np.float32)
    for policy, reduced in [(QuantPolicy(), a.max((0, 1))),
                            (QuantPolicy(reduction="min-mean", step_fraction=0.5), a.mean(0)[:3].min(0))]:
        for scale, want in [(pqs, (reduced * pqs).max()), (None, reduced.max())]:
            layer = nn.Sequential(nn.Linear(4, 2))
            quantizer = SimpleNamespace(pre_quant_scale=None if scale is None else torch.from_numpy(scale), amax=None)
            layer[0].input_quantizer = quantizer
            recorded = _set_input_ranges(layer, ["0"], {"0": r}, policy)
            assert recorded["0"] == pytest.approx(float(want), rel=1e-6)
            assert float(quantizer.amax) == pytest.approx(float(want), rel=1e-6)


def test_recorder_keeps_steps_apart() -> None:
    lin = nn.Sequential(nn.Linear(3, 2, bias=False))
    rec = RangeRecorder(lin, ["0"])
    inputs = {  # batch -> step -> calls (two guidance branches per step)
        0: [[[1.0, -2.0, 0.5], [0.5, 0.0, -3.0]], [[4.0, 0.0, 0.0]]],
        1: [[[-0.5, 1.0, 1.0]], [[0.0, -6.0, 2.0], [1.0, 1.0, 1.0]]],
    }
    for steps in inputs.values():
        rec.begin_batch()
        for s, calls in enumerate(steps):
            rec.step = s
            for x in calls:
                lin(torch.tensor([[x]]))  # [1, 1, 3]
        rec.end_batch()
    rec.remove()
    r = rec.ranges()["0"]
    b0 = np.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    b1 = np.array([[0.5, 1.0, 1.0], [1.0, 6.0, 2.0]])
    assert np.array_equal(r.step_max, np.maximum(b0, b1))
    assert np.array_equal(r.step_sum, b0 + b1)
    assert r.step_count.tolist() == [2, 2]
    lin(torch.ones(1, 3))  # hooks removed: nothing more is recorded
    assert np.array_equal(rec.ranges()["0"].step_max, r.step_max)


def test_calibration_with_zero_prompts_fails_clearly() -> None:
    rec = RangeRecorder(nn.Sequential(nn.Linear(2, 2)), ["0"])
    with pytest.raises(InputError, match="at least one prompt, got none"):
        run_calibration(pipe=None, prompts=[], settings=CalibrationSettings(), recorder=rec)
    with pytest.raises(InputError, match="recorded no activations"):
        rec.ranges()
    with pytest.raises(ConfigError, match="batch size"):
        CalibrationSettings(batch_size=0)


def test_shipped_prompt_sets() -> None:
    general = load_prompts("general")
    assert len(general) >= 256 and len(set(general)) == len(general)
    demo = load_prompts("demo")
    assert len(demo) >= 256 and len(set(demo)) == len(demo)
    assert load_prompts("demo", 5) == demo[:5]
    with pytest.raises(ConfigError, match="expected >= 1"):
        load_prompts("general", 0)
    with pytest.raises(ConfigError, match="general"):
        load_prompts("no-such-set")
    assert set(PROMPT_SETS) == {"general", "demo", "demo-v2"}
    v2 = load_prompts("demo-v2")
    assert len(v2) == 512 and len(set(v2)) == 512 and not set(v2) & set(demo)


def test_the_v2_demo_set_is_what_its_generator_writes() -> None:
    """calib/data/demo_captions_v2.txt is reproducible: captions.calibration_captions(512, 20261126)."""
    from qwen_image2_ref.demo.captions import calibration_captions

    assert load_prompts("demo-v2") == calibration_captions(512, 20261126)
    assert calibration_captions(5, 1) != calibration_captions(5, 2)  # the seed matters


def test_a_demo_folder_gets_the_prompt_set_of_its_language(tiny_model_dir, tmp_path) -> None:
    import json
    import shutil

    from qwen_image2_ref.demo import STUDENT_DIR, WEIGHTS_DIR
    from qwen_image_edge.calib.prompts import default_prompt_set, is_demo_folder

    # the shipped folders: the language their model_index.json records, v1 where it records none
    for shipped in (WEIGHTS_DIR, STUDENT_DIR):
        index = json.loads((shipped / "model_index.json").read_text())
        style = index["qwen_image_edge"].get("demo_caption_style", "v1")
        assert default_prompt_set(shipped) == {"v1": "demo", "v2": "demo-v2"}[style] and is_demo_folder(shipped)
    assert default_prompt_set(tiny_model_dir) == "general" and not is_demo_folder(tiny_model_dir)
    folder = tmp_path / "saved"
    shutil.copytree(tiny_model_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    for style, expected in (("v2", "demo-v2"), ("v1", "demo")):
        index["qwen_image_edge"]["demo_caption_style"] = style
        (folder / "model_index.json").write_text(json.dumps(index))
        assert default_prompt_set(folder) == expected and is_demo_folder(folder)
    index["qwen_image_edge"]["demo_caption_style"] = "v9"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="v9"):
        default_prompt_set(folder)


def test_demo_calibration_captions_avoid_the_heldout_combinations() -> None:
    from qwen_image2_ref.demo import data

    heldout = data.heldout_combos()
    for name in ("demo", "demo-v2"):
        checked = 0
        for caption in load_prompts(name):
            words = caption.replace(";", " ").replace(",", " ").replace(":", " ").replace(".", " ").split()
            # single-object captions name one colour and one shape; check those against held-out triples
            colors = [w for w in words if w in data.COLORS]
            shapes = [w for w in words if w in data.SHAPES]
            glyph = any(w in words for w in ("letter", "digit", "number"))  # glyphs carry position words too
            if len(colors) == 1 and len(shapes) == 1 and not glyph:
                checked += 1
                assert not any(c == colors[0] and s == shapes[0] and any(p in caption for p in _position_words(pos))
                               for c, s, pos in heldout), caption
        assert checked >= 50, name  # the check covers a good share of the set


def _position_words(position: str) -> tuple[str, ...]:
    from qwen_image2_ref.demo.captions import POSITION_PHRASES_V2

    return POSITION_PHRASES_V2[position]  # v1's phrases and more


# ------------------------------------------------------------------------------ edit calibration


def test_edit_calibration_sets_come_from_the_training_split_or_the_models_own_images(tiny_model_dir) -> None:
    from qwen_image2_ref.demo import WEIGHTS_DIR, data
    from qwen_image_edge.calib.prompts import GENERAL_EDITS, calibration_edits, demo_edits

    demo = calibration_edits(WEIGHTS_DIR, 6)
    assert len(demo) == 6 and [t for _, t in demo] == [t for _, t in demo_edits(6)]
    assert all(img.shape == (128, 128, 4) and img.dtype == np.uint8 for img, _ in demo)
    # the same seed draws the same training-split examples; the instruction names what changes
    rng = np.random.default_rng(20261126)
    for (img, text), e in zip(demo, (data.sample_edit(rng, 128, 128, "train") for _ in range(6))):
        assert text == e.instruction and data.scene_split(e.target) == "train"
        np.testing.assert_array_equal(img, data.render(e.source))
    general = [line for line in GENERAL_EDITS.read_text().splitlines() if line.strip()]
    assert len(general) == len(set(general)) >= 32
    own = calibration_edits(tiny_model_dir, len(general) + 2)  # cycles past the end of the set
    assert [img for img, _ in own] == [None] * (len(general) + 2)
    assert [t for _, t in own] == general + general[:2]
    assert calibration_edits(tiny_model_dir, 0) == []
    with pytest.raises(ConfigError, match="calibration edits: expected >= 0, got -1"):
        calibration_edits(tiny_model_dir, -1)


class _Spy:
    """A pipeline stand-in's recorder of what run_calibration asks: generate and edit calls."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, prompts, **kw):
        out = self.pipe.generate(prompts, **kw)
        self.calls.append(("generate", list(prompts), kw["output"], out))
        return out

    def edit(self, images, instruction, **kw):
        self.calls.append(("edit", list(images), instruction, kw["latents"]))
        return self.pipe.edit(images, instruction, **kw)


def test_edit_calibration_records_the_condition_tokens_ranges(tiny_model_dir) -> None:
    """Edits run after the prompts, one sample each, on the model's own images where none is given,
    with their own noise; they can only widen the text-to-image ranges (same prompts and seeds), and
    do widen them: the condition image's tokens are new inputs to every block."""
    from qwen_image2_ref.model_folder import load_model
    from qwen_image_edge.runtime.sampling import initial_noise

    model = load_model(tiny_model_dir)
    names = QuantPolicy().select(model.transformer)
    settings = CalibrationSettings(batch_size=2, steps=2, resolution=64)
    prompts = ["a red cat", "a blue dog", "a green bird"]
    given = np.zeros((64, 64, 4), np.uint8)
    given[..., 0], given[..., 3] = 200, 255

    def ranges(edits):
        spy = _Spy(model.pipeline())
        rec = RangeRecorder(spy.transformer, names)
        steps = run_calibration(spy, prompts, settings, rec, progress=False, edits=edits)
        rec.remove()
        return rec.ranges(), spy.calls, steps

    base, calls, steps = ranges([])
    assert steps == 2 and [c[0] for c in calls] == ["generate", "generate"] and calls[0][2] == "latent"
    with_edits, calls, _ = ranges([(None, "make it blue"), (given, "add a hat"), (None, "remove the dog")])
    assert [c[0] for c in calls] == ["generate", "generate", "edit", "edit", "edit"]
    # two edits bring no image: the first batch (two prompts) is drawn as images, the second is not
    assert (calls[0][2], calls[1][2]) == ("pil", "latent")
    drawn = calls[0][3]
    assert calls[2][1] == [drawn[0]] and calls[4][1] == [drawn[1]] and calls[3][1] == [given]
    assert [c[2] for c in calls[2:]] == ["make it blue", "add a hat", "remove the dog"]
    channels = model.transformer.config.in_channels
    for k, call in enumerate(calls[2:]):  # settings.seed 0: edit k's noise is seed 100000 + k
        np.testing.assert_array_equal(call[3], initial_noise(100_000 + k, 1, 64, 64, channels))
    widened = 0
    for n in names:
        b, e = base[n], with_edits[n]
        assert (e.step_max >= b.step_max).all(), n
        np.testing.assert_array_equal(e.step_count, b.step_count + 3)
        widened += int((e.step_max > b.step_max).any())
    assert widened >= len(names) // 2  # most layers see a larger value among the condition tokens
    with pytest.raises(InputError, match="3 edits of the model's own images need as many prompts, got 2"):
        run_calibration(model.pipeline(), prompts[:2], settings, RangeRecorder(model.transformer, names),
                        progress=False, edits=[(None, "x")] * 3)


def test_quantize_calibrates_a_quarter_of_edits_by_default(tiny_model_dir, monkeypatch) -> None:
    import dataclasses

    from qwen_image2_ref.model_folder import load_model
    from qwen_image_edge.calib.quantize import default_edit_count, edit_samples

    model = load_model(tiny_model_dir)
    assert [default_edit_count(n, model.config) for n in (1, 4, 7, 32)] == [1, 1, 1, 8]
    assert len(edit_samples(model, 32, None)) == 8 and len(edit_samples(model, 32, 0)) == 0
    with pytest.raises(InputError, match="5 edits of the model's own images need as many prompts.*got 4"):
        edit_samples(model, 4, 5)
    pipeline = dataclasses.replace(model.config.pipeline, max_condition_images=0)
    t2i = dataclasses.replace(model, config=dataclasses.replace(model.config, pipeline=pipeline))
    assert default_edit_count(32, t2i.config) == 0 and edit_samples(t2i, 32, None) == []
    with pytest.raises(ConfigError, match="takes no condition images; use --calib-edits 0"):
        edit_samples(t2i, 32, 2)
