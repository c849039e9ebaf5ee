"""Whole checkpoint folders, laid out as the public Qwen-Image-2.1 one that diffusers writes.

``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``, ``processor/``, ``scheduler/``.
Schedule parameters come from ``scheduler/scheduler_config.json`` and the pipeline's
``sample_sigmas`` from ``model_index.json``, never from constants in code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.initialization import no_init_weights

from qwen_image2_ref.checkpoint import (
    _read_json,
    checkpoint_digest,
    load_into,
    meta_parameters,
    read_config,
    save_component,
)
from qwen_image2_ref.config import ModelConfig, PipelineConfig, TransformerConfig, VAEConfig
from qwen_image2_ref.demo import SHIPPED_MODELS
from qwen_image2_ref.devices import resolve_placement
from qwen_image2_ref.encoder import ConditionEncoder, read_image_processor_config
from qwen_image2_ref.lora import LoraAdapter, LoraSpec, fuse_loras, module_shapes, read_loras
from qwen_image2_ref.pipeline import QwenImagePipeline
from qwen_image2_ref.transformer import QwenImageTransformer
from qwen_image2_ref.vae import QwenImageVAE
from qwen_image_edge.runtime.errors import CheckpointError
from qwen_image_edge.runtime.graphs import Component
from qwen_image_edge.runtime.images import VisionConfig
from qwen_image_edge.runtime.schedule import SchedulerConfig
from qwen_image_edge.runtime.tokens import PromptTokenizer

log = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
COMPONENTS = ("transformer", "vae", "text_encoder", "processor", "scheduler")
SCHEDULER_CONFIG = "scheduler_config.json"
# Keys this project adds to model_index.json (diffusers ignores unknown pipeline kwargs with a warning).
EDGE_KEY = "qwen_image_edge"
# A LoRA student's folder (distill --lora) names its adapter file here; loading the folder fuses it.
STUDENT_LORA_KEY = "student_lora"


@dataclass
class LoadedModel:
    """A checkpoint folder opened once (:func:`open_model`) and passed down to every stage.

    ``lazy``: the parameters are on ``meta`` (configs, tokenizer and computed buffers only); the
    lean export reads the weights from the folder's shards itself.
    """

    config: ModelConfig
    transformer: QwenImageTransformer
    vae: QwenImageVAE
    encoder: ConditionEncoder
    path: Path
    lazy: bool = False
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    # LoRA adapters fused into the transformer (a lazy model's are fused as its weights stream)
    loras: tuple[LoraAdapter, ...] = ()

    def component(self, component: Component) -> nn.Module:
        """The module whose state dict is the checkpoint folder ``<path>/<component>``."""
        modules = {Component.TRANSFORMER: self.transformer, Component.VAE: self.vae,
                   Component.TEXT_ENCODER: self.encoder.model}
        return modules[Component(component)]

    def pipeline(self, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None) -> QwenImagePipeline:
        """The reference pipeline over these modules (not copies); by default in the model's own
        device and dtype (the ones it was loaded with)."""
        if self.lazy:
            raise CheckpointError(f"model {self.path}: opened without weights (lazy); open it with weights to sample")
        return QwenImagePipeline(self.config, self.transformer, self.vae, self.encoder,
                                 device=self.device if device is None else device,
                                 dtype=self.dtype if dtype is None else dtype)


# What a stage's ``model`` argument may be: a checkpoint folder, a shipped name ("demo") or an open model.
ModelSource = str | os.PathLike | LoadedModel


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A checkpoint folder path; the names ``demo`` and ``demo-4step`` mean the embedded demo model
    and its shipped 4-step distilled student."""
    if str(model) in SHIPPED_MODELS:
        return SHIPPED_MODELS[str(model)]()
    path = Path(model)
    if not (path / MODEL_INDEX).is_file():
        raise CheckpointError(
            f"model {path}: expected a checkpoint folder with {MODEL_INDEX} "
            f"(components {', '.join(COMPONENTS)}), not found"
        )
    return path


def read_pipeline_config(path: Path) -> PipelineConfig:
    index = _read_json(path / MODEL_INDEX)  # a malformed file is a CheckpointError naming it
    sched_path = path / "scheduler" / SCHEDULER_CONFIG
    if not sched_path.is_file():
        raise CheckpointError(f"model {path}: expected scheduler/{SCHEDULER_CONFIG}, not found")
    scheduler = SchedulerConfig.from_dict(_read_json(sched_path))
    extra = index.get(EDGE_KEY) or {}
    sigmas = index.get("sample_sigmas")
    fields = {f.name for f in dataclasses.fields(PipelineConfig)}
    kwargs = {k: v for k, v in extra.items() if k in fields and k != "scheduler"}
    if sigmas is not None:
        kwargs["sample_sigmas"] = tuple(sigmas)
        kwargs.setdefault("num_steps", len(sigmas))
    return PipelineConfig(scheduler=scheduler, **kwargs)


def meta_components(path: Path) -> tuple[QwenImageTransformer, QwenImageVAE]:
    """The folder's transformer and VAE built on the meta device (no storage), from their config.json."""
    t_cfg = TransformerConfig.from_diffusers(read_config(path / "transformer"))
    v_cfg = VAEConfig.from_diffusers(read_config(path / "vae"))
    with torch.device("meta"):
        return QwenImageTransformer(t_cfg), QwenImageVAE(v_cfg)


# What ``device`` / ``dtype`` may be: a name (``"cuda:1"``, ``"bf16"``), a torch object, or None (the
# default of devices.resolve_placement: CUDA + bf16 where available, else CPU + fp32).
DeviceArg = str | torch.device | None
DtypeArg = str | torch.dtype | None


def open_model(model: ModelSource, *, lazy: bool = False, dtype: DtypeArg = torch.float32,
               device: DeviceArg = "cpu", stage: str | None = None,
               loras: list[LoraSpec] | None = None) -> LoadedModel:
    """The one place a stage's ``model`` argument becomes a :class:`LoadedModel`: a folder or a
    shipped name is loaded (``lazy``: without weights); an open model is passed through, or reopened
    from its folder when it lacks the weights the caller needs (or holds ones it does not).

    ``device`` / ``dtype``: where the weights go (default the CPU in fp32, the precision graphs are
    traced and compared in; ``None`` picks the machine's default); checked before anything loads,
    ``stage`` names the caller in errors and in the logged choice. An open model is passed through
    in whatever placement it has.

    ``loras``: adapter files, or (file, scale) pairs, fused into the transformer (:mod:`qwen_image2_ref.lora`);
    an open model keeps the adapters it was opened with and refuses others."""
    if not isinstance(model, LoadedModel):
        if lazy:
            return load_lazy_model(model, loras=loras)
        return load_model(model, dtype=dtype, device=device, stage=stage, loras=loras)
    if loras:
        raise CheckpointError(f"model {model.path}: already open; pass the LoRA adapters when opening it")
    if model.lazy == lazy:
        return model
    if lazy:
        return load_lazy_model(model.path, name=model.config.name, loras=model.loras)
    return load_model(model.path, dtype=dtype, device=device, name=model.config.name, stage=stage,
                      loras=model.loras)


def load_model(model: str | os.PathLike, *, dtype: DtypeArg = torch.float32, device: DeviceArg = "cpu",
               name: str | None = None, stage: str | None = None,
               loras: list[LoraSpec] | tuple[LoraAdapter, ...] | None = None) -> LoadedModel:
    """Build every component on the meta device and fill it from the folder's safetensors, each
    tensor read, cast to ``dtype`` and placed on ``device`` one shard at a time (never a full fp32
    copy in host memory); ``device="meta"``: leave the weights out (:func:`load_lazy_model`).
    ``None`` for either: the machine's default (:func:`qwen_image2_ref.devices.resolve_placement`)."""
    if str(device) == "meta":
        return load_lazy_model(model, name=name, loras=loras)
    placement = resolve_placement(device, dtype, stage=stage)  # a device or dtype this machine lacks fails before loading
    device, dtype = placement.device, placement.dtype
    path = resolve_model_path(model)
    pipeline_cfg = read_pipeline_config(path)
    transformer, vae = meta_components(path)
    t_cfg, v_cfg = transformer.config, vae.config
    adapters = _adapters(loras, transformer, path)  # a bad adapter fails before any weight is read
    load_into(transformer, path / "transformer", dtype=dtype, device=device)
    fuse_loras(transformer, adapters)
    load_into(vae, path / "vae", dtype=dtype, device=device)
    encoder = ConditionEncoder.from_pretrained(
        path / "text_encoder", path / "processor", dtype=dtype,
        system_prompt=pipeline_cfg.system_prompt, max_prompt_tokens=pipeline_cfg.max_prompt_tokens,
    ).to(device)
    config = ModelConfig(name=name or path.name, transformer=t_cfg, vae=v_cfg, encoder=encoder.config,
                         pipeline=pipeline_cfg)
    log.info("loaded %s: transformer %d layers, hidden %d, on %s in %s", path, t_cfg.num_layers, t_cfg.hidden_size,
             device, placement.dtype_name)
    return LoadedModel(config, transformer.eval(), vae.eval(), encoder, path, device=device, dtype=dtype,
                       loras=adapters)


def _adapters(loras, transformer: nn.Module, path: Path) -> tuple[LoraAdapter, ...]:
    """Adapters already read pass through; files are read and checked against the transformer, after
    the folder's own (a LoRA student's adapter, named in model_index.json)."""
    if loras and all(isinstance(a, LoraAdapter) for a in loras):
        return tuple(loras)
    own = (_read_json(path / MODEL_INDEX).get(EDGE_KEY) or {}).get(STUDENT_LORA_KEY)
    specs = ([(path / own, 1.0)] if own else []) + list(loras or ())
    return read_loras(specs, module_shapes(transformer))


def load_lazy_model(model: str | os.PathLike, *, name: str | None = None,
                    loras: list[LoraSpec] | tuple[LoraAdapter, ...] | None = None) -> LoadedModel:
    """A :class:`LoadedModel` whose parameters are on ``meta``: configs, tokenizer and computed
    buffers only, no weight read (the lean export attaches them from the shards)."""
    path = resolve_model_path(model)
    pipeline = read_pipeline_config(path)
    transformer, vae = meta_components(path)
    adapters = _adapters(loras, transformer, path)
    vae.reset_buffers()  # latents mean/std from the config, for real
    hf = Qwen3VLConfig.from_dict(read_config(path / "text_encoder"))
    with meta_parameters(), no_init_weights():  # rotary tables are computed in __init__
        qwen = Qwen3VLForConditionalGeneration(hf)
    vision = VisionConfig.from_dict(read_image_processor_config(path / "processor"))
    tokenizer = PromptTokenizer.from_file(path / "processor" / "tokenizer.json", system_prompt=pipeline.system_prompt,
                                          max_prompt_tokens=pipeline.max_prompt_tokens, merge_size=vision.merge_size)
    encoder = ConditionEncoder(qwen, tokenizer, vision)
    config = ModelConfig(name=name or path.name, transformer=transformer.config, vae=vae.config,
                         encoder=encoder.config, pipeline=pipeline)
    return LoadedModel(config, transformer.eval(), vae.eval(), encoder, path, lazy=True, loras=adapters)


def load_pipeline(model: str | os.PathLike, *, dtype: DtypeArg = torch.float32, device: DeviceArg = "cpu",
                  stage: str | None = None, loras: list[LoraSpec] | None = None) -> QwenImagePipeline:
    """The reference pipeline of a folder or shipped name, in ``dtype`` on ``device`` (``None``:
    the machine's default, CUDA + bf16 where available, else CPU + fp32: what the CLI uses)."""
    return load_model(model, dtype=dtype, device=device, stage=stage, loras=loras).pipeline()


def save_model(folder: str | os.PathLike, config: ModelConfig, transformer, vae, encoder, *,
               max_shard_size: int | str = "10GB", dtype: torch.dtype | None = None,
               overwrite: bool = False, extra_index: dict | None = None,
               write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write a checkpoint folder diffusers' ``QwenImage21Pipeline.from_pretrained`` loads, atomically.

    ``extra_index``: more JSON entries for the ``qwen_image_edge`` section of ``model_index.json``
    (provenance such as ``distilled_from``; ignored when the pipeline config is read back).
    ``write_extra(staging_folder)``: writes more files (a LoRA student's adapter) into the folder
    before it appears, so the folder is never seen naming a file it lacks."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise CheckpointError(f"model folder {folder} already exists; pass overwrite=True to replace it")
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        save_component(transformer, tmp / "transformer", config.transformer.to_diffusers(),
                       max_shard_size=max_shard_size, dtype=dtype)
        save_component(vae, tmp / "vae", config.vae.to_diffusers(), max_shard_size=max_shard_size, dtype=dtype)
        encoder.save_pretrained(tmp / "text_encoder", tmp / "processor")
        sched = {"_class_name": "FlowMatchEulerDiscreteScheduler", **config.pipeline.scheduler.to_dict()}
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / SCHEDULER_CONFIG).write_text(json.dumps(sched, indent=2) + "\n")
        p = config.pipeline
        index = {
            "_class_name": "QwenImage21Pipeline",
            "_diffusers_version": "0.42.1",
            "processor": ["transformers", "Qwen3VLProcessor"],
            "sample_sigmas": list(p.sample_sigmas) if p.sample_sigmas is not None else None,
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen3VLForConditionalGeneration"],
            "transformer": ["diffusers", "QwenImage21Transformer2DModel"],
            "vae": ["diffusers", "AutoencoderKLQwenImage21"],
            EDGE_KEY: {
                "num_steps": p.num_steps,
                "guidance_scale": p.guidance_scale,
                "guidance_distilled": p.guidance_distilled,
                "output_resolution": p.output_resolution,
                "max_prompt_tokens": p.max_prompt_tokens,
                "default_negative_prompt": p.default_negative_prompt,
                **(extra_index or {}),
            },
        }
        if write_extra is not None:
            write_extra(tmp)
        (tmp / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (digest %s)", folder, checkpoint_digest(folder / "transformer")[:12])
    return folder
