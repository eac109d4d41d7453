"""Shutdown with idle streams open: a health Watch (client-side health checking, Envoy, meshes)
and a reflection stream must not hold the grace period once the work is done."""

from __future__ import annotations

import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from asr.v1 import asr_pb2
from server.config import Settings
from server.embedded import EmbeddedServer
from server.models.fake import FakeModel
from tests.conftest import tone, wav_bytes

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GRACE_S = 60.0  # far longer than the test may take: the drain must not wait it out


class Watcher:
    """A Watch stream read in a thread: every status, and how the stream ended."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="asr.v1.Speech"), timeout=120
        )
        self.statuses: list[int] = []
        self.changed = threading.Condition()
        self.error: grpc.RpcError | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for reply in self.call:
                with self.changed:
                    self.statuses.append(reply.status)
                    self.changed.notify_all()
        except grpc.RpcError as err:
            self.error = err

    def wait_for(self, status: int) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: status in self.statuses, 30)


def test_drain_ends_idle_streams_once_the_work_is_done_not_at_the_grace():
    fake = FakeModel()
    fake.gate = threading.Event()
    server = EmbeddedServer(Settings(max_batch_size=4, max_wait_ms=5), fake).start()
    try:
        channel = server.channel()
        watch = Watcher(channel)
        assert watch.wait_for(SERVING)
        # A reflection stream the client never half-closes: also long-lived, also idle.
        requests_done = threading.Event()

        def reflection_requests():
            yield reflection_pb2.ServerReflectionRequest(list_services="")
            requests_done.wait(120)

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            reflection_requests(), timeout=120
        )
        assert next(reflection).list_services_response.service
        audio = wav_bytes(tone(440, 1.0, 16_000), 16_000)
        request = asr_pb2.RecognizeRequest(audio=asr_pb2.RecognitionAudio(content=audio))
        in_flight = server.stub().Recognize.future(request, timeout=120)
        assert fake.started.wait(10)
        drained: list[object] = []
        drain = threading.Thread(
            target=lambda: drained.append(server.call(lambda h: h.drain_and_stop(GRACE_S)))
        )
        drain.start()
        assert watch.wait_for(NOT_SERVING)  # health flips at once, work still running
        fake.gate.set()
        assert in_flight.result().results  # the work finishes...
        finished = time.monotonic()
        drain.join(GRACE_S)
        took_s = time.monotonic() - finished
        assert drained == [True]
        assert took_s < 10, f"the drain waited {took_s:.1f} s after the last response"
        watch.thread.join(10)
        # The Watch got its final NOT_SERVING and ended cleanly; reflection was cancelled.
        assert watch.statuses[-1] == NOT_SERVING and watch.error is None
        try:
            list(reflection)
        except grpc.RpcError as err:
            assert err.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        requests_done.set()
    finally:
        fake.gate.set()
        server.stop()


def test_drain_with_nothing_open_returns_at_once():
    server = EmbeddedServer(Settings(), FakeModel()).start()
    try:
        watch = Watcher(server.channel())
        assert watch.wait_for(SERVING)
        started = time.monotonic()
        assert server.call(lambda h: h.drain_and_stop(GRACE_S)) is True
        assert time.monotonic() - started < 5
        watch.thread.join(10)
        assert watch.statuses[-1] == NOT_SERVING and watch.error is None
    finally:
        server.stop()
