"""``quantize`` with a precision per component: calibrate what needs it, export one directory, validate it.

The transformer goes through ``qwen_image_edge.calib.quantize`` (unchanged: a plain ``int8`` /
``fp8`` policy is exactly the old command), the text encoder through
``qwen_image_edge.calib.encoder_quant`` + ``qwen_image_edge.export.encoder_qdq``, fp16 graphs
through ``qwen_image_edge.export.half``; the other graphs are exported fp32 as ``export`` writes
them. The export is then validated, each graph against its own precision's bound.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import onnx
from tqdm.auto import tqdm

from qwen_image2_ref.devices import resolve_placement
from qwen_image2_ref.model_folder import DeviceArg, DtypeArg, LoadedModel, ModelSource, open_model
from qwen_image_edge.calib.collect import CalibrationSettings
from qwen_image_edge.calib.components import ComponentPolicy, parse_component_policy, read_json_object
from qwen_image_edge.calib.encoder_quant import (
    EncoderQuantPolicy,
    demo_condition_images,
    quantize_text_encoder,
)
from qwen_image_edge.calib.policy import Int4Policy, QuantPolicy
from qwen_image_edge.calib.prompts import (
    check_calibration_size,
    default_prompt_set,
    is_demo_folder,
    load_prompts,
)
from qwen_image_edge.runtime.errors import ConfigError, NumericalError
from qwen_image_edge.runtime.graphs import GRAPH_NAMES, check_graph_names
from qwen_image_edge.runtime.manifest import GraphSpec, Manifest, Precision, load_manifest

log = logging.getLogger(__name__)


def _transformer_policy(policy: QuantPolicy | str | os.PathLike | None, precision: Precision):
    if precision is Precision.INT4:  # weight-only: the policy's layer selection, blocks and AWQ-lite
        if isinstance(policy, Int4Policy):
            return policy
        if policy is not None and not isinstance(policy, QuantPolicy):
            data = read_json_object(policy, f"quant policy file {policy}")
            if data.get("precision") == Precision.INT4.value:  # an INT4 policy file: blocks, AWQ, keeps
                return Int4Policy.from_dict(data)
            policy = QuantPolicy.from_dict({**data, "precision": Precision.INT8.value})
        return Int4Policy.like(policy)
    if isinstance(policy, Int4Policy):
        raise ConfigError(f"quantize: an int4 policy given for a {precision.value} transformer")
    if policy is None:
        return QuantPolicy(precision=precision)
    if isinstance(policy, QuantPolicy):
        return QuantPolicy.from_dict({**policy.to_dict(), "precision": precision.value})
    return QuantPolicy.from_json(policy, precision=precision.value)


def quantize_components(model: ModelSource, precision: str | os.PathLike | ComponentPolicy, out: str | os.PathLike,
                        *, policy: QuantPolicy | str | os.PathLike | None = None,
                        encoder_policy: EncoderQuantPolicy | None = None, prompts: str | None = None,
                        calib_size: int = 32, settings: CalibrationSettings | None = None,
                        max_resolution: int | None = None, overwrite: bool = False, progress: bool = True,
                        device: DeviceArg = None, dtype: DtypeArg = None, graphs=None, gate: bool = True,
                        lean: bool | None = None, loras=None, calib_edits: int | None = None) -> Manifest:
    """``qwen-image-edge quantize``: ``precision`` is ``int8`` / ``fp8`` (transformer only), a preset, a
    ``part=precision,...`` list or a JSON file (``qwen_image_edge.calib.components``); ``policy`` is the
    transformer's QuantPolicy (or its JSON file). Every argument is checked before the model loads.
    ``lean`` (the transformer-only path's streaming export) is not available with other parts yet."""
    components = parse_component_policy(precision)
    if components.transformer_only and components.transformer in (Precision.INT8, Precision.FP8):
        from qwen_image_edge.calib.quantize import quantize_model

        return quantize_model(model, components.transformer, out, policy=policy, prompts=prompts,
                              calib_size=calib_size, settings=settings, max_resolution=max_resolution,
                              overwrite=overwrite, progress=progress, device=device, dtype=dtype, lean=lean,
                              loras=loras, calib_edits=calib_edits)
    if lean:
        raise ConfigError(f"quantize --lean: only for a transformer-only precision (int8 or fp8), not "
                          f"{components.name!r}; drop --lean")
    transformer_policy = (None if components.transformer is Precision.FP32
                          else _transformer_policy(policy, components.transformer))
    if components.text_encoder is not Precision.FP32:
        encoder_policy = dataclasses.replace(encoder_policy or EncoderQuantPolicy(components.text_encoder),
                                             precision=components.text_encoder)
    check_calibration_size(calib_size, calib_edits)
    graphs = check_graph_names(graphs or GRAPH_NAMES, where="quantize graphs")
    texts = load_prompts(prompts, calib_size) if prompts else None  # a bad prompt file fails before loading
    placement = resolve_placement(device, dtype, stage="quantize")
    loaded = open_model(model, device=placement.device, dtype=placement.dtype, stage="quantize", loras=loras)
    texts = texts or load_prompts(default_prompt_set(loaded.path), calib_size)
    from qwen_image_edge.calib.quantize import edit_samples, quantize_transformer, to_trace_placement

    qt = qe = None
    if transformer_policy is not None:
        qt = quantize_transformer(loaded, transformer_policy, texts, settings, progress,
                                  edits=edit_samples(loaded, len(texts), calib_edits))
        qt.summary["prompt_source"] = str(prompts or default_prompt_set(loaded.path))
    loaded = to_trace_placement(loaded, qt)  # fp32 on the CPU, the checkpoint's weights
    if encoder_policy is not None:
        # the text encoder graph also reads visual rows: the demo calibrates them on rendered scenes
        # (a real checkpoint ships no images; its edits are then calibrated on text only)
        images = demo_condition_images(4) if is_demo_folder(loaded.path) else None
        qe = quantize_text_encoder(loaded, encoder_policy, texts, images=images, progress=progress)
    manifest = export_components(loaded, components, out, qt, qe, graphs=graphs, max_resolution=max_resolution,
                                 overwrite=overwrite)
    if gate:
        _gate(Path(out), loaded, components)
    return manifest


def _halve(name: str, spec: GraphSpec, loaded: LoadedModel, staging: Path, max_resolution: int) -> tuple:
    """Re-save the fp32 graph ``name`` as fp16 (fp32 where it would overflow), measured on its validation feeds."""
    from qwen_image_edge.export.half import to_half
    from qwen_image_edge.export.registry import graph_io, validation_cases
    from qwen_image_edge.export.trace import save_graph_spec

    path = staging / spec.file
    model = onnx.load(str(path))  # external data, if any, loaded beside it
    feeds = [feeds for _, feeds, _, _ in validation_cases(name, loaded, spec)]
    half, record = to_half(model, feeds)
    for data in spec.external_data:
        (staging / data.file).unlink()
    return save_graph_spec(half, graph_io(name, loaded.config, max_resolution), staging, Precision.FP16), record


def export_components(loaded: LoadedModel, components: ComponentPolicy, out: str | os.PathLike, qt=None, qe=None,
                      graphs=None, max_resolution: int | None = None, overwrite: bool = False) -> Manifest:
    """Write the export: quantized transformer graphs from ``qt``, the text encoder from ``qe``, fp16
    graphs where ``components`` says so, fp32 otherwise; provenance records every part's choice."""
    from qwen_image_edge.export.encoder_qdq import export_quantized_text_encoder
    from qwen_image_edge.export.int4 import export_int4_transformer
    from qwen_image_edge.export.iospec import MIN_RESOLUTION, RESOLUTION_MULTIPLE, check_max_resolution
    from qwen_image_edge.export.manifest_writer import (
        build_manifest,
        copy_tokenizer,
        image_section,
        prompt_section,
        staging_dir,
        write_manifest,
    )
    from qwen_image_edge.export.quantized import (
        TRANSFORMER_GRAPHS,
        calibration_section,
        export_fp32_graph,
        export_quantized_transformer,
    )

    graphs = check_graph_names(graphs or GRAPH_NAMES, where="quantize graphs")
    cfg = loaded.config
    max_resolution = check_max_resolution(max_resolution) if max_resolution else cfg.pipeline.output_resolution
    with staging_dir(Path(out), overwrite=overwrite) as staging:
        specs: dict[str, GraphSpec] = {}
        half: dict[str, dict] = {}
        for name in tqdm(graphs, desc="export", unit="graph"):
            if qt is not None and name in TRANSFORMER_GRAPHS:
                export = export_int4_transformer if qt.policy.precision is Precision.INT4 else \
                    export_quantized_transformer
                specs[name] = export(qt, cfg, staging, max_resolution, name)
            elif qe is not None and name == "text_encoder":
                specs[name] = export_quantized_text_encoder(qe, cfg, staging, max_resolution)
            else:
                specs[name] = export_fp32_graph(name, loaded, cfg, staging, max_resolution)
                if components.graph_precision(name) is Precision.FP16:
                    specs[name], record = _halve(name, specs[name], loaded, staging, max_resolution)
                    half[name] = record.to_dict()
        prompt = prompt_section(loaded, copy_tokenizer(loaded.path, staging))
        image = image_section(loaded, MIN_RESOLUTION, max_resolution, RESOLUTION_MULTIPLE)
        manifest = build_manifest(loaded, specs, prompt, image)
        calibration = calibration_section(qt) if qt is not None else {}
        if qt is not None and qt.policy.precision is Precision.INT4:
            calibration["qdq"] = "int4 weight-only: int4 codes [in, out] -> DequantizeLinear(axis 0, block_size)"
        calibration["components"] = {
            "policy": components.to_dict(),
            "graphs": {n: s.precision.value for n, s in specs.items()},
            "fp16": half,
            # per graph, as fp16's record: the lookup tables stored as int8 rows (calib.encoder_quant)
            "int8_embedding": {} if qe is None or qe.embedding is None else {"text_encoder": qe.summary["embedding"]},
            "text_encoder": None if qe is None else {"policy": qe.policy.to_dict(), "layers": list(qe.layers),
                                                     "summary": qe.summary},
        }
        provenance = dataclasses.replace(manifest.provenance, calibration=calibration)
        write_manifest(staging, dataclasses.replace(manifest, provenance=provenance))
    log.info("export %s complete (%s)", out, components.to_dict())
    return load_manifest(out, verify_hashes=False)


def _gate(out: Path, loaded: LoadedModel, components: ComponentPolicy) -> None:
    """validate the new export, each graph against its own precision's bound; outside is a NumericalError."""
    from qwen_image_edge.export.validate import validate

    report = validate(out, loaded, verify_hashes=False)
    log.info("validate:\n%s", report.table())
    if not report.passed:
        raise NumericalError(f"quantize: the {components.name} export in {out} is outside validate's bounds "
                             f"(see {report.report_path})")
