"""Edge footprint of the demo model per precision policy, projected to Qwen-Image-2.1; prints tables.

    python bench/footprint.py [--n 64] [--steps 40] [--calib-size 16] [--policies fp32,int8,fp8,edge]
                              [--threads 2] [--work DIR]

One run prints:

1. bytes per graph and per pipeline (text encoder + vision tower + transformer + VAE decoder and
   encoder; the KV-cache pair is an alternative form of the transformer and is listed apart) for
   the fp32, bf16, int8, fp8 and ``edge`` policies, measured on the demo exports; bf16 is computed
   (2 bytes per fp32 byte's parameter: no bf16 ONNX export exists, bf16 is a TensorRT build flag);
2. the same projected for Qwen-Image-2.1: per graph, its full-size parameters split into quantized
   weights and the rest (meta-device models, the policies' own layer selection), each times the
   bytes per parameter the demo export actually wrote for that group, and the ``edge`` / bf16 ratio;
3. peak RSS (VmHWM, a fresh process per figure) of one generation, default against low memory;
4. adherence (demo judge, ``--n`` held-out prompts, ``--steps``, same seeds for every policy) and
   seconds per image per policy, through the torch-free runtime (onnxruntime CPU).

The shipped demo encoder is random and frozen (no outlier channels): the text encoder's INT8/INT4
figures here are on it; ``bench/encoder_quant.py`` measures the methods on a trained encoder (demo
v2) and with injected outliers, tests/test_encoder_quant.py on injected outliers.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # run as a script: bench/runtime.py would shadow the runtime package

import numpy as np  # noqa: E402

PIPELINE_GRAPHS = ("text_encoder", "vision_encoder", "transformer", "vae_decoder", "vae_encoder")
PAIR_GRAPHS = ("transformer_prefill", "transformer_step")
JUDGE_KEYS = ("color", "shape", "position", "background")
QUANTIZED_TYPES = (3, 17, 22)  # onnx TensorProto INT8, FLOAT8E4M3FN, INT4


# ----------------------------------------------------------------------------- exports


def make_exports(policies: list[str], work: Path, calib_size: int) -> dict[str, Path]:
    """One export per policy (reused when ``work`` has it), without quantize's validate gate."""
    from qwen_image2_ref.model_folder import load_model
    from qwen_image_edge.calib.collect import CalibrationSettings
    from qwen_image_edge.calib.component_export import export_components, quantize_components
    from qwen_image_edge.calib.components import parse_component_policy
    from qwen_image_edge.calib.policy import QuantPolicy
    from qwen_image_edge.calib.prompts import load_prompts
    from qwen_image_edge.calib.quantize import quantize_transformer
    from qwen_image_edge.export.onnx_export import export_model

    settings = CalibrationSettings(batch_size=4, steps=8)
    out = {}
    for policy in policies:
        path = work / Path(policy).stem  # a policy file's export is named after the file
        if not (path / "manifest.json").is_file():
            start = time.perf_counter()
            components = parse_component_policy(policy) if policy != "fp32" else None
            if components is None:
                export_model("demo", path)
            elif components.transformer_only and components.transformer.value in ("int8", "fp8"):
                # what `quantize --precision int8|fp8` writes, ungated
                model = load_model("demo")
                qt = quantize_transformer(model, QuantPolicy(precision=components.transformer),
                                          load_prompts("demo", calib_size), settings, progress=False)
                export_components(model, components, path, qt=qt)
            else:
                quantize_components("demo", policy, path, calib_size=calib_size, progress=False, gate=False,
                                    settings=settings)
            logging.getLogger("footprint").info("%s export: %.0f s", policy, time.perf_counter() - start)
        out[path.name] = path
    return out


def graph_bytes(export: Path) -> dict[str, int]:
    from qwen_image_edge.runtime.manifest import load_manifest

    manifest = load_manifest(export, verify_hashes=False)
    return {n: (export / g.file).stat().st_size + sum((export / d.file).stat().st_size for d in g.external_data)
            for n, g in manifest.graphs.items()}


def group_rates(export: Path) -> dict[str, dict[str, float]]:
    """Per graph, as the export wrote them: bytes per parameter of its quantized weights (codes +
    scales + zero points, ``quantized``), split into ``codes`` per parameter and ``scale`` bytes per
    scale element for block-wise weights (``blocked``); the int8 lookup table's codes per parameter
    and bytes per row scale (``embedding`` / ``row_scale``); and the rest of its float initializers."""
    import onnx
    from onnx import numpy_helper

    from qwen_image_edge.runtime.manifest import load_manifest

    manifest = load_manifest(export, verify_hashes=False)
    rates = {}
    for name, spec in manifest.graphs.items():
        model = onnx.load(str(export / spec.file))
        inits = {i.name: i for i in model.graph.initializer}
        size = lambda t: len(t.raw_data) if t.raw_data else numpy_helper.to_array(t).nbytes  # noqa: E731
        count = lambda t: int(np.prod(t.dims)) if t.dims else 1  # noqa: E731
        q_bytes = q_params = code_bytes = scale_bytes = scale_count = 0
        blocked = False
        in_group = set()
        for node in model.graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0] in inits \
                    and inits[node.input[0]].data_type in QUANTIZED_TYPES:
                q_params += count(inits[node.input[0]])
                blocked |= any(a.name == "block_size" and a.i > 0 for a in node.attribute)
                for k, i in enumerate(node.input):
                    if i in inits and i not in in_group:
                        q_bytes += size(inits[i])
                        code_bytes += size(inits[i]) if k == 0 else 0
                        scale_bytes += size(inits[i]) if k == 1 else 0
                        scale_count += count(inits[i]) if k == 1 else 0
                        in_group.add(i)
        table = embedding_table(model, inits)
        emb = {"embedding": 0.0, "row_scale": 0.0}
        if table is not None:
            codes, scales = inits[table[0]], inits[table[1]]
            emb = {"embedding": size(codes) / count(codes), "row_scale": size(scales) / count(scales)}
            in_group.update(table)
        rest = [t for n, t in inits.items() if n not in in_group and t.data_type in (1, 10, 16) and count(t) > 1]
        r_params = sum(count(t) for t in rest)
        rates[name] = {"quantized": q_bytes / q_params if q_params else 0.0, "blocked": blocked,
                       "codes": code_bytes / q_params if q_params else 0.0,
                       "scale": scale_bytes / scale_count if scale_count else 0.0, **emb,
                       "rest": sum(size(t) for t in rest) / r_params if r_params else 4.0}
    return rates


def embedding_table(model, inits) -> tuple[str, str] | None:
    """``(codes, row scales)`` of an int8 lookup table (``Gather`` of an int8 initializer and, on the
    same ids, of its per-row scales: export/encoder_qdq.py's form), or None."""
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits]
    for node in gathers:
        codes = inits[node.input[0]]
        if codes.data_type != 3 or len(codes.dims) != 2:  # TensorProto.INT8 [vocab, hidden]
            continue
        scales = [n.input[0] for n in gathers if n.input[1] == node.input[1]
                  and list(inits[n.input[0]].dims) == [codes.dims[0]]]
        if scales:
            return node.input[0], scales[0]
    return None


# ----------------------------------------------------------------------------- full-size parameters


def full_size_params() -> dict[str, dict[str, int]]:
    """Qwen-Image-2.1 parameters per graph: ``quantizable`` (the weights the policies quantize),
    ``blocks`` (their INT4 scale count at the policy's block size, clipped per layer as the
    quantizer clips it), ``embedding`` / ``rows`` (the text encoder's lookup table) and ``all``."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from qwen_image2_ref.config import get_preset
    from qwen_image2_ref.encoder import build_qwen3vl_config
    from qwen_image2_ref.transformer import QwenImageTransformer
    from qwen_image2_ref.vae import QwenImageVAE
    from qwen_image_edge.calib.encoder_quant import EncoderQuantPolicy, block_size_for, select_layers
    from qwen_image_edge.calib.policy import Int4Policy, QuantPolicy
    from qwen_image_edge.export.graphs import TextEncoderGraph

    cfg = get_preset("qwen-image-2.1")
    with torch.device("meta"):
        transformer = QwenImageTransformer(cfg.transformer)
        vae = QwenImageVAE(cfg.vae)
        qwen = Qwen3VLForConditionalGeneration(build_qwen3vl_config(cfg.encoder))
    weights = lambda m, names: sum(m.get_submodule(n).weight.numel() for n in names)  # noqa: E731
    total = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731

    def blocks(m, names, policy) -> int:
        layers = [m.get_submodule(n) for n in names]
        return sum(x.weight.numel() // block_size_for(policy, x.in_features) for x in layers)

    text = TextEncoderGraph(qwen)
    t_layers, e_layers = QuantPolicy().select(transformer), select_layers(text, EncoderQuantPolicy())
    table = qwen.model.language_model.embed_tokens.weight
    t_all = {"quantizable": weights(transformer, t_layers), "all": total(transformer),
             "blocks": blocks(transformer, t_layers, Int4Policy())}
    none = {"quantizable": 0, "blocks": 0}
    return {
        "transformer": t_all, "transformer_prefill": t_all, "transformer_step": t_all,
        "text_encoder": {"quantizable": weights(text, e_layers), "blocks": blocks(text, e_layers, EncoderQuantPolicy()),
                         "embedding": table.numel(), "rows": table.shape[0], "all": total(qwen.model.language_model)},
        "vision_encoder": {**none, "all": total(qwen.model.visual)},
        "vae_decoder": {**none, "all": total(vae.decoder) + total(vae.post_quant_conv)},
        "vae_encoder": {**none, "all": total(vae.encoder) + total(vae.quant_conv)},
    }


def projected(params: dict[str, int], rate: dict[str, float]) -> float:
    """Full-size bytes of one graph. Block-wise INT4 weights: the codes' bytes per parameter and the
    bytes per scale the demo wrote, times the full-size parameter and block counts (the demo's narrow
    layers clip their blocks to two per row; full-size layers keep the policy's 128). The int8 table:
    its codes per parameter and bytes per row scale, times the full-size table. Other quantized
    weights: their measured bytes per parameter. The rest: its measured bytes per parameter."""
    quantized = params["quantizable"] if rate["quantized"] else 0
    if rate.get("blocked"):
        q = quantized * rate["codes"] + params["blocks"] * rate["scale"]
    else:
        q = quantized * rate["quantized"]
    table = params.get("embedding", 0) if rate.get("embedding") else 0
    e = table * rate.get("embedding", 0.0) + (params["rows"] * rate["row_scale"] if table else 0)
    return q + e + (params["all"] - quantized - table) * rate["rest"]


# ----------------------------------------------------------------------------- memory, adherence


def probe(export: str, memory: str) -> None:
    """(child process) one generation; prints the VmHWM cost in kB as JSON."""
    from qwen_image_edge.runtime.pipeline import Pipeline

    def hwm() -> int:
        return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmHWM:"))

    base = hwm()
    Pipeline.load(export, threads=1, verify_hashes=False, memory=memory).generate("a red circle", steps=2, seed=0)
    print(json.dumps({"cost_kb": hwm() - base, "peak_kb": hwm()}))


def peak_rss(export: Path, memory: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--probe", str(export), memory], capture_output=True,
                         text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def adherence(export: Path, n: int, steps: int, threads: int) -> tuple[dict[str, float], float]:
    from qwen_image2_ref.demo import data, judge
    from qwen_image_edge.runtime.pipeline import Pipeline

    pipe = Pipeline.load(export, threads=threads, verify_hashes=False)
    pairs = data.heldout_prompts(n, 1000)  # export/endtoend.py's held-out set
    images, start = [], time.perf_counter()
    for i, (_, caption) in enumerate(pairs):
        images.append(np.asarray(pipe.generate(caption, steps=steps, seed=i)))
    seconds = (time.perf_counter() - start) / n
    acc = judge.accuracy(images, [s for s, _ in pairs], JUDGE_KEYS)
    return {k: 100 * v for k, v in acc.items()}, seconds


# ----------------------------------------------------------------------------- report


def _mb(b: float) -> str:
    return f"{b / 1e6:9.2f}"


def _gb(b: float) -> str:
    return f"{b / 1e9:8.2f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=8, help="held-out prompts for adherence (64 for the issue's figure)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--calib-size", type=int, default=16)
    p.add_argument("--policies", default="fp32,int8,fp8,edge",
                   help="presets, int8 / fp8, or .json policy files (a part=precision list has commas)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=None, help="keep the exports here (reused when present)")
    p.add_argument("--probe", nargs=2, metavar=("EXPORT", "MEMORY"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        return probe(*args.probe)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("footprint").setLevel(logging.INFO)
    policies = args.policies.split(",")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="footprint-"))
    exports = make_exports(policies, work, args.calib_size)
    policies = list(exports)  # a policy file's column is its file name's stem
    sizes = {pol: graph_bytes(e) for pol, e in exports.items()}
    rates = {pol: group_rates(e) for pol, e in exports.items()}
    full = full_size_params()
    columns = policies[:1] + ["bf16"] + policies[1:] if "fp32" in policies else policies

    def demo_bytes(pol, g):
        return sizes["fp32"][g] / 2 if pol == "bf16" else sizes[pol].get(g, 0)

    def full_bytes(pol, g):
        return 2.0 * full[g]["all"] if pol == "bf16" else projected(full[g], rates[pol][g])

    for title, fn, fmt in (("demo model, measured (MB)", demo_bytes, _mb),
                           ("Qwen-Image-2.1, projected (GB)", full_bytes, _gb)):
        print(f"\n{title}; bf16 computed as 2 bytes per parameter")
        print(f"{'graph':20}" + "".join(f"{c:>10}" for c in columns))
        for g in PIPELINE_GRAPHS + PAIR_GRAPHS:
            print(f"{g:20}" + "".join(f"{fmt(fn(c, g)):>10}" for c in columns))
        totals = {c: sum(fn(c, g) for g in PIPELINE_GRAPHS) for c in columns}
        print(f"{'pipeline total':20}" + "".join(f"{fmt(totals[c]):>10}" for c in columns))
        if "bf16" in totals:
            print(f"{'x bf16':20}" + "".join(f"{totals[c] / totals['bf16']:10.3f}" for c in columns))
    print("\nbytes per parameter the demo exports wrote (quantized weights / rest; int8 table), per graph")
    for pol in policies:
        print(f"  {pol:6} " + ", ".join(f"{g} {r['quantized']:.3f}/{r['rest']:.2f}"
                                         + (f"; {r['embedding']:.3f}" if r["embedding"] else "")
                                         for g, r in rates[pol].items() if g in PIPELINE_GRAPHS))
    print("\npeak RSS of one generation (VmHWM over the imported runtime, MB): default vs low memory")
    for pol, e in exports.items():
        d, low = peak_rss(e, "default"), peak_rss(e, "low")
        print(f"  {pol:6} default {d['cost_kb'] / 1e3:8.1f}   low {low['cost_kb'] / 1e3:8.1f}   "
              f"(process peaks {d['peak_kb'] / 1e3:.0f} / {low['peak_kb'] / 1e3:.0f})")
    print(f"\nadherence on {args.n} held-out prompts, {args.steps} steps (points), seconds per image "
          f"(onnxruntime CPU, {args.threads} threads)")
    print(f"{'policy':8}" + "".join(f"{k:>12}" for k in JUDGE_KEYS) + f"{'s/image':>10}")
    results = {}
    for pol, e in exports.items():
        acc, seconds = adherence(e, args.n, args.steps, args.threads)
        results[pol] = acc
        print(f"{pol:8}" + "".join(f"{acc[k]:12.1f}" for k in JUDGE_KEYS) + f"{seconds:10.2f}", flush=True)
    if "fp32" in results:
        for pol, acc in results.items():
            drops = {k: results["fp32"][k] - acc[k] for k in ("color", "shape", "position")}
            print(f"  {pol}: drop vs fp32 " + ", ".join(f"{k} {v:+.1f}" for k, v in drops.items())
                  + ("  (within 3 points)" if max(drops.values()) <= 3 else "  (MORE than 3 points)"))


if __name__ == "__main__":
    main()
