"""The ``qwen-image-edge`` argument parser (argparse only: nothing heavy is imported to build it)."""

from __future__ import annotations

import argparse

PROG = "qwen-image-edge"
# The largest --steps: the flow-matching schedulers of Qwen-Image train on 1000 timesteps
# (num_train_timesteps), so more steps only subdivide a grid the model never saw, and each step is
# one or two full transformer calls: a typo such as 10000 would run for hours instead of failing.
MAX_STEPS = 1000
MAX_IMAGES = 64

DESCRIPTION = """\
Qwen-Image-2 on small GPUs. A deployment runs these stages in order:

  export      PyTorch reference -> ONNX graphs (condition encoder, transformer, VAE) + manifest.json
  quantize    FP8 / INT8 (W8A8) with timestep-aware calibration
  distill     step distillation: fewer sampling steps (alternative or complement to quantize)
  build       ONNX graphs -> TensorRT engines for one GPU
  refit       LoRA adapters written into refittable engines, without a rebuild
  run         generate or edit images from an export directory (no torch)
  validate    per-graph and end-to-end numbers against the reference
  serve       an HTTP API over the runtime on Ray Serve (replicas, batching; the 'serve' extra)

"""

NO_VERIFY_HELP = (
    "skip the sha256 check of the graph and tokenizer files against the manifest (saves ~1 s per GB). "
    "What it gives up: a truncated, damaged or swapped graph file (an interrupted copy, disk corruption, "
    "a file from another export with the same inputs) is no longer caught at load; onnxruntime may then "
    "fail, or run other weights and write a wrong image without any error. Names, shapes and dtypes are "
    "still checked.")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qwen-image-edge")
    except PackageNotFoundError:
        return "unknown (not installed)"


def add_placement_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """``--device`` / ``--dtype`` of a command that runs the torch reference (checked by
    ``qwen_image2_ref.devices.resolve_placement`` before anything loads)."""
    p.add_argument("--device", default=None,
                   help=f"where {what} runs: cpu, cuda or cuda:N (default: cuda where available, else cpu)")
    p.add_argument("--dtype", default=None,
                   help=f"precision {what} runs in: fp32, bf16 or fp16 (default: bf16 on a GPU, fp32 on the CPU)")


def add_lora_argument(p: argparse.ArgumentParser, what: str = "the model", flag: str = "--lora",
                      required: bool = False) -> None:
    """``--lora FILE[:SCALE]``, repeatable; parsed by :func:`parse_lora_args` in the handler (one-line errors)."""
    p.add_argument(flag, action="append", default=None, required=required, metavar="FILE[:SCALE]",
                   help=f"LoRA adapter (safetensors, diffusers/peft or kohya/Lightning keys) fused into {what}'s "
                        "transformer, SCALE times (default 1); repeatable")


def parse_lora_args(values: list[str] | None) -> list[tuple[str, float]]:
    """``--lora`` values as (file, scale) pairs; a SCALE that is not a finite number is an InputError."""
    import math

    from qwen_image_edge.runtime.errors import InputError

    out = []
    for text in values or ():
        path, sep, tail = text.rpartition(":")
        if not sep or "/" in tail or "\\" in tail or tail.lower().endswith(".safetensors"):
            out.append((text, 1.0))  # no scale given (a ':' inside a path stays in it)
            continue
        try:
            scale = float(tail)
        except ValueError:
            scale = math.nan
        if not math.isfinite(scale):
            raise InputError(f"--lora {text}: expected FILE[:SCALE] with a finite number as SCALE, got {tail!r}")
        out.append((path, scale))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log progress (-v: INFO, -vv: DEBUG)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    # After the subcommand too (`run ... -v`); its own dest: a subparser's default would reset the main -v.
    common.add_argument("-v", "--verbose", dest="verbose_after", action="count", default=0,
                        help="log progress (-v: INFO, -vv: DEBUG)")
    threads = argparse.ArgumentParser(add_help=False)
    threads.add_argument("--threads", type=int, default=None,
                         help="CPU threads, at most this machine's cores (default: the library's own choice)")

    def add(name: str, *, computes: bool = False, **kwargs) -> argparse.ArgumentParser:
        parents = [common, threads] if computes else [common]
        return commands.add_parser(name, parents=parents, **kwargs)

    _add_info(add)
    _add_export(add)
    _add_quantize(add)
    _add_distill(add, common)
    _add_validate(add)
    _add_build(add)
    _add_refit(add)
    _add_reference(add)
    _add_run(add)
    _add_demo(add)
    _add_serve(add)
    return parser


def _add_info(add) -> None:
    info = add(
        "info",
        help="parameter counts and weight sizes of a model preset, or the parameters stored in an image",
        description="Print the parameter counts and bf16 weight sizes of a preset's transformer, "
        "VAE and text encoder (counted on the meta device: no weights, no memory). With --image: the "
        "generation parameters a PNG written by qwen-image-edge carries (prompt, seed, steps, ...).",
    )
    info.add_argument("--preset", default="qwen-image-2.1", help="preset name (default: %(default)s)")
    info.add_argument("--image", default=None, metavar="PNG", help="print the parameters stored in this image")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(command="info")


def _max_resolution(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-resolution", type=int, help="largest square output side in pixels (default: the model's "
                   "output resolution); other aspect ratios, 1:4 to 4:1, are taken at about that area, for outputs "
                   "and condition images alike")


def _add_export(add) -> None:
    export = add("export", computes=True, help="PyTorch checkpoint -> ONNX graphs + manifest.json")
    export.add_argument("--model", required=True, help="checkpoint folder, or 'demo'")
    export.add_argument("--out", required=True, help="export directory to create")
    export.add_argument("--graphs", nargs="+", help="graphs to export (default: all)")
    _max_resolution(export)
    export.add_argument("--opset", type=int, default=19, help="ONNX opset, >= 19 (default: %(default)s)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing export directory")
    add_lora_argument(export)
    export.add_argument("--lean", action=argparse.BooleanOptionalAction, default=None,
                        help="trace without weights and attach them from the checkpoint shards (default: "
                             "when the fp32 weights exceed 40%% of the available memory)")


def _add_quantize(add) -> None:
    quant = add(
        "quantize", computes=True,
        help="INT8 / FP8 transformer (timestep-aware calibration), INT8 / INT4 text encoder, fp16 VAE -> ONNX export",
        description="Calibrate the transformer over the reference pipeline's denoising steps, quantize it "
        "with NVIDIA modelopt (INT8 SmoothQuant or FP8 E4M3, W8A8) and write an export directory whose "
        "transformer is a standard QDQ ONNX graph. With a per-component --precision, the text encoder's "
        "language model is quantized too (INT8 SmoothQuant, or INT4 weight-only AWQ as block-wise "
        "DequantizeLinear) and the vision tower / VAE converted to fp16 (fp32 kept where fp16 would "
        "overflow); unnamed parts stay fp32. Each graph's precision is recorded in the manifest.",
    )
    quant.add_argument("--model", required=True, help="checkpoint folder, or 'demo'")
    add_lora_argument(quant)
    quant.add_argument("--precision", required=True,
                       help="int8 or fp8 (the transformer only); a preset: edge (transformer int4, text encoder int4 "
                       "AWQ, vision tower and VAE fp16); part=precision pairs, e.g. "
                       "transformer=fp8,text_encoder=int4,vae=fp16 (parts: transformer int8|fp8|int4, text_encoder "
                       "int8|int4, vision_encoder fp16, vae fp16; unnamed parts stay fp32); or a .json file of "
                       "such pairs")
    quant.add_argument("--out", required=True, help="export directory to create")
    quant.add_argument("--calib-size", type=int, default=32, help="calibration prompts (default: %(default)s)")
    quant.add_argument("--calib-edits", type=int, default=None,
                       help="edit samples calibrated after the prompts, so the condition image's tokens get ranges "
                       "(a demo folder edits rendered scenes, another model the images it draws for its prompts; "
                       "default: a quarter of --calib-size, 0 for text-to-image only)")
    quant.add_argument("--prompts", default=None,
                       help="prompt set 'general', 'demo', 'demo-v2' or a text file (default: the demo set of a demo-trained "
                       "folder's caption language, else general)")
    quant.add_argument("--policy", default=None, help="the transformer's QuantPolicy JSON file (layer selection, ranges; default: the built-in "
                       "policy); with \"precision\": \"int4\" the int4 policy (block_size, awq, keep_first, keep_last)")
    quant.add_argument("--batch-size", type=int, default=4, help="calibration batch (default: %(default)s)")
    quant.add_argument("--steps", type=int, default=None, help="calibration denoising steps (default: the model's)")
    quant.add_argument("--guidance", type=float, default=None, help="calibration guidance (default: the model's)")
    _max_resolution(quant)
    add_placement_arguments(quant, "calibration (fp16 is refused: its range overflows; ranges are kept in fp32)")
    quant.add_argument("--lean", action=argparse.BooleanOptionalAction, default=None,
                       help="calibrate the model in place, keep only its scales, and write the graphs traced "
                            "without weights, quantizing each weight as it streams from the shards (peak memory: "
                            "about the model in --dtype; default: when the fp32 weights exceed 40%% of the "
                            "available memory)")
    quant.add_argument("--overwrite", action="store_true", help="replace an existing export directory")


def _add_distill(add, common) -> None:
    from qwen_image_edge.distill.cli import DESCRIPTION as distill_description
    from qwen_image_edge.distill.cli import add_arguments as distill_arguments  # argparse only: no torch

    dist = add(
        "distill",  # distill's own arguments include --threads
        help="step distillation: a few-step student with guidance built in (torchrun for several processes)",
        description=distill_description, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    distill_arguments(dist)


def _add_validate(add) -> None:
    validate = add("validate", computes=True, help="compare each exported graph with the reference")
    validate.add_argument("export_dir", help="export directory (with manifest.json)")
    validate.add_argument("--model", required=True, help="checkpoint folder, or 'demo'")
    add_lora_argument(validate, "the reference (the adapters the export was made with)")
    validate.add_argument("--report", help="JSON report path, its folder must exist (default: "
                          "<export_dir>/validation.json)")
    add_placement_arguments(validate, "the reference run")


def _add_build(add) -> None:
    build = add(
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
    build.add_argument("--refittable", action="store_true",
                       help="build the transformer engines refittable (TensorRT's REFIT flag), so `refit` can write "
                            "LoRA adapters into them without a rebuild")


def _add_refit(add) -> None:
    refit = add(
        "refit", help="fuse LoRA adapters into an export's transformer and its engines (no engine rebuild)",
        description="Fuse LoRA adapters into the transformer graphs of a lean export (their weights keep the "
        "checkpoint's names) and write the new weights into this GPU's engines, built with `build --refittable`, "
        "through TensorRT's refitter. The manifest (hashes, provenance's adapters) is rewritten atomically; "
        "adapters add to the weights the export holds. int8/fp8 graphs are refused: quantize with --lora.")
    refit.add_argument("export_dir", help="export directory (with manifest.json and refittable engines)")
    add_lora_argument(refit, "the export", required=True)


def _add_reference(add) -> None:
    gen = add(
        "generate", computes=True,
        help="text to image with the PyTorch reference",
        description="Generate an image from a prompt with the PyTorch reference pipeline "
        "(the numbers the runtime is validated against).",
    )
    gen.add_argument("prompt", help="what to draw")
    _add_reference_model(gen)

    edit = add(
        "edit", computes=True,
        help="edit an image with the PyTorch reference",
        description="Edit one or more condition images as an instruction says, with the PyTorch "
        "reference pipeline. The output size follows the last image unless --width/--height are given.",
    )
    edit.add_argument("instruction", help="what to change")
    edit.add_argument("--image", action="append", required=True, metavar="PATH",
                      help="condition image (repeat for several, in prompt order)")
    _add_reference_model(edit)


def _add_reference_model(p) -> None:
    """The model, its device and dtype, and the sampling flags of generate and edit."""
    p.add_argument("--model", required=True, help="checkpoint folder (diffusers layout) or 'demo'")
    add_lora_argument(p)
    add_placement_arguments(p, "the reference")
    _add_sampling_args(p)


def _add_run(add) -> None:
    run = add(
        "run", computes=True,
        help="generate or edit with the torch-free runtime from an export directory",
        description="Run an export directory with the runtime (numpy + onnxruntime, no torch). "
        "With --image it edits the given images; without, it generates from the prompt. "
        "--no-verify: " + NO_VERIFY_HELP,
    )
    run.add_argument("prompt", help="what to draw, or the edit instruction with --image")
    run.add_argument("--export", required=True, help="export directory (with manifest.json)")
    run.add_argument("--image", action="append", default=None, metavar="PATH",
                     help="condition image to edit (repeat for several, in prompt order)")
    _add_sampling_args(run)
    run.add_argument("--backend", default="onnxruntime", help="inference backend (default: %(default)s)")
    run.add_argument("--providers", nargs="+", default=None,
                     help="onnxruntime execution providers in order (default: CUDA if present, then CPU)")
    run.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    run.add_argument("--low-memory", action="store_true",
                     help="open each graph when its stage starts and release it after (encoders before denoising, "
                     "the VAE decoder after): peak memory about the largest graph, slower (graphs reopen per image)")


def _add_demo(add) -> None:
    from qwen_image2_ref.demo.language import LANGUAGE  # a string: the module imports numpy only when called

    demo = add(
        "demo", computes=True,
        help="export the embedded demo model if needed and generate with the runtime",
        description="The main job on a fresh machine: export the shipped demo model once (cached), "
        "then generate an image from a prompt with the torch-free runtime. A prompt outside the demo "
        "model's language (below) gets a warning that says why.\n\n" + LANGUAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("prompt", nargs="?", default="a red circle on the left on a white background",
                      help="what to draw (default: %(default)r)")
    demo.add_argument("--fast", action="store_true",
                      help="use the shipped 4-step distilled student (demo-4step) instead of the 40-step model")
    demo.add_argument("--export-dir", default=None,
                      help="where the export is kept (default: $QWEN_IMAGE_EDGE_CACHE or ~/.cache/qwen-image-edge); "
                           "an export of another model there is refused unless --overwrite")
    demo.add_argument("--overwrite", action="store_true",
                      help="replace what --export-dir holds when it is not an export of this model")
    _add_sampling_args(demo, output_default="demo.png")


def _add_sampling_args(p: argparse.ArgumentParser, output_default: str | None = None) -> None:
    p.add_argument("-o", "--output", required=output_default is None, default=output_default,
                   help="output image: .png (with the parameters as text chunks), .jpg/.jpeg or .webp (lossless); "
                   "with --num-images N > 1, NAME-0.png ... NAME-(N-1).png"
                   + (" (default: %(default)s)" if output_default else ""))
    p.add_argument("--negative-prompt", default=None, help="enables guidance together with --guidance > 1")
    p.add_argument("--width", type=int, default=None, help="pixels, multiple of 32 (default: the model's)")
    p.add_argument("--height", type=int, default=None, help="pixels, multiple of 32 (default: the model's)")
    p.add_argument("--steps", "--num-inference-steps", type=int, default=None,
                   help=f"denoising steps, 1..{MAX_STEPS} (default: the model's; {MAX_STEPS} is the schedulers' "
                   "training grid of timesteps); --num-inference-steps is diffusers' name for it")
    p.add_argument("--guidance", "--guidance-scale", type=float, default=None,
                   help="guidance scale (default: the model's); --guidance-scale is diffusers' name for it")
    p.add_argument("--seed", type=int, default=None,
                   help="noise seed, >= 0 (default: random, printed on stderr and stored in the image); "
                   "image i of --num-images uses seed + i")
    p.add_argument("--num-images", type=int, default=1,
                   help=f"images to make, 1..{MAX_IMAGES}, seeds seed, seed + 1, ... (default: %(default)s)")
    p.add_argument("--background", default="white",
                   help="JPEG only (no alpha): colour the transparent parts are flattened onto, a name or "
                   "#rrggbb (default: %(default)s)")


def _add_serve(add) -> None:
    serve = add(
        "serve", computes=True,
        help="serve an export directory over HTTP on Ray Serve (the 'serve' extra)",
        description="An HTTP API over the torch-free runtime on Ray Serve: POST /v1/generate (JSON), POST /v1/edit "
        "(multipart), GET /healthz, GET /v1/model. Without --address a local Ray instance is started and stopped "
        "with the command; with --address the application runs on that Ray cluster (every node must see "
        "EXPORT_DIR at the same path). Ctrl-C or SIGTERM stops it. --threads: onnxruntime threads per replica "
        "(default 1), also the CPUs Ray reserves for each.",
    )
    serve.add_argument("export_dir", metavar="EXPORT_DIR", help="export directory (with manifest.json)")
    serve.add_argument("--replicas", type=int, default=1, help="pipeline replicas (default: %(default)s)")
    serve.add_argument("--gpus-per-replica", type=float, default=0.0,
                       help="GPUs Ray reserves for each replica (0: CPU; 0.5: two replicas share one GPU); "
                       "use with --backend tensorrt or a CUDA provider (default: %(default)s)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address the HTTP proxy listens on (default: %(default)s; 0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    serve.add_argument("--max-batch", type=int, default=4,
                       help="generate requests combined into one pipeline call, at most (1: no batching; "
                       "capped at the export's batch range, 4 today; default: %(default)s)")
    serve.add_argument("--batch-wait-ms", type=float, default=20.0,
                       help="how long a batch waits to fill before it runs (default: %(default)s ms)")
    serve.add_argument("--address", default=None,
                       help="an existing Ray cluster to deploy on ('auto' or HOST:6379; default: a local Ray "
                       "instance for this command)")
    serve.add_argument("--backend", default="onnxruntime", help="inference backend (default: %(default)s)")
    serve.add_argument("--providers", nargs="+", default=None,
                       help="onnxruntime execution providers in order (default: CUDA if present, then CPU)")
    serve.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
