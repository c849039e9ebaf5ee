"""Bounded load test of `qwen-image-edge serve` on 127.0.0.1: batching on against off, in one run.

Starts the service on a free local port with ``--max-batch B``, then with ``--max-batch 1``
(``--rounds`` times, alternating), sends a fixed number of generate requests at concurrency 1, 4
and 16 to each, prints throughput, p50 / p99 latency, failures and the mean batch size the
replicas reported, and stops every service (and its Ray instance) by itself. The requests share one prompt and differ in their seeds, so they can
share a batch (requests combine only with the same size, steps, guidance and prompt token counts).

    python bench/serve.py                                   # the demo export (made once, cached)
    python bench/serve.py --export demo-export --replicas 2 --requests 32 --steps 8 --size 64

``Service`` (a subprocess with its own Ray temp folder, and the processes it left behind) and
``post`` are also what tests/test_serve.py drives the service with.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

CONCURRENCY = (1, 4, 16)
PROMPT = "a red circle on the left on a white background"


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict
    body: bytes
    seconds: float


def post(url: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 300) -> Reply:
    """One HTTP request (POST with a body, else GET); an HTTP error status is a Reply too."""
    request = urllib.request.Request(url + path, data=body, headers=headers or {},
                                     method="POST" if body is not None else "GET")
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read(), time.perf_counter() - start)
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read(), time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every process (Linux /proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # exited meanwhile
                continue
            table[int(entry.name)] = (int(fields[1]), fields[19])  # ppid, starttime
    return table


def descendants(pid: int) -> dict[int, str]:
    """pid -> start time of every process below ``pid``."""
    table = _proc_table()
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, start) in table.items():
            if ppid == parent and child not in found:
                found[child] = start
                frontier.append(child)
    return found


class Service:
    """``qwen-image-edge serve EXPORT ARGS...`` on a free 127.0.0.1 port in a subprocess, with its own
    Ray temp folder (``RAY_TMPDIR``); ``stop()`` sends SIGTERM, ``leftovers()`` lists what survived."""

    def __init__(self, export_dir, *args: str, wait: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ray_tmp = tempfile.mkdtemp(prefix="qie-ray-", dir="/tmp")  # short: Ray's socket paths must fit
        self.log = tempfile.TemporaryFile()
        env = {**os.environ, "RAY_TMPDIR": self.ray_tmp, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "qwen_image_edge", "serve", str(export_dir), "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.tree: dict[int, str] = {}
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 240) -> None:
        """Until ``/healthz`` answers (Ray and the replicas take ~20 s on 2 cores); the processes then."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}: {self.output()[-3000:]}")
            try:
                if post(self.url, "/healthz", timeout=5).status == 200:
                    self.tree = descendants(self.proc.pid)  # Ray's processes, to check after the stop
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"serve not ready after {timeout} s: {self.output()[-3000:]}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM and wait; the exit code (killed, and -9, if it does not stop in time)."""
        if self.proc.poll() is None:
            self.tree.update(descendants(self.proc.pid))  # workers Ray started since it was ready
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return -9
        return self.proc.returncode

    def leftovers(self) -> list[str]:
        """Processes still running that this service started: its recorded descendants (same pid and
        start time) and anything whose command line names its Ray temp folder."""
        table = _proc_table()
        alive = [pid for pid, start in self.tree.items() if table.get(pid, (0, None))[1] == start]
        for pid in table:
            try:
                if self.ray_tmp.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    alive.append(pid)
            except OSError:
                continue
        return [f"{pid}: {_cmdline(pid)}" for pid in sorted(set(alive))]

    def close(self) -> None:
        self.stop()
        self.log.close()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return "(exited)"


def load(url: str, requests: int, concurrency: int, fields: dict, seed0: int) -> tuple[list[Reply], float]:
    """``requests`` generate calls, ``concurrency`` at a time: the replies and the wall time."""
    def one(i: int) -> Reply:
        body = json.dumps({"prompt": PROMPT, "seed": seed0 + i, **fields}).encode()
        try:
            return post(url, "/v1/generate", body, {"Content-Type": "application/json"})
        except OSError as exc:  # connection refused or reset: a failure, not a crash of the bench
            return Reply(0, {}, str(exc).encode(), 0.0)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        replies = list(pool.map(one, range(requests)))
    return replies, time.perf_counter() - start


def summary(replies: list[Reply], wall: float) -> dict:
    good = [r for r in replies if r.status == 200]
    latencies = sorted(r.seconds for r in good)
    batches = [int(r.headers.get("x-batch-size", 1)) for r in good]
    return {"requests": len(replies), "failures": len(replies) - len(good), "throughput": len(good) / wall,
            "p50": _percentile(latencies, 50), "p99": _percentile(latencies, 99),
            "batch": statistics.mean(batches) if batches else float("nan")}


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))  # nearest rank on sorted values
    return values[k]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", default=None, help="export directory (default: the demo export, made once)")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--requests", type=int, default=32,
                    help="requests per concurrency level and mode, split over the rounds (default: 32)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="services started per mode, on and off alternating, so that a drift in the machine's "
                    "load falls on both (default: 2)")
    ap.add_argument("--steps", type=int, default=8, help="denoising steps per request (default: 8)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default: the export's)")
    ap.add_argument("--max-batch", type=int, default=4,
                    help="batching on: --max-batch (default: 4, the exports' batch range)")
    ap.add_argument("--batch-wait-ms", type=float, default=20.0)
    args = ap.parse_args()
    export = args.export
    if export is None:
        from qwen_image_edge.export.demo import ensure_export

        export = ensure_export("demo")
    fields = {"steps": args.steps, **({"width": args.size, "height": args.size} if args.size else {})}
    modes = ((f"on (max {args.max_batch})", args.max_batch), ("off", 1))
    per_round = max(1, args.requests // args.rounds)
    runs: dict[tuple[str, int], tuple[list[Reply], float]] = {}
    for r in range(args.rounds):
        for label, batch in modes:
            with Service(export, "--replicas", str(args.replicas), "--max-batch", str(batch),
                         "--batch-wait-ms", str(args.batch_wait_ms)) as service:
                load(service.url, 2 * args.replicas, 2 * args.replicas, fields, 10_000)  # warm-up, not counted
                for c in CONCURRENCY:
                    replies, wall = load(service.url, per_round, c, fields, 1000 * c + per_round * r)
                    before = runs.get((label, c), ([], 0.0))
                    runs[label, c] = (before[0] + replies, before[1] + wall)
                code, left = service.stop(), service.leftovers()
            print(f"[round {r + 1}, batching {label}] service stopped with exit code {code}; Ray processes left: "
                  f"{len(left)}", file=sys.stderr)
    size = f"{args.size}x{args.size}" if args.size else "the export's default size"
    print(f"{args.replicas} replicas, {args.steps} steps, {size}, {per_round * args.rounds} requests per level "
          f"and mode over {args.rounds} rounds")
    print(f"{'batching':<12} {'concurrency':>11} {'requests':>8} {'failures':>8} {'img/s':>7} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'mean batch':>10}")
    rows = [(label, c, summary(*runs[label, c])) for c in CONCURRENCY for label, _ in modes]
    for label, c, r in rows:
        print(f"{label:<12} {c:>11} {r['requests']:>8} {r['failures']:>8} {r['throughput']:>7.2f} "
              f"{r['p50'] * 1000:>8.0f} {r['p99'] * 1000:>8.0f} {r['batch']:>10.2f}")
    return 0 if all(r["failures"] == 0 for *_, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
