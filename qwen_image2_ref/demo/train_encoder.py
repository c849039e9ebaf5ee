"""Stage 2 of the demo trainer (v2): the condition encoder's language model, pre-trained as a causal LM
on the caption language, then frozen.

Why pre-train it rather than train it jointly with the MMDiT: the MMDiT trains on encoder states
computed once up front, so each of its steps costs only its own forward and backward; a joint
encoder would need its forward and backward on every MMDiT step and states recomputed, for a
model whose job (telling caption words apart in context) a next-token objective already teaches.
And the next-token objective is what real Qwen3-VL weights were trained on, so the activations
the edge quantization measures (outlier channels, ranges) come from an LLM-like model instead of
a random one. Only the text model learns; the vision tower stays as initialised (edits pass the
condition image to the MMDiT as latents too).

What a next-token objective alone does to this small caption language (measured, session 7): the
last hidden state at "red" only has to predict "circle"/"square"/..., which does not depend on the
colour, so the model drops the word itself. Captions that differ in one colour, shape or position
word then get states with cosine 0.994-0.999 even at that word's own token (the MMDiT trained on
them followed no prompt: colour 6% at 40 steps). ``token_loss`` adds the same head reading the
*current* token back from each last hidden state (cross-entropy, weighted): after 1000 steps the
differing tokens' states fall to cosine 0.58 / 0.59 / 0.76 (colour / shape / position), and the
next-token loss still falls. The shipped v1 random encoder's are 0.36 / 0.36 / 0.49.

The text is what the encoder reads at inference: captions and edit instructions from TRAINING
scenes (the held-out combinations never appear), in the runtime's chat template. The loss counts
the user turn only (the system message is the same every time).

What both terms still leave out (measured, session 10, on the v2b encoder): every state carries its
own word and almost nothing of its context. "make the square black" and "make the circle black"
differ at "square" (cosine 0.71) and nowhere else (>= 0.998), and edits read the condition image
through a vision tower that never trained. Which object an edit means is then left for the MMDiT
to find from a shape word and the condition latents; on two-object recolours it paints both
objects, and it removes the named one of two barely above chance. ``edit_loss`` adds the job the
VLM does for Qwen-Image-Edit, grounding the instruction in the image: from the state of the last
token (after "assistant\n"; the MMDiT reads it), a linear readout that only training uses must
tell the edit's kind, where it acts (the position of the object it recolours or removes, or
moves it to) and the new colour. The instruction is read with its source image, so the vision
tower trains too. Measured from the v2b encoder, 6000 steps of 32 edits (``build/demo_v2e``,
``bench/encoder_grounding.py``): on held-out two-object recolours the readout names the right
object 95% of the time (chance 50%), on removals 97%. A readout of the whole target scene (every
position's colour and shape) learned far less in 1500 steps (both colours right on 11% of held-out
two-object recolours).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qwen_image2_ref.demo import captions, data
from qwen_image2_ref.demo.resume import TrainState, run_steps
from qwen_image2_ref.demo.resume import start as resume_or_start
from qwen_image2_ref.demo.train_vae import lr_at
from qwen_image_edge.runtime.images import vision_patches

log = logging.getLogger(__name__)

# A channel whose max |activation| is this many times the median channel's max is an outlier:
# LLM.int8() calls magnitudes >= 6 outliers in models whose typical activations are about 1.
OUTLIER_RATIO = 6.0


@dataclass(frozen=True)
class EncoderSettings:
    steps: int = 3000
    batch: int = 48
    lr: float = 3e-3
    warmup: int = 100
    style: str = "v2"  # captions.CaptionStyle value
    instruction_share: float = 0.25
    token_loss: float = 0.0  # weight of the current-token term (module docstring); 0: next token only
    edit_loss: float = 0.0  # weight of the last-token edit readout (module docstring); 0: none
    edit_batch: int = 32  # edits per step for the edit readout


def lm_texts(rng: np.random.Generator, n: int, style: captions.CaptionStyle, instruction_share: float) -> list[str]:
    """n training texts: captions of training scenes (any size) and training edit instructions."""
    out = []
    for _ in range(n):
        if rng.random() < instruction_share:
            out.append(data.sample_edit(rng, split="train").instruction)
        else:
            w, h = data.SIZES[int(rng.integers(len(data.SIZES)))]
            out.append(captions.caption(data.sample_scene(rng, w, h, "train"), rng, style))
    return out


def lm_loss(encoder, texts: list[str], token_loss: float = 0.0) -> torch.Tensor:
    """Next-token cross-entropy over the user turn of each templated text, plus ``token_loss`` times
    the cross-entropy of the same head reading each token itself back from its last hidden state."""
    batch = encoder.tokenizer.encode(texts)
    ids = torch.from_numpy(batch.input_ids)  # [B, L]
    mask = torch.from_numpy(batch.attention_mask)  # [B, L]
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : batch.drop_idx] = -100
    out = encoder.model(input_ids=ids, attention_mask=mask,
                        mm_token_type_ids=torch.from_numpy(batch.mm_token_type_ids), labels=labels, use_cache=False)
    if not token_loss:
        return out.loss
    current = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten().to(out.logits.device),
                                                ignore_index=-100)  # logits at t against token t: no shift
    return out.loss + token_loss * current


# The edit readout's slots: what an edit instruction, read with its source image, asks to change.
# "where": the position of the object it recolours or removes, or moves it to; "none" otherwise.
EDIT_SLOTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("kind", data.EDIT_KINDS),
    ("where", (*data.POSITIONS, "none")),
    ("color", (*data.COLORS, "none")),
)


def edit_labels(edit: data.EditExample) -> list[int]:
    """The class index of every ``EDIT_SLOTS`` slot for ``edit``."""
    where, color = "none", "none"
    if edit.kind == "recolor":
        (i,) = [j for j, (a, b) in enumerate(zip(edit.source.objects, edit.target.objects)) if a.color != b.color]
        where, color = edit.source.objects[i].position, edit.target.objects[i].color
    elif edit.kind == "remove_object":
        (where,) = {o.position for o in edit.source.objects} - {o.position for o in edit.target.objects}
    elif edit.kind == "move":
        where = edit.target.objects[0].position
    return [options.index(v) for (_, options), v in zip(EDIT_SLOTS, (edit.kind, where, color))]


def edit_head(hidden_size: int) -> torch.nn.Linear:
    """The readout from the last token's state to every slot's logits (used in training only)."""
    return torch.nn.Linear(hidden_size, sum(len(options) for _, options in EDIT_SLOTS))


def last_state(encoder, texts: list[str], images: list) -> torch.Tensor:
    """[B, D] the language model's final (normed) state at each templated edit prompt's last token,
    with gradients; one condition image per prompt, all of one size (``encoder.tokenize`` would give
    every prompt the same images)."""
    pixel_values, grid = vision_patches(images, encoder.vision)
    if len({tuple(g) for g in grid}) != 1:
        raise ValueError("last_state: the images of one batch must share a size")
    batch = encoder.tokenizer.encode(texts, grid[:1])  # the same slot layout in every row
    out = encoder.model.model(input_ids=torch.from_numpy(batch.input_ids),
                              attention_mask=torch.from_numpy(batch.attention_mask),
                              mm_token_type_ids=torch.from_numpy(batch.mm_token_type_ids),
                              pixel_values=torch.from_numpy(pixel_values), image_grid_thw=torch.from_numpy(grid),
                              use_cache=False)
    return out.last_hidden_state[:, -1]  # rows are left padded


def edit_readout(head: torch.nn.Linear, states: torch.Tensor,
                 edits: list[data.EditExample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the slots, and the right/wrong table [B, n_slots]."""
    logits = head(states)
    labels = torch.tensor([edit_labels(e) for e in edits])
    loss, right, start = 0.0, [], 0
    for k, (_, options) in enumerate(EDIT_SLOTS):
        part = logits[:, start:start + len(options)]
        loss = loss + torch.nn.functional.cross_entropy(part, labels[:, k])
        right.append(part.argmax(1) == labels[:, k])
        start += len(options)
    return loss / len(EDIT_SLOTS), torch.stack(right, 1)


def edit_examples(rng: np.random.Generator, n: int, split: str = "train") -> tuple[list[data.EditExample], list]:
    """n 128 px edits of ``split`` and their source images."""
    edits = [data.sample_edit(rng, 128, 128, split) for _ in range(n)]
    return edits, [Image.fromarray(data.render(e.source)) for e in edits]


def edit_loss(encoder, head, rng: np.random.Generator, n: int) -> torch.Tensor:
    edits, images = edit_examples(rng, n)
    return edit_readout(head, last_state(encoder, [e.instruction for e in edits], images), edits)[0]


def settings_record(settings: EncoderSettings) -> dict:
    """The settings a checkpoint records (and resuming compares); ``token_loss`` and ``edit_loss``
    (with its batch) only when used, so checkpoints written before they existed still resume."""
    record = dataclasses.asdict(settings)
    if not record["token_loss"]:
        del record["token_loss"]
    if not record["edit_loss"]:
        del record["edit_loss"], record["edit_batch"]
    return record


def text_parameters(encoder) -> list[torch.nn.Parameter]:
    """The language model and its head (the vision tower trains only with the edit readout)."""
    return [*encoder.model.model.language_model.parameters(), *encoder.model.lm_head.parameters()]


def train_encoder(encoder, settings: EncoderSettings, seed: int, progress: bool = True,
                  checkpoint: Path | None = None, resume: bool = False, every_s: float = 600.0,
                  extra_settings: dict | None = None) -> tuple[list, dict]:
    """Pre-train ``encoder``'s text model (and, with ``edit_loss``, its vision tower) in place; returns
    (losses, stats). Leaves it frozen, in eval mode. ``extra_settings`` join what the checkpoint
    records and a resume compares (e.g. the run its weights started from)."""
    t0 = time.time()
    modules = {"encoder": encoder.model}
    params = text_parameters(encoder)
    if settings.edit_loss:
        torch.manual_seed(seed + 502)
        modules["edit_head"] = head = edit_head(encoder.model.config.text_config.hidden_size)
        params += [*encoder.model.model.visual.parameters(), *head.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.98), weight_decay=0.01)
    style = captions.CaptionStyle(settings.style)
    state = TrainState(modules, opt, np.random.default_rng(seed + 500),
                       torch.Generator().manual_seed(seed + 501), settings.steps,
                       {"seed": seed, **settings_record(settings), **(extra_settings or {})})

    def step(st: TrainState) -> float:
        for g in opt.param_groups:
            g["lr"] = lr_at(st.step, st.total, settings.lr, settings.warmup)
        loss = lm_loss(encoder, lm_texts(st.rng, settings.batch, style, settings.instruction_share), settings.token_loss)
        if settings.edit_loss:
            loss = loss + settings.edit_loss * edit_loss(encoder, head, st.rng, settings.edit_batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()

    encoder.model.train()
    try:
        if not resume_or_start(state, checkpoint, resume):
            run_steps(state, step, checkpoint, every_s, "encoder", progress, log_every=100)
    finally:
        encoder.model.eval()
        encoder.requires_grad_(False)
    return state.losses, {"steps": state.step, "seconds": round(time.time() - t0, 1)}


@torch.no_grad()
def activation_stats(encoder, prompts: list[str], batch: int = 64) -> dict:
    """Per decoder layer, over the prompts' real tokens (system turn included, as the encoder runs it):
    per-channel max |h| and median |h| of the layer's output (the residual stream; the last layer's is
    what the MMDiT reads), and the outlier channels (max over OUTLIER_RATIO x the median channel max)."""
    layers = encoder.model.model.language_model.layers
    per_layer: list[list[torch.Tensor]] = [[] for _ in layers]

    def hook(i):
        def fn(module, args, output):
            per_layer[i].append(output[0] if isinstance(output, tuple) else output)
        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    masks = []
    try:
        for start in range(0, len(prompts), batch):
            tb, _ = encoder.tokenize(prompts[start:start + batch])
            encoder.hidden_states(tb)
            masks.append(torch.from_numpy(tb.attention_mask).bool())
    finally:
        for h in handles:
            h.remove()
    report = {"prompts": len(prompts), "tokens": int(sum(int(m.sum()) for m in masks)), "layers": []}
    for i, outs in enumerate(per_layer):
        a = torch.cat([o[m].abs() for o, m in zip(outs, masks)])  # [tokens, D]
        cmax, cmed = a.amax(0), a.median(0).values  # [D]
        ratio = cmax / cmax.median()
        outliers = torch.nonzero(ratio >= OUTLIER_RATIO).flatten().tolist()
        report["layers"].append({
            "layer": i, "max": round(float(cmax.max()), 4), "median_channel_max": round(float(cmax.median()), 4),
            "median_abs": round(float(a.median()), 4), "top_ratio": round(float(ratio.max()), 2),
            "outlier_channels": outliers, "channel_max": [round(float(v), 4) for v in cmax],
            "channel_median": [round(float(v), 4) for v in cmed]})
    return report
