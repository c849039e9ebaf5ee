"""Training state that a stage resumes from bit for bit, and the step loop that checkpoints it.

A checkpoint is ONE safetensors file: the tensors (every module's weights, the optimizer's
moments, the torch generators' states) plus a JSON header entry (step, step total, losses, the
numpy generator's state, the optimizer's hyper-parameters, the stage's settings). One file, so a
single ``os.replace`` makes it appear whole: a kill mid-write leaves the previous checkpoint and a
stray ``.tmp``, never half of each. Never pickle.

Bit-exact continuation holds because everything a step reads is in the file: weights, optimizer
moments and step counts, the EMA, the step (the learning rate is a pure function of step and
total), and the random streams (numpy for the data order, a torch generator for noise, torch's
global generator for anything else). The same thread count is assumed: a different one may sum
in another order.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from qwen_image_edge.runtime.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

# Set (e.g. by a SIGTERM handler) to make ``run_steps`` checkpoint after the current step and stop.
STOP = threading.Event()
# Set while ``run_steps`` loops: a handler may then leave the stopping to it (else stop at once).
IN_STEPS = threading.Event()


class Interrupted(Exception):
    """``run_steps`` stopped on ``STOP`` after writing a checkpoint."""


@dataclass
class TrainState:
    """What a training stage carries from step to step."""

    modules: dict[str, torch.nn.Module]
    optimizer: torch.optim.Optimizer
    rng: np.random.Generator  # data order
    gen: torch.Generator  # noise
    total: int
    settings: dict  # JSON: what the run was started with; a resume must match it
    step: int = 0
    losses: list[float] = field(default_factory=list)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, plain = {}, {}
    for idx, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{idx}/{name}"] = value
            else:
                plain[f"{idx}/{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "plain": plain}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split("/", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["plain"].items():
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(path: Path, state: TrainState, done: bool = False) -> None:
    """Write ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    tensors = {f"{name}/{k}": v for name, m in state.modules.items() for k, v in m.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_tensors(state.optimizer)
    tensors.update(opt_tensors)
    tensors["rng/torch_gen"] = state.gen.get_state()
    tensors["rng/torch_global"] = torch.get_rng_state()
    meta = {"step": state.step, "total": state.total, "done": done, "settings": state.settings,
            "losses": state.losses, "numpy_rng": state.rng.bit_generator.state, "optimizer": opt_meta}
    tmp = path.with_name(path.name + ".tmp")
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"state": json.dumps(meta)})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_complete(path: Path) -> None:
    """Raise unless the file is as long as its safetensors header says (a truncated file would be
    memory-mapped past its end)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if os.path.getsize(path) != 8 + n + end:
        raise ValueError(f"{os.path.getsize(path)} bytes, the header describes {8 + n + end}")


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON state) of a checkpoint file."""
    try:
        _check_complete(path)
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, KeyError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"training checkpoint {path}: expected a complete safetensors file with a 'state' "
                              f"entry, could not read it ({exc})") from None
    return tensors, meta


def load_checkpoint(path: Path, state: TrainState) -> dict:
    """Restore ``state`` in place from ``path``; returns the JSON state. The settings must match."""
    tensors, meta = read_checkpoint(path)
    stored, now = _options(meta["settings"]), _options(state.settings)
    if stored != now:
        diff = {k: (stored.get(k), now.get(k)) for k in stored.keys() | now.keys() if stored.get(k) != now.get(k)}
        raise ConfigError(f"resume {path}: expected the settings it was started with, got changes "
                          f"(checkpoint, now) {diff}; use the same options or a fresh --out")
    if BRANCHED in meta["settings"]:
        state.settings[BRANCHED] = meta["settings"][BRANCHED]
    _restore(state, tensors, meta)
    state.total = meta["total"]
    log.info("resumed %s at step %d/%d", path, state.step, state.total)
    return meta


# settings entry of a branched run: where it started (a record, not an option a resume must repeat)
BRANCHED = "branched_from"


def _options(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k != BRANCHED}


def branch(state: TrainState, path: Path) -> dict:
    """Start ``state`` where another run's checkpoint ``path`` stands (weights, optimizer moments,
    random streams, step, losses) but with this run's settings: a change of data or sampling in the
    middle of a long run, without repeating its first steps. ``state.settings`` records the branch
    point and the parent's settings; the step total stays this run's. From there, this run
    checkpoints and resumes bit for bit like any other."""
    tensors, meta = read_checkpoint(path)
    if meta["step"] >= state.total:
        raise ConfigError(f"branch from {path}: it is at step {meta['step']}, expected fewer than this run's "
                          f"total {state.total}")
    _restore(state, tensors, meta)
    state.settings[BRANCHED] = {"path": str(path), "step": meta["step"], "settings": _options(meta["settings"])}
    log.info("branched from %s at step %d/%d", path, state.step, state.total)
    return meta


def _restore(state: TrainState, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    for name, module in state.modules.items():
        prefix = f"{name}/"
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    state.optimizer.load_state_dict(_optimizer_state(
        {k: v for k, v in tensors.items() if k.startswith("optimizer/")}, meta["optimizer"]))
    state.gen.set_state(tensors["rng/torch_gen"])
    torch.set_rng_state(tensors["rng/torch_global"])
    state.rng.bit_generator.state = meta["numpy_rng"]
    state.step, state.losses = meta["step"], list(meta["losses"])


def run_steps(state: TrainState, step_fn: Callable[[TrainState], float], path: Path | None, every_s: float,
              desc: str, progress: bool = True, log_every: int = 250,
              on_checkpoint: Callable[[TrainState], None] | None = None) -> None:
    """Call ``step_fn`` until ``state.total`` steps; checkpoint to ``path`` every ``every_s`` seconds,
    at the end (marked done) and when ``STOP`` is set (then raise ``Interrupted``), each time
    followed by ``on_checkpoint(state)``."""
    IN_STEPS.set()
    try:
        _loop(state, step_fn, path, every_s, desc, progress, log_every, on_checkpoint)
    finally:
        IN_STEPS.clear()


def _loop(state, step_fn, path, every_s, desc, progress, log_every, on_checkpoint) -> None:
    bar = tqdm(total=state.total, initial=state.step, desc=desc, disable=not progress)
    last = time.monotonic()
    while state.step < state.total:
        state.losses.append(step_fn(state))
        state.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{state.losses[-1]:.4f}")
        if state.step % log_every == 0:
            log.info("%s step %d/%d loss %.4f", desc, state.step, state.total, np.mean(state.losses[-log_every:]))
        if path is not None and (STOP.is_set() or time.monotonic() - last >= every_s):
            save_checkpoint(path, state)
            if on_checkpoint is not None:
                on_checkpoint(state)
            last = time.monotonic()
        if STOP.is_set():
            bar.close()
            raise Interrupted(f"{desc}: stopped at step {state.step}/{state.total}, checkpoint {path}")
    bar.close()
    if path is not None:
        save_checkpoint(path, state, done=True)
        if on_checkpoint is not None:
            on_checkpoint(state)


def start(state: TrainState, path: Path | None, resume: bool) -> bool:
    """Load ``path`` into ``state`` when resuming and it exists; refuse to overwrite it otherwise.
    Returns whether the stage is already done."""
    if path is None or not Path(path).exists():
        return False
    if not resume:
        raise ConfigError(f"training checkpoint {path} exists: expected --resume to continue it, "
                          "or a fresh --out")
    return bool(load_checkpoint(path, state)["done"])
