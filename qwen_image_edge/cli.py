"""The ``qwen-image-edge`` command: a thin dispatcher, one subcommand per stage.

Each handler parses its arguments, imports its stage inside the handler and calls one library
function, so importing this module (and running the torch-free stages) never loads torch.
Expected failures are ``QwenImageEdgeError``s: they become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

PROG = "qwen-image-edge"

DESCRIPTION = """\
Qwen-Image-2 on small GPUs. A deployment runs these stages in order:

  export      PyTorch reference -> ONNX graphs (condition encoder, transformer, VAE) + manifest.json
  quantize    FP8 / INT8 (W8A8) with timestep-aware calibration
  distill     step distillation: fewer sampling steps (alternative or complement to quantize)
  build       ONNX graphs -> TensorRT engines for one GPU
  run         generate or edit images from an export directory (no torch)
  validate    per-graph and end-to-end numbers against the reference

"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qwen-image-edge")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log progress (-v: INFO, -vv: DEBUG)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = commands.add_parser(
        "info",
        help="parameter counts and weight sizes of a model preset",
        description="Print the parameter counts and bf16 weight sizes of a preset's transformer, "
        "VAE and text encoder (counted on the meta device: no weights, no memory).",
    )
    info.add_argument("--preset", default="qwen-image-2.1", help="preset name (default: %(default)s)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(handler=_cmd_info)

    export = commands.add_parser("export", help="PyTorch checkpoint -> ONNX graphs + manifest.json")
    export.add_argument("--model", required=True, help="checkpoint folder, or 'demo'")
    export.add_argument("--out", required=True, help="export directory to create")
    export.add_argument("--graphs", nargs="+", help="graphs to export (default: all)")
    export.add_argument("--max-resolution", type=int, help="largest square output side in pixels (default: the model's output resolution); "
                        "other aspect ratios, 1:4 to 4:1, are taken at about that area, for outputs and "
                        "condition images alike")
    export.add_argument("--opset", type=int, default=19, help="ONNX opset, >= 19 (default: %(default)s)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing export directory")
    export.add_argument("--lean", action=argparse.BooleanOptionalAction, default=None,
                        help="trace without weights and attach them from the checkpoint shards (default: "
                             "when the fp32 weights exceed 40%% of the available memory)")
    export.set_defaults(handler=_cmd_export)

    quant = commands.add_parser(
        "quantize",
        help="INT8 / FP8 transformer with timestep-aware calibration -> QDQ ONNX export",
        description="Calibrate the transformer over the reference pipeline's denoising steps, quantize it "
        "with NVIDIA modelopt (INT8 SmoothQuant or FP8 E4M3, W8A8) and write an export directory whose "
        "transformer is a standard QDQ ONNX graph (the VAE and text encoder stay fp32).",
    )
    quant.add_argument("--model", required=True, help="checkpoint folder, or 'demo'")
    quant.add_argument("--precision", required=True, help="int8 or fp8")
    quant.add_argument("--out", required=True, help="export directory to create")
    quant.add_argument("--calib-size", type=int, default=32, help="calibration prompts (default: %(default)s)")
    quant.add_argument("--prompts", default=None,
                       help="prompt set 'general', 'demo' or a text file (default: demo for the demo model)")
    quant.add_argument("--policy", default=None, help="QuantPolicy JSON file (default: the built-in policy)")
    quant.add_argument("--batch-size", type=int, default=4, help="calibration batch (default: %(default)s)")
    quant.add_argument("--steps", type=int, default=None, help="calibration denoising steps (default: the model's)")
    quant.add_argument("--guidance", type=float, default=None, help="calibration guidance (default: the model's)")
    quant.add_argument("--max-resolution", type=int, help="largest square output side in pixels (default: the model's output resolution); "
                        "other aspect ratios, 1:4 to 4:1, are taken at about that area, for outputs and "
                        "condition images alike")
    quant.add_argument("--overwrite", action="store_true", help="replace an existing export directory")
    quant.set_defaults(handler=_cmd_quantize)

    from qwen_image_edge.distill.cli import DESCRIPTION as distill_description
    from qwen_image_edge.distill.cli import add_arguments as distill_arguments  # argparse only: no torch at parse time

    dist = commands.add_parser(
        "distill",
        help="step distillation: a few-step student with guidance built in (torchrun for several processes)",
        description=distill_description, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    distill_arguments(dist)
    dist.set_defaults(handler=_cmd_distill)

    validate = commands.add_parser("validate", help="compare each exported graph with the reference")
    validate.add_argument("export_dir", help="export directory (with manifest.json)")
    validate.add_argument("--model", required=True, help="checkpoint folder, or 'demo'")
    validate.add_argument("--report", help="JSON report path (default: <export_dir>/validation.json)")
    validate.set_defaults(handler=_cmd_validate)

    build = commands.add_parser(
        "build", help="ONNX graphs -> TensorRT engines for this GPU, recorded in the manifest",
        description="Build one TensorRT engine per graph (needs tensorrt + cuda-python and a GPU). Ranges "
        "narrow the export's own; engines go to <export>/engines/<gpu>-trt<version>/.")
    build.add_argument("export_dir", help="export directory (with manifest.json)")
    build.add_argument("--graphs", nargs="+", help="graphs to build (default: all)")
    for flag, what in (("--min-res", "smallest"), ("--opt-res", "tuned"), ("--max-res", "largest")):
        build.add_argument(flag, type=int, help=f"{what} image side in pixels (default: the export's)")
    build.add_argument("--max-batch", type=int, help="largest batch (default: the export's)")
    build.add_argument("--max-prompt-tokens", type=int, help="longest prompt in tokens (default: the export's)")
    build.add_argument("--precision", choices=("fp16", "bf16"),
                       help="lower fp32 text_encoder/transformer graphs (TensorRT 10 builder flags; VAE stays fp32)")
    build.add_argument("--opt-level", type=int, default=3, help="builder optimisation level 0-5 (default: %(default)s)")
    build.add_argument("--timing-cache", help="timing cache file, loaded and saved (default: in the engine folder)")
    build.add_argument("--weight-streaming", action="store_true", help="build engines that can stream weights")
    build.set_defaults(handler=_cmd_build)

    gen = commands.add_parser(
        "generate",
        help="text to image with the PyTorch reference",
        description="Generate an image from a prompt with the PyTorch reference pipeline "
        "(the numbers the runtime is validated against).",
    )
    gen.add_argument("prompt", help="what to draw")
    _add_reference_args(gen)
    gen.set_defaults(handler=_cmd_generate)

    edit = commands.add_parser(
        "edit",
        help="edit an image with the PyTorch reference",
        description="Edit one or more condition images as an instruction says, with the PyTorch "
        "reference pipeline. The output size follows the last image unless --width/--height are given.",
    )
    edit.add_argument("instruction", help="what to change")
    edit.add_argument("--image", action="append", required=True, metavar="PATH",
                      help="condition image (repeat for several, in prompt order)")
    _add_reference_args(edit)
    edit.set_defaults(handler=_cmd_edit)

    run = commands.add_parser(
        "run",
        help="generate or edit with the torch-free runtime from an export directory",
        description="Run an export directory with the runtime (numpy + onnxruntime, no torch). "
        "With --image it edits the given images; without, it generates from the prompt.",
    )
    run.add_argument("prompt", help="what to draw, or the edit instruction with --image")
    run.add_argument("--export", required=True, help="export directory (with manifest.json)")
    run.add_argument("--image", action="append", default=None, metavar="PATH",
                     help="condition image to edit (repeat for several, in prompt order)")
    _add_sampling_args(run)
    run.add_argument("--backend", default="onnxruntime", help="inference backend (default: %(default)s)")
    run.add_argument("--providers", nargs="+", default=None,
                     help="onnxruntime execution providers in order (default: CUDA if present, then CPU)")
    run.add_argument("--no-verify", action="store_true",
                     help="skip the sha256 check of the graph files (~1 s per GB)")
    run.set_defaults(handler=_cmd_run)

    demo = commands.add_parser(
        "demo",
        help="export the embedded demo model if needed and generate with the runtime",
        description="The main job on a fresh machine: export the shipped demo model once (cached), "
        "then generate an image from a prompt with the torch-free runtime.",
    )
    demo.add_argument("prompt", nargs="?", default="a red circle on the left on a white background",
                      help="what to draw (default: %(default)r)")
    demo.add_argument("--fast", action="store_true",
                      help="use the shipped 4-step distilled student (demo-4step) instead of the 40-step model")
    demo.add_argument("--export-dir", default=None,
                      help="where the export is kept (default: $QWEN_IMAGE_EDGE_CACHE or ~/.cache/qwen-image-edge)")
    _add_sampling_args(demo, output_default="demo.png")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def _add_reference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder (diffusers layout) or 'demo'")
    _add_sampling_args(p)


def _add_sampling_args(p: argparse.ArgumentParser, output_default: str | None = None) -> None:
    p.add_argument("-o", "--output", required=output_default is None, default=output_default,
                   help="output PNG path" + (" (default: %(default)s)" if output_default else ""))
    p.add_argument("--negative-prompt", default=None, help="enables guidance together with --guidance > 1")
    p.add_argument("--width", type=int, default=None, help="pixels, multiple of 32 (default: the model's)")
    p.add_argument("--height", type=int, default=None, help="pixels, multiple of 32 (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch, or onnxruntime for run/demo)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)  # also when a host application already configured logging

    from qwen_image_edge.runtime.errors import QwenImageEdgeError

    try:
        return args.handler(args)
    except QwenImageEdgeError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


def _cmd_info(args: argparse.Namespace) -> int:
    from qwen_image2_ref.config import get_preset
    from qwen_image2_ref.sizes import model_sizes

    sizes = model_sizes(get_preset(args.preset))
    print(json.dumps(sizes.to_dict(), indent=2) if args.json else format_sizes(sizes))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from qwen_image_edge.export.onnx_export import export_model

    export_model(args.model, args.out, graphs=args.graphs, max_resolution=args.max_resolution,
                 opset=args.opset, overwrite=args.overwrite, lean=args.lean)
    print(f"exported to {args.out}")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from qwen_image_edge.export.tensorrt import build_engines
    from qwen_image_edge.export.trt_profiles import BuildRanges
    from qwen_image_edge.runtime.manifest import Precision

    ranges = BuildRanges(args.min_res, args.opt_res, args.max_res, args.max_batch, args.max_prompt_tokens)
    built = build_engines(args.export_dir, graphs=args.graphs, ranges=ranges,
                          precision=Precision(args.precision) if args.precision else None, opt_level=args.opt_level,
                          timing_cache=args.timing_cache, weight_streaming=args.weight_streaming)
    for entry in built.values():
        print(f"{entry.graph}: {entry.file} ({entry.precision.value})")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from qwen_image_edge.calib.collect import CalibrationSettings
    from qwen_image_edge.calib.quantize import quantize_model

    settings = CalibrationSettings(batch_size=args.batch_size, steps=args.steps, guidance=args.guidance)
    quantize_model(args.model, args.precision, args.out, policy=args.policy, prompts=args.prompts,
                   calib_size=args.calib_size, settings=settings, max_resolution=args.max_resolution,
                   overwrite=args.overwrite, progress=True)
    print(f"quantized export ({args.precision}) written to {args.out}")
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from qwen_image_edge.distill.cli import run

    return run(args)


def _cmd_validate(args: argparse.Namespace) -> int:
    """Exit 0 when every graph is within its precision's bounds, 1 otherwise."""
    from qwen_image_edge.export.validate import validate

    report = validate(args.export_dir, args.model, report=args.report)
    print(report.table())
    return 0 if report.passed else 1


def _check_request_args(args: argparse.Namespace):
    """Output path and explicit sampling values, checked before any loading."""
    from pathlib import Path

    from qwen_image_edge.runtime.errors import InputError
    from qwen_image_edge.runtime.sampling import check_guidance, check_steps, resolve_size

    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise InputError(f"output {out}: expected a .png path (RGBA output)")
    if not out.parent.is_dir():
        raise InputError(f"output {out}: folder {out.parent} does not exist")
    if args.steps is not None:
        check_steps(args.steps)
    if args.guidance is not None:
        check_guidance(args.guidance)
    resolve_size(args.width, args.height, (1024, 1024))
    return out


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(negative_prompt=args.negative_prompt, width=args.width, height=args.height,
                steps=args.steps, guidance=args.guidance, seed=args.seed)


def _runtime_generate(export_dir, args: argparse.Namespace, out, images=None, **load) -> int:
    from qwen_image_edge.runtime.pipeline import Pipeline

    pipe = Pipeline.load(export_dir, threads=args.threads, **load)
    if images:
        image = pipe.edit(images, args.prompt, **_sampling_kwargs(args))
    else:
        image = pipe.generate(args.prompt, **_sampling_kwargs(args))
    _save_atomic(image, out)
    print(out)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    out = _check_request_args(args)
    return _runtime_generate(args.export, args, out, images=args.image, backend=args.backend,
                             providers=args.providers, verify_hashes=not args.no_verify)


def _cmd_demo(args: argparse.Namespace) -> int:
    out = _check_request_args(args)
    from qwen_image_edge.export.demo import ensure_export

    return _runtime_generate(ensure_export("demo-4step" if args.fast else "demo", args.export_dir), args, out)


def _reference_run(args: argparse.Namespace, images: list[str] | None) -> int:
    out = _check_request_args(args)
    import torch

    from qwen_image2_ref.model_folder import load_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    kwargs = _sampling_kwargs(args)
    if images is None:
        (image,) = pipe.generate(args.prompt, **kwargs)
    else:
        (image,) = pipe.edit(images, args.instruction, **kwargs)
    _save_atomic(image, out)
    print(out)
    return 0


def _save_atomic(image, out) -> None:
    """Write next to the target, then rename: no half-written PNG on interruption."""
    import os

    tmp = out.with_name(f".{out.name}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _cmd_generate(args: argparse.Namespace) -> int:
    return _reference_run(args, None)


def _cmd_edit(args: argparse.Namespace) -> int:
    return _reference_run(args, args.image)


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
