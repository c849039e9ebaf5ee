"""Low-memory mode: open each graph when its stage starts, release it when the next stage starts.

A generation runs three stages in order: ``encode`` (text encoder, and for edits the vision tower
and the VAE encoder), ``denoise`` (the transformer, or the KV-cache pair, and the sampler graph)
and ``decode`` (the VAE decoder). :class:`StagedSessions` is the ``sessions`` mapping the pipeline
reads: looking a graph up opens it if needed, and first releases every open graph of another
stage, so the encoders are gone before the transformer opens and the decoder opens only after
the transformer is released. Peak memory is then about the largest stage instead of the sum of
all graphs, at the cost of opening graphs again on every call (the default, all-resident mode is
for speed).

A backend session with a ``close()`` (TensorRT: its execution context, CUDA graph, buffers and
stream) is closed when released; the TensorRT backend's engines are per session, so releasing the
session releases its engine too. onnxruntime sessions free their weights and arenas when dropped.
Low-memory mode is meant for one call at a time: a concurrent call may reopen what another
released (correct, but the peak is then no longer one stage).
"""

from __future__ import annotations

import enum
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from qwen_image_edge.runtime.errors import ConfigError
from qwen_image_edge.runtime.manifest import GraphSpec

log = logging.getLogger(__name__)


class Memory(str, enum.Enum):
    DEFAULT = "default"  # every graph a generation uses opened at load and kept
    LOW = "low"  # staged: one stage's graphs at a time


STAGES: dict[str, str] = {
    "text_encoder": "encode",
    "vision_encoder": "encode",
    "vae_encoder": "encode",
    "transformer": "denoise",
    "transformer_prefill": "denoise",
    "transformer_step": "denoise",
    "sampler_step": "denoise",
    "vae_decoder": "decode",
}


def parse_memory(value: str | Memory) -> Memory:
    try:
        return Memory(value)
    except ValueError:
        raise ConfigError(f"memory {value!r}: expected one of {[m.value for m in Memory]}") from None


def stage_of(graph: str) -> str:
    return STAGES.get(graph, graph)  # a graph outside the table is a stage of its own


class StagedSessions(Mapping):
    """``name -> session`` over the graphs ``specs`` names; sessions open on first use per stage."""

    def __init__(self, open_graph: Callable[[GraphSpec, Path], object], specs: dict[str, tuple[GraphSpec, Path]]):
        self._open_graph = open_graph
        self._specs = dict(specs)
        self._open: dict[str, object] = {}
        self._lock = threading.Lock()
        self.opened = 0  # sessions opened over this object's life (a figure for tests and benchmarks)

    def __getitem__(self, name: str):
        if name not in self._specs:
            raise KeyError(name)
        with self._lock:
            session = self._open.get(name)
            if session is None:
                self._release_other_stages(stage_of(name))
                start = time.perf_counter()
                spec, path = self._specs[name]
                session = self._open[name] = self._open_graph(spec, path)
                self.opened += 1
                log.info("low memory: opened %s (stage %s) in %.2f s", name, stage_of(name),
                         time.perf_counter() - start)
            return session

    def __contains__(self, name) -> bool:
        return name in self._specs  # without opening it

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    @property
    def resident(self) -> tuple[str, ...]:
        """The graphs open now."""
        return tuple(self._open)

    def _release_other_stages(self, stage: str) -> None:
        for name in [n for n in self._open if stage_of(n) != stage]:
            session = self._open.pop(name)
            close = getattr(session, "close", None)
            if close is not None:
                close()
            del session
            log.info("low memory: released %s", name)
        gc.collect()  # sessions in reference cycles go now, not at some later collection

    def release(self) -> None:
        """Release every open graph (the next lookup opens again)."""
        with self._lock:
            self._release_other_stages(stage="")
