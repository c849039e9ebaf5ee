"""Quantize the condition encoder's language model with NVIDIA modelopt: INT8 W8A8 or INT4 weight-only.

The module quantized is the ``text_encoder`` graph's own module (``qwen_image_edge.export.graphs.
TextEncoderGraph`` around a copy of the Qwen3-VL model), calibrated on that graph's inputs built
from the calibration prompts exactly as the runtime builds them (tokenizer, M-RoPE positions, no
visual rows, or condition images' visual rows when the caller passes them). The decoder layers'
linears are quantized as below; the embedding table (a lookup, no GEMM) becomes int8 with one
scale per row (``int8_embedding``, both precisions: ``export.encoder_qdq`` says how the graph
reads it); the final norm and the vision tower (its own graph) keep their precision.

- INT8 (``Precision.INT8``): per-channel weights, one per-tensor activation scale per GEMM, and
  SmoothQuant's migration (alpha 0.5, the LLM default of the SmoothQuant paper and modelopt's
  ``INT8_SMOOTHQUANT_CFG``): trained LLMs carry a few residual channels 10-100x larger than the
  rest, and a per-tensor activation scale then leaves the other channels a couple of levels.
- INT4 (``Precision.INT4``): weight-only, symmetric, one scale per ``block_size`` input channels
  of each output row, with modelopt's AWQ-lite search (activation-aware per-channel scales in
  front of each linear; the same outlier channels are the salient ones AWQ protects).

:class:`EncoderQuantPolicy` holds the choice; ``naive()`` is the per-tensor INT8 without
smoothing that tests and benchmarks compare against.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from qwen_image_edge.calib.modelopt_import import load_modelopt as _modelopt
from qwen_image_edge.calib.policy import check_block_size
from qwen_image_edge.runtime.errors import ConfigError, InputError
from qwen_image_edge.runtime.images import load_image, vision_patches
from qwen_image_edge.runtime.manifest import Precision
from qwen_image_edge.runtime.tokens import mrope_position_ids
from qwen_image_edge.runtime.vision import visual_index

log = logging.getLogger(__name__)

ENCODER_PRECISIONS = (Precision.INT8, Precision.INT4)
LANGUAGE_LINEARS = (
    "language_model.layers.*.self_attn.q_proj",
    "language_model.layers.*.self_attn.k_proj",
    "language_model.layers.*.self_attn.v_proj",
    "language_model.layers.*.self_attn.o_proj",
    "language_model.layers.*.mlp.gate_proj",
    "language_model.layers.*.mlp.up_proj",
    "language_model.layers.*.mlp.down_proj",
)
REDUCED_WEIGHT_MAX = 63  # as calib.policy.QuantPolicy.weight_reduce_range (non-VNNI x86 CPUs)
INT8_MAX = 127


@dataclass(frozen=True)
class EncoderQuantPolicy:
    precision: Precision = Precision.INT8
    smoothquant_alpha: float | None = 0.5  # INT8: migration strength; None: no smoothing
    per_channel_weights: bool = True  # INT8: one scale per output channel (False: one per tensor)
    block_size: int = 128  # INT4: input channels per scale (clipped to a layer's width)
    awq: bool = True  # INT4: AWQ-lite scale search; False: round-to-nearest with max scales
    weight_reduce_range: bool = True  # INT8: weights on [-63, 63] (see calib.policy)
    int8_embedding: bool = True  # the embedding table as int8 rows (per-row fp32 scale)
    include: tuple[str, ...] = LANGUAGE_LINEARS

    def __post_init__(self) -> None:
        try:
            precision = Precision(self.precision)
        except ValueError:
            precision = None
        if precision not in ENCODER_PRECISIONS:
            raise ConfigError(f"text encoder quantization precision {self.precision!r}: expected one of "
                              f"{[p.value for p in ENCODER_PRECISIONS]}")
        object.__setattr__(self, "precision", precision)
        object.__setattr__(self, "include", tuple(self.include))
        if self.smoothquant_alpha is not None and not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ConfigError(f"encoder policy smoothquant_alpha: expected in [0, 1] or None, got {self.smoothquant_alpha}")
        check_block_size(self.block_size, "encoder policy")

    @classmethod
    def naive(cls) -> EncoderQuantPolicy:
        """Per-tensor INT8 weights and activations, no smoothing: the baseline the methods beat."""
        return cls(Precision.INT8, smoothquant_alpha=None, per_channel_weights=False)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {**d, "precision": self.precision.value, "include": list(self.include)}


@dataclass
class QuantizedEncoder:
    """A modelopt-quantized ``TextEncoderGraph`` (fake quantization in torch) and its record."""

    module: nn.Module
    policy: EncoderQuantPolicy
    layers: tuple[str, ...]
    summary: dict
    embedding: tuple[np.ndarray, np.ndarray] | None = None  # int8 codes [vocab, D], row scales [vocab]


def select_layers(module: nn.Module, policy: EncoderQuantPolicy) -> list[str]:
    linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    chosen = [n for n in linears if any(fnmatch.fnmatchcase(n, p) for p in policy.include)]
    if not chosen:
        raise ConfigError(f"encoder policy include {list(policy.include)}: names no linear layer; the graph's "
                          f"linears are {linears[:8]}...")
    return chosen


def block_size_for(policy, in_features: int) -> int:
    """The policy's block (any policy with ``block_size``), clipped so that a row holds at least two
    (one block per row would be per-channel INT4, not block-wise; measured on the demo's 64-wide
    encoder: one block per row lost 2 of 64 held-out shapes under ``edge``, two did not).
    Full-size layers (3072+) keep 128."""
    block = min(policy.block_size, max(16, in_features // 2))
    if in_features % block:
        raise ConfigError(f"INT4: input width {in_features} is not a multiple of block_size {block}")
    return block


def int4_config(policy, module: nn.Module, layers: Sequence[str]) -> dict:
    """An ``mtq.quantize`` config for weight-only block-wise INT4 on exactly ``layers`` (``policy``:
    ``block_size`` and ``awq``); shared by the text encoder and the transformer."""
    entries: list[dict] = [{"quantizer_name": "*", "enable": False}]
    for name in layers:
        block = block_size_for(policy, module.get_submodule(name).in_features)
        entries.append({"quantizer_name": f"{name}.weight_quantizer",
                        "cfg": {"num_bits": 4, "block_sizes": {-1: block, "type": "static"}}})
    return {"quant_cfg": entries, "algorithm": {"method": "awq_lite"} if policy.awq else "max"}


def modelopt_config(policy: EncoderQuantPolicy, module: nn.Module, layers: Sequence[str]) -> dict:
    """An ``mtq.quantize`` config enabling exactly ``layers`` (everything else disabled)."""
    if policy.precision is Precision.INT4:
        return int4_config(policy, module, layers)
    entries: list[dict] = [{"quantizer_name": "*", "enable": False}]
    axis = 0 if policy.per_channel_weights else None
    for name in layers:
        entries.append({"quantizer_name": f"{name}.weight_quantizer", "cfg": {"num_bits": 8, "axis": axis}})
        entries.append({"quantizer_name": f"{name}.input_quantizer", "cfg": {"num_bits": 8, "axis": None}})
    algorithm = {"method": "smoothquant", "alpha": policy.smoothquant_alpha} if policy.smoothquant_alpha \
        is not None else "max"
    return {"quant_cfg": entries, "algorithm": algorithm}


# ----------------------------------------------------------------------------- calibration inputs


def graph_inputs(model, prompts: Sequence[str], images: Sequence | None = None) -> tuple:
    """``text_encoder`` graph inputs for ``prompts`` (and optionally condition images), as the runtime
    feeds them: torch tensors in the IOSpec's order."""
    enc = model.encoder
    d = model.config.encoder.hidden_size
    n_ds = len(model.config.encoder.deepstack_visual_indexes)
    pixels, grid = vision_patches([load_image(i) for i in images], enc.vision) if images else (None, None)
    batch = enc.tokenizer.encode(list(prompts), grid)
    pos = mrope_position_ids(batch, enc.vision.merge_size)
    if pixels is None:
        visual, deep = np.zeros((0, d), np.float32), np.zeros((n_ds, 0, d), np.float32)
        index = np.zeros_like(batch.input_ids)
    else:
        qwen = enc.model  # the fp32 tower: its outputs are the graph's visual inputs, once for the batch
        with torch.no_grad():
            out = qwen.model.visual(torch.from_numpy(pixels).to(qwen.dtype), grid_thw=torch.from_numpy(grid))
        visual = out.pooler_output.float().numpy()  # [N_vis, D]
        deep = torch.stack(out.deepstack_features).float().numpy()  # [n_ds, N_vis, D]
        index = visual_index(batch, visual.shape[0])
    arrays = (batch.input_ids, batch.attention_mask, pos, visual, deep, index)
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


def calibration_batches(model, prompts: Sequence[str], batch_size: int = 8,
                        images: Sequence | None = None) -> list[tuple]:
    """Graph inputs per batch of prompts; with ``images`` (a list of condition images), a second pass
    gives each batch the next image so the visual rows are calibrated too."""
    prompts = list(prompts)
    if not prompts:
        raise InputError("text encoder calibration: expected at least one prompt, got none")
    if batch_size < 1:
        raise InputError(f"text encoder calibration batch: expected >= 1, got {batch_size}")
    chunks = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    batches = [graph_inputs(model, c) for c in chunks]
    for i, c in enumerate(chunks if images else []):
        batches.append(graph_inputs(model, c, [images[i % len(images)]]))
    return batches


def demo_condition_images(count: int, seed: int = 20261127) -> list:
    """Condition images for the demo model's vision path: rendered scenes of its training split
    (the held-out split stays for evaluation)."""
    from qwen_image2_ref.demo import data

    rng = np.random.default_rng(seed)
    return [data.render(data.sample_scene(rng, 128, 128, "train")) for _ in range(count)]


# ----------------------------------------------------------------------------- quantize


def quantize_text_encoder(model, policy: EncoderQuantPolicy, prompts: Sequence[str], batch_size: int = 8,
                          images: Sequence | None = None, progress: bool = True) -> QuantizedEncoder:
    """Calibrate and quantize a copy of ``model``'s (a LoadedModel's) text-encoder graph module."""
    from qwen_image_edge.export.graphs import TextEncoderGraph

    mtq = _modelopt()
    batches = calibration_batches(model, prompts, batch_size, images)
    module = TextEncoderGraph(copy.deepcopy(model.encoder.model).float().cpu()).eval()
    layers = select_layers(module, policy)
    # the table first: the linears are then calibrated on the embeddings the graph will produce
    embedding = quantize_embedding(module) if policy.int8_embedding else None

    def forward_loop(m: nn.Module) -> None:
        for args in tqdm(batches, desc="calibrate text encoder", unit="batch", disable=not progress):
            m(*args)

    chatter = io.StringIO()  # modelopt prints its summaries; the library logs them
    with torch.no_grad(), contextlib.redirect_stdout(chatter), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is not calibrated, skip smoothing")
        quantized = mtq.quantize(module, modelopt_config(policy, module, layers), forward_loop=forward_loop)
    for line in chatter.getvalue().splitlines():
        log.info("modelopt: %s", line)
    if policy.precision is Precision.INT8 and policy.weight_reduce_range:
        with torch.no_grad():
            for name in layers:
                wq = quantized.get_submodule(name).weight_quantizer
                wq.amax = wq.amax.float() * (INT8_MAX / REDUCED_WEIGHT_MAX)
    summary = {"prompts": len(list(prompts)), "batches": len(batches), "images": len(images or ()),
               "method": _method(policy)}
    if embedding is not None:
        summary["embedding"] = embedding_record(*embedding)
    log.info("text encoder: %d linears quantized (%s)", len(layers), summary["method"])
    return QuantizedEncoder(quantized.eval(), policy, tuple(layers), summary, embedding)


def quantize_embedding(module: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """Round the graph module's embedding table to int8 rows in place (it then holds ``codes * scale``
    in fp32, what the exported lookup computes); returns ``(codes [vocab, D], scales [vocab])``."""
    from qwen_image_edge.export.encoder_qdq import dequantized_rows, int8_rows

    weight = module.language_model.embed_tokens.weight  # [vocab, D]
    codes, scales = int8_rows(weight.detach().float().cpu().numpy())
    with torch.no_grad():
        weight.copy_(torch.from_numpy(dequantized_rows(codes, scales)))
    return codes, scales


def embedding_record(codes: np.ndarray, scales: np.ndarray) -> dict:
    """The manifest's record of the int8 table (as export.half's record of its fp32-kept nodes)."""
    return {"precision": "int8", "scale": "per row, fp32, row amax / 127", "rows": int(codes.shape[0]),
            "width": int(codes.shape[1]), "graph": "Gather(int8) -> Cast(float) -> Mul(Gather(row scale))",
            "bytes": int(codes.nbytes + scales.nbytes), "fp32_bytes": int(codes.size * 4)}


def _method(policy: EncoderQuantPolicy) -> str:
    if policy.precision is Precision.INT4:
        return f"int4 weight-only, blocks of {policy.block_size}, " + ("AWQ-lite" if policy.awq else "max (RTN)")
    weights = "per-channel" if policy.per_channel_weights else "per-tensor"
    smooth = f"SmoothQuant alpha {policy.smoothquant_alpha}" if policy.smoothquant_alpha is not None else "no smoothing"
    return f"int8 W8A8, {weights} weights, per-tensor activations, {smooth}"


# ----------------------------------------------------------------------------- measuring


def hidden_state_cosines(model, module: nn.Module, prompts: Sequence[str], batch_size: int = 8) -> np.ndarray:
    """Per prompt: cosine of ``module``'s hidden states against the fp32 encoder's, over the prompt's
    valid (unpadded) tokens; the figure the issue's >= 0.99 bound reads."""
    from qwen_image_edge.export.graphs import TextEncoderGraph

    reference = TextEncoderGraph(model.encoder.model).eval()
    out = []
    with torch.no_grad():
        for args in calibration_batches(model, prompts, batch_size):
            ref, got = reference(*args).double(), module(*args).double()  # [B, L, D]
            for r, g, valid in zip(ref, got, args[1].bool()):
                r, g = r[valid].flatten(), g[valid].flatten()
                out.append(float(torch.dot(r, g) / (r.norm() * g.norm())))
    return np.asarray(out)


# The stress case the tests and bench/encoder_quant.py give an encoder with none of its own: three
# channels 60-100x (LLM.int8() and SmoothQuant measure 20-100x in trained LLMs).
STRESS_OUTLIERS = ((3, 17, 40), (60.0, 80.0, 100.0))


def add_outlier_channels(qwen3vl, channels: Sequence[int], factors: Sequence[float]) -> None:
    """Give a (random) Qwen3-VL language model a trained LLM's outlier channels, in place, without
    changing what it computes: per decoder layer, each RMSNorm weight is scaled up by ``factor`` in
    ``channels`` and the input columns of the linears it feeds are scaled down by the same factor.
    The linears' inputs then carry channels ``factor`` x the rest (LLM.int8 and SmoothQuant measure
    20-100x in trained LLMs) while the fp32 hidden states stay as they were."""
    idx = torch.as_tensor(list(channels))
    f = torch.as_tensor(list(factors), dtype=torch.float32)
    with torch.no_grad():
        for layer in qwen3vl.model.language_model.layers:
            for norm, linears in ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                           layer.self_attn.v_proj)),
                                  (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj))):
                norm.weight[idx] *= f.to(norm.weight.dtype)
                for linear in linears:
                    linear.weight[:, idx] /= f.to(linear.weight.dtype)
