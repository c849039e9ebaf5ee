"""Per-call timings: each ``generate``/``edit`` call records its own :class:`GenerationStats`.

A call creates one, passes it down its own stack and hands it back with ``return_stats=True``
(as gpt-fast's ``generate`` returns its stats), so concurrent calls on one pipeline never share
timing state.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class GenerationStats:
    """Wall time of one call: seconds per run of each stage (a graph name, ``tokenize``, ``layout``,
    ``preprocess``, ``update``, ``to_image``), and of the whole call."""

    stages: dict[str, list[float]] = field(default_factory=dict)
    wall: float = 0.0  # seconds, the whole call

    def add(self, name: str, seconds: float) -> None:
        self.stages.setdefault(name, []).append(seconds)

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def seconds(self, name: str) -> float:
        """Total seconds spent in ``name`` (0 when it never ran)."""
        return sum(self.stages.get(name, ()))

    def calls(self, name: str) -> int:
        return len(self.stages.get(name, ()))
