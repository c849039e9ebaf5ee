"""``qwen-image-edge serve``: the torch-free runtime behind an HTTP API on Ray Serve (the ``serve`` extra).

Ray is imported here only, when the command runs; the runtime never imports it. Routes:
``POST /v1/generate`` (JSON), ``POST /v1/edit`` (multipart), ``GET /healthz``, ``GET /v1/model``.
Parsing and responses: ``serve_http``; the pipeline calls and batch grouping: ``serve_runner``.

With ``max_batch > 1`` generate requests wait up to ``batch_wait_ms`` in Ray Serve's batch queue
(``@serve.batch``) and the replica runs them in as few ``Pipeline.generate`` calls as their keys
allow; edits run one by one (each has its own condition images). Without ``address`` a local Ray
instance is started for the command and shut down with it; with one, the application is deployed
on that cluster and deleted when the command stops.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from ray import serve

from qwen_image_edge.runtime.errors import InputError
from qwen_image_edge.serve_http import (
    MAX_BODY_BYTES,
    BodyTooLarge,
    error_body,
    error_status,
    parse_edit,
    parse_generate,
    response_body,
)

log = logging.getLogger(__name__)

APP_NAME = "qwen-image-edge"


@dataclass(frozen=True)
class ServeOptions:
    export_dir: Path
    replicas: int = 1
    gpus_per_replica: float = 0.0
    threads: int = 1  # onnxruntime threads per replica, also the CPUs Ray reserves for it
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 4  # 1: no batching; at most the export's batch range
    batch_wait_ms: float = 20.0
    address: str | None = None  # an existing Ray cluster ("auto", "ray://host:10001", "host:6379"); None: local
    backend: str = "onnxruntime"
    providers: tuple[str, ...] | None = None
    verify_hashes: bool = True

    def check(self) -> None:
        """One-line errors before Ray starts."""
        for name, value, low in (("--replicas", self.replicas, 1), ("--threads", self.threads, 1),
                                 ("--max-batch", self.max_batch, 1), ("--port", self.port, 1)):
            if value < low:
                raise InputError(f"{name}: expected an integer >= {low}, got {value}")
        if self.port > 65535:
            raise InputError(f"--port: expected 1..65535, got {self.port}")
        if self.gpus_per_replica < 0:
            raise InputError(f"--gpus-per-replica: expected a number >= 0, got {self.gpus_per_replica}")
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise InputError(f"--batch-wait-ms: expected 0..10000 milliseconds, got {self.batch_wait_ms}")

    @property
    def max_ongoing(self) -> int:
        """Requests a replica holds at once: room for a full batch while the previous one runs."""
        return max(2 * self.max_batch, 8)


def _response(body: bytes, media_type: str, status: int = 200, headers: dict | None = None):
    from starlette.responses import Response

    return Response(body, status_code=status, media_type=media_type, headers=headers)


class ImageService:
    """The replica: one Runner (Pipeline) and the routes. Made a Ray Serve deployment by :func:`build_app`."""

    def __init__(self, options: ServeOptions):
        from qwen_image_edge.serve_runner import Runner

        logging.getLogger("qwen_image_edge").setLevel(logging.WARNING)
        self.runner = Runner.load(options.export_dir, backend=options.backend, threads=options.threads,
                                  providers=list(options.providers) if options.providers else None,
                                  verify_hashes=options.verify_hashes)
        batch = min(options.max_batch, self.runner.max_rows)  # a larger batch would only be split
        if batch < options.max_batch:
            log.warning("--max-batch %d: this export takes at most %d prompts a call; batches of %d",
                        options.max_batch, batch, batch)
        self.batching = batch > 1
        if self.batching:
            self._generate_batch.set_max_batch_size(batch)
            self._generate_batch.set_batch_wait_timeout_s(options.batch_wait_ms / 1000)

    async def __call__(self, request):
        path, method = request.url.path.rstrip("/") or "/", request.method
        try:
            if path == "/healthz" and method == "GET":
                return _response(b'{"status": "ok"}', "application/json")
            if path == "/v1/model" and method == "GET":
                return _response(json.dumps(self.runner.model_summary()).encode(), "application/json")
            if path in ("/v1/generate", "/v1/edit") and method == "POST":
                return await self._image(request, path)
            allowed = {"/healthz": "GET", "/v1/model": "GET", "/v1/generate": "POST", "/v1/edit": "POST"}
            if path in allowed:
                return _response(error_body(InputError(f"{path}: expected {allowed[path]}, got {method}")),
                                 "application/json", 405, {"Allow": allowed[path]})
            return _response(error_body(InputError(f"{path}: no such route; expected one of {sorted(allowed)}")),
                             "application/json", 404)
        except Exception as exc:  # every failure is one line and a status; never a traceback to the client
            status = error_status(exc)
            if status >= 500:
                log.exception("%s %s failed", method, path)
            return _response(error_body(exc), "application/json", status)

    async def _image(self, request, path: str):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise BodyTooLarge(f"request body: expected at most {MAX_BODY_BYTES} bytes, got {declared}")
        body = await request.body()
        accept = request.headers.get("accept", "")
        if path == "/v1/generate":
            job = self.runner.resolve(parse_generate(body, accept))
            self.runner.batch_key(job)  # the token limit checked before the job joins a batch
            if self.batching:
                result = await self._generate_batch(job)
            else:
                (result,) = await asyncio.to_thread(self.runner.generate, [job])
        else:
            # decoding the uploads takes a while for large images: off the event loop, like the pipeline
            job = await asyncio.to_thread(parse_edit, body, request.headers.get("content-type", ""), accept)
            job = self.runner.resolve(job)
            result = await asyncio.to_thread(self.runner.edit, job)
        if isinstance(result, Exception):
            raise result
        data, media = response_body(result.png, result.params, job.as_json)
        return _response(data, media, headers={"X-Batch-Size": str(result.batch_size)})

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.02)  # sizes set per replica in __init__
    async def _generate_batch(self, jobs):
        return await asyncio.to_thread(self.runner.generate, jobs)


def build_app(options: ServeOptions):
    """The Ray Serve application: ``options.replicas`` replicas of :class:`ImageService`."""
    from ray.serve.schema import LoggingConfig

    deployment = serve.deployment(
        name="ImageService", num_replicas=options.replicas, max_ongoing_requests=options.max_ongoing,
        ray_actor_options={"num_cpus": options.threads, "num_gpus": options.gpus_per_replica},
        max_constructor_retry_count=1,
        logging_config=LoggingConfig(log_level="WARNING", enable_access_log=False),
    )(ImageService)
    return deployment.bind(options)


def check_port_free(host: str, port: int) -> None:
    """The local proxy binds ``host:port``: refuse a taken port now, in one line, not deep inside Ray."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise InputError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None


def serve_forever(options: ServeOptions, ready=None) -> None:
    """Start Ray (or join ``options.address``), deploy, call ``ready(url)``, then wait for SIGINT/SIGTERM
    and shut down: a local Ray instance entirely, on a cluster only this application."""
    options.check()
    from qwen_image_edge.runtime.manifest import load_manifest

    load_manifest(options.export_dir, verify_hashes=False)  # a bad folder fails here, not in every replica
    local = options.address is None
    if local:
        check_port_free(options.host, options.port)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if logging.getLogger().level > logging.DEBUG:  # Ray Serve's INFO lines unless -vv
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    cpus = max(os.cpu_count() or 1, options.replicas * options.threads) if local else None
    ray.init(address=options.address, num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False, configure_logging=False)
    stop = threading.Event()
    # after ray.init (which sets its own SIGTERM handler), before the deploy: the proxy may answer
    # before serve.run returns, and a stop asked for then must not be lost
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": options.host, "port": options.port},
                    logging_config={"log_level": "WARNING", "enable_access_log": False})
        serve.run(build_app(options), name=APP_NAME, route_prefix="/")
        if ready is not None and not stop.is_set():
            ready(f"http://{options.host}:{options.port}")
        while not stop.wait(0.5):  # short waits: the handlers run between them
            pass
    finally:
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()
