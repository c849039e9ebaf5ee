"""Stages 3-5 of the demo trainer: precomputed latents and encoder states, the MMDiT, the checkpoint.

The MMDiT learns flow matching on normalised latents: ``x_t = (1 - s) x0 + s noise`` with a
logit-normal ``s`` and the velocity target ``noise - x0`` (what ``qwen_image_edge.runtime.schedule``'s Euler step
integrates from s = 1 to 0). Captions are dropped to the empty prompt " " 10% of the time so
classifier-free guidance has an unconditional branch; the EMA of the weights is what ships.
Text-to-image and edit batches are mixed. Every batch goes through the pipeline's own layout code
(``qwen_image_edge.runtime.layout.build_layout`` + ``transformer.layout_inputs``): edits put the condition
image's latents where the prompt's ``<|image_pad|>`` slots are, exactly as ``QwenImagePipeline``
does at inference.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from qwen_image2_ref.config import ModelConfig
from qwen_image2_ref.demo import CAPTION_STYLE_KEY, data
from qwen_image2_ref.demo.captions import CaptionStyle, caption_v2
from qwen_image2_ref.demo.parts import encoder_for, load_vae
from qwen_image2_ref.demo.resume import TrainState, run_steps
from qwen_image2_ref.demo.resume import branch as resume_branch
from qwen_image2_ref.demo.resume import start as resume_or_start
from qwen_image2_ref.demo.stage_io import load_groups, load_stage, save_groups, save_module
from qwen_image2_ref.demo.train_vae import lr_at, to_pixels
from qwen_image2_ref.model_folder import save_model
from qwen_image2_ref.transformer import QwenImageTransformer, layout_inputs
from qwen_image2_ref.vae import pack_latents
from qwen_image_edge.runtime import images as rimages
from qwen_image_edge.runtime.errors import ConfigError
from qwen_image_edge.runtime.layout import image_slot_prefix, padded_batch

log = logging.getLogger(__name__)

DIT_STEP_KEY = "demo_dit_step"
# Checkpoint file of each training stage, under the work folder.
CHECKPOINTS = {"vae": "ckpt_vae.safetensors", "encoder": "ckpt_encoder.safetensors", "dit": "ckpt_dit.safetensors"}
NEGATIVE_PROMPT = " "  # the unconditional prompt of caption dropout and of guidance
DROPOUT = 0.1
# (group, share of steps): the held-out goals are measured at 128x128; other aspect ratios and
# edits keep those abilities alive.
MIX = (("t2i_128", 0.62), ("edit_128", 0.30), ("t2i_192x128", 0.04), ("t2i_128x192", 0.04))
DATA_SIZES = {"t2i_128": 20000, "t2i_192x128": 1600, "t2i_128x192": 1600, "edit_128": 6000}
SINGLE_OBJECT_SHARE = 0.4  # extra one-object scenes in t2i_128: the cleanest signal for shape words
# Noise levels s ~ logit-normal(T_MEAN, 1). Measured (500 steps, 4x4x32, t2i only; MSE at s=0.9 with
# the right vs shuffled captions): T_MEAN 0 / lr 1e-3 -> 0.512 vs 0.517 (the prompt is ignored);
# 1.0 / 1e-3 -> 0.422 vs 0.485; 1.5 / 2e-3 -> 0.319 vs 0.504. At mid and low noise the noisy image
# already shows the colours and places, so only high-noise samples teach the model to read the prompt.
T_MEAN = 1.2


@dataclasses.dataclass
class Group:
    latents: torch.Tensor  # [N, h*w, C] normalised, packed
    states: list[np.ndarray]  # N x [L_i, D] float16
    neg_states: list[np.ndarray]  # N x [L_i', D] (edits: " " with the same image) or one shared entry
    target_shape: tuple[int, int]
    cond_latents: torch.Tensor | None = None  # [N, N_c, C]
    pad_prefix: np.ndarray | None = None  # [K] bool: image-slot pattern that starts every edit prompt
    captions_per_image: int = 1  # K: states[i * K + k] is caption k of image i


def _encode_latents(vae, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    """VAE means on the VAE's device, returned on the CPU (where the training data lives)."""
    device = next(vae.parameters()).device
    with torch.no_grad():
        return torch.cat([vae.encode(to_pixels(images[i:i + batch]).to(device)).cpu()
                          for i in range(0, len(images), batch)])


def _trim(embeds: torch.Tensor, mask: torch.Tensor) -> list[np.ndarray]:
    return [e[: int(m.sum())].cpu().numpy().astype(np.float16) for e, m in zip(embeds, mask)]


def _captions(ds: data.Dataset, style: CaptionStyle, seed: int) -> list[str]:
    """V1: the dataset's own captions. V2: two per image, one naming the background and one not, so
    the model learns both and picks a background itself when none is named."""
    if style is CaptionStyle.V1:
        return list(ds.captions)
    rng = np.random.default_rng(seed)
    return [c for s in ds.scenes for c in (caption_v2(s, rng, True), caption_v2(s, rng, False))]


def _encode_states(encoder, texts: list[str]) -> list[np.ndarray]:
    states = []
    for i in range(0, len(texts), 64):
        e, m, _ = encoder.encode(list(texts[i:i + 64]))
        states += _trim(e, m)
    return states


def build_data(vae, encoder, seed: int, small: bool, progress: bool,
               style: CaptionStyle = CaptionStyle.V1) -> tuple[dict[str, Group], dict]:
    """Render, encode, measure latent statistics, normalise. Returns the groups and the stats (on the
    CPU). The VAE and the encoder encode on whatever device they are on."""
    sizes = {k: (24 if small else v) for k, v in DATA_SIZES.items()}
    raw: dict[str, tuple] = {}
    for i, name in enumerate(("t2i_128", "t2i_192x128", "t2i_128x192")):
        w, h = (int(v) for v in name.split("_")[1].split("x")) if "x" in name.split("_")[1] else (128, 128)
        if name == "t2i_128":
            n1 = int(sizes[name] * SINGLE_OBJECT_SHARE)
            a = data.make_dataset(sizes[name] - n1, seed + 1000, w, h)
            b = data.make_dataset(n1, seed + 1010, w, h, n_objects=1)
            texts = _captions(a, style, seed + 1500) + _captions(b, style, seed + 1510)
            images = np.concatenate([a.images, b.images])
        else:
            ds = data.make_dataset(sizes[name], seed + 1000 + i, w, h)
            texts, images = _captions(ds, style, seed + 1500 + i), ds.images
        raw[name] = (texts, _encode_latents(vae, images), (h // 16, w // 16))
    edits = train_edits(seed, sizes["edit_128"])
    src = np.stack([data.render(e.source) for e in edits])
    tgt = np.stack([data.render(e.target) for e in edits])
    src_lat, tgt_lat = _encode_latents(vae, src), _encode_latents(vae, tgt)

    allz = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]) for _, z, _ in raw.values()] +
                     [tgt_lat.permute(0, 2, 3, 1).reshape(-1, tgt_lat.shape[1])])  # [M, C]
    mean, std = allz.mean(0), allz.std(0).clamp_min(1e-3)
    stats = {"latents_mean": [round(float(v), 5) for v in mean], "latents_std": [round(float(v), 5) for v in std]}

    def norm(z: torch.Tensor) -> torch.Tensor:
        return pack_latents((z - mean[None, :, None, None]) / std[None, :, None, None])  # [N, h*w, C]

    neg, neg_mask, _ = encoder.encode([NEGATIVE_PROMPT])
    groups: dict[str, Group] = {}
    with torch.no_grad():
        for name, (texts, z, shape) in raw.items():
            groups[name] = Group(norm(z), _encode_states(encoder, texts), _trim(neg, neg_mask), shape,
                                 captions_per_image=len(texts) // len(z))
        states, negs, prefix = [], [], None
        for e_ex, img in tqdm(list(zip(edits, src)), desc="encode edits", disable=not progress):
            vl = rimages.resize_rgba(Image.fromarray(img), 128, 128)  # pipeline: calculate_dimensions -> 128x128
            e, m, pad = encoder.encode([e_ex.instruction, NEGATIVE_PROMPT], [vl])
            pos_s, neg_s = _trim(e, m)
            prefix = image_slot_prefix(pad[0].cpu().numpy(), prefix)
            states.append(pos_s)
            negs.append(neg_s)
        groups["edit_128"] = Group(norm(tgt_lat), states, negs, (8, 8), norm(src_lat), prefix)
    return groups, stats


def train_edits(seed: int, n: int) -> list[data.EditExample]:
    """The edit group's triples, in its order (the data stage renders and encodes exactly these)."""
    rng = np.random.default_rng(seed + 2000)
    return [data.sample_edit(rng, 128, 128, "train") for _ in range(n)]


def edit_label(ex: data.EditExample) -> str:
    """'recolor/2': an edit's kind and its source's object count."""
    return f"{ex.kind}/{len(ex.source.objects)}"


def check_edit_weights(weights: dict[str, float]) -> None:
    known = {f"{k}/{c}" for k in data.EDIT_KINDS for c in (1, 2)} | set(data.EDIT_KINDS)
    unknown = set(weights) - known
    if unknown:
        raise ConfigError(f"edit weights: unknown {sorted(unknown)}, expected a kind {data.EDIT_KINDS} "
                          "optionally followed by /1 or /2 (the source's object count)")
    if any(not (w > 0 and math.isfinite(w)) for w in weights.values()):
        raise ConfigError(f"edit weights: expected positive finite numbers, got {weights}")


def check_kept_weight(weight: float) -> None:
    if not (weight > 0 and math.isfinite(weight)):
        raise ConfigError(f"kept-object weight: expected a positive finite number, got {weight}")


def edit_probabilities(seed: int, n: int, weights: dict[str, float]) -> np.ndarray:
    """Sampling probabilities of the edit group's n items: each item's weight is ``weights``'s entry
    for its label ('recolor/2'), else for its kind ('recolor'), else 1. The labels are derived again
    from the seed, with the code that built the data."""
    check_edit_weights(weights)
    w = np.array([weights.get(edit_label(ex), weights.get(ex.kind, 1.0)) for ex in train_edits(seed, n)])
    return w / w.sum()


# A token is on a kept object when that object covers at least this share of its pixel block.
KEPT_COVERAGE = 0.05


def kept_object_tokens(seed: int, n: int, grid: tuple[int, int]) -> np.ndarray:
    """[n, h*w] bool, row-major like the packed latents: the tokens of the edit group's n items that an
    object the edit leaves as it was (the same shape, colour and place in source and target) covers.
    In a two-object recolour or removal, that is the object the instruction does not name; the
    triples are derived again from the seed, as in ``edit_probabilities``."""
    h, w = grid
    out = np.zeros((n, h * w), bool)
    for i, ex in enumerate(train_edits(seed, n)):
        src = ex.source
        kept = [o for o in src.objects if o in ex.target.objects]
        if not kept:
            continue
        cover = np.zeros((src.height, src.width), np.float32)
        for o in kept:
            cover = np.maximum(cover, data.object_coverage(o, src.width, src.height))
        blocks = cover.reshape(h, src.height // h, w, src.width // w).mean(axis=(1, 3))
        out[i] = (blocks >= KEPT_COVERAGE).reshape(-1)
    return out


def make_batch(group: Group, idx: np.ndarray, drop: np.ndarray, variant: np.ndarray | None = None):
    """Padded states [B, L, D], the shared layout and its tensors, condition latents [B, N_c, C].
    ``variant``: which of each image's captions (default the first)."""
    k = group.captions_per_image
    variant = np.zeros(len(idx), np.int64) if variant is None else variant
    rows = [group.neg_states[i if len(group.neg_states) > 1 else 0] if d else group.states[i * k + v]
            for i, d, v in zip(idx, drop, variant)]
    edit = group.cond_latents is not None
    states, layout = padded_batch(rows, group.target_shape, group.pad_prefix, [group.target_shape] if edit else [])
    cond = group.cond_latents[idx] if edit else torch.zeros(len(idx), 0, group.latents.shape[2])
    return torch.from_numpy(states), layout, cond


@dataclasses.dataclass(frozen=True)
class DiTSettings:
    steps: int = 20000
    batch: int = 24
    lr: float = 1.5e-3
    warmup: int = 100
    ema: float = 0.999


def flow_loss(model, group: Group, idx, drop, variant, gen: torch.Generator, cfg,
              device: torch.device | str = "cpu", token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The batch is drawn on the CPU (``gen`` is a CPU generator: the random streams, and so a
    checkpoint, do not depend on the device), then moved to ``device``, where the model is.
    ``token_weight`` [B, N]: a weighted mean over the target tokens instead of the plain mean (the
    loss keeps its scale: the weights are divided by their mean)."""
    states, layout, cond = make_batch(group, idx, drop, variant)
    x0 = group.latents[idx]  # [B, N, C]
    noise = torch.randn(x0.shape, generator=gen)
    s = torch.sigmoid(torch.randn(x0.shape[0], generator=gen) + T_MEAN)  # logit-normal(T_MEAN, 1)
    x0, noise, s = x0.to(device), noise.to(device), s.to(device)
    xt = (1 - s[:, None, None]) * x0 + s[:, None, None] * noise
    extra = {k: v.to(device) for k, v in layout_inputs(layout, cfg).items()}
    pred = model(xt, states.to(device), s, cond.to(device), **extra)
    err = (pred - (noise - x0)).square()
    if token_weight is None:
        return err.mean()
    w = token_weight.to(device=device, dtype=err.dtype)
    return (err * w[:, :, None]).mean() / w.mean()


def train_dit(config: ModelConfig, groups: dict[str, Group], settings: DiTSettings, seed: int,
              progress: bool = True, checkpoint=None, resume: bool = False, every_s: float = 600.0,
              on_checkpoint=None, device: torch.device | str = "cpu", edit_weights: dict[str, float] | None = None,
              branch_from=None, kept_weight: float = 1.0):
    """Returns (EMA model, losses, stats) after ``settings.steps`` steps, continuing ``checkpoint``
    when ``resume``. ``on_checkpoint(ema, step)`` runs after every checkpoint write. The model, its EMA and
    the optimizer live on ``device``; a checkpoint written on one device resumes on another (the
    device is not a setting; the numbers then differ in the last bits).

    ``edit_weights`` ('recolor/2' -> 4.0): draw those edits that many times as often within the edit
    group (``edit_probabilities``). ``kept_weight``: the flow loss of an edit weighs the tokens of
    the objects the edit keeps (``kept_object_tokens``) that many times as much as the others.
    ``branch_from``: with no checkpoint of its own yet, start from that checkpoint of another run
    (``resume.branch``) instead of step 0."""
    t0 = time.time()
    torch.manual_seed(seed)
    model = QwenImageTransformer(config.transformer)
    with torch.no_grad():
        model.proj_out.weight.zero_()  # start as "predict zero velocity"
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.99), weight_decay=0.0)
    names = [n for n, _ in MIX if n in groups]
    p = np.array([w for n, w in MIX if n in groups])
    p = p / p.sum()
    state = TrainState({"model": model, "ema": ema}, opt, np.random.default_rng(seed + 3000),
                       torch.Generator().manual_seed(seed + 4000), settings.steps,
                       {"seed": seed, **dataclasses.asdict(settings),
                        "data": {n: [len(g.latents), g.captions_per_image] for n, g in groups.items()},
                        **({"edit_weights": dict(sorted(edit_weights.items()))} if edit_weights else {}),
                        **({"edit_kept_weight": kept_weight} if kept_weight != 1.0 else {})})
    edit_p = (edit_probabilities(seed, len(groups["edit_128"].latents), edit_weights)
              if edit_weights and "edit_128" in groups else None)
    kept = None
    if kept_weight != 1.0 and "edit_128" in groups:
        check_kept_weight(kept_weight)
        g = groups["edit_128"]
        kept = 1.0 + (kept_weight - 1.0) * torch.from_numpy(
            kept_object_tokens(seed, len(g.latents), g.target_shape)).float()  # [N, h*w]

    def step(st: TrainState) -> float:
        name = names[st.rng.choice(len(names), p=p)]
        g = groups[name]
        if name == "edit_128" and edit_p is not None:
            idx = st.rng.choice(len(g.latents), size=settings.batch, p=edit_p)
        else:
            idx = st.rng.integers(len(g.latents), size=settings.batch)
        drop = st.rng.random(settings.batch) < DROPOUT
        variant = st.rng.integers(g.captions_per_image, size=settings.batch)
        lr = lr_at(st.step, st.total, settings.lr, settings.warmup)
        weight = kept[idx] if name == "edit_128" and kept is not None else None
        loss = flow_loss(model, g, idx, drop, variant, st.gen, config.transformer, device, weight)
        return _dit_step(model, ema, opt, lr, loss, min(settings.ema, (1 + st.step) / (10 + st.step)))

    if branch_from is not None and not (checkpoint is not None and Path(checkpoint).exists()):
        resume_branch(state, branch_from)
    if not resume_or_start(state, checkpoint, resume):
        hook = None if on_checkpoint is None else (lambda st: on_checkpoint(ema, st.step))
        run_steps(state, step, checkpoint, every_s, "dit", progress, on_checkpoint=hook)
    return ema.cpu().eval(), state.losses, {"steps": state.step, "seconds": round(time.time() - t0, 1)}


def _dit_step(model, ema, opt, lr: float, loss: torch.Tensor, decay: float) -> float:
    """One optimiser step at ``lr`` on ``loss``, then the EMA update; returns the loss."""
    for pg in opt.param_groups:
        pg["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)
    return loss.item()


def smoothed(losses: list[float], every: int = 500) -> list[tuple[int, float]]:
    return [(i + every, round(float(np.mean(losses[i:i + every])), 4)) for i in range(0, len(losses), every)]


def load_encoder(out, config: ModelConfig, args):
    """The encoder stage's tokenizer and weights (whatever ``--style`` says now: they were made once)."""
    encoder = encoder_for(out, config)
    encoder.model.load_state_dict(load_stage(out / "encoder")[0])
    return encoder.requires_grad_(False)


def run_stage(stage: str, out, config: ModelConfig, args, progress: bool) -> dict:
    device = torch.device(getattr(args, "device", "cpu"))
    if stage == "data":
        vae = load_vae(out).to(device)
        encoder = load_encoder(out, config, args)
        encoder.to(device)
        t0 = time.time()
        groups, stats = build_data(vae, encoder, args.seed, args.small_data, progress, CaptionStyle(args.style))
        save_groups(out / "data", groups, stats)
        return {"seconds": round(time.time() - t0, 1), "sizes": {k: len(g.latents) for k, g in groups.items()}}
    groups, data_stats = load_groups(out / "data", Group)
    if stage == "dit":
        settings = DiTSettings(steps=args.dit_steps, **({"batch": 4} if args.small_data else {}))

        def write(ema, step: int):  # the stage file later stages (and `--stages save` mid-run) read
            save_module(out / "dit", ema, config.transformer, step=step)

        model, losses, stats = train_dit(config, groups, settings, args.seed, progress, out / CHECKPOINTS["dit"],
                                         args.resume, args.checkpoint_minutes * 60, write, device,
                                         args.edit_weights, args.branch_from,
                                         getattr(args, "edit_kept_weight", 1.0))
        write(model, stats["steps"])
        stats["loss_every_500"] = smoothed(losses)
        log.info("dit stage: %s", stats)
        return {"losses": losses, **stats}
    if stage == "save":
        return {"folder": str(save_weights(out, config, data_stats, args))}
    raise ValueError(stage)


def parse_edit_weights(items: list[str]) -> dict[str, float]:
    """['recolor/2=4'] -> {'recolor/2': 4.0}; one-line errors for anything else."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = float(value)  # no "=": float("") fails too
        except ValueError:
            raise ConfigError(f"--edit-weight: expected KIND[/N]=WEIGHT such as recolor/2=4, got {item!r}") from None
    check_edit_weights(out)
    return out


def save_weights(out, config: ModelConfig, stats: dict, args):
    vae = load_vae(out)
    vcfg = dataclasses.replace(vae.config, latents_mean=tuple(stats["latents_mean"]),
                               latents_std=tuple(stats["latents_std"]))
    vae.config = vcfg
    vae.reset_buffers()
    encoder = load_encoder(out, config, args)
    model = QwenImageTransformer(config.transformer)
    weights, dit_meta = load_stage(out / "dit")
    model.load_state_dict(weights)
    extra = {"default_negative_prompt": NEGATIVE_PROMPT} if "default_negative_prompt" in {
        f.name for f in dataclasses.fields(config.pipeline)} else {}
    pipe = dataclasses.replace(config.pipeline, output_resolution=128, num_steps=40,
                               guidance_scale=float(getattr(args, "guidance", 1.0) or 1.0), **extra)
    full = dataclasses.replace(config, vae=vcfg, encoder=encoder.config, pipeline=pipe)
    n_params = sum(p.numel() for m in (model, vae, encoder.model) for p in m.parameters())
    dtype = torch.bfloat16 if n_params * 4 > 24e6 else None
    folder = args.weights or (out / "weights")
    log.info("saving %d parameters (%s) to %s", n_params, dtype or "float32", folder)
    # the caption language it learned (bench/demo_quality.py words its prompts in it) and the MMDiT
    # step its EMA was taken at (a folder saved mid-run says which step it is)
    extra_index = {CAPTION_STYLE_KEY: args.style}
    if "step" in dit_meta:
        extra_index[DIT_STEP_KEY] = dit_meta["step"]
    return save_model(folder, full, model, vae, encoder, dtype=dtype, overwrite=True, extra_index=extra_index)


def latent_stats_ok(stats: dict) -> bool:
    return all(math.isfinite(v) for v in stats["latents_mean"] + stats["latents_std"])
