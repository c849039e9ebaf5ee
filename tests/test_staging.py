"""Low-memory mode (runtime/staging.py): which graphs are open when, identical images, peak RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qwen_image_edge.runtime.errors import ConfigError
from qwen_image_edge.runtime.pipeline import Pipeline
from qwen_image_edge.runtime.staging import StagedSessions, parse_memory

ROOT = Path(__file__).resolve().parents[1]


class _Session:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def close(self) -> None:
        self.log.append(("close", self.name))


def _staged(names):
    log: list = []

    def open_graph(spec, path):
        log.append(("open", spec))
        return _Session(spec, log)

    return StagedSessions(open_graph, {n: (n, Path(n)) for n in names}), log


def test_stages_release_before_the_next_opens():
    sessions, log = _staged(["text_encoder", "vision_encoder", "transformer", "sampler_step", "vae_decoder"])
    assert "transformer" in sessions and sessions.resident == ()  # membership opens nothing
    sessions["vision_encoder"], sessions["text_encoder"], sessions["text_encoder"]
    sessions["transformer"], sessions["sampler_step"], sessions["transformer"]
    sessions["vae_decoder"]
    assert log == [("open", "vision_encoder"), ("open", "text_encoder"),
                   ("close", "vision_encoder"), ("close", "text_encoder"), ("open", "transformer"),
                   ("open", "sampler_step"),
                   ("close", "transformer"), ("close", "sampler_step"), ("open", "vae_decoder")]
    assert sessions.resident == ("vae_decoder",) and sessions.opened == 5
    with pytest.raises(KeyError):
        sessions["transformer_step"]  # not one of this pipeline's graphs
    sessions.release()
    assert sessions.resident == () and log[-1] == ("close", "vae_decoder")


def test_bad_memory_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="expected one of"):
        parse_memory("tiny")


def test_low_memory_images_equal_the_default(tiny_export, runtime_pipe):
    low = Pipeline.load(tiny_export[1], threads=1, memory="low")
    assert not low.uses_kv_cache  # the pair would hold the transformer twice
    for kw in ({"seed": 1}, {"seed": 2, "guidance": 3.0, "negative_prompt": "blurry", "width": 96}):
        ref = runtime_pipe.generate("a red cat", steps=3, output="np", **kw)
        single = Pipeline.load(tiny_export[1], threads=1, kv_cache=False).generate(
            "a red cat", steps=3, output="np", **kw)
        got = low.generate("a red cat", steps=3, output="np", **kw)
        np.testing.assert_array_equal(got, single)  # same graphs, same image
        np.testing.assert_allclose(got, ref, atol=1e-5)  # the pair vs the single graph: float order only
    assert low.sessions.resident == ("vae_decoder",)
    image = np.zeros((64, 64, 3), np.uint8)
    np.testing.assert_array_equal(low.edit(image, "make it blue", steps=2, seed=0, output="np"),
                                  Pipeline.load(tiny_export[1], threads=1, kv_cache=False)
                                  .edit(image, "make it blue", steps=2, seed=0, output="np"))


def _probe(*args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "tests.rss_probe", *args], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_low_memory_peak_is_the_largest_graph_plus_30_percent(demo_default_export, tmp_path):
    """VmHWM in fresh processes: a low-memory generation costs at most 1.3x the largest graph it
    opens (opened and run alone, on the feeds the generation gave it)."""
    feeds: dict[str, dict] = {}
    pipe = Pipeline.load(demo_default_export, threads=1, memory="low")
    opener = pipe.sessions._open_graph

    def recording(spec, path):
        session = opener(spec, path)
        run = session.run
        session.run = lambda f: (feeds.setdefault(spec.name, dict(f)), run(f))[1]
        return session

    pipe.sessions._open_graph = recording
    pipe.generate("a red circle on the left", steps=2, seed=3, output="np")
    graph_cost = {}
    for name, f in feeds.items():
        np.savez(tmp_path / f"{name}.npz", **f)
        r = _probe("graph", str(demo_default_export), name, str(tmp_path / f"{name}.npz"))
        graph_cost[name] = r["peak"] - r["baseline"]
    low, default = (_probe("generate", str(demo_default_export), m) for m in ("low", "default"))
    assert low["image_sum"] == default["image_sum"]
    low_cost, default_cost = low["peak"] - low["baseline"], default["peak"] - default["baseline"]
    largest = max(graph_cost.values())
    assert low_cost <= 1.3 * largest, (low_cost, graph_cost)
    assert default_cost > low_cost  # all-resident holds more than one stage at once


def test_run_low_memory_flag(tiny_export, tmp_path, monkeypatch):
    """`run --low-memory` loads with memory="low" and writes the staged pipeline's image."""
    from PIL import Image

    from qwen_image_edge.cli import main

    seen = {}
    load = Pipeline.load

    def spy(*args, **kwargs):
        seen["memory"] = kwargs.get("memory")
        return load(*args, **kwargs)

    monkeypatch.setattr(Pipeline, "load", spy)
    out = tmp_path / "low.png"
    assert main(["run", "--export", str(tiny_export[1]), "a red cat", "-o", str(out), "--seed", "4", "--steps", "2",
                 "--threads", "1", "--low-memory"]) == 0
    assert seen["memory"] == "low"
    want = load(tiny_export[1], threads=1, memory="low").generate("a red cat", steps=2, seed=4)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(want))


def test_tensorrt_low_memory_closes_each_stages_engines(tiny_export, trt, tmp_path):
    """TensorRT (the stand-in): the same images as all-resident engines; a released stage's sessions
    are closed (stream destroyed, buffers freed) and its engine deserialized again next time."""
    import shutil

    from qwen_image_edge.export.tensorrt import build_engines
    from qwen_image_edge.export.trt_profiles import BuildRanges
    from tests.cuda_standin import CUDART

    built = Path(shutil.copytree(tiny_export[1], tmp_path / "export"))
    build_engines(built, ranges=BuildRanges(max_res=64))
    kw = dict(width=64, height=32, steps=2, seed=3, output="np")
    resident = Pipeline.load(built, backend="tensorrt", kv_cache=False)
    ref = resident.generate("a red circle", **kw)
    streams_resident = len(CUDART.streams)
    low = Pipeline.load(built, backend="tensorrt", memory="low")
    before = trt.CALLS.count("deserialize_cuda_engine")
    for _ in range(2):
        np.testing.assert_array_equal(low.generate("a red circle", **kw), ref)
    used = {"text_encoder", "transformer", "vae_decoder"} | ({"sampler_step"} if low.device is not None else set())
    assert trt.CALLS.count("deserialize_cuda_engine") - before == 2 * len(used)  # reopened per call
    assert low.sessions.resident == ("vae_decoder",)
    assert len(CUDART.streams) - streams_resident <= 2  # the decoder's session (+ the loop's copy stream)
