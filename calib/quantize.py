"""Quantize the transformer with NVIDIA modelopt, calibrated over the reference pipeline's steps.

Two phases (as gpt-fast's quantize): :func:`quantize_transformer` returns a fake-quantized torch
module (modelopt's simulated quantization; the reference numbers), and
``qwen_image_edge.export.quantized.export_quantized`` turns it into a QDQ ONNX export. :func:`quantize_model` runs
both, the ``qwen-image-edge quantize`` command.

``mtq.quantize`` gets a config naming exactly the policy's layers and a forward loop that samples
the calibration prompts through the whole pipeline; the same loop records every layer input per
denoising step (``qwen_image_edge.calib.collect``). modelopt's own calibration gives the SmoothQuant scales (INT8)
and a max range; the policy's step reduction then sets each input range:
``amax = max_c(range_c * pre_quant_scale_c)``, modelopt's rule after smoothing. The VAE and the
text encoder are never touched.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qwen_image2_ref.devices import release_memory, resolve_placement
from qwen_image2_ref.model_folder import (
    DeviceArg,
    DtypeArg,
    LoadedModel,
    ModelSource,
    load_lazy_model,
    load_model,
    open_model,
)
from qwen_image2_ref.pipeline import QwenImagePipeline
from qwen_image_edge.calib.collect import (
    CalibrationSettings,
    RangeRecorder,
    check_own_images,
    reduce_ranges,
    run_calibration,
    spread_summary,
)
from qwen_image_edge.calib.encoder_quant import int4_config
from qwen_image_edge.calib.modelopt_import import load_modelopt as _modelopt
from qwen_image_edge.calib.policy import Granularity, Int4Policy, QuantPolicy, Reduction, parse_precision
from qwen_image_edge.calib.prompts import (
    calibration_edits,
    check_calibration_size,
    default_prompt_set,
    load_prompts,
)
from qwen_image_edge.export.lean import choose_lean
from qwen_image_edge.export.qdq_lean import calibrated_scales
from qwen_image_edge.export.quantized import export_quantized
from qwen_image_edge.runtime.errors import ConfigError, InputError, NumericalError
from qwen_image_edge.runtime.graphs import GRAPH_NAMES
from qwen_image_edge.runtime.manifest import Precision

log = logging.getLogger(__name__)

INT8_MAX = 127
REDUCED_WEIGHT_MAX = 63  # see QuantPolicy.weight_reduce_range
FP8_E4M3 = (4, 3)


@dataclass
class QuantizedTransformer:
    """A modelopt-quantized copy of the transformer (fake quantization in torch) and its record."""

    module: nn.Module
    policy: QuantPolicy | Int4Policy
    layers: tuple[str, ...]
    summary: dict


def modelopt_config(policy: QuantPolicy, layers: Sequence[str]) -> dict:
    """An ``mtq.quantize`` config that enables exactly ``layers`` (everything else disabled)."""
    bits = 8 if policy.precision is Precision.INT8 else FP8_E4M3
    w_axis = 0 if policy.weight_granularity is Granularity.PER_CHANNEL else None
    entries: list[dict] = [{"quantizer_name": "*", "enable": False}]
    for name in layers:
        entries.append({"quantizer_name": f"{name}.weight_quantizer", "cfg": {"num_bits": bits, "axis": w_axis}})
        entries.append({"quantizer_name": f"{name}.input_quantizer", "cfg": {"num_bits": bits, "axis": None}})
    algorithm = {"method": "smoothquant", "alpha": policy.smoothquant_alpha} if policy.smoothquant else "max"
    return {"quant_cfg": entries, "algorithm": algorithm}


def _set_input_ranges(module: nn.Module, layers: Sequence[str], ranges: dict, policy: QuantPolicy) -> dict:
    amaxes = {}
    for name in layers:
        iq = module.get_submodule(name).input_quantizer
        r = torch.from_numpy(np.ascontiguousarray(reduce_ranges(ranges[name], policy), dtype=np.float32))
        pqs = getattr(iq, "pre_quant_scale", None)
        if pqs is not None:
            r = r.to(pqs.device)
        amax = (r * pqs.float()).amax() if pqs is not None else r.amax()
        iq.amax = amax.clamp(min=1e-8)  # fp32 (modelopt casts to the input's dtype when it quantizes)
        amaxes[name] = float(amax)
    return amaxes


def _ranges_in_fp32(module: nn.Module, layers: Sequence[str]) -> None:
    """modelopt keeps a quantizer's amax and SmoothQuant scale in the dtype it calibrated in; a bf16
    calibration would round them to 8 bits. The ranges are recorded in fp32 whatever the dtype."""
    for name in layers:
        layer = module.get_submodule(name)
        for quantizer in (layer.input_quantizer, layer.weight_quantizer):
            for key, buf in list(quantizer.named_buffers(recurse=False)):
                if buf.is_floating_point() and buf.dtype != torch.float32:
                    setattr(quantizer, key, buf.float())


def quantize_transformer(model: LoadedModel, policy: QuantPolicy, prompts: Sequence[str],
                         settings: CalibrationSettings | None = None,
                         progress: bool = True, copy_module: bool = True, edits: Sequence = ()) -> QuantizedTransformer:
    """Calibrate and quantize a copy of ``model.transformer`` (``model``: a ``LoadedModel``) by
    sampling ``prompts`` through the reference pipeline, in the model's device and dtype, then
    ``edits`` (``(image or None, instruction)`` pairs, see ``run_calibration``).
    ``copy_module=False`` quantizes ``model.transformer`` itself (no second copy at full size; the
    model is then no longer a reference)."""
    settings = settings or CalibrationSettings()
    prompts = list(prompts)
    if not prompts:
        raise InputError("calibration: expected at least one prompt, got none (see --calib-size / --prompts)")
    edits = list(edits)
    transformer = (copy.deepcopy(model.transformer) if copy_module else model.transformer).eval()
    pipe = QwenImagePipeline(model.config, transformer, model.vae, model.encoder, device=model.device,
                             dtype=model.dtype)

    def calibrate(module: nn.Module, recorder: RangeRecorder) -> int:
        pipe.transformer = module
        return run_calibration(pipe, prompts, settings, recorder, progress, edits)

    quantized = quantize_module(transformer, policy, calibrate)
    quantized.summary.update({
        "prompts": len(prompts),
        "edits": len(edits),
        "batch_size": settings.batch_size,
        "guidance": settings.guidance if settings.guidance is not None else model.config.pipeline.guidance_scale,
        "resolution": settings.resolution or model.config.pipeline.output_resolution,
        "seed": settings.seed,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
    })
    return quantized


def quantize_module(transformer: nn.Module, policy: QuantPolicy,
                    calibrate: Callable[[nn.Module, RangeRecorder], int]) -> QuantizedTransformer:
    """Quantize ``transformer`` in place. ``calibrate(module, recorder)`` runs the calibration data
    through ``module``, advancing ``recorder`` per step (``begin_batch`` / ``step`` / ``end_batch``),
    and returns the steps per sample; ``quantize_transformer`` passes the pipeline, benchmarks a
    loop over random inputs."""
    mtq = _modelopt()
    layers = policy.select(transformer)
    state: dict = {}

    def forward_loop(module: nn.Module) -> None:
        recorder = RangeRecorder(module, [] if policy.precision is Precision.INT4 else layers)
        try:
            state["steps"] = calibrate(module, recorder)
        finally:
            recorder.remove()
        if recorder.names:  # INT4 is weight-only: AWQ's own hooks see the activations, no ranges kept
            state["ranges"] = recorder.ranges()

    chatter = io.StringIO()  # modelopt prints its summaries; the library logs instead
    int4 = policy.precision is Precision.INT4  # weight-only (calib.policy.Int4Policy): no input ranges
    config = int4_config(policy, transformer, layers) if int4 else modelopt_config(policy, layers)
    with torch.no_grad(), contextlib.redirect_stdout(chatter), warnings.catch_warnings():
        # smoothquant warns once per linear it leaves alone: the policy's high-precision layers
        warnings.filterwarnings("ignore", message=".*is not calibrated, skip smoothing")
        quantized = mtq.quantize(transformer, config, forward_loop=forward_loop)
    for line in chatter.getvalue().splitlines():
        log.info("modelopt: %s", line)
    if int4:
        with torch.no_grad():
            _ranges_in_fp32(quantized, layers)  # AWQ's scales and the block amaxes, whatever the dtype
        summary = {"steps": state["steps"], "method": f"int4 weight-only, blocks of {policy.block_size}, "
                   + ("AWQ-lite" if policy.awq else "max (RTN)"), "modelopt": _version("nvidia-modelopt")}
        log.info("quantized %d layers to int4 (%s)", len(layers), summary["method"])
        return QuantizedTransformer(quantized.eval(), policy, tuple(layers), summary)
    with torch.no_grad():
        _ranges_in_fp32(quantized, layers)
        amaxes = _set_input_ranges(quantized, layers, state["ranges"], policy)
        if policy.precision is Precision.INT8 and policy.weight_reduce_range:
            for name in layers:
                wq = quantized.get_submodule(name).weight_quantizer
                wq.amax = wq.amax * (INT8_MAX / REDUCED_WEIGHT_MAX)
    summary = {
        "steps": state["steps"],
        "reduction": policy.reduction.value,
        "step_range_spread": spread_summary(state["ranges"]),
        "input_amax": amaxes,
        "modelopt": _version("nvidia-modelopt"),
    }
    log.info("quantized %d layers to %s (%s reduction over %d steps)", len(layers), policy.precision.value,
             policy.reduction.value, state["steps"])
    return QuantizedTransformer(quantized.eval(), policy, tuple(layers), summary)


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def default_edit_count(calib_size: int, config) -> int:
    """Edit samples a calibration of ``calib_size`` prompts adds by default: a quarter of them (at
    least one; each is a batch of one with a longer sequence) for a model that takes condition
    images, none for a text-to-image-only one."""
    return max(1, calib_size // 4) if config.pipeline.max_condition_images > 0 else 0


def edit_samples(loaded: LoadedModel, n_prompts: int, calib_edits: int | None) -> list:
    """The ``(image or None, instruction)`` edits to calibrate ``loaded`` on (``calibration_edits``)."""
    n = default_edit_count(n_prompts, loaded.config) if calib_edits is None else calib_edits
    if n and loaded.config.pipeline.max_condition_images < 1:
        raise ConfigError(f"calibration edits: {loaded.config.name} takes no condition images; use --calib-edits 0")
    edits = calibration_edits(loaded.path, n)
    check_own_images(edits, n_prompts)  # before the model is copied and calibrated
    return edits


def quantize_model(model: ModelSource, precision: str | Precision, out: str | os.PathLike, *,
                   policy: QuantPolicy | str | os.PathLike | None = None, prompts: str | None = None,
                   calib_size: int = 32, settings: CalibrationSettings | None = None,
                   max_resolution: int | None = None, overwrite: bool = False, progress: bool = True,
                   device: DeviceArg = None, dtype: DtypeArg = None, lean: bool | None = None, loras=None,
                   calib_edits: int | None = None):
    """Load ``model`` (a folder, ``demo`` or a ``LoadedModel``), quantize its transformer, write a QDQ export to ``out``.

    ``device`` / ``dtype``: where calibration runs (default: CUDA + bf16 where available, else CPU +
    fp32; fp16 is refused, see ``qwen_image2_ref.devices``); checked before anything loads. A
    ``LoadedModel`` is calibrated where it already is. Ranges are recorded in fp32 either way, and the
    export's weights are the checkpoint's as stored (a bf16 calibration is exported lean by default).

    ``policy``: a QuantPolicy, a JSON file of one (its precision is overridden by ``precision``) or
    None for the defaults. ``prompts``: a prompt-set name or text file (default: ``demo`` captions
    for the demo model, else ``general``). ``calib_edits``: edit samples calibrated after the
    prompts (``calibration_edits``: the condition image's tokens never pass through a
    text-to-image calibration); default :func:`default_edit_count`, 0 for text-to-image only.
    Returns the written Manifest.
    """
    precision = parse_precision(precision)
    if policy is None:
        policy = QuantPolicy(precision=precision)
    elif isinstance(policy, QuantPolicy):
        policy = QuantPolicy.from_dict({**policy.to_dict(), "precision": precision.value})
    else:
        policy = QuantPolicy.from_json(policy, precision=precision.value)
    check_calibration_size(calib_size, calib_edits)
    texts = load_prompts(prompts, calib_size) if prompts else None  # a bad prompt file fails before loading
    placement = resolve_placement(device, dtype, stage="quantize")
    # modelopt first: a missing 'quant' extra fails before any load, and its import keeps the stack
    # it ran under alive (an exception it stores from a plugin import holds those frames); imported
    # later, that stack held the calibrated model, which then could not be freed before the export.
    _modelopt()
    if lean is None:
        # calibrated in a narrower dtype than fp32 (bf16): the lean path, whose weights stream from the
        # checkpoint as stored; exported from the calibrated modules they would carry bf16's rounding
        lean = choose_lean(model, list(GRAPH_NAMES)) or placement.dtype is not torch.float32
    owned = not isinstance(model, LoadedModel)  # ours to quantize in place
    loaded = open_model(model, device=placement.device, dtype=placement.dtype, stage="quantize", loras=loras)
    source = prompts or default_prompt_set(loaded.path)
    texts = texts or load_prompts(source, calib_size)
    if policy.reduction is not Reduction.MAX and len(texts) < 2:
        log.warning("reduction %s over one prompt batch is a per-step range of a single sample",
                    policy.reduction.value)
    edits = edit_samples(loaded, len(texts), calib_edits)
    quantized = quantize_transformer(loaded, policy, texts, settings, progress, copy_module=not (lean and owned),
                                     edits=edits)
    quantized.summary["prompt_source"] = str(source)
    if lean:  # only the scales go on: the calibrated model is let go before the export
        scales = calibrated_scales(quantized)
        path, name, adapters = loaded.path, loaded.config.name, loaded.loras  # LoRAs: fused again as they stream
        del quantized, loaded, model
        release_memory()
        return _export_lean(path, name, scales, Path(out), placement, max_resolution, overwrite, adapters)
    loaded = to_trace_placement(loaded, quantized)
    manifest = export_quantized(loaded, quantized, Path(out), max_resolution=max_resolution, overwrite=overwrite)
    _gate(Path(out), loaded, precision)
    return manifest


def _export_lean(path: Path, name: str, scales, out: Path, placement, max_resolution, overwrite: bool, loras=()):
    """The lean export of a calibration's scales (graphs from the shards, weights quantized as they
    stream), then the gate against a freshly loaded reference (the calibrated module is not one)."""
    lazy = load_lazy_model(path, name=name, loras=loras)
    manifest = export_quantized(lazy, scales, out, max_resolution=max_resolution, overwrite=overwrite)
    del lazy
    release_memory()
    reference = open_model(path, device=placement.device, dtype=placement.dtype, stage="validate", loras=loras)
    reference.config = dataclasses.replace(reference.config, name=name)
    _gate(out, reference, scales.precision)
    return manifest


def _gate(out: Path, loaded: LoadedModel, precision: Precision) -> None:
    """validate the new export (per graph and end to end); out of bounds is a NumericalError."""
    from qwen_image_edge.export.validate import validate

    report = validate(out, loaded, verify_hashes=False)  # just written: the hashes are ours
    log.info("validate:\n%s", report.table())
    if not report.passed:
        raise NumericalError(f"quantize: the {precision.value} export in {out} is outside validate's bounds "
                             f"(see {report.report_path})")


def to_trace_placement(loaded: LoadedModel, quantized: QuantizedTransformer | None) -> LoadedModel:
    """The model the export traces: fp32 on the CPU, with the checkpoint's own weights.

    Calibrated on the CPU in fp32: ``loaded`` itself. Calibrated in fp32 elsewhere: moved in place
    (no second copy). Calibrated in a narrower dtype: the modules hold rounded weights (bf16 keeps 8
    bits), and an upcast would put that rounding into every fp32 graph of the export, the VAE's and
    the encoders' included. The model is then opened again in fp32 from its folder (LoRAs fused as
    before), and the calibrated ``quantized`` module takes the fresh tensors of every layer it did not
    quantize; a quantized layer keeps its weight (its rounding stays below a quarter of an INT8 step;
    ``quantize_model``'s lean path, its default there, reads those from the checkpoint too)."""
    if loaded.device.type == "cpu" and loaded.dtype is torch.float32:
        return loaded
    module = quantized.module if quantized is not None else None
    if loaded.dtype is torch.float32:
        for m in (module, loaded.transformer, loaded.vae, loaded.encoder.model):
            if m is not None:
                m.to("cpu", torch.float32)
        loaded.device = torch.device("cpu")
        return loaded
    log.info("calibrated in %s: the export takes the weights from %s in fp32", str(loaded.dtype).removeprefix(
        "torch."), loaded.path)
    fresh = load_model(loaded.path, dtype=torch.float32, device="cpu", name=loaded.config.name,
                       stage="quantize", loras=loaded.loras)
    if module is not None:
        module.to("cpu", torch.float32)
        skip = tuple(f"{name}." for name in quantized.layers)
        source = dict(fresh.transformer.named_parameters()) | dict(fresh.transformer.named_buffers())
        with torch.no_grad():
            for name, t in [*module.named_parameters(), *module.named_buffers()]:
                if name in source and not name.startswith(skip) and t.shape == source[name].shape:
                    t.copy_(source[name])
    return fresh
