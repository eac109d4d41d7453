"""Server assembly and lifecycle.

`build_server()` wires a gRPC server (Speech, the Google and Riva drop-ins of `server.vendors`,
health, reflection, the error interceptor) and
returns a handle with the bound port, so tests can run a real server on port 0 in-process.
`run()` is the production path: start listening with health NOT_SERVING, load and warm the
model on the model worker thread, switch to SERVING, wait for SIGTERM/SIGINT, then drain:
NOT_SERVING, refuse new work, finish what is queued and running within the grace period, then
end what is left at once (health Watch streams, reflection): the grace bounds the work, not idle
streams.

The model worker is a single thread: the only one that ever touches the accelerator.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from asr.v1 import asr_pb2, asr_pb2_grpc
from asr.vendors import google_speech_pb2_grpc, riva_asr_pb2_grpc
from server.batching import build_batcher
from server.batching.base import WindowBatcher
from server.calls import OpenCalls
from server.config import Settings
from server.health_watch import ClosingHealthServicer
from server.interceptors import ErrorInterceptor
from server.memory import HeapTrimmer
from server.metrics import Metrics
from server.models.base import SpeechModel
from server.recognizer import Recognizer, SpeechGate
from server.reflection import enable_reflection
from server.security import Access, server_credentials, server_options
from server.servicer import SpeechServicer
from server.speech import SpeechCore
from server.vendors import google, riva

log = logging.getLogger(__name__)

SPEECH_SERVICE = asr_pb2.DESCRIPTOR.services_by_name["Speech"].full_name
# Exit status after an unrecoverable error (EX_SOFTWARE): the orchestrator restarts the pod.
EXIT_UNRECOVERABLE = 70
# Every speech API served, over the same recognizer: ours and the drop-in vendor ones.
SPEECH_SERVICES = (SPEECH_SERVICE, google.SERVICE, riva.SERVICE)
STREAM_FINAL_S = 5.0  # of the grace period, kept for the finals of streams cut at shutdown
# Once our services' last responses are written: time for the health Watch streams to send their
# end; reflection and other long-lived calls still open after it are cancelled.
SETTLE_S = 1.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class ServerHandle:
    """A built server and the parts a test or `run()` needs to drive it."""

    server: grpc.aio.Server
    port: int
    settings: Settings
    servicer: SpeechCore  # the speech core every API edge (asr.v1, Google, Riva) stands on
    health: ClosingHealthServicer
    metrics: Metrics
    # Our services' open calls (the interceptor's): the drain ends the rest once none is open.
    calls: OpenCalls = field(default_factory=OpenCalls)
    worker: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="model-worker")
    )
    batcher: WindowBatcher | None = None
    # Set when the batcher hit an unrecoverable error (a sticky device fault, a crashed
    # engine loop): `run()` then drains and exits with EXIT_UNRECOVERABLE.
    failed: asyncio.Event = field(default_factory=asyncio.Event)
    failure: Exception | None = None
    trimmer: HeapTrimmer | None = None

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
        self.trimmer = HeapTrimmer(s.malloc_trim_s).start()
        self.metrics.queue_depth.set_function(lambda: batcher.depth)
        self.metrics.watch_engine(batcher.stats)
        self.metrics.watch_steps(getattr(batcher, "step_times", None))
        if s.warmup:  # the engine's own caches and kernels, on top of the model's warm-up
            started = time.monotonic()
            await batcher.warmup([1, s.max_batch_size])
            log.info("engine warmed up in %.1f s", time.monotonic() - started)
        step = getattr(batcher, "decode_step", "")
        if step:
            log.info("decode step: %s", step)
        gate = SpeechGate(s.no_speech_threshold, s.silence_dbfs)
        self.servicer.recognizer = Recognizer(
            model, self.batcher, s.max_audio_s, gate, max_windows=s.max_queue_size
        )
        await self.set_health(SERVING)

    async def drain_and_stop(self, grace_s: float) -> bool:
        """NOT_SERVING and refuse new calls at once; let open streams finalize the audio they
        sent, and queued and running work finish, within the grace period; then end what is
        left (health Watch streams, reflection) and stop. True if all work finished within the
        grace period."""
        deadline = time.monotonic() + grace_s
        # Refuse first, then tell the balancers: whoever sees NOT_SERVING is refused too.
        self.servicer.draining = True
        await self.set_health(NOT_SERVING)
        # Streams first, while the batcher still takes their finals: a client that half-closes
        # within the grace gets its final as usual; near its end, the streams still open stop
        # being read, get finals for what they sent, and end with UNAVAILABLE.
        close_after_s = grace_s - min(STREAM_FINAL_S, grace_s / 2)
        drained = await self.servicer.streams.wind_down(close_after_s, grace_s)
        if self.batcher is not None:
            left_s = max(0.0, deadline - time.monotonic())
            drained = await self.batcher.drain(left_s) and drained
        # The batcher is empty: what's left are our handlers writing their responses.
        drained = await self.calls.idle(deadline - time.monotonic()) and drained
        # Nothing of ours is open: Watch streams get their final NOT_SERVING and end, and what
        # still holds on (reflection, another Watch) is cancelled after SETTLE_S.
        await self.health.close()
        await self.server.stop(grace=min(SETTLE_S, max(0.0, deadline - time.monotonic())))
        if self.batcher is not None:
            await self.batcher.stop()
        self.worker.shutdown(wait=False, cancel_futures=True)
        return drained


async def build_server(settings: Settings) -> ServerHandle:
    """Create (not start) a server bound to settings.host:settings.port; NOT_SERVING until
    `serve_model()`."""
    metrics = Metrics()
    access = Access.from_settings(settings)  # reads the token file: fails before binding
    credentials = server_credentials(settings)
    interceptor = ErrorInterceptor(metrics, access)
    server = grpc.aio.server(
        interceptors=[interceptor],
        options=server_options(settings),
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    servicer = SpeechCore(settings, metrics)
    asr_pb2_grpc.add_SpeechServicer_to_server(SpeechServicer(servicer), server)
    google_speech_pb2_grpc.add_SpeechServicer_to_server(
        google.GoogleSpeechServicer(servicer), server
    )
    riva_asr_pb2_grpc.add_RivaSpeechRecognitionServicer_to_server(
        riva.RivaSpeechServicer(servicer), server
    )
    health_servicer = ClosingHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((*SPEECH_SERVICES, health.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.port}"
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"could not bind {settings.host}:{settings.port}")
    handle = ServerHandle(
        server, port, settings, servicer, health_servicer, metrics, calls=interceptor.calls
    )
    await handle.set_health(NOT_SERVING)
    return handle


async def run(settings: Settings) -> int:
    """The server's main: returns the process exit code."""
    from server.models.loader import load_model  # torch is imported here, not at module load

    try:
        handle = await build_server(settings)
    except (OSError, RuntimeError, ValueError) as err:  # RuntimeError: grpc's port in use
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, err)
        return 1
    await handle.server.start()
    log.info("listening on %s:%d (NOT_SERVING until the model is warm)", settings.host, handle.port)
    if settings.metrics_port >= 0:
        try:
            mport = handle.metrics.serve(settings.metrics_port, settings.metrics_bind_host)
        except OSError as err:
            log.error(
                "cannot serve metrics on %s:%d: %s (--metrics-port -1 turns them off)",
                settings.metrics_bind_host, settings.metrics_port, err.strerror or err,
            )  # fmt: skip
            await handle.drain_and_stop(0)
            return 1
        log.info("metrics on http://%s:%d/metrics", settings.metrics_bind_host, mport)
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
