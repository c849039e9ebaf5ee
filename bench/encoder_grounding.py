"""Does a demo encoder ground edit instructions in their source image? Reads its edit readout.

    python bench/encoder_grounding.py --work build/demo_v2e [--n 96] [--seed 7] [--json out.json]

The encoder stage of a run trained with ``--encoder-edit-loss`` keeps, in its checkpoint, the linear
readout from the last token's state to the edit's kind, where it acts (the position of the object
it recolours or removes, or moves it to) and the new colour (``train_encoder.EDIT_SLOTS``). This
reads that readout on fresh training-split and held-out edits of each kind and prints how often
each slot is right. "where" on two-object recolours and removals is the one that needs the image:
the instruction names the object by its shape only ("make the square black"), so the encoder has
to find the square; chance is 50% (two objects).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # run as a script: bench/runtime.py would shadow the runtime package

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qwen_image2_ref.config import DEMO  # noqa: E402
from qwen_image2_ref.demo import data  # noqa: E402
from qwen_image2_ref.demo import train_encoder as te  # noqa: E402
from qwen_image2_ref.demo.resume import read_checkpoint  # noqa: E402
from qwen_image2_ref.demo.train_dit import load_encoder  # noqa: E402

ROWS = (("recolor", 1), ("recolor", 2), ("move", 1), ("add_glyph", 1), ("remove_background", None),
        ("remove_object", 2))


def load(work: Path):
    ckpt = work / "ckpt_encoder.safetensors"
    if not ckpt.is_file():
        raise SystemExit(f"--work {work}: no encoder checkpoint there (expected {ckpt})")
    tensors, meta = read_checkpoint(ckpt)
    head_state = {k[len("edit_head/"):]: v for k, v in tensors.items() if k.startswith("edit_head/")}
    if not head_state:
        raise SystemExit(f"--work {work}: its encoder trained without --encoder-edit-loss (no edit readout)")
    encoder = load_encoder(work, DEMO, None)
    head = te.edit_head(encoder.model.config.text_config.hidden_size)
    head.load_state_dict(head_state)
    return encoder, head, meta


def edits_of(rng: np.random.Generator, kind: str, objects: int | None, split: str, n: int) -> list:
    out = []
    for _ in range(50 * n):
        e = data.sample_edit(rng, 128, 128, split, (kind,))
        if objects is None or len(e.source.objects) == objects:
            out.append(e)
        if len(out) == n:
            break
    return out


@torch.no_grad()
def measure(encoder, head, n: int, seed: int) -> list[dict]:
    from PIL import Image

    rows = []
    for split in ("train", "heldout"):
        rng = np.random.default_rng(seed)
        for kind, objects in ROWS:
            edits = edits_of(rng, kind, objects, split, n)
            images = [Image.fromarray(data.render(e.source)) for e in edits]
            _, right = te.edit_readout(head, te.last_state(encoder, [e.instruction for e in edits], images), edits)
            acc = right.float().mean(0).tolist()
            rows.append({"split": split, "edit": f"{kind}/{objects or 'any'}", "n": len(edits),
                         **{name: round(a, 3) for (name, _), a in zip(te.EDIT_SLOTS, acc)}})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True, help="demo trainer work folder (its encoder checkpoint)")
    p.add_argument("--n", type=int, default=96, help="edits per row")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.n < 1:
        raise SystemExit(f"--n: expected at least 1, got {args.n}")
    torch.set_num_threads(args.threads)
    encoder, head, meta = load(args.work)
    rows = measure(encoder, head, args.n, args.seed)
    print(f"edit readout of {args.work} (encoder step {meta['step']}); share of edits with each slot right")
    print(f"{'split':8s} {'edit':22s} {'n':>4s} {'kind':>6s} {'where':>6s} {'colour':>6s}")
    for r in rows:
        print(f"{r['split']:8s} {r['edit']:22s} {r['n']:4d} {r['kind']:6.2f} {r['where']:6.2f} {r['color']:6.2f}")
    if args.json:
        args.json.write_text(json.dumps({"work": str(args.work), "step": meta["step"], "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
