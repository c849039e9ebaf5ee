"""The distillation trainer: one process or many (``torchrun``), CPU (gloo) or GPU (nccl).

    qwen-image-edge distill --teacher demo --steps 4 --out DIR [--iters N --batch B --lr LR]
    torchrun --nproc-per-node 2 -m qwen_image_edge.distill --teacher demo --steps 4 --out DIR

Each iteration draws one global batch from a generator seeded by ``(seed, iteration)``; rank r
takes rows ``r::world`` and DDP (or FSDP's reduce-scatter) averages the gradients, so any world
size that divides the batch follows the same trajectory as one process (up to float summation
order). The rule: the data order is a function of (seed, iteration) only, never of the world
size or of earlier iterations. That makes resume exact, on the same or another world size: the
checkpoint (student, optimizer, iteration; written atomically every ``checkpoint_every_s`` seconds
and at the end) is all the state there is. ``--strategy ddp`` (default): full fp32 replicas,
``DIR/checkpoint`` (safetensors + JSON). ``--strategy fsdp``: FSDP2 shards, optionally bf16
compute, a torch.distributed.checkpoint folder that resumes on any world size (distill/fsdp.py).

Outputs under ``--out``: ``pool`` (teacher trajectories, reused when the teacher and the pool
spec are unchanged), ``checkpoint``, ``losses.json`` and ``student/`` — a checkpoint folder in the
teacher's layout whose ``model_index.json`` carries the student schedule (``num_steps``,
``sample_sigmas``, guidance 1, ``guidance_distilled``), which export and the runtime pick up.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from qwen_image2_ref.checkpoint import checkpoint_digest
from qwen_image2_ref.demo import CAPTION_STYLE_KEY, caption_style
from qwen_image2_ref.demo.stage_io import load_stage, save_stage
from qwen_image2_ref.demo.train_vae import lr_at
from qwen_image2_ref.devices import resolve_placement
from qwen_image2_ref.model_folder import STUDENT_LORA_KEY, ModelSource, open_model, save_model
from qwen_image2_ref.pipeline import QwenImagePipeline
from qwen_image2_ref.transformer import layout_inputs
from qwen_image_edge.calib.prompts import default_prompt_set, demo_edits, is_demo_folder, load_prompts
from qwen_image_edge.distill import fsdp
from qwen_image_edge.distill.lora_student import (
    ADAPTER_NAME,
    DEFAULT_TARGETS,
    LoraStudentConfig,
    add_adapter,
    base_state,
    save_adapter,
)
from qwen_image_edge.distill.pool import (
    Group,
    Pool,
    PoolSpec,
    build_pool,
    load_pool,
    save_pool,
    student_sigmas,
)
from qwen_image_edge.runtime import schedule
from qwen_image_edge.runtime.errors import ConfigError
from qwen_image_edge.runtime.layout import padded_batch

log = logging.getLogger(__name__)


class Strategy(enum.StrEnum):
    DDP = "ddp"  # a full fp32 replica per process (DistributedDataParallel)
    FSDP = "fsdp"  # FSDP2: weights, gradients and optimizer state sharded over the processes


class Precision(enum.StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"  # fsdp only: bf16 weights in compute, fp32 master weights and gradient reductions


def _choice(enum_type, value, flag: str):
    try:
        return enum_type(value)
    except ValueError:
        raise ConfigError(f"{flag}: expected one of {', '.join(e.value for e in enum_type)}, got {value!r}") from None


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    steps: tuple[int, ...] = (4,)  # student schedules trained; the first is the shipped default
    iters: int = 1000
    batch: int = 16  # global batch (all ranks together)
    lr: float = 2e-4
    warmup: int = 20
    seed: int = 0
    teacher_steps: int = 40
    guidance: float | None = None  # teacher guidance; None: the teacher's default, 4 when that is 1
    pool_size: int = 512
    edit_size: int = 0
    pool_batch: int = 16
    checkpoint_every_s: float = 120.0
    lora_rank: int = 0  # > 0: a LoRA student of this rank (distill/lora_student.py); 0: full fine-tuning
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    strategy: Strategy = Strategy.DDP
    mixed_precision: Precision = Precision.FP32
    activation_checkpointing: bool = False  # recompute each block in the backward (same math, less memory)

    @property
    def lora(self) -> LoraStudentConfig | None:
        return LoraStudentConfig(self.lora_rank, self.lora_alpha, tuple(self.lora_targets)) if self.lora_rank else None

    def __post_init__(self):
        if not self.steps or any(s < 1 for s in self.steps):
            raise ConfigError(f"steps: expected positive step counts, got {self.steps}")
        for name in ("iters", "batch", "pool_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr: expected > 0, got {self.lr}")
        if self.lora_rank < 0:
            raise ConfigError(f"--lora: expected a rank >= 1, got {self.lora_rank}")
        _ = self.lora  # checks alpha and targets
        object.__setattr__(self, "strategy", _choice(Strategy, self.strategy, "--strategy"))
        object.__setattr__(self, "mixed_precision", _choice(Precision, self.mixed_precision, "--mixed-precision"))
        if self.mixed_precision is Precision.BF16 and self.strategy is not Strategy.FSDP:
            raise ConfigError("--mixed-precision bf16: needs --strategy fsdp (ddp trains fp32 replicas)")


# ------------------------------------------------------------------------------------ processes

@dataclasses.dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    device: torch.device


def init_distributed(device: torch.device | None = None) -> tuple[int, int, torch.device]:
    """(rank, world, device). Under torchrun: nccl on GPUs, gloo on CPU; alone: (0, 1, ``device``).
    ``device``: the resolved ``--device`` (None: cuda:0 where CUDA is available); under torchrun a
    CUDA device is each process's ``cuda:LOCAL_RANK``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        index = local if world > 1 or device is None or device.index is None else device.index
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), device


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


# ------------------------------------------------------------------------------------ batches

def segment_table(pool: Pool, steps: tuple[int, ...], n_tokens: int, scheduler) -> list[tuple[int, int]]:
    """Every (start, end) position pair into ``pool.sigmas`` over all student grids."""
    table = []
    for s in steps:
        pos = []
        for sigma in student_sigmas(s, n_tokens, scheduler):
            hit = np.flatnonzero(np.abs(pool.sigmas - sigma) < 1e-6)
            if not hit.size:
                raise ConfigError(f"steps {s}: the pool holds no teacher state at sigma {sigma:.6f}; rebuild it")
            pos.append(int(hit[0]))
        table += list(zip(pos[:-1], pos[1:]))
    return table


def draw(pool: Pool, table, settings: DistillSettings, it: int) -> tuple[str, np.ndarray, np.ndarray]:
    """The global batch of iteration ``it``: (group name, sample ids [B], segment ids [B])."""
    rng = np.random.default_rng([settings.seed, it])
    names = sorted(pool.groups)
    sizes = np.array([len(pool.groups[n].points) for n in names], dtype=float)
    name = names[rng.choice(len(names), p=sizes / sizes.sum())]
    ids = rng.integers(len(pool.groups[name].points), size=settings.batch)
    segs = rng.integers(len(table), size=settings.batch)
    return name, ids, segs


def batch_inputs(group: Group, ids: np.ndarray, segs: np.ndarray, table, pool: Pool, config, device,
                 length: int):
    """Student inputs and its regression target for the given rows, text padded to ``length`` (the
    longest prompt of the global batch: padding moves rope positions, so every rank pads alike)."""
    edit = group.cond_latents is not None
    states, layout = padded_batch([group.states[i] for i in ids], group.target_shape, group.pad_prefix,
                                  [group.target_shape] if edit else [], length)
    cond = group.cond_latents[ids] if edit else torch.zeros(len(ids), 0, group.points.shape[-1])
    start = torch.tensor([table[s][0] for s in segs])
    end = torch.tensor([table[s][1] for s in segs])
    ids_t = torch.from_numpy(ids)
    x_in, x_out = group.points[ids_t, start], group.points[ids_t, end]  # [B, N_t, C]
    sig = torch.from_numpy(pool.sigmas.astype(np.float32))
    s0, s1 = sig[start], sig[end]
    target = (x_out - x_in) / (s1 - s0)[:, None, None]
    inputs = layout_inputs(layout, config, device)
    return (x_in.to(device), torch.from_numpy(states).to(device), s0.to(device), cond.to(device), inputs,
            target.to(device))


# ------------------------------------------------------------------------------------ checkpoints

def _opt_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt/{pid}/{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return tensors, {"param_groups": sd["param_groups"]}


def save_checkpoint(path: Path, model, opt, it: int, losses: list[float], settings, digest: str) -> None:
    # a LoRA student's checkpoint holds its adapters only (the base weights are the teacher's)
    tensors = {f"model/{k}": v for k, v in model.state_dict().items() if not settings.lora_rank or "lora_" in k}
    opt_t, opt_meta = _opt_tensors(opt)
    tensors.update(opt_t)
    save_stage(path, tensors, {"iteration": it, "losses": losses, "settings": dataclasses.asdict(settings),
                               "teacher": digest, **opt_meta})


def load_checkpoint(path: Path, model, opt, settings, digest: str) -> tuple[int, list[float]]:
    """Restore into ``model`` / ``opt``; (0, []) when there is no checkpoint to resume."""
    if (path.parent / fsdp.META_NAME).is_file():
        raise ConfigError(f"{path.parent / fsdp.META_NAME}: an fsdp checkpoint; resume it with --strategy fsdp, "
                          "or use another --out or --restart")
    if not Path(path).with_suffix(".json").is_file():
        return 0, []
    tensors, meta = load_stage(path)
    check_same_run(path, meta, settings, digest)
    model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")},
                          strict=not settings.lora_rank)
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, pid, name = k.split("/", 2)
            state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return int(meta["iteration"]), list(meta["losses"])


def check_same_run(path: Path, meta: dict, settings: DistillSettings, digest: str) -> None:
    """Refuse a checkpoint made by another teacher or with settings that change the trajectory."""
    saved = meta["settings"]
    mine = json.loads(json.dumps(dataclasses.asdict(settings)))
    keys = ("steps", "iters", "batch", "lr", "warmup", "seed", "teacher_steps", "guidance", "pool_size", "edit_size",
            "lora_rank", "lora_alpha", "lora_targets")
    if settings.strategy is Strategy.FSDP:  # ddp checkpoints predate it (always fp32)
        keys += ("mixed_precision",)
    diff = [k for k in keys if saved.get(k) != mine.get(k)]
    if meta.get("teacher") != digest or diff:
        raise ConfigError(f"{path}: a checkpoint of another run (differs in {diff or ['teacher']}); "
                          "use another --out or --restart")


def load_sharded(out: Path, model, opt, settings: DistillSettings, digest: str) -> tuple[int, list[float]]:
    """The fsdp counterpart of ``load_checkpoint``: (0, []) when ``out`` holds no DCP checkpoint."""
    if Path(out / "checkpoint").with_suffix(".json").is_file():
        raise ConfigError(f"{out / 'checkpoint.json'}: a ddp checkpoint; resume it with --strategy ddp, "
                          "or use another --out or --restart")
    meta = fsdp.read_meta(out)
    if meta is None:
        return 0, []
    check_same_run(out / fsdp.META_NAME, meta, settings, digest)
    fsdp.load_checkpoint(out, meta, model, opt, lora=bool(settings.lora_rank))
    return int(meta["iteration"]), list(meta["losses"])


def save_any(ckpt: Path, student, opt, it: int, losses: list[float], settings: DistillSettings, digest: str,
             ranks: Ranks) -> None:
    """Checkpoint: rank 0 writes a ddp replica; every rank writes its fsdp shards."""
    if settings.strategy is Strategy.FSDP:
        meta = {"iteration": it, "losses": losses, "settings": dataclasses.asdict(settings), "teacher": digest,
                "world": ranks.world}
        fsdp.save_checkpoint(ckpt.parent, student, opt, meta, ranks.rank, lora=bool(settings.lora_rank))
    elif ranks.rank == 0:
        save_checkpoint(ckpt, student, opt, it, losses, settings, digest)


# ------------------------------------------------------------------------------------ the run

def pool_spec(model_path: str | Path, pipe, settings: DistillSettings) -> PoolSpec:
    """What the teacher samples: the default prompt set of the teacher's folder, repeated to
    ``pool_size`` (each repeat gets other noise), and demo edit examples when asked."""
    prompts = load_prompts(default_prompt_set(model_path))
    reps = -(-settings.pool_size // len(prompts))
    prompts = (prompts * reps)[: settings.pool_size]  # each repeat gets other noise (seed + index)
    edits: tuple = ()
    if settings.edit_size:
        if not is_demo_folder(model_path):
            raise ConfigError("--edits: edit examples come from the demo data generator; only with a demo-trained "
                              "teacher (--teacher demo, or a folder the demo trainer saved)")
        edits = tuple(demo_edits(settings.edit_size, settings.seed + 17))
    guidance = settings.guidance
    if guidance is None:
        guidance = pipe.config.pipeline.guidance_scale if pipe.config.pipeline.guidance_scale > 1 else 4.0
    return PoolSpec(tuple(prompts), edits, settings.teacher_steps, float(guidance),
                    tuple(sorted(set(settings.steps))), settings.seed, settings.pool_batch)


def teacher_pool(pipe: QwenImagePipeline, model_path: Path, settings: DistillSettings, folder: Path, digest: str,
                 ranks: Ranks, progress: bool) -> Pool:
    """The teacher's trajectories: reused from ``folder`` when made for this teacher, spec and dtype
    (a bf16 teacher's trajectories are not an fp32 one's)."""
    spec = pool_spec(model_path, pipe, settings)
    pool_digest = f"{digest[:16]}-{spec.digest()}-{str(pipe.dtype).removeprefix('torch.')}"
    pool = load_pool(folder, pool_digest)
    if pool is None:
        log.info("teacher trajectories: %d prompts, %d edits, %d steps, guidance %.2f, %d process(es)",
                 len(spec.prompts), len(spec.edits), spec.teacher_steps, spec.guidance, ranks.world)
        pool = build_pool(pipe, spec, ranks.rank, ranks.world, progress)
        if ranks.rank == 0:
            save_pool(folder, pool, pool_digest)
    _barrier(ranks.world)
    return pool


def open_student(pipe: QwenImagePipeline, settings: DistillSettings, ckpt: Path, digest: str, ranks: Ranks,
                 restart: bool):
    """(student, optimizer, first iteration, losses so far): the teacher's transformer trained in
    place, resumed from ``ckpt`` unless ``restart``. The student trains in fp32 whatever the
    teacher's dtype (AdamW updates are below bf16's resolution of its weights); with fsdp, sharded
    (fp32 master shards, bf16 compute copies with --mixed-precision bf16)."""
    sharded = settings.strategy is Strategy.FSDP
    student = pipe.transformer.train().requires_grad_(True)
    if not sharded or settings.lora:  # fsdp casts block by block as it shards (no whole fp32 copy)
        student = student.to(ranks.device, torch.float32)
    if settings.lora:  # after the pool: the teacher sampled the base weights, the one copy in memory
        add_adapter(student, settings.lora, settings.seed)
    if settings.activation_checkpointing:
        fsdp.checkpoint_blocks(student)
    if sharded:  # before the optimizer: fully_shard replaces the parameters by their shards
        fsdp.shard_student(student, ranks.device, settings.mixed_precision is Precision.BF16)
    trainable = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=settings.lr, betas=(0.9, 0.99), weight_decay=0.0)
    if restart and ranks.rank == 0:
        for p in (ckpt.with_suffix(".safetensors"), ckpt.with_suffix(".json")):
            p.unlink(missing_ok=True)
        fsdp.remove_checkpoints(ckpt.parent)
    _barrier(ranks.world)
    if sharded:
        start, losses = load_sharded(ckpt.parent, student, opt, settings, digest)
    else:
        start, losses = load_checkpoint(ckpt, student, opt, settings, digest)
    if start:
        log.info("resuming from iteration %d/%d", start, settings.iters)
    return student, opt, start, losses


def train_step(model, student, opt, pool: Pool, table, settings: DistillSettings, it: int, ranks: Ranks) -> float:
    """One iteration on this rank's rows of the global batch; the loss averaged over ranks."""
    name, ids, segs = draw(pool, table, settings, it)
    length = max(len(pool.groups[name].states[i]) for i in ids)
    ids, segs = ids[ranks.rank::ranks.world], segs[ranks.rank::ranks.world]
    x_in, states, sig, cond, inputs, target = batch_inputs(pool.groups[name], ids, segs, table, pool, student.config,
                                                           ranks.device, length)
    if settings.mixed_precision is Precision.BF16:  # as the reference's bf16 path: sigma and rope stay fp32
        x_in, states, cond = x_in.bfloat16(), states.bfloat16(), cond.bfloat16()
    for g in opt.param_groups:
        g["lr"] = lr_at(it, settings.iters, settings.lr, settings.warmup)
    pred = model(x_in, states, sig, cond, **inputs)
    loss = (pred.float() - target).square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    return _global_mean(loss.detach(), ranks.world)


def train_loop(student, opt, pool: Pool, table, settings: DistillSettings, run: tuple[Path, str], start: int,
               losses: list[float], ranks: Ranks, progress: bool, stop_after: int | None) -> bool:
    """Iterate from ``start``, checkpointing every ``checkpoint_every_s`` and at the end; returns
    whether it ran to the end (False: stopped after ``stop_after`` iterations of this call)."""
    ckpt, digest = run
    model = student
    if ranks.world > 1 and settings.strategy is Strategy.DDP:
        model = DistributedDataParallel(student, device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None)
    last = time.time()
    bar = tqdm(total=settings.iters, initial=start, desc="distill", disable=not progress or ranks.rank > 0)
    it, stop = start, False
    try:
        while it < settings.iters and not stop:
            losses.append(train_step(model, student, opt, pool, table, settings, it, ranks))
            it += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if it % 100 == 0:
                log.info("distill iteration %d/%d loss %.5f", it, settings.iters, float(np.mean(losses[-100:])))
            stop = stop_after is not None and it - start >= stop_after
            # rank 0's clock decides for all: every rank takes part in an fsdp checkpoint
            due = time.time() - last > settings.checkpoint_every_s
            if settings.strategy is Strategy.FSDP:
                due = _agree(due, ranks)
            if it == settings.iters or stop or due:
                save_any(ckpt, student, opt, it, losses, settings, digest, ranks)
                last = time.time()
    finally:
        bar.close()
    _barrier(ranks.world)
    return not stop


def distill(teacher: ModelSource, out: str | os.PathLike, settings: DistillSettings, *, progress: bool = True,
            restart: bool = False, stop_after: int | None = None, device=None, dtype=None,
            loras=None) -> Path | None:
    """Run (or resume) a distillation; returns the student folder (rank 0) or None (other ranks).

    ``teacher``: a checkpoint folder, ``demo`` or a ``LoadedModel`` (trained in place).
    ``stop_after``: return after that many iterations of this call, checkpointed, without writing
    the student (tests use it to simulate an interruption). ``device`` / ``dtype``: where and in
    what precision the teacher samples the pool (default: CUDA + bf16 where available, else CPU +
    fp32; checked before anything loads); the student trains in fp32 on that device. ``loras``:
    adapter files or (file, scale) pairs fused into the teacher (and so into the student's start).
    """
    placement = resolve_placement(device, dtype, stage="distill")
    ranks = Ranks(*init_distributed(placement.device))
    # fsdp in one process still shards over a (one-rank) process group; made here, removed at the end
    own_group = settings.strategy is Strategy.FSDP and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if ranks.device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    try:
        return _distill(teacher, Path(out), settings, ranks, placement, progress, restart, stop_after, loras)
    finally:
        if own_group:
            dist.destroy_process_group()


def _distill(teacher, out: Path, settings: DistillSettings, ranks: Ranks, placement, progress: bool, restart: bool,
             stop_after: int | None, loras) -> Path | None:
    if settings.batch % ranks.world:
        raise ConfigError(f"--batch {settings.batch} must be a multiple of the number of processes ({ranks.world})")
    if ranks.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    _barrier(ranks.world)
    model = open_model(teacher, device=ranks.device, dtype=placement.dtype, stage="distill", loras=loras)
    digest = teacher_digest(model)
    pipe = model.pipeline()
    pipe.transformer.requires_grad_(False)
    pool = teacher_pool(pipe, model.path, settings, out / "pool", digest, ranks, progress)
    res = pipe.config.pipeline.output_resolution
    table = segment_table(pool, tuple(settings.steps), (res // 16) ** 2, pipe.config.pipeline.scheduler)
    student, opt, start, losses = open_student(pipe, settings, out / "checkpoint", digest, ranks, restart)
    finished = train_loop(student, opt, pool, table, settings, (out / "checkpoint", digest), start, losses, ranks,
                          progress, stop_after)
    if finished and settings.strategy is Strategy.FSDP:
        student = fsdp.full_state(student)  # every rank takes part; rank 0 gets the fp32 tensors
    if not finished or ranks.rank:
        return None
    (out / "losses.json").write_text(json.dumps({"losses": losses}))
    provenance = {"teacher_transformer_sha256": digest, "teacher_steps": settings.teacher_steps,
                  "guidance": pool.guidance, "trained_steps": list(settings.steps), "iterations": settings.iters,
                  "batch": settings.batch, "pool": {k: len(g.points) for k, g in pool.groups.items()},
                  **({"teacher_loras": [a.provenance() for a in model.loras]} if model.loras else {}),
                  **({"strategy": "fsdp", "mixed_precision": settings.mixed_precision.value}
                     if settings.strategy is Strategy.FSDP else {})}
    if settings.lora:
        provenance["lora"] = {"rank": settings.lora_rank, "alpha": settings.lora.lora_alpha,
                              "targets": list(settings.lora_targets)}
    return save_student(pipe, student, out / "student", settings.steps[0], model.path, provenance, settings.lora)


def teacher_digest(model) -> str:
    """The teacher transformer's identity: its checkpoint digest, and the fused adapters' digests and
    scales (a pool or checkpoint made with other adapters is not reused)."""
    digest = checkpoint_digest(model.path / "transformer")
    if not model.loras:
        return digest
    parts = [digest] + [f"{a.sha256}:{a.scale!r}" for a in model.loras]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _agree(flag: bool, ranks: Ranks) -> bool:
    """Rank 0's ``flag`` on every rank."""
    if ranks.world == 1:
        return flag
    t = torch.tensor([int(flag)], device=ranks.device)
    dist.broadcast(t, 0)
    return bool(t.item())


def _global_mean(loss: torch.Tensor, world: int) -> float:
    if world > 1:
        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= world
    return float(loss)


def student_pipeline_config(pcfg, steps: int):
    """The teacher's pipeline config with the student's schedule: ``steps`` fixed base sigmas
    (shifted at sampling time exactly as the teacher's 40-step grid), guidance off and distilled."""
    sigmas = tuple(float(s) for s in schedule.default_sigmas(steps))
    return dataclasses.replace(pcfg, num_steps=steps, sample_sigmas=sigmas, guidance_scale=1.0,
                               guidance_distilled=True)


def save_student(pipe, student, folder: Path, steps: int, teacher_folder: Path, provenance: dict,
                 lora: LoraStudentConfig | None = None) -> Path:
    """The student folder; a LoRA student's keeps the base weights and names its adapter file in
    ``model_index.json`` (loading the folder fuses it). ``student``: the module, or its full state
    dict (an fsdp student, gathered)."""
    config = dataclasses.replace(pipe.config, pipeline=student_pipeline_config(pipe.config.pipeline, steps))
    dtype = None
    for sub in ("transformer", "vae"):
        cfg_file = teacher_folder / sub / "config.json"
        if cfg_file.is_file() and json.loads(cfg_file.read_text()).get("torch_dtype") == "bfloat16":
            dtype = torch.bfloat16
    extra = {"distilled_from": provenance, **({STUDENT_LORA_KEY: ADAPTER_NAME} if lora else {})}
    style = caption_style(teacher_folder)
    if style is not None:  # the student reads the teacher's prompt language
        extra[CAPTION_STYLE_KEY] = style
    state = student if isinstance(student, dict) else student.eval().float().cpu()
    weights = base_state(state) if lora else state
    write_adapter = (lambda staging: save_adapter(staging / ADAPTER_NAME, state, lora)) if lora else None
    return save_model(folder, config, weights, pipe.vae, pipe.encoder, dtype=dtype, overwrite=True,
                      extra_index=extra, write_extra=write_adapter)
