"""The ``qwen-image-edge`` command: a thin dispatcher, one subcommand per stage.

Each handler parses its arguments, imports its stage inside the handler and calls one library
function, so importing this module (and running the torch-free stages) never loads torch.
Expected failures are ``QwenImageEdgeError``s: they become one line on stderr and exit code 2.
The parser lives in ``cli_args``; output paths, formats and atomic writes in ``outputs``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qwen_image_edge.cli_args import MAX_IMAGES, PROG, build_parser, parse_lora_args

__all__ = ["main", "build_parser", "format_sizes"]

log = logging.getLogger("qwen_image_edge.cli")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = args.verbose + getattr(args, "verbose_after", 0)
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)  # also when a host application already configured logging

    from qwen_image_edge.runtime.errors import QwenImageEdgeError

    try:
        return HANDLERS[args.command](args)
    except QwenImageEdgeError as exc:
        message = re.sub(r"\s*\n\s*", " ", str(exc)).strip()  # one line, also when it quotes a library's text
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in _FILESYSTEM_FULL:  # anything else is a bug or a fault to see whole
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"{PROG}: error: {exc.strerror}{where}; nothing was kept (a failed export or image write "
              "removes what it staged): free some space or write elsewhere", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


# a full disk, a full quota, or a filesystem that turned read-only during the work: expected, one line
_FILESYSTEM_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _threads(args: argparse.Namespace, torch_too: bool = True) -> None:
    """--threads checked against the cores before any work; torch's pool set for torch stages."""
    from qwen_image_edge.runtime.backends.onnxruntime import check_threads

    threads = check_threads(getattr(args, "threads", None))
    if threads and torch_too:
        import torch

        torch.set_num_threads(threads)


def _cmd_info(args: argparse.Namespace) -> int:
    if args.image is not None:
        from qwen_image_edge.runtime.metadata import format_parameters, read_parameters

        params = read_parameters(args.image)
        print(json.dumps(params, indent=2, ensure_ascii=False) if args.json else format_parameters(params))
        return 0
    from qwen_image2_ref.config import get_preset
    from qwen_image2_ref.sizes import model_sizes

    sizes = model_sizes(get_preset(args.preset))
    print(json.dumps(sizes.to_dict(), indent=2) if args.json else format_sizes(sizes))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    loras = parse_lora_args(args.lora)
    _threads(args)
    from qwen_image_edge.export.onnx_export import export_model

    export_model(args.model, args.out, graphs=args.graphs, max_resolution=args.max_resolution,
                 opset=args.opset, overwrite=args.overwrite, lean=args.lean, loras=loras)
    print(f"exported to {args.out}")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from qwen_image_edge.export.tensorrt import build_engines
    from qwen_image_edge.export.trt_profiles import BuildRanges
    from qwen_image_edge.runtime.manifest import Precision

    ranges = BuildRanges(args.min_res, args.opt_res, args.max_res, args.max_batch, args.max_prompt_tokens)
    built = build_engines(args.export_dir, graphs=args.graphs, ranges=ranges,
                          precision=Precision(args.precision) if args.precision else None, opt_level=args.opt_level,
                          timing_cache=args.timing_cache, weight_streaming=args.weight_streaming,
                          refittable=args.refittable)
    for entry in built.values():
        print(f"{entry.graph}: {entry.file} ({entry.precision.value})")
    return 0


def _cmd_refit(args: argparse.Namespace) -> int:
    loras = parse_lora_args(args.lora)
    from qwen_image_edge.export.refit import refit_engines

    result = refit_engines(args.export_dir, loras)
    for entry in result.engines.values():
        print(f"{entry.graph}: {entry.file} (refit)")
    return 0


@contextlib.contextmanager
def quiet_third_party_warnings():
    """Hide modelopt's import-time hint to install ``nvidia-modelopt[hf]``: that extra pins a
    transformers version the project cannot use (README, dependencies), so the hint misleads."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*nvidia-modelopt\[hf\]")
        yield


def _cmd_quantize(args: argparse.Namespace) -> int:
    from qwen_image_edge.calib.components import parse_component_policy

    components = parse_component_policy(args.precision)  # a bad part or precision: one line, before any work
    loras = parse_lora_args(args.lora)
    _threads(args)
    from qwen_image_edge.calib.collect import CalibrationSettings
    from qwen_image_edge.calib.component_export import quantize_components

    settings = CalibrationSettings(batch_size=args.batch_size, steps=args.steps, guidance=args.guidance)
    with quiet_third_party_warnings():
        quantize_components(args.model, components, args.out, policy=args.policy, prompts=args.prompts,
                            calib_size=args.calib_size, calib_edits=args.calib_edits, settings=settings,
                            max_resolution=args.max_resolution,
                            overwrite=args.overwrite, progress=True, device=args.device, dtype=args.dtype,
                            lean=args.lean, loras=loras)
    print(f"quantized export ({args.precision}) written to {args.out}")
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    _threads(args, torch_too=False)  # distill's run sets torch's threads itself
    from qwen_image_edge.distill.cli import run

    return run(args)


def _cmd_validate(args: argparse.Namespace) -> int:
    """Exit 0 when every graph is within its precision's bounds, 1 otherwise."""
    from qwen_image_edge.outputs import check_writable_file

    loras = parse_lora_args(args.lora)
    if args.report is not None:
        check_writable_file(Path(args.report), "--report")
    _threads(args)
    from qwen_image2_ref.devices import resolve_placement

    placement = resolve_placement(args.device, args.dtype, stage="validate")
    from qwen_image2_ref.model_folder import open_model
    from qwen_image_edge.export.validate import validate

    model = open_model(args.model, device=placement.device, dtype=placement.dtype, stage="validate", loras=loras)
    report = validate(args.export_dir, model, report=args.report)
    print(report.table())
    return 0 if report.passed else 1


# ------------------------------------------------------------------------- generate, edit, run, demo

@dataclass(frozen=True)
class _Outputs:
    paths: list[Path]
    background: tuple[int, int, int]
    seed_was_random: bool


def _check_request_args(args: argparse.Namespace) -> _Outputs:
    """Output paths and explicit sampling values, checked before any loading; the seed drawn if not given."""
    import secrets

    from qwen_image_edge.outputs import check_output, output_paths, parse_color
    from qwen_image_edge.runtime.errors import InputError
    from qwen_image_edge.runtime.sampling import check_guidance, check_steps, resolve_size

    if not 1 <= args.num_images <= MAX_IMAGES:
        raise InputError(f"--num-images: expected 1..{MAX_IMAGES}, got {args.num_images}")
    if args.steps is not None:
        check_steps(args.steps)  # 1..MAX_STEPS
    if args.guidance is not None:
        check_guidance(args.guidance)
    if args.seed is not None and args.seed < 0:
        raise InputError(f"seed: expected a non-negative integer, got {args.seed}")
    width, height = resolve_size(args.width, args.height, (1024, 1024))
    background = parse_color(args.background)
    _threads(args, torch_too=False)
    paths = output_paths(args.output, args.num_images)
    for path in paths:
        check_output(path, max(width * height, 1024 * 1024))
    random_seed = args.seed is None
    if random_seed:
        args.seed = secrets.randbelow(2**31)
    return _Outputs(paths, background, random_seed)


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(negative_prompt=args.negative_prompt, width=args.width, height=args.height,
                steps=args.steps, guidance=args.guidance, seed=args.seed)


@dataclass(frozen=True)
class _Source:
    """What the metadata records about the model: its sampling defaults and digests."""

    schedule: object  # runtime.sections.ScheduleSection
    model: str
    model_sha256: str
    export_sha256: str | None
    pipeline: str


def _export_source(pipe) -> _Source:
    """Defaults and digests from the export's manifest (already loaded and verified by Pipeline.load)."""
    from qwen_image_edge.runtime.manifest import MANIFEST_NAME, sha256_file
    from qwen_image_edge.runtime.metadata import model_digest

    source = pipe.manifest.provenance.source or {}
    digests = source.get("checkpoint_sha256")
    return _Source(schedule=pipe.manifest.schedule, model=str(source.get("name") or Path(pipe.export_dir).name),
                   model_sha256=model_digest(digests) if isinstance(digests, dict) and digests else "unknown",
                   export_sha256=sha256_file(Path(pipe.export_dir) / MANIFEST_NAME), pipeline="runtime")


def _reference_source(model, pipe) -> _Source:
    from qwen_image2_ref.checkpoint import checkpoint_digest
    from qwen_image2_ref.model_folder import resolve_model_path
    from qwen_image_edge.runtime.metadata import model_digest

    path = resolve_model_path(model)
    digests = {c: checkpoint_digest(path / c) for c in ("transformer", "vae", "text_encoder")}
    return _Source(schedule=pipe.config.pipeline.schedule_section(), model=pipe.config.name,
                   model_sha256=model_digest(digests), export_sha256=None, pipeline="reference")


def _make_images(args: argparse.Namespace, outputs: _Outputs, source: _Source, call, task: str, prompt: str) -> int:
    """``call(**sampling kwargs) -> PIL image`` once per output, seeds seed, seed + 1, ...; each saved
    with its parameters."""
    from qwen_image_edge.outputs import save_image
    from qwen_image_edge.runtime.metadata import generation_parameters
    from qwen_image_edge.runtime.sampling import sampling_defaults

    # the model's defaults written into args, so that what runs is exactly what is recorded
    args.steps, args.guidance, args.negative_prompt = sampling_defaults(
        source.schedule, args.steps, args.guidance, args.negative_prompt)
    first = args.seed
    for i, out in enumerate(outputs.paths):
        args.seed = first + i
        image = call(**_sampling_kwargs(args))
        params = generation_parameters(
            task=task, prompt=prompt, negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps,
            guidance=args.guidance, width=image.width, height=image.height, model=source.model,
            model_sha256=source.model_sha256, export_sha256=source.export_sha256, pipeline=source.pipeline)
        save_image(image, out, params=params, background=outputs.background)
        print(out)
    if outputs.seed_was_random:
        last = first + len(outputs.paths) - 1
        print(f"seed: {first}" + (f" (images: {first}..{last})" if last > first else ""), file=sys.stderr)
    return 0


def _runtime_generate(export_dir, args: argparse.Namespace, outputs: _Outputs, images=None, **load) -> int:
    from qwen_image_edge.runtime.pipeline import Pipeline

    pipe = Pipeline.load(export_dir, threads=args.threads, **load)
    if images:
        def call(**kw):
            return pipe.edit(images, args.prompt, **kw)
    else:
        def call(**kw):
            return pipe.generate(args.prompt, **kw)
    return _make_images(args, outputs, _export_source(pipe), call, "edit" if images else "generate",
                        args.prompt)


def _cmd_run(args: argparse.Namespace) -> int:
    outputs = _check_request_args(args)
    return _runtime_generate(args.export, args, outputs, images=args.image, backend=args.backend,
                             providers=args.providers, verify_hashes=not args.no_verify,
                             memory="low" if args.low_memory else "default")


def _warn_demo_prompt(prompt: str) -> None:
    """Say why the shipped demo model may not follow ``prompt`` (unknown words, ...), as warnings."""
    from qwen_image2_ref.demo.language import prompt_warnings

    for note in prompt_warnings(prompt):
        log.warning("the demo model may not follow %r: %s", prompt, note)


def _cmd_demo(args: argparse.Namespace) -> int:
    outputs = _check_request_args(args)
    _warn_demo_prompt(args.prompt)
    from qwen_image_edge.export.demo import ensure_export

    export = ensure_export("demo-4step" if args.fast else "demo", args.export_dir, overwrite=args.overwrite)
    return _runtime_generate(export, args, outputs)


def _reference_run(args: argparse.Namespace, images: list[str] | None) -> int:
    outputs = _check_request_args(args)
    loras = parse_lora_args(args.lora)
    import torch

    from qwen_image2_ref.devices import resolve_placement
    from qwen_image2_ref.model_folder import load_pipeline

    placement = resolve_placement(args.device, args.dtype, stage=args.command)  # before anything loads
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, device=placement.device, dtype=placement.dtype, loras=loras)
    if images is None and str(args.model) in ("demo", "demo-4step"):
        _warn_demo_prompt(args.prompt)
    if images is None:
        def call(**kw):
            return _one(pipe.generate(args.prompt, **kw))
        prompt = args.prompt
    else:
        def call(**kw):
            return _one(pipe.edit(images, args.instruction, **kw))
        prompt = args.instruction
    return _make_images(args, outputs, _reference_source(args.model, pipe), call,
                        "generate" if images is None else "edit", prompt)


def _one(result):
    """The image of a one-prompt call (a list of one from pipelines that always return lists)."""
    if isinstance(result, (list, tuple)):
        (result,) = result
    return result


def _cmd_generate(args: argparse.Namespace) -> int:
    return _reference_run(args, None)


def _cmd_edit(args: argparse.Namespace) -> int:
    return _reference_run(args, args.image)


def _cmd_serve(args: argparse.Namespace) -> int:
    """Until SIGINT/SIGTERM; Ray is imported only here (the 'serve' extra)."""
    import importlib.util

    from qwen_image_edge.runtime.errors import ConfigError

    if importlib.util.find_spec("ray") is None:
        raise ConfigError("serve: Ray Serve is not installed here; pip install 'qwen-image-edge[serve]'")
    from qwen_image_edge.serve import ServeOptions, serve_forever

    options = ServeOptions(Path(args.export_dir), replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
                           threads=args.threads or 1, host=args.host, port=args.port, max_batch=args.max_batch,
                           batch_wait_ms=args.batch_wait_ms, address=args.address, backend=args.backend,
                           providers=tuple(args.providers) if args.providers else None,
                           verify_hashes=not args.no_verify)
    serve_forever(options, ready=lambda url: print(f"serving {args.export_dir} on {url} (Ctrl-C stops)", flush=True))
    return 0


HANDLERS = {"info": _cmd_info, "export": _cmd_export, "quantize": _cmd_quantize, "distill": _cmd_distill,
            "validate": _cmd_validate, "build": _cmd_build, "refit": _cmd_refit, "generate": _cmd_generate,
            "edit": _cmd_edit, "run": _cmd_run, "demo": _cmd_demo, "serve": _cmd_serve}


def format_sizes(sizes) -> str:
    """A ``ModelSizes`` as a plain-text table."""
    t, v, e = sizes.transformer, sizes.vae, sizes.encoder
    rows = [
        (
            "transformer",
            t.params,
            t.bf16_gb,
            f"{t.layers} layers, {t.heads} heads x {t.head_dim} = {t.hidden}",
        ),
        ("vae", v.params, v.bf16_gb, f"encoder {v.encoder_params:,}, decoder {v.decoder_params:,}"),
        (
            "text encoder",
            e.params,
            e.bf16_gb,
            f"text {e.text_params:,}, vision {e.vision_params:,}, lm_head {e.lm_head_params:,}",
        ),
        ("total", sizes.params, sum(r.bf16_gb for r in (t, v, e)), ""),
    ]
    header = ("component", "params", "bf16", "")
    cells = [header] + [(name, f"{n:,}", _human_gb(gb), detail) for name, n, gb, detail in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(3)]
    lines = [f"preset {sizes.preset}"]
    for name, n, gb, detail in cells:
        lines.append(f"{name:<{widths[0]}}  {n:>{widths[1]}}  {gb:>{widths[2]}}  {detail}".rstrip())
    return "\n".join(lines)


def _human_gb(gb: float) -> str:
    if gb >= 1:
        return f"{gb:.2f} GB"
    if gb >= 1e-3:
        return f"{gb * 1e3:.2f} MB"
    return f"{gb * 1e6:.2f} kB"


if __name__ == "__main__":
    sys.exit(main())
