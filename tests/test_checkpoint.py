"""Component folders: diffusers' on-disk format, strict checking, lean loading, atomic writes."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from qwen_image2_ref import checkpoint as ckpt
from qwen_image_edge.runtime.errors import CheckpointError


class Tiny(nn.Module):
    """Several Linear/LayerNorm layers, a persistent buffer and a computed (non-persistent) table."""

    def __init__(self, dim: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.dim = dim
        self.proj_in = nn.Linear(8, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, 4, bias=False)
        self.register_buffer("step", torch.tensor([3], dtype=torch.int64))
        self.reset_buffers()

    def reset_buffers(self) -> None:
        freqs = torch.exp(-math.log(10000.0) * torch.arange(self.dim // 2, dtype=torch.float32) / (self.dim // 2))
        self.register_buffer("table", freqs, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        for block in self.blocks:
            h = h + block(h)
        return self.proj_out(self.norm_out(h)) * self.table[:4]


def _random(model: nn.Module) -> nn.Module:
    # Default LayerNorm weights are constant; randomise everything so a swapped tensor is visible.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


def _on_meta(**kwargs) -> Tiny:
    with torch.device("meta"):
        return Tiny(**kwargs)


def _tensor_bytes(model: nn.Module) -> int:
    return sum(t.nbytes for t in model.state_dict().values())


@pytest.fixture
def source() -> Tiny:
    torch.manual_seed(0)
    return _random(Tiny())


def test_sharded_bf16_round_trip_loads_as_fp32(tmp_path, source):
    folder = ckpt.save_component(source, tmp_path / "transformer", {"dim": 16}, max_shard_size=600,
                                 dtype=torch.bfloat16)
    files, weight_map = ckpt.find_weight_files(folder)
    assert len(files) >= 3
    assert [f.name for f in files] == [f"diffusion_pytorch_model-{i:05d}-of-{len(files):05d}.safetensors"
                                       for i in range(1, len(files) + 1)]
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map and set(weight_map) == set(source.state_dict())
    # bf16 floats take 2 bytes; the int64 buffer keeps its 8.
    state = source.state_dict()
    assert index["metadata"]["total_size"] == sum(t.numel() * (2 if t.is_floating_point() else 8)
                                                  for t in state.values())
    assert ckpt.read_config(folder) == {"dim": 16}
    assert {t.dtype for _, t in ckpt.iter_tensors(folder)} == {torch.bfloat16, torch.int64}

    model = ckpt.load_into(_on_meta(), folder, dtype=torch.float32)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    for key, value in model.state_dict().items():
        expected = state[key].to(torch.bfloat16).to(torch.float32) if state[key].is_floating_point() else state[key]
        assert value.dtype == expected.dtype, key
        assert torch.equal(value, expected), key
    assert torch.equal(model.table, source.table)  # recomputed by reset_buffers, not read
    x = torch.randn(2, 8)
    # Same bf16-rounded weights in both: outputs agree to fp32 rounding.
    rounded = Tiny()
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() if v.is_floating_point() else v
                             for k, v in state.items()})
    torch.testing.assert_close(model(x), rounded(x), rtol=0, atol=0)


def test_single_file_transformers_names_and_module_dtype(tmp_path, source):
    folder = ckpt.save_component(source.state_dict(), tmp_path / "text_encoder", {},
                                 weights_name="model.safetensors", dtype=torch.float16)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    files, weight_map = ckpt.find_weight_files(folder)
    assert [f.name for f in files] == ["model.safetensors"] and weight_map is None
    model = ckpt.load_into(_on_meta(), folder)  # dtype=None: the module's own (fp32) dtypes
    assert model.proj_in.weight.dtype == torch.float32 and model.step.dtype == torch.int64
    assert torch.equal(model.proj_in.weight, source.proj_in.weight.half().float())


def test_transformers_style_shards(tmp_path, source):
    folder = ckpt.save_component(source, tmp_path / "te", {}, max_shard_size="1KB", weights_name="model.safetensors")
    files, _ = ckpt.find_weight_files(folder)
    assert len(files) >= 3 and files[0].name.startswith("model-00001-of-")
    assert (folder / "model.safetensors.index.json").is_file()
    model = ckpt.load_into(_on_meta(), folder)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


def test_load_is_one_file_at_a_time(tmp_path, source, monkeypatch):
    folder = ckpt.save_component(source, tmp_path / "t", {}, max_shard_size=600)
    files, weight_map = ckpt.find_weight_files(folder)
    calls = []
    original = ckpt._load_shard

    def spy(module, path, keys, dtypes, device):
        loaded = [n for n, p in module.named_parameters() if not p.is_meta]
        calls.append((path.name, sorted(keys), loaded))
        original(module, path, keys, dtypes, device)

    monkeypatch.setattr(ckpt, "_load_shard", spy)
    ckpt.load_into(_on_meta(), folder)
    assert [name for name, _, _ in calls] == [f.name for f in files]
    for name, keys, _ in calls:
        assert keys == sorted(k for k, n in weight_map.items() if n == name)
    # Before the last file is read, the module is still partly empty: nothing was read ahead.
    assert calls[0][2] == [] and 0 < len(calls[-1][2]) < len(list(source.parameters()))

    stream = ckpt.iter_tensors(folder)
    assert inspect.isgenerator(stream)
    first_key, _ = next(stream)
    assert weight_map[first_key] == files[0].name


def _corrupt(tmp_path, source, edit) -> Path:
    state = dict(source.state_dict())
    edit(state)
    return ckpt.save_component(state, tmp_path / "bad", {})


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (lambda s: s.pop("blocks.2.1.weight"), ["1 missing keys", "blocks.2.1.weight"]),
        (lambda s: s.update(extra=torch.zeros(2)), ["1 unexpected keys", "extra"]),
        (lambda s: s.update({"proj_out.weight": torch.zeros(4, 15)}),
         ["1 shape mismatches", "proj_out.weight: expected [4, 16], found [4, 15]"]),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_mismatch_is_named(tmp_path, source, edit, fragments):
    folder = _corrupt(tmp_path, source, edit)
    with pytest.raises(CheckpointError) as info:
        ckpt.load_into(_on_meta(), folder)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_non_strict_ignores_extra_keys_but_not_holes(tmp_path, source):
    folder = _corrupt(tmp_path, source, lambda s: s.update(extra=torch.zeros(2)))
    ckpt.load_into(_on_meta(), folder, strict=False)
    holed = _corrupt(tmp_path / "h", source, lambda s: s.pop("proj_in.bias"))
    with pytest.raises(CheckpointError, match=r"still on the meta device: proj_in\.bias"):
        ckpt.load_into(_on_meta(), holed, strict=False)
    shape = _corrupt(tmp_path / "s", source, lambda s: s.update({"proj_in.bias": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        ckpt.load_into(_on_meta(), shape, strict=False)


def test_long_lists_are_truncated(tmp_path):
    folder = ckpt.save_component({"only": torch.zeros(1)}, tmp_path / "c", {})
    with pytest.raises(CheckpointError) as info:
        ckpt.load_into(_on_meta(depth=30), folder)
    message = str(info.value)
    missing = len(Tiny(depth=30).state_dict())
    assert f"{missing} missing keys" in message and f"and {missing - 20} more" in message
    assert len(message) < 2000


def test_buffers_without_hook_are_reported(tmp_path):
    class NoHook(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("table", torch.arange(3.0), persistent=False)

    folder = ckpt.save_component(NoHook(), tmp_path / "c", {})
    with torch.device("meta"):
        empty = NoHook()
    with pytest.raises(CheckpointError, match=r"still on the meta device: table.*reset_buffers"):
        ckpt.load_into(empty, folder)
    with ckpt.meta_parameters():
        lean = NoHook()
    assert lean.lin.weight.is_meta and not lean.table.is_meta
    assert torch.equal(ckpt.load_into(lean, folder).table, torch.arange(3.0))


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt"])
def test_pickle_only_is_refused_without_unpickling(tmp_path, monkeypatch, suffix):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / f"diffusion_pytorch_model{suffix}").write_bytes(b"\x80\x04not really a pickle")

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(CheckpointError, match="pickle.*execute.*safetensors"):
        ckpt.load_into(_on_meta(), tmp_path)


def test_empty_or_absent_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        ckpt.find_weight_files(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="expected diffusion_pytorch_model.safetensors"):
        ckpt.find_weight_files(tmp_path)
    with pytest.raises(CheckpointError, match="config.json"):
        ckpt.read_config(tmp_path)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/outside.safetensors",
                                   "sub/../../outside.safetensors", "C:\\outside.safetensors"])
def test_index_escaping_the_folder_is_refused(tmp_path, shard):
    folder = tmp_path / "c"
    folder.mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "outside.safetensors"))
    index = {"metadata": {"total_size": 8}, "weight_map": {"w": shard}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        ckpt.find_weight_files(folder)


def test_index_and_shards_must_agree(tmp_path, source):
    folder = ckpt.save_component(source, tmp_path / "c", {}, max_shard_size=600)
    path = folder / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"]["ghost"] = next(iter(index["weight_map"].values()))
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="listed but absent: ghost"):
        ckpt.load_into(_on_meta(), folder)
    index["weight_map"]["ghost"] = "diffusion_pytorch_model-00009-of-00009.safetensors"
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not found.*00009-of-00009"):
        ckpt.find_weight_files(folder)


def test_truncated_file_is_a_checkpoint_error(tmp_path, source):
    folder = ckpt.save_component(source, tmp_path / "c", {})
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        ckpt.load_into(_on_meta(), folder)


def test_interrupted_write_leaves_nothing(tmp_path, source, monkeypatch):
    written = []

    def failing_save(tensors, path, metadata=None):
        if written:
            raise KeyboardInterrupt
        written.append(path)
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_component(source, tmp_path / "t", {}, max_shard_size=600)
    assert written and list(tmp_path.iterdir()) == []


def test_existing_folder_needs_overwrite(tmp_path, source):
    folder = ckpt.save_component(source, tmp_path / "t", {"v": 1})
    with pytest.raises(CheckpointError, match="already exists"):
        ckpt.save_component(source, folder, {"v": 2})
    ckpt.save_component(source, folder, {"v": 2}, max_shard_size=600, overwrite=True)
    assert ckpt.read_config(folder) == {"v": 2}
    assert not (folder / "diffusion_pytorch_model.safetensors").exists()  # old single file gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_save_refuses_meta_and_unserialisable_config(tmp_path, source):
    with pytest.raises(CheckpointError, match="meta device"):
        ckpt.save_component(_on_meta(), tmp_path / "m", {})
    with pytest.raises(CheckpointError, match="JSON"):
        ckpt.save_component(source, tmp_path / "j", {"dtype": torch.float32})
    assert list(tmp_path.iterdir()) == []


def test_tied_tensors_are_saved(tmp_path):
    weight = torch.randn(4, 4)
    folder = ckpt.save_component({"a": weight, "b": weight, "c": weight[:2]}, tmp_path / "t", {})
    loaded = dict(ckpt.iter_tensors(folder))
    assert torch.equal(loaded["a"], weight) and torch.equal(loaded["b"], weight)
    assert torch.equal(loaded["c"], weight[:2])


def test_parse_size():
    assert ckpt.parse_size("10GB") == 10 * 10**9
    assert ckpt.parse_size("1.5MiB") == 3 * 2**19
    assert ckpt.parse_size(123) == 123
    for bad in ("10", "GB", "-1KB", 0):
        with pytest.raises(CheckpointError):
            ckpt.parse_size(bad)


def test_digest_follows_content(tmp_path, source):
    a = ckpt.save_component(source, tmp_path / "a", {"x": 1}, max_shard_size=600)
    b = ckpt.save_component(source, tmp_path / "b", {"x": 1}, max_shard_size=600)
    c = ckpt.save_component(source, tmp_path / "c", {"x": 2}, max_shard_size=600)
    digest = ckpt.checkpoint_digest(a)
    assert len(digest) == 64 and digest == ckpt.checkpoint_digest(b) != ckpt.checkpoint_digest(c)
    last = sorted(b.glob("*-of-*.safetensors"))[-1]
    data = bytearray(last.read_bytes())
    data[-1] ^= 1
    last.write_bytes(bytes(data))
    assert ckpt.checkpoint_digest(b) != digest


# The real on-disk format: what diffusers' own save_pretrained writes, and what its from_pretrained reads.

TINY_DIT = dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, context_in_dim=32, axes_dims_rope=(4, 6, 6))


@pytest.fixture(scope="module")
def diffusers_dit():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(1)
    return _random(diffusers.QwenImage21Transformer2DModel(**TINY_DIT))


def test_loads_diffusers_save_pretrained_shards(tmp_path, diffusers_dit):
    model_cls = type(diffusers_dit)
    limit = _tensor_bytes(diffusers_dit) // 4
    diffusers_dit.save_pretrained(tmp_path, max_shard_size=limit)
    files, _ = ckpt.find_weight_files(tmp_path)
    assert len(files) >= 3

    with ckpt.meta_parameters():
        empty = model_cls.from_config(ckpt.read_config(tmp_path))
    assert all(p.is_meta for p in empty.parameters())
    loaded = ckpt.load_into(empty, tmp_path)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    expected = diffusers_dit.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    for (name, buf), (_, ref) in zip(loaded.named_buffers(), diffusers_dit.named_buffers()):
        assert torch.equal(buf, ref), name  # the non-persistent rope/time tables


def test_save_component_matches_diffusers_layout(tmp_path, diffusers_dit):
    limit = _tensor_bytes(diffusers_dit) // 4
    diffusers_dit.save_pretrained(tmp_path / "theirs", max_shard_size=limit)
    ours = ckpt.save_component(diffusers_dit, tmp_path / "ours", dict(diffusers_dit.config), max_shard_size=limit)
    theirs = tmp_path / "theirs"
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    index_name = "diffusion_pytorch_model.safetensors.index.json"
    assert json.loads((ours / index_name).read_text()) == json.loads((theirs / index_name).read_text())

    reloaded = type(diffusers_dit).from_pretrained(ours)
    expected = diffusers_dit.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in reloaded.state_dict().items())


def test_loads_transformers_save_pretrained_shards(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3VLConfig(
        text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, intermediate_size=128, vocab_size=1000, max_position_embeddings=512,
                         rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[4, 2, 2],
                                              mrope_interleaved=True)),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                           out_hidden_size=64, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=64, deepstack_visual_indexes=[0]),
        image_token_id=990, video_token_id=991, vision_start_token_id=992, vision_end_token_id=993)
    torch.manual_seed(2)
    model_cls = transformers.Qwen3VLForConditionalGeneration
    source = _random(model_cls(config)).eval()
    source.save_pretrained(tmp_path, max_shard_size="300KB")
    files, _ = ckpt.find_weight_files(tmp_path)
    assert len(files) >= 3 and files[0].name.startswith("model-00001-of-")

    with ckpt.meta_parameters():
        empty = model_cls(model_cls.config_class.from_dict(ckpt.read_config(tmp_path))).eval()
    loaded = ckpt.load_into(empty, tmp_path)
    expected = source.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    ids = torch.randint(0, 900, (1, 7))
    with torch.no_grad():  # identical weights and buffers (rotary inv_freq): identical logits
        assert torch.equal(loaded(ids).logits, source(ids).logits)
