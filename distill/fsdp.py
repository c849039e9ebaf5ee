"""``distill --strategy fsdp``: the student sharded with FSDP2, checkpoints through torch.distributed.checkpoint.

Sharding: ``fully_shard`` per transformer block, then the root (embedders, modulation, output
head). Each rank keeps 1/N of the fp32 master weights, gradients and AdamW moments; a block's
full weights exist only while it runs. ``--mixed-precision bf16``: the all-gathered weights and
the compute are bf16, gradients are reduce-scattered in fp32 and the optimizer steps the fp32
shards. The timestep stays fp32 (as in the reference's bf16 path: bf16 would move the
sinusoids' phases), so forward inputs are cast by the trainer, not by FSDP.

Checkpoints: ``OUT/checkpoint-dcp.json`` (iteration, losses, settings, teacher digest, written
atomically by rank 0 last) names ``OUT/checkpoint.dcp-<iteration>/``, a DCP folder holding the
student's and the optimizer's sharded state (a LoRA student's adapters only). DCP stores each
tensor with its global shape, so a run resumes on any number of processes (DCP reshards), and
the data order does not depend on it (see trainer.py): the resumed run is the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from qwen_image_edge.runtime.errors import ConfigError

META_NAME = "checkpoint-dcp.json"
DCP_PREFIX = "checkpoint.dcp-"


def checkpoint_blocks(transformer: nn.Module) -> None:
    """Activation checkpointing per block: a block's activations are recomputed in the backward
    instead of kept (the forward runs twice; the result is the same computation). Done by
    replacing each block's forward, so parameter names (and checkpoints) stay the model's."""
    for block in transformer.transformer_blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def shard_student(student: nn.Module, device: torch.device, bf16: bool) -> nn.Module:
    """``fully_shard`` every block, then the root, over all processes; in place. Each block is
    made fp32 just before it is sharded, so a bf16 teacher never has a whole fp32 copy on a rank."""
    # A block returns its (k, v) (views, for the inference KV cache) besides x; training drops them
    # and nothing writes into them in place, which is the case FSDP's warning is about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # cast_forward_inputs off: the trainer casts latents and text states, and keeps the timestep fp32
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    for block in student.transformer_blocks:
        fully_shard(block.to(device, torch.float32), mesh=mesh, mp_policy=policy)
    fully_shard(student.to(device, torch.float32), mesh=mesh, mp_policy=policy)
    return student


def _options(lora: bool, **kw) -> StateDictOptions:
    # a LoRA student's checkpoint holds the adapters only: the frozen base is the teacher's
    return StateDictOptions(ignore_frozen_params=lora, **kw)


def save_checkpoint(out: Path, model, opt, meta: dict, rank: int, lora: bool) -> None:
    """Every rank writes its shards; rank 0 then points ``checkpoint-dcp.json`` at the new folder
    (os.replace: an interruption leaves the previous checkpoint whole) and removes the older ones."""
    folder = out / f"{DCP_PREFIX}{meta['iteration']:08d}"
    model_sd, optim_sd = get_state_dict(model, opt, options=_options(lora))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder)
    dist.barrier()  # every rank's shards are on disk before the pointer moves
    if rank == 0:
        tmp = out / f".{META_NAME}.tmp"
        tmp.write_text(json.dumps({**meta, "folder": folder.name}))
        os.replace(tmp, out / META_NAME)
        for old in out.glob(f"{DCP_PREFIX}*"):
            if old.name != folder.name:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def read_meta(out: Path) -> dict | None:
    path = out / META_NAME
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    if not (out / meta.get("folder", "")).is_dir():
        raise ConfigError(f"{path}: names the checkpoint folder {meta.get('folder')!r}, which is missing; "
                          "use --restart")
    return meta


def load_checkpoint(out: Path, meta: dict, model, opt, lora: bool) -> None:
    """Restore the sharded student and optimizer from the folder ``meta`` names (any world size)."""
    model_sd, optim_sd = get_state_dict(model, opt, options=_options(lora))  # the templates to load into
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, checkpoint_id=out / meta["folder"])
    except (Exception, dcp.CheckpointException) as exc:  # a BaseException carrying each rank's traceback
        last = [line for line in str(exc).splitlines() if line.strip()][-1:] or [type(exc).__name__]
        raise ConfigError(f"{out / meta['folder']}: not a checkpoint of this student ({last[0].strip()[:200]}); "
                          "use another --out or --restart") from None
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(lora))


def remove_checkpoints(out: Path) -> None:
    (out / META_NAME).unlink(missing_ok=True)
    for old in out.glob(f"{DCP_PREFIX}*"):
        shutil.rmtree(old, ignore_errors=True)


def full_state(model) -> dict[str, torch.Tensor]:
    """The whole fp32 student on rank 0's CPU (every rank must call it; others get an empty dict)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
