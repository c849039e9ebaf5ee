"""TensorRT optimisation profiles from the manifest's IOSpecs and the user's ranges (pure functions).

Every symbolic dim of an export has a declared ``(min, opt, max)`` per graph (``qwen_image_edge.export.iospec``).
A build may narrow them: pixel sizes (``--min-res/--opt-res/--max-res``) fix ``h, w, H, W`` and
``N_t``, ``--max-batch`` fixes ``B``, ``--max-prompt-tokens`` fixes ``L_tok`` and ``L_enc``. The
derived symbols are recomputed from those, never narrowed on their own, so one profile stays
consistent across inputs and graphs::

    H = f h,  W = f w,  N_t = min(h w, the exported N_t)
    L_prefix = L_enc + N_c,  L = L_prefix + N_t          (componentwise on min, opt, max)

Condition images are resized to about ``output_resolution**2`` pixels whatever the target size,
so their symbols (``N_c``, the vision patch counts, the ``vae_encoder``'s ``hc, wc, Hc, Wc``) keep
the export's ranges, which cover every aspect ratio the export records (1:4 to 4:1 by default).

A requested range outside what the export declares is a :class:`ConfigError`: an engine cannot
accept shapes its ONNX graph was not exported for. Derived ranges are intersected with the
graph's declared ones (an export may declare a joint length tighter than the sum of its parts).
Symbols no option maps to keep the export's ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen_image_edge.runtime.errors import ConfigError
from qwen_image_edge.runtime.manifest import GraphSpec, Manifest

Range = tuple[int, int, int]
WantedRange = tuple[int, "int | None", int]  # opt None: the graph's declared opt, clamped
DERIVED = ("N_c", "L_prefix", "L")  # computed from the others; intersected with what a graph declares


@dataclass(frozen=True)
class BuildRanges:
    """What the user asked for; ``None`` keeps the export's own range."""

    min_res: int | None = None  # pixels, both sides
    opt_res: int | None = None
    max_res: int | None = None
    max_batch: int | None = None
    max_prompt_tokens: int | None = None


@dataclass(frozen=True)
class InputProfile:
    """``IOptimizationProfile.set_shape(name, min, opt, max)`` for one dynamic input."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def _add(a: Range, b: Range) -> Range:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


def _check_range(name: str, r: Range) -> Range:
    lo, opt, hi = r
    if not 0 <= lo <= opt <= hi:
        raise ConfigError(f"{name}: expected 0 <= min <= opt <= max, got ({lo}, {opt}, {hi})")
    return r


def _declared(manifest: Manifest, symbol: str) -> Range | None:
    """The widest declared range of ``symbol`` over all graphs (they agree on min and max)."""
    found = [g.dim_ranges[symbol] for g in manifest.graphs.values() if symbol in g.dim_ranges]
    if not found:
        return None
    return (min(r[0] for r in found), max(r[1] for r in found), max(r[2] for r in found))


def resolution_range(manifest: Manifest, req: BuildRanges) -> Range:
    """Pixel side range; defaults are the export's min resolution, longest side and output resolution."""
    img = manifest.image
    max_side, multiple = img.target.max_side, img.multiple
    lo = req.min_res if req.min_res is not None else img.min_resolution
    hi = req.max_res if req.max_res is not None else max_side
    opt = req.opt_res if req.opt_res is not None else min(max(img.output_resolution, lo), hi)
    for flag, value in (("--min-res", lo), ("--opt-res", opt), ("--max-res", hi)):
        if value % multiple or value <= 0:
            raise ConfigError(f"{flag} {value}: expected a positive multiple of {multiple} pixels")
    _check_range("resolution (--min-res, --opt-res, --max-res)", (lo, opt, hi))
    ex_lo, ex_hi = img.min_resolution, max_side
    if lo < ex_lo or hi > ex_hi:
        raise ConfigError(
            f"resolution {lo}..{hi} px: outside the exported range {ex_lo}..{ex_hi} px "
            "(re-export with a larger --max-resolution)"
        )
    return (lo, opt, hi)


def wanted_ranges(manifest: Manifest, req: BuildRanges) -> dict[str, WantedRange]:
    """One consistent range per symbol of the export, from the request (see the module docstring)."""
    f = manifest.vae_scale_factor
    res = resolution_range(manifest, req)
    side = (res[0] // f, res[1] // f, res[2] // f)
    out: dict[str, WantedRange] = {"h": side, "w": side, "H": res, "W": res}
    n_t = (side[0] * side[0], side[1] * side[1], side[2] * side[2])
    declared_nt = _declared(manifest, "N_t")
    if declared_nt is not None:  # a side past max_resolution exists only for non-square sizes of bounded area
        n_t = tuple(min(v, declared_nt[2]) for v in n_t)
    out["N_t"] = n_t
    declared_nc = _declared(manifest, "N_c")
    if declared_nc is not None:  # not narrowed by --max-res: condition sizes follow the output resolution
        out["N_c"] = declared_nc
    batch = _declared(manifest, "B")
    if batch is not None:
        if req.max_batch is not None:
            if req.max_batch < 1:
                raise ConfigError(f"--max-batch {req.max_batch}: expected >= 1")
            batch = (batch[0], batch[1], req.max_batch)
        out["B"] = (batch[0], None, batch[2])  # opt: each graph's own (1 for the VAE, 2 with guidance)
    for sym in ("L_tok", "L_enc"):
        declared = _declared(manifest, sym)
        if declared is None:
            continue
        if req.max_prompt_tokens is not None:
            if req.max_prompt_tokens < 1:
                raise ConfigError(f"--max-prompt-tokens {req.max_prompt_tokens}: expected >= 1")
            # the export's allowance for template tokens on top of the prompt is kept
            allowance = declared[2] - manifest.prompt.max_prompt_tokens
            hi = req.max_prompt_tokens + allowance
            declared = (declared[0], min(declared[1], hi), hi)
        out[sym] = declared
    if "L_enc" in out:
        out["L_prefix"] = _add(out["L_enc"], out.get("N_c", (0, 0, 0)))
        out["L"] = _add(out["L_prefix"], n_t)
    return out


def graph_ranges(graph: GraphSpec, wanted: dict[str, WantedRange]) -> dict[str, Range]:
    """``wanted`` restricted to ``graph``'s symbols, checked against what the graph declares.

    ``opt`` is clamped into the graph's accepted range (TensorRT requires min <= opt <= max).
    """
    out = {}
    for sym, declared in graph.dim_ranges.items():
        lo, opt, hi = wanted.get(sym, declared)
        opt = declared[1] if opt is None else opt
        if sym in DERIVED:  # an export may declare a tighter joint range than the sum of its parts
            lo, hi = max(lo, declared[0]), min(hi, declared[2])
        if lo < declared[0] or hi > declared[2]:
            raise ConfigError(
                f"graph {graph.name!r}: {sym} range [{lo}, {hi}] is outside the exported [{declared[0]}, {declared[2]}]"
            )
        if lo > hi:
            raise ConfigError(f"graph {graph.name!r}: {sym} range is empty (min {lo} > max {hi})")
        out[sym] = _check_range(f"graph {graph.name!r} {sym}", (lo, min(max(opt, lo), hi), hi))
    return out


def input_profiles(graph: GraphSpec, ranges: dict[str, Range]) -> list[InputProfile]:
    """min/opt/max shapes of every input with a symbolic dim (static inputs need no profile)."""
    profiles = []
    for t in graph.inputs:
        if all(isinstance(d, int) for d in t.dims):
            continue
        missing = [d for d in t.dims if isinstance(d, str) and d not in ranges]
        if missing:
            raise ConfigError(f"graph {graph.name!r} input {t.name!r}: no declared range for dims {missing}")
        shapes = [tuple(d if isinstance(d, int) else ranges[d][i] for d in t.dims) for i in range(3)]
        profiles.append(InputProfile(t.name, *shapes))
    return profiles
