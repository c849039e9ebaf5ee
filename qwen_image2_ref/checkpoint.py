"""Diffusers-format component folders in and out: ``config.json`` plus safetensors weights.

A component folder (``transformer/``, ``vae/``, ``text_encoder/``) holds ``config.json`` and either
one weights file or numbered shards with an index json, under diffusers' names
(``diffusion_pytorch_model.safetensors``) or transformers' (``model.safetensors``). Pickle weights
are refused: ``torch.load`` is never called.

Loading is memory-lean. Build the module without storage, then fill it shard by shard::

    with torch.device("meta"):            # own modules that define reset_buffers()
        model = MyModel(cfg)
    with meta_parameters():               # peers (diffusers/transformers): buffers stay real
        model = PeerModel.from_config(read_config(folder))
    load_into(model, folder, dtype=torch.float32)

Each checkpoint tensor is read once (a plain read into its own storage, ``qwen_image2_ref.shards``),
cast, and assigned into the module, so the weights never exist twice. Non-persistent buffers are not in a checkpoint: after loading, every
submodule that defines ``reset_buffers()`` has it called under ``torch.device(device)`` so it can
recompute them there. Weights tied between two names are not re-tied; tie them again afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from qwen_image2_ref.shards import read_header, read_tensor
from qwen_image_edge.runtime.errors import CheckpointError

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS_NAME = "model.safetensors"
WEIGHTS_NAMES = (DIFFUSERS_WEIGHTS_NAME, TRANSFORMERS_WEIGHTS_NAME)
INDEX_SUFFIX = ".index.json"  # diffusion_pytorch_model.safetensors.index.json
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_LIST_LIMIT = 20  # names shown per category in an error message


def _listing(items: list[str], limit: int = _LIST_LIMIT) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def shard_name(weights_name: str, index: int, count: int) -> str:
    """``diffusion_pytorch_model.safetensors``, 2, 3 -> ``diffusion_pytorch_model-00002-of-00003.safetensors``."""
    stem, _, ext = weights_name.rpartition(".")
    return f"{stem}-{index:05d}-of-{count:05d}.{ext}"


def _check_shard_name(folder: Path, name: object, index_path: Path) -> str:
    """A shard named by an index must be a plain file name inside ``folder``."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{index_path}: expected shard file names as strings, got {name!r}")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts or ".." in windows.parts:
        raise CheckpointError(
            f"{index_path}: shard file {name!r} points outside the checkpoint folder {folder}; "
            "expected a file name relative to that folder")
    return name


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_config(folder: str | os.PathLike) -> dict:
    """The component's ``config.json`` as a dict."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{Path(folder)}: expected {CONFIG_NAME}, found none")
    return _read_json(path)


def _index_path(folder: Path) -> Path | None:
    found = [folder / (name + INDEX_SUFFIX) for name in WEIGHTS_NAMES if (folder / (name + INDEX_SUFFIX)).is_file()]
    if len(found) > 1:
        raise CheckpointError(f"{folder}: expected one weights index, found {_listing([p.name for p in found])}")
    return found[0] if found else None


def find_weight_files(folder: str | os.PathLike) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a component, and the index's key -> file map when sharded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"expected a checkpoint folder, {folder} is not a directory")
    index_path = _index_path(folder)
    if index_path is not None:
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: expected a non-empty 'weight_map' object")
        names = sorted({_check_shard_name(folder, n, index_path) for n in weight_map.values()})
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{index_path}: shard files listed but not found in {folder}: {_listing(missing)}")
        if any((folder / n).is_file() for n in WEIGHTS_NAMES):
            logger.warning("%s: both an index and a single weights file; using the index", folder)
        return [folder / n for n in names], dict(weight_map)
    singles = [folder / n for n in WEIGHTS_NAMES if (folder / n).is_file()]
    if len(singles) > 1:
        raise CheckpointError(f"{folder}: expected one weights file, found {_listing([p.name for p in singles])}")
    if singles:
        return singles, None
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder}: found only pickle weights ({_listing(pickles)}). Pickle files can execute arbitrary code "
            "when loaded, so they are refused; convert them to safetensors with a trusted tool first")
    raise CheckpointError(
        f"{folder}: expected {DIFFUSERS_WEIGHTS_NAME} or {TRANSFORMERS_WEIGHTS_NAME} (or shards with "
        f"an '{INDEX_SUFFIX}' index), found {_listing(sorted(p.name for p in folder.iterdir())) or 'nothing'}")


@contextlib.contextmanager
def _open(path: Path, device: torch.device | str = "cpu") -> Iterator:
    """A safetensors file whose tensors are created on ``device`` (straight from the mmapped file to
    a GPU, without a host copy of the shard)."""
    try:
        handle = safe_open(str(path), framework="pt", device=str(device))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    with handle as f:
        yield f


def _shard_keys(files: list[Path], weight_map: dict[str, str] | None) -> list[tuple[Path, list[str], dict]]:
    """Per file: its keys and their shapes, read from headers only; checks the index against the files."""
    out, owner = [], {}
    for path in files:
        with _open(path) as f:
            keys = list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        for k in keys:
            if k in owner:
                raise CheckpointError(f"key {k!r} is stored twice: in {owner[k].name} and {path.name}")
            owner[k] = path
        if weight_map is not None:
            listed = {k for k, n in weight_map.items() if n == path.name}
            if listed != set(keys):
                problems = sorted(listed - set(keys))
                extra = sorted(set(keys) - listed)
                raise CheckpointError(
                    f"{path}: index and shard disagree; listed but absent: {_listing(problems) or 'none'}; "
                    f"present but not listed: {_listing(extra) or 'none'}")
        out.append((path, keys, shapes))
    return out


def _cast(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device | str | None = None) -> torch.Tensor:
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    return t if device is None else t.to(device)


def iter_tensors(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` file by file, one tensor at a time; floating tensors cast to ``dtype``.

    The folder is checked now; tensors are read only as the iterator advances.
    """
    files, _ = find_weight_files(folder)
    return _iter_files(files, dtype)


def _iter_files(files: list[Path], dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with _open(path) as f:
            for key in f.keys():
                yield key, _cast(f.get_tensor(key), dtype)


def _mismatch_report(folder: Path, expected: Mapping[str, torch.Size], found: Mapping[str, tuple],
                     strict: bool) -> str | None:
    missing = sorted(set(expected) - set(found)) if strict else []
    unexpected = sorted(set(found) - set(expected)) if strict else []
    shapes = [f"{k}: expected {list(expected[k])}, found {list(found[k])}"
              for k in sorted(set(expected) & set(found)) if tuple(expected[k]) != tuple(found[k])]
    if not (missing or unexpected or shapes):
        return None
    parts = [f"checkpoint {folder} does not match the module"]
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            parts.append(f"{len(items)} {label}: {_listing(items)}")
    return "; ".join(parts)


def _load_shard(module: nn.Module, path: Path, keys: list[str], dtypes: Mapping[str, torch.dtype | None],
                device: torch.device) -> None:
    """Assign one file's tensors into ``module``. Each tensor is read into its own storage by a plain
    file read (``qwen_image2_ref.shards``: no mapped shard counted in resident memory), cast, and
    moved to ``device``: one source tensor in host memory at a time."""
    entries = read_header(path)
    partial = {}
    with open(path, "rb") as fh:
        for k in keys:  # cast on the device (no host copy in a wider dtype); nothing else keeps the read
            partial[k] = _cast(read_tensor(entries[k], fh=fh).to(device), dtypes[k])
    result = module.load_state_dict(partial, strict=False, assign=True)
    if result.unexpected_keys:  # cannot happen after the header check; guards against hooks renaming keys
        raise CheckpointError(f"{path}: module refused keys {_listing(sorted(result.unexpected_keys))}")


def _meta_tensors(module: nn.Module) -> list[str]:
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return [name for name, t in named if t.is_meta]


def load_into(module: nn.Module, folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
              strict: bool = True, device: str | torch.device = "cpu") -> nn.Module:
    """Fill ``module`` (usually built on meta) from a component folder, one file at a time.

    Keys and shapes are checked against the file headers before any data is read. ``strict=False``
    ignores missing and unexpected keys, never shape mismatches. ``dtype=None`` gives each floating
    tensor the dtype of the module tensor it replaces. Afterwards ``reset_buffers()`` hooks run under
    ``torch.device(device)`` and no parameter or buffer may be left on meta.
    """
    folder, device = Path(folder), torch.device(device)
    files, weight_map = find_weight_files(folder)
    per_file = _shard_keys(files, weight_map)
    expected = module.state_dict(keep_vars=True)
    found = {k: s for _, _, shapes in per_file for k, s in shapes.items()}
    report = _mismatch_report(folder, {k: v.shape for k, v in expected.items()}, found, strict)
    if report:
        raise CheckpointError(report)
    dtypes = {k: dtype if dtype is not None else v.dtype for k, v in expected.items()}
    for path, keys, _ in per_file:
        wanted = [k for k in keys if k in expected]
        if wanted:
            _load_shard(module, path, wanted, dtypes, device)
        logger.debug("loaded %d tensors from %s", len(wanted), path.name)
    with torch.device(device):
        for sub in module.modules():
            hook = getattr(sub, "reset_buffers", None)
            if callable(hook):
                hook()
    left = _meta_tensors(module)
    if left:
        raise CheckpointError(
            f"after loading {folder}, {len(left)} tensors are still on the meta device: {_listing(left)}; "
            "expected them in the checkpoint, or recomputed by a reset_buffers() method "
            "(build peer models under meta_parameters() so their buffers stay real)")
    return module.to(device)


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """While active, every new ``nn.Parameter`` is moved to meta; buffers are computed for real.

    For peer models (diffusers, transformers) whose non-persistent buffers have no ``reset_buffers``
    hook. Not thread-safe: it patches ``nn.Module.register_parameter`` for its duration.
    """
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and type(param) is nn.Parameter and not param.is_meta:
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def parse_size(size: int | str) -> int:
    """``"10GB"`` -> 10**9 * 10 bytes (decimal units as diffusers; KiB/MiB/GiB binary)."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B)\s*", size.upper())
        if match is None:
            raise CheckpointError(f"max_shard_size: expected bytes or e.g. '10GB', got {size!r}")
        value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if value <= 0:
        raise CheckpointError(f"max_shard_size: expected a positive size, got {size!r}")
    return value


def _plan_shards(state: Mapping[str, torch.Tensor], limit: int, dtype: torch.dtype | None) -> list[list[str]]:
    """Greedy split in key order; a tensor larger than ``limit`` gets a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * (torch.finfo(dtype).bits // 8 if dtype and t.is_floating_point() else t.element_size())
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return [s for s in shards if s]


def _shard_tensors(state: Mapping[str, torch.Tensor], keys: list[str], dtype: torch.dtype | None) -> dict:
    out, seen = {}, set()
    for k in keys:
        t = _cast(state[k].detach(), dtype, "cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone()  # safetensors refuses tensors sharing storage
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def save_component(module_or_state_dict: nn.Module | Mapping[str, torch.Tensor], folder: str | os.PathLike,
                   config: dict, *, max_shard_size: int | str = "10GB", dtype: torch.dtype | None = None,
                   weights_name: str = DIFFUSERS_WEIGHTS_NAME, overwrite: bool = False) -> Path:
    """Write ``config.json`` and the weights (one file, or shards plus index) into ``folder``.

    The folder is written under a temporary name next to it and renamed into place, so an
    interrupted write never leaves a folder that looks complete. Returns the folder.
    """
    folder = Path(folder)
    if weights_name not in WEIGHTS_NAMES:
        raise CheckpointError(f"weights_name: expected one of {list(WEIGHTS_NAMES)}, got {weights_name!r}")
    if folder.exists() and not overwrite:
        raise CheckpointError(f"{folder} already exists; pass overwrite=True to replace it")
    state = module_or_state_dict.state_dict() if isinstance(module_or_state_dict, nn.Module) else module_or_state_dict
    meta = [k for k, t in state.items() if t.is_meta]
    if meta:
        raise CheckpointError(f"cannot save {folder}: tensors on the meta device: {_listing(meta)}")
    try:
        config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"config for {folder} is not JSON-serialisable ({exc})") from exc
    plan = _plan_shards(state, parse_size(max_shard_size), dtype)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / CONFIG_NAME).write_text(config_text, encoding="utf-8")
        weight_map, total = {}, 0
        for i, keys in enumerate(plan, start=1):
            name = weights_name if len(plan) == 1 else shard_name(weights_name, i, len(plan))
            tensors = _shard_tensors(state, keys, dtype)
            total += sum(t.nbytes for t in tensors.values())
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})  # transformers requires format=pt
            weight_map.update(dict.fromkeys(keys, name))
            del tensors
        if len(plan) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / (weights_name + INDEX_SUFFIX)).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        _swap_into_place(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved %d tensors in %d file(s) to %s", len(state), len(plan), folder)
    return folder


def _swap_into_place(tmp: Path, folder: Path) -> None:
    old = None
    if folder.exists():
        old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
        folder.rename(old)
    tmp.rename(folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_digest(folder: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """sha256 (hex) over config.json, the index and the weight files, names included, streamed."""
    folder = Path(folder)
    files, _ = find_weight_files(folder)
    extra = [p for p in (folder / CONFIG_NAME, _index_path(folder)) if p is not None and p.is_file()]
    digest = hashlib.sha256()
    for path in [*extra, *files]:
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as fh:
            while chunk := fh.read(chunk_size):
                digest.update(chunk)
    return digest.hexdigest()
