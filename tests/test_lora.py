"""LoRA adapter files (qwen_image2_ref/lora.py) on the tiny model, written in the real key formats.

Formats: diffusers' ``save_lora_weights`` (``transformer.<m>.lora_A/B.weight`` + ``lora_adapter_metadata``),
peft's ``save_pretrained`` (``base_model.model.<m>.lora_A.default.weight``), and the kohya-style keys
Qwen-Image-Lightning ships (``<m>.lora_down/lora_up.weight`` + ``<m>.alpha``, bf16, optionally
``diffusion_model.``-prefixed or ``lora_unet_`` flattened). The fused weight is checked against
``W + user_scale * alpha / rank * B @ A`` computed here in float64: fusing is one fp32 matmul and add,
so the two agree to fp32 rounding of values ~1 (atol 1e-6).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file

from qwen_image2_ref.checkpoint import iter_tensors
from qwen_image2_ref.lora import read_lora
from qwen_image2_ref.model_folder import load_model, open_model
from qwen_image_edge.cli import main
from qwen_image_edge.cli_args import parse_lora_args
from qwen_image_edge.export.onnx_export import export_model
from qwen_image_edge.runtime.errors import CheckpointError, InputError

ATOL = 1e-6
RANK = 4
MODULES = ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mlp.proj", "img_in", "txt_in.in_layer")


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return {k: v.double() for k, v in iter_tensors(tiny_model_dir / "transformer")}


def _pairs(base: dict, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A [r, in], B [out, r]) with entries large enough to move the weights visibly."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in MODULES:
        o, i = base[f"{m}.weight"].shape
        out[m] = (torch.randn(RANK, i, generator=g) * 0.3, torch.randn(o, RANK, generator=g) * 0.3)
    return out


def _expected(base: dict, pairs: dict, scales: dict[str, float]) -> dict[str, torch.Tensor]:
    return {f"{m}.weight": base[f"{m}.weight"] + scales[m] * (b.double() @ a.double()) for m, (a, b) in pairs.items()}


def write_diffusers(path, pairs, prefix="transformer.", alpha=8.0, alpha_pattern=None, peft=False):
    """As diffusers' ``save_lora_weights`` writes (or peft's ``save_pretrained`` when ``peft``)."""
    tensors = {}
    for m, (a, b) in pairs.items():
        mid = ".default" if peft else ""
        tensors[f"{prefix}{m}.lora_A{mid}.weight"] = a.contiguous()
        tensors[f"{prefix}{m}.lora_B{mid}.weight"] = b.contiguous()
    meta = {"transformer.r": RANK, "transformer.lora_alpha": alpha, "transformer.alpha_pattern": alpha_pattern or {},
            "transformer.rank_pattern": {}, "transformer.target_modules": sorted(pairs)}
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    return path


def write_lightning(path, pairs, alphas, prefix="", flat=False, dtype=torch.bfloat16):
    """As Qwen-Image-Lightning ships: lora_down / lora_up / alpha per module, bf16."""
    tensors = {}
    for m, (a, b) in pairs.items():
        name = "lora_unet_" + m.replace(".", "_") if flat else prefix + m
        tensors[f"{name}.lora_down.weight"] = a.to(dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = b.to(dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(alphas[m], dtype=dtype)
    save_file(tensors, str(path))
    return path


def _fused(model_dir, loras) -> dict[str, torch.Tensor]:
    return {k: v.detach().double() for k, v in load_model(model_dir, loras=loras).transformer.state_dict().items()}


def _check(fused: dict, base: dict, expected: dict) -> None:
    for key, w in fused.items():
        if key in expected:
            assert (w - base[key]).abs().max() > 1e-2, key  # the adapter moved it
            torch.testing.assert_close(w, expected[key], atol=ATOL, rtol=0)
        else:
            assert torch.equal(w, base[key].to(w.dtype)), f"{key}: untouched weights must stay bit-identical"


def test_diffusers_format_fuses_to_hand_computed(tiny_model_dir, base, tmp_path):
    pairs = _pairs(base)
    # lora_alpha 8 / r 4 = 2 everywhere but img_in (alpha_pattern 2 -> 0.5); user scale 0.75
    path = write_diffusers(tmp_path / "d.safetensors", pairs, alpha_pattern={"img_in": 2.0})
    scales = {m: 0.75 * (0.5 if m == "img_in" else 2.0) for m in MODULES}
    _check(_fused(tiny_model_dir, [(path, 0.75)]), base, _expected(base, pairs, scales))


def test_peft_prefix_and_adapter_name(tiny_model_dir, base, tmp_path):
    pairs = _pairs(base, seed=1)
    path = write_diffusers(tmp_path / "adapter_model.safetensors", pairs, prefix="base_model.model.", peft=True)
    _check(_fused(tiny_model_dir, [path]), base, _expected(base, pairs, {m: 2.0 for m in MODULES}))


@pytest.mark.parametrize("variant", ["plain", "diffusion_model", "lora_unet"])
def test_lightning_format_alpha_over_rank(tiny_model_dir, base, tmp_path, variant):
    pairs = {m: (a.bfloat16(), b.bfloat16()) for m, (a, b) in _pairs(base, seed=2).items()}
    alphas = {m: float(i + 1) for i, m in enumerate(MODULES)}  # a different alpha per module: 1..4 over rank 4
    path = write_lightning(tmp_path / "l.safetensors", pairs, alphas, prefix="diffusion_model." * (variant != "plain"),
                           flat=variant == "lora_unet")
    adapter = read_lora(path, 1.0, {k: tuple(v.shape) for k, v in base.items()})
    assert adapter.format == "kohya" and adapter.rank == RANK
    _check(_fused(tiny_model_dir, [path]), base, _expected(base, pairs, {m: alphas[m] / RANK for m in MODULES}))


def test_two_adapters_add(tiny_model_dir, base, tmp_path):
    p1, p2 = _pairs(base, seed=3), _pairs(base, seed=4)
    f1 = write_diffusers(tmp_path / "a.safetensors", p1, alpha=RANK)
    f2 = write_lightning(tmp_path / "b.safetensors", p2, {m: 2.0 for m in MODULES}, dtype=torch.float32)
    e1 = _expected(base, p1, {m: 0.5 for m in MODULES})
    expected = {k: e1[k] + (_expected(base, p2, {m: -1.0 * 0.5 for m in MODULES})[k] - base[k]) for k in e1}
    _check(_fused(tiny_model_dir, [(f1, 0.5), (f2, -1.0)]), base, expected)


def test_open_model_keeps_adapters_when_reopening(tiny_model_dir, base, tmp_path):
    path = write_diffusers(tmp_path / "d.safetensors", _pairs(base))
    lazy = open_model(tiny_model_dir, lazy=True, loras=[path])
    full = open_model(lazy)  # reopened with weights: the same adapters fused
    assert [a.sha256 for a in full.loras] == [a.sha256 for a in lazy.loras]
    assert not torch.equal(full.transformer.img_in.weight.double(), base["img_in.weight"])
    with pytest.raises(CheckpointError, match="already open"):
        open_model(full, loras=[path])


# ----------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def lora_file(base, tmp_path_factory):
    return write_lightning(tmp_path_factory.mktemp("lora") / "lightning.safetensors", _pairs(base, seed=5),
                           {m: 2.0 for m in MODULES})


def test_lean_export_streams_the_fused_weights(tiny_model_dir, lora_file, tmp_path):
    """The lean transformer's initializers (named by checkpoint key) are the resident fused model's
    weights bit for bit (both: fp32 base + fp32 delta), and the manifest lists the adapter."""
    manifest = export_model(tiny_model_dir, tmp_path / "lean", graphs=["transformer"], lean=True,
                            loras=[(lora_file, 0.8)])
    fused = load_model(tiny_model_dir, loras=[(lora_file, 0.8)]).transformer.state_dict()
    path = tmp_path / "lean" / manifest.graph("transformer").file
    inits = {t.name: t for t in onnx.load(str(path), load_external_data=False).graph.initializer}
    for m in MODULES:
        np.testing.assert_array_equal(_external(inits[f"{m}.weight"], path.parent), fused[f"{m}.weight"].numpy())
    (entry,) = manifest.provenance.source["loras"]
    assert entry["file"] == "lightning.safetensors" and entry["scale"] == 0.8 and entry["rank"] == RANK
    assert entry["layers"] == sorted(MODULES) and entry["format"] == "kohya"
    assert len(entry["sha256"]) == 64
    on_disk = json.loads((tmp_path / "lean" / "manifest.json").read_text())
    assert on_disk["provenance"]["source"]["loras"] == [entry]


def _external(t: onnx.TensorProto, folder) -> np.ndarray:
    """An external initializer's values, read from its data file (onnx.load refuses the hard-linked shards)."""
    info = {e.key: e.value for e in t.external_data}
    with open(folder / info["location"], "rb") as fh:
        fh.seek(int(info.get("offset", 0)))
        raw = fh.read(int(info["length"]))
    return np.frombuffer(raw, dtype=onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).reshape(tuple(t.dims))


def test_plain_export_with_adapter_equals_fused_model_export(tiny_model_dir, lora_file, tmp_path):
    a = export_model(tiny_model_dir, tmp_path / "a", graphs=["transformer"], lean=False, loras=[lora_file])
    b = export_model(load_model(tiny_model_dir, loras=[lora_file]), tmp_path / "b", graphs=["transformer"], lean=False)
    plain = export_model(tiny_model_dir, tmp_path / "c", graphs=["transformer"], lean=False)
    assert a.graph("transformer").sha256 == b.graph("transformer").sha256
    assert a.graph("transformer").sha256 != plain.graph("transformer").sha256
    assert "loras" not in plain.provenance.source  # unchanged without adapters


# ----------------------------------------------------------------------------- bad input


def _bad_cases(base):
    pairs = _pairs(base)

    def unknown(p):
        write_diffusers(p, {**pairs, "transformer_blocks.0.attn.to_nothing": tuple(t.clone() for t in pairs["img_in"])})

    def shape(p):
        a, b = pairs["img_in"]
        write_diffusers(p, {**pairs, "img_in": (a[:, :-1], b)})

    def flux(p):  # an adapter for another architecture (FLUX's single-stream blocks)
        write_diffusers(p, {"single_transformer_blocks.0.attn.to_q": pairs["img_in"]})

    def pickle(p):
        torch.save({"transformer.img_in.lora_A.weight": pairs["img_in"][0]}, p)

    def text_encoder(p):
        write_diffusers(p, pairs, prefix="text_encoder.")

    def dora(p):
        write_diffusers(p, pairs)
        t = dict(iter_tensors_file(p))
        t["transformer.img_in.lora_magnitude_vector"] = torch.ones(4)
        save_file(t, str(p))

    def half(p):
        save_file({"transformer.img_in.lora_A.weight": pairs["img_in"][0].contiguous()}, str(p))

    return {
        "missing": (None, InputError, "expected a safetensors file, found none"),
        "unknown key": (unknown, CheckpointError, "to_nothing"),
        "shape": (shape, CheckpointError, r"'img_in'.*expected A \[r, \d+\]"),
        "other architecture": (flux, CheckpointError, "single_transformer_blocks.0.attn.to_q"),
        "pickle": (pickle, CheckpointError, "pickle adapters are refused"),
        "text encoder": (text_encoder, CheckpointError, "only transformer adapters"),
        "dora": (dora, CheckpointError, "lora_magnitude_vector"),
        "half a pair": (half, CheckpointError, "'img_in' has \\['lora_A'\\]"),
    }


def iter_tensors_file(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            yield k, f.get_tensor(k)


BAD = ["missing", "unknown key", "shape", "other architecture", "pickle", "text encoder", "dora", "half a pair"]


@pytest.mark.parametrize("case", BAD)
def test_bad_adapter_is_one_line_naming_the_key(case, tiny_model_dir, base, tmp_path):
    make, error, match = _bad_cases(base)[case]
    path = tmp_path / "bad.safetensors"
    if make is not None:
        make(path)
    with pytest.raises(error, match=match) as info:
        load_model(tiny_model_dir, loras=[path])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("case", ["missing", "shape", "pickle"])
def test_bad_adapter_on_the_cli_writes_nothing(case, tiny_model_dir, base, tmp_path, capsys):
    make, _, match = _bad_cases(base)[case]
    path = tmp_path / "bad.safetensors"
    if make is not None:
        make(path)
    out = tmp_path / "out"
    assert main(["export", "--model", str(tiny_model_dir), "--out", str(out), "--lora", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qwen-image-edge: error:") and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"] * (make is not None)


@pytest.mark.parametrize("command", ["export", "validate", "generate", "quantize"])
def test_scale_that_is_not_a_number(command, tiny_model_dir, lora_file, tmp_path, capsys):
    argv = {"export": ["export", "--out", str(tmp_path / "o")], "validate": ["validate", str(tmp_path / "o")],
            "generate": ["generate", "a red circle", "-o", str(tmp_path / "o.png")],
            "quantize": ["quantize", "--precision", "int8", "--out", str(tmp_path / "o")]}[command]
    assert main(argv + ["--model", str(tiny_model_dir), "--lora", f"{lora_file}:strong"]) == 2
    err = capsys.readouterr().err.strip()
    assert "expected FILE[:SCALE] with a finite number as SCALE, got 'strong'" in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_lora_argument_parsing(tmp_path):
    assert parse_lora_args(["a.safetensors", "b.safetensors:0.5", "dir/c:-1e-1", "x:y/z.safetensors"]) == [
        ("a.safetensors", 1.0), ("b.safetensors", 0.5), ("dir/c", -0.1), ("x:y/z.safetensors", 1.0)]
    for bad in ("a.safetensors:nan", "a.safetensors:inf", "a.safetensors:"):
        with pytest.raises(InputError, match="finite number"):
            parse_lora_args([bad])
    with pytest.raises(InputError, match="LoRA scale"):
        load_model("demo", loras=[("a.safetensors", "strong")])


def test_lean_quantization_quantizes_the_fused_weight(tiny_model_dir, lora_file):
    """quantize --lean streams each quantized weight from its source: for a fused one, W + delta."""
    from qwen_image_edge.export.external_data import WeightSource, checkpoint_entries
    from qwen_image_edge.export.lean import fuse_sources
    from qwen_image_edge.export.qdq_lean import LayerScales, quantized_weight
    from qwen_image_edge.runtime.manifest import Precision

    key = "transformer_blocks.1.img_mlp.proj.weight"
    entry = checkpoint_entries(tiny_model_dir / "transformer")[key]
    adapters = open_model(tiny_model_dir, lazy=True, loras=[lora_file]).loras
    (source,) = fuse_sources([WeightSource(key, onnx.TensorProto.FLOAT, entry.shape, entry=entry)], adapters)
    fused = load_model(tiny_model_dir, loras=[lora_file]).transformer.state_dict()[key]
    amax = np.float32(fused.abs().max())
    scales = LayerScales(1.0, np.asarray(amax), None)
    expected = (fused / (amax / 127.0)).round().clamp(-128, 127).to(torch.int8).t()  # [in, out]
    assert torch.equal(quantized_weight(source, scales, Precision.INT8), expected)
    plain = quantized_weight(WeightSource(key, onnx.TensorProto.FLOAT, entry.shape, entry=entry), scales,
                             Precision.INT8)
    assert not torch.equal(plain, expected)  # the adapter's delta survives quantization
