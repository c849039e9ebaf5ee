"""Activation statistics of a condition encoder over calibration prompts: does it have outlier channels?

    python bench/encoder_stats.py [--model demo | --work build/demo_v2] [--prompts demo] [--limit 512]
                                  [--random-too] [--json stats.json]

Per decoder layer of the language model, over every real token of the prompts (the system turn
included, as the encoder runs it): the largest |activation|, the median over channels of each
channel's max, the median |activation|, the largest channel-max / median-channel-max ratio, and
the outlier channels (ratio >= ``train_encoder.OUTLIER_RATIO``). Outlier channels are what makes
LLM activations hard to quantize per tensor (LLM.int8(), SmoothQuant); the edge quantization of
the encoder depends on whether they appear.

``--model``: a model folder or shipped name (the shipped demo's encoder is random-init);
``--work``: a demo trainer work folder (its ``tokenizer/`` and ``encoder`` stage file: the v2
encoder pre-trained as a causal LM). ``--random-too`` adds the same architecture random-init over
the same tokenizer, for contrast. Prompts: a calibration set (``calib.prompts``) or a text file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # run as a script: bench/runtime.py would shadow the runtime package

import torch  # noqa: E402

from qwen_image2_ref.config import DEMO  # noqa: E402
from qwen_image2_ref.demo.train_encoder import OUTLIER_RATIO, activation_stats  # noqa: E402


def work_encoder(work: Path, random_init: bool = False):
    from qwen_image2_ref.demo.parts import encoder_for
    from qwen_image2_ref.demo.stage_io import load_stage

    torch.manual_seed(7)
    encoder = encoder_for(work, DEMO)
    if not random_init:
        encoder.model.load_state_dict(load_stage(work / "encoder")[0])
    return encoder


def random_like(encoder):
    from qwen_image2_ref.encoder import ConditionEncoder

    torch.manual_seed(7)
    return ConditionEncoder.from_config(encoder.config, encoder.tokenizer, encoder.vision)


def table(name: str, report: dict) -> list[str]:
    lines = [f"{name}: {report['prompts']} prompts, {report['tokens']} tokens",
             f"  {'layer':>5} {'max':>9} {'med ch max':>10} {'med |h|':>8} {'top ratio':>9}  outlier channels"]
    for layer in report["layers"]:
        lines.append(f"  {layer['layer']:5d} {layer['max']:9.3f} {layer['median_channel_max']:10.3f} "
                     f"{layer['median_abs']:8.4f} {layer['top_ratio']:9.2f}  {layer['outlier_channels'] or 'none'}")
    return lines


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="model folder or shipped name (default: demo)")
    src.add_argument("--work", type=Path, default=None, help="demo trainer work folder")
    p.add_argument("--prompts", default="demo", help="calibration prompt set name or a text file")
    p.add_argument("--limit", type=int, default=512)
    p.add_argument("--random-too", action="store_true", help="also the random-init encoder, for contrast")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the full statistics (every channel) here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from qwen_image_edge.calib.prompts import load_prompts

    prompts = load_prompts(args.prompts, args.limit)
    if args.work is not None:
        encoder, name = work_encoder(args.work), f"encoder of {args.work}"
    else:
        from qwen_image2_ref.model_folder import load_model

        model = args.model or "demo"
        encoder, name = load_model(model).encoder, f"encoder of {model}"
    reports = {name: activation_stats(encoder, prompts)}
    if args.random_too:
        reports["random-init, same architecture and tokenizer"] = activation_stats(random_like(encoder), prompts)
    print(f"outlier: channel max >= {OUTLIER_RATIO:g} x the median channel max; prompts {args.prompts!r}")
    for key, report in reports.items():
        print("\n".join(table(key, report)))
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1))
    return reports


if __name__ == "__main__":
    main()
