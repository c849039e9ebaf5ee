"""The trainer's stage files: tensors in safetensors, everything else in JSON — never pickle.

A stage file ``NAME`` is the pair ``NAME.safetensors`` + ``NAME.json``, each written to a temp
name and renamed, so an interrupted stage leaves the previous pair or nothing.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def _replace(tmp: Path, final: Path) -> None:
    tmp.replace(final)


def save_stage(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``path.safetensors`` (contiguous CPU copies) and ``path.json``."""
    path = Path(path)
    st, js = path.with_suffix(".safetensors"), path.with_suffix(".json")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(st.with_suffix(".tmp")))
    js.with_suffix(".jtmp").write_text(json.dumps(meta, default=float))
    _replace(st.with_suffix(".tmp"), st)
    _replace(js.with_suffix(".jtmp"), js)


def load_stage(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    return load_file(str(path.with_suffix(".safetensors"))), json.loads(path.with_suffix(".json").read_text())


def ragged_tensors(key: str, arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """N arrays ``[L_i, D]`` as ``key`` ``[sum L_i, D]`` plus their lengths ``key_len`` ``[N]``."""
    return {key: torch.from_numpy(np.concatenate(arrays, axis=0)),
            f"{key}_len": torch.tensor([a.shape[0] for a in arrays], dtype=torch.int64)}


def ragged_arrays(tensors: dict[str, torch.Tensor], key: str) -> list[np.ndarray]:
    """The arrays ``ragged_tensors`` stored under ``key``."""
    ends = np.cumsum(tensors[f"{key}_len"].numpy())
    return list(np.split(tensors[key].numpy(), ends[:-1]))


def save_groups(path: Path, groups: dict, stats: dict) -> None:
    """The data stage's groups (latents, per-sample encoder states, layouts) and latent statistics."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {"stats": stats, "groups": {}}
    for name, g in groups.items():
        tensors[f"{name}/latents"] = g.latents
        if g.cond_latents is not None:
            tensors[f"{name}/cond_latents"] = g.cond_latents
        if g.pad_prefix is not None:
            tensors[f"{name}/pad_prefix"] = torch.from_numpy(np.asarray(g.pad_prefix, dtype=np.uint8))
        for field in ("states", "neg_states"):
            tensors.update(ragged_tensors(f"{name}/{field}", getattr(g, field)))
        meta["groups"][name] = {"target_shape": list(g.target_shape), "captions_per_image": g.captions_per_image}
    save_stage(path, tensors, meta)


def load_groups(path: Path, group_cls) -> tuple[dict, dict]:
    tensors, meta = load_stage(path)
    groups = {}
    for name, info in meta["groups"].items():
        fields = {field: ragged_arrays(tensors, f"{name}/{field}") for field in ("states", "neg_states")}
        pad = tensors.get(f"{name}/pad_prefix")
        groups[name] = group_cls(
            latents=tensors[f"{name}/latents"],
            target_shape=tuple(info["target_shape"]),
            cond_latents=tensors.get(f"{name}/cond_latents"),
            pad_prefix=None if pad is None else pad.numpy().astype(bool),
            captions_per_image=info.get("captions_per_image", 1),
            **fields,
        )
    return groups, meta["stats"]


def save_module(path: Path, module: torch.nn.Module, config=None, **extra) -> None:
    meta = {"config": dataclasses.asdict(config) if config is not None else None, **extra}
    save_stage(path, dict(module.state_dict()), meta)
