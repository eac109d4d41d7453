"""Server assembly and lifecycle.

`build_server()` wires a gRPC server (Speech, the Google and Riva drop-ins of `server.vendors`,
health, reflection, the error interceptor) and
returns a handle with the bound port, so tests can run a real server on port 0 in-process.
`run()` is the production path: start listening with health NOT_SERVING, load and warm the
model on the model worker thread, switch to SERVING, wait for SIGTERM/SIGINT, then drain:
NOT_SERVING, refuse new work, finish what is queued and running within the grace period, stop.

The model worker is a single thread: the only one that ever touches the accelerator.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from asr.v1 import asr_pb2, asr_pb2_grpc
from asr.vendors import google_speech_pb2_grpc, riva_asr_pb2_grpc
from server.batching import build_batcher
from server.batching.base import WindowBatcher
from server.config import Settings
from server.interceptors import ErrorInterceptor
from server.metrics import Metrics
from server.models.base import SpeechModel
from server.recognizer import Recognizer, SpeechGate
from server.reflection import enable_reflection
from server.servicer import SpeechServicer
from server.vendors import google, riva

log = logging.getLogger(__name__)

SPEECH_SERVICE = asr_pb2.DESCRIPTOR.services_by_name["Speech"].full_name
# Exit status after an unrecoverable error (EX_SOFTWARE): the orchestrator restarts the pod.
EXIT_UNRECOVERABLE = 70
# Every speech API served, over the same recognizer: ours and the drop-in vendor ones.
SPEECH_SERVICES = (SPEECH_SERVICE, google.SERVICE, riva.SERVICE)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class ServerHandle:
    """A built server and the parts a test or `run()` needs to drive it."""

    server: grpc.aio.Server
    port: int
    settings: Settings
    servicer: SpeechServicer
    health: health.aio.HealthServicer
    metrics: Metrics
    worker: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="model-worker")
    )
    batcher: WindowBatcher | None = None
    # Set when the batcher hit an unrecoverable error (a sticky device fault, a crashed
    # engine loop): `run()` then drains and exits with EXIT_UNRECOVERABLE.
    failed: asyncio.Event = field(default_factory=asyncio.Event)
    failure: Exception | None = None

    def on_fatal(self, error: Exception) -> None:
        """The batcher can't go on (called on the event loop): NOT_SERVING at once, so
        balancers stop sending, and wake `run()` to drain and exit."""
        if self.failure is None:
            log.error("unrecoverable: %s; NOT_SERVING, draining, exiting", error)
            self.failure = error
            asyncio.get_running_loop().create_task(self.set_health(NOT_SERVING))
        self.failed.set()

    async def set_health(self, status: int) -> None:
        for service in ("", *SPEECH_SERVICES):
            await self.health.set(service, status)  # type: ignore[arg-type]

    async def serve_model(self, model: SpeechModel) -> None:
        """Put a loaded (and warmed) model behind the servicer and report SERVING."""
        s = self.settings
        batcher = build_batcher(s, model, self.worker, self.metrics.observe_batch, self.on_fatal)
        self.batcher = batcher
        batcher.start()
        self.metrics.queue_depth.set_function(lambda: batcher.depth)
        self.metrics.watch_engine(batcher.stats)
        if s.warmup:  # the engine's own caches and kernels, on top of the model's warm-up
            await batcher.warmup([1, s.max_batch_size])
        gate = SpeechGate(s.no_speech_threshold, s.silence_dbfs)
        self.servicer.recognizer = Recognizer(model, self.batcher, s.max_audio_s, gate)
        await self.set_health(SERVING)

    async def drain_and_stop(self, grace_s: float) -> bool:
        """NOT_SERVING, refuse new work, finish queued and running work, stop. True if all
        work finished within the grace period."""
        await self.set_health(NOT_SERVING)
        drained = True
        if self.batcher is not None:
            drained = await self.batcher.drain(grace_s)
        # The batcher is empty: what's left are handlers writing their responses.
        await self.server.stop(grace=min(grace_s, 5.0))
        if self.batcher is not None:
            await self.batcher.stop()
        self.worker.shutdown(wait=False, cancel_futures=True)
        return drained


async def build_server(settings: Settings) -> ServerHandle:
    """Create (not start) a server bound to settings.host:settings.port; NOT_SERVING until
    `serve_model()`."""
    metrics = Metrics()
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    if settings.max_connection_age_s > 0:
        # Clients behind a connection balancer reconnect (and so spread over the replicas)
        # after this age; gRPC core adds ±10% jitter. Calls in flight get the grace.
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * 1000)),
        ]
    server = grpc.aio.server(interceptors=[ErrorInterceptor(metrics)], options=options)
    servicer = SpeechServicer(settings, metrics)
    asr_pb2_grpc.add_SpeechServicer_to_server(servicer, server)
    google_speech_pb2_grpc.add_SpeechServicer_to_server(
        google.GoogleSpeechServicer(servicer), server
    )
    riva_asr_pb2_grpc.add_RivaSpeechRecognitionServicer_to_server(
        riva.RivaSpeechServicer(servicer), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((*SPEECH_SERVICES, health.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    if port == 0:
        raise OSError(f"could not bind {settings.host}:{settings.port}")
    handle = ServerHandle(server, port, settings, servicer, health_servicer, metrics)
    await handle.set_health(NOT_SERVING)
    return handle


async def run(settings: Settings) -> int:
    """The server's main: returns the process exit code."""
    from server.models.loader import load_model  # torch is imported here, not at module load

    handle = await build_server(settings)
    await handle.server.start()
    log.info("listening on %s:%d (NOT_SERVING until the model is warm)", settings.host, handle.port)
    if settings.metrics_port >= 0:
        mport = handle.metrics.serve(settings.metrics_port, settings.host)
        log.info("metrics on http://%s:%d/metrics", settings.host, mport)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loading: asyncio.Future[SpeechModel] = loop.run_in_executor(handle.worker, load_model, settings)
    stopping: asyncio.Future[bool] = asyncio.ensure_future(stop.wait())
    waiting: list[asyncio.Future[Any]] = [loading, stopping]
    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if loading not in done:
        log.info("stopped while loading the model")
        await handle.drain_and_stop(0)
        return 0
    try:
        model = loading.result()
    except Exception as err:
        log.error("could not load model %r: %s", settings.model, err)
        await handle.drain_and_stop(0)
        return 1
    await handle.serve_model(model)
    log.info("SERVING %s on %s", model.info.model_id, model.info.device)
    failing: asyncio.Future[Any] = asyncio.ensure_future(
        handle.failed.wait()
    )  # still pending: stopping
    await asyncio.wait([stopping, failing], return_when=asyncio.FIRST_COMPLETED)
    for waiter in (stopping, failing):
        waiter.cancel()
    log.info("draining (grace %.0f s)", settings.grace_s)
    drained = await handle.drain_and_stop(settings.grace_s)
    log.info("stopped%s", "" if drained else " (grace period ran out with work left)")
    if handle.failure is not None:
        log.error("exiting with %d: %s", EXIT_UNRECOVERABLE, handle.failure)
        return EXIT_UNRECOVERABLE
    return 0
