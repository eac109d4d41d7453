"""The gRPC protocol client: it times one call with perf_counter and fires one Locust request
event; nothing else. What the event carries becomes a `loadgen.stats.Record` in the listener.

Also the checks made once before a run: wait for health SERVING, read GetServerInfo, and find
out whether the server implements StreamingRecognize (`--mode stream`). The request shapes of
each API (`--api`) are in `loadgen.apis`.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

import loadgen.green  # noqa: F401  (gevent patching before grpc is used)
from asr.v1 import asr_pb2, asr_pb2_grpc
from loadgen.apis import APIS
from loadgen.config import Connection, LevelPlan
from loadgen.dataset import Item, pcm16
from loadgen.errors import LoadgenError, UsageError
from loadgen.live import Arrival, PacedChunks, UtteranceFigures, analyze, behind, chunk, layout
from loadgen.stats import DROPPED, OK

MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class ServerNotReady(LoadgenError):
    """Health did not say SERVING within the wait."""


class ModeNotSupported(UsageError):
    """The server does not implement the RPC that `--mode` needs."""


class Dropped(Exception):
    """Locust's stats need an exception for a request that was not sent."""


class NoFinal(Exception):
    """A stream ended without a final result for one of its utterances."""


class BehindRealTime(Exception):
    """A live stream's chunks went out later than real time allows (flow control pushed back,
    or the generator could not keep up)."""


def make_channels(conn: Connection) -> list[grpc.Channel]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    if conn.channels > 1:  # otherwise equal channels share one connection
        options.append(("grpc.use_local_subchannel_pool", 1))
    if conn.tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=conn.ca_pem,
            private_key=conn.client_key_pem,
            certificate_chain=conn.client_cert_pem,
        )
        return [
            grpc.secure_channel(conn.target, credentials, options) for _ in range(conn.channels)
        ]
    return [grpc.insecure_channel(conn.target, options) for _ in range(conn.channels)]


class SpeechClient:
    """Sends one request per call over the process's channels, round robin."""

    def __init__(
        self,
        channels: list[grpc.Channel],
        fire: Callable[..., Any],
        conn: Connection,
        worker: str,
    ) -> None:
        self._api = APIS[conn.api]
        self._stubs = itertools.cycle([self._api.stub(c) for c in channels])
        self._fire = fire  # Locust's events.request.fire
        self._conn = conn
        self._worker = worker
        self._requests: dict[str, Any] = {}
        self._pcm: dict[str, tuple[bytes, int]] = {}
        if conn.mode == "stream":
            # Streams score each final as it arrives: load the normalizer (transformers, a
            # second or two) now, not on the event loop while other streams are being paced.
            from loadgen.wer import normalize

            normalize("warm up")

    def call(self, item: Item, start_perf: float, sent_ts: float, late_ms: float = 0.0) -> None:
        """One Recognize call; latency counts from start_perf (the scheduled time in open loop)."""
        stub = next(self._stubs)
        response: Any = None
        error: grpc.RpcError | None = None
        try:
            response = self._unary(stub, item)
        except grpc.RpcError as err:
            error = err
        latency_ms = (time.perf_counter() - start_perf) * 1000.0
        fields = _fields(
            item.id, item.audio_s, self._worker, sent_ts, latency_ms, late_ms, response, error
        )
        self._fire(
            request_type="grpc",
            name="Recognize",
            response_time=latency_ms,
            response_length=len(fields["transcript"]),
            exception=error,
            context={"loadgen": fields},
        )

    def dropped(self, item: Item, sent_ts: float, late_ms: float) -> None:
        """An open-loop arrival that was not sent: too many calls in flight here."""
        fields = {
            "item_id": item.id,
            "worker": self._worker,
            "sent_ts": sent_ts,
            "latency_ms": float("nan"),
            "status": DROPPED,
            "audio_s": item.audio_s,
            "late_ms": late_ms,
        }
        self._fire(
            request_type="grpc",
            name="dropped",
            response_time=0.0,
            response_length=0,
            exception=Dropped("too many calls in flight"),
            context={"loadgen": fields},
        )

    def _unary(self, stub: Any, item: Item) -> tuple[str, Any]:
        request = self._requests.get(item.id)
        if request is None:
            request = self._requests[item.id] = self._api.unary_request(item)
        return self._api.recognize(
            stub, request, timeout=self._conn.timeout_s, metadata=self._conn.metadata or None
        )

    def _pcm16(self, item: Item) -> tuple[bytes, int]:
        if item.id not in self._pcm:
            self._pcm[item.id] = pcm16(item)
        return self._pcm[item.id]

    def live(self, items: Sequence[Item], plan: LevelPlan, stream_id: str) -> None:
        """One live stream: the items' audio (silence between them) paced by plan.pace in
        plan.chunk_ms chunks, interim results on, read to the end; then one request event per
        figure (see `_fire_live`)."""
        stub = next(self._stubs)
        pcm, rate, spans = layout(
            [self._pcm16(i) for i in items], [i.id for i in items], plan.gap_ms / 1000
        )
        chunk_s = plan.chunk_ms / 1000
        paced = PacedChunks(chunk(pcm, rate, chunk_s), chunk_s, plan.pace)
        audio_s = len(pcm) / 2 / rate
        timeout_s = self._conn.timeout_s + (0 if math.isinf(plan.pace) else audio_s / plan.pace)
        arrivals: list[Arrival] = []
        error: grpc.RpcError | None = None
        epoch = time.time() - time.perf_counter()
        started = time.perf_counter()
        try:
            responses = stub.StreamingRecognize(
                self._api.live_requests(paced, rate, True, plan.interim_interval_ms),
                timeout=timeout_s,
                metadata=self._conn.metadata or None,
            )
            for response in responses:
                at = time.perf_counter()
                timing = self._api.timing(response)
                for r in response.results:
                    text = r.alternatives[0].transcript if r.alternatives else ""
                    end_s = self._api.result_end_s(r)
                    arrivals.append(Arrival(at, r.is_final, text.strip(), end_s, timing))
        except grpc.RpcError as err:
            error = err
        ended = time.perf_counter()
        figures = analyze(spans, paced, arrivals)
        late = behind(paced, plan.behind_ms / 1000)
        by_id = {i.id: i for i in items}
        for fig in figures:
            first = fig.first_sent if fig.first_sent is not None else started
            self._fire_live(fig, by_id[fig.span.item_id], stream_id, epoch + first,
                            ((fig.final_at or ended) - first) * 1000.0, late, error)  # fmt: skip
        if late:
            worst_ms = max(paced.lateness_s(), default=0.0) * 1000.0
            self._fire(
                request_type="stream",
                name="behind_real_time",
                response_time=worst_ms,
                response_length=0,
                exception=BehindRealTime(f"a chunk went out {worst_ms:.0f} ms late"),
            )

    def _fire_live(
        self,
        fig: UtteranceFigures,
        item: Item,
        stream_id: str,
        sent_ts: float,
        latency_ms: float,
        late: bool,
        error: grpc.RpcError | None,
    ) -> None:
        """The utterance's events: `final_lag` (which carries our record), `first_interim`,
        every `interim`, `flicker_words` and `final_wer` (response_time holds the count of
        retracted words and the WER in percent: Locust only has one number per event)."""
        got_final = fig.final_at is not None
        response = (fig.transcript, fig.timing) if got_final else None
        failure = None if got_final else error
        fields = _fields(
            item.id, item.audio_s, self._worker, sent_ts, latency_ms, 0.0, response, failure
        )
        exception: Exception | None = failure
        if response is None and failure is None:
            fields.update(status="NO_FINAL", error="the stream ended without a final")
            exception = NoFinal(fields["error"])
        nan = float("nan")
        fields.update(
            stream=stream_id,
            first_interim_ms=nan if fig.first_interim_ms is None else fig.first_interim_ms,
            interim_ms=tuple(fig.interim_ms),
            final_lag_ms=nan if fig.final_lag_ms is None else fig.final_lag_ms,
            flicker_words=fig.flicker_words,
            backlog_ms=fig.backlog_ms,
            behind=late,
        )
        fire = self._fire
        fire(request_type="stream", name="final_lag",
             response_time=fig.final_lag_ms if got_final else latency_ms,
             response_length=len(fig.transcript), exception=exception,
             context={"loadgen": fields})  # fmt: skip
        if fig.first_interim_ms is not None:
            fire(request_type="stream", name="first_interim",
                 response_time=fig.first_interim_ms, response_length=0)  # fmt: skip
        for ms in fig.interim_ms:
            fire(request_type="stream", name="interim", response_time=ms, response_length=0)
        if got_final:
            fire(request_type="stream", name="flicker_words",
                 response_time=fig.flicker_words, response_length=0)  # fmt: skip
            if item.reference:
                from loadgen.wer import word_error_rate

                wer = word_error_rate([item.reference], [fig.transcript])
                fire(request_type="stream", name="final_wer", response_time=100.0 * wer,
                     response_length=len(item.reference.split()))  # fmt: skip


def _ms(duration: Any) -> float:
    return float(duration.ToNanoseconds()) / 1e6


def _fields(
    item_id: str,
    audio_s: float,
    worker: str,
    sent_ts: float,
    latency_ms: float,
    late_ms: float,
    response: tuple[str, Any] | None,
    error: grpc.RpcError | None,
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "item_id": item_id,
        "worker": worker,
        "sent_ts": sent_ts,
        "latency_ms": latency_ms,
        "status": OK,
        "audio_s": audio_s,
        "late_ms": late_ms,
    }
    if error is not None:
        code = error.code() if hasattr(error, "code") else None
        fields["status"] = code.name if code is not None else "UNKNOWN"
        fields["error"] = (error.details() if hasattr(error, "details") else str(error)) or ""
        return fields
    assert response is not None
    text, timing = response
    fields["transcript"] = text
    if timing is not None:
        fields.update(
            queue_ms=_ms(timing.queue_time),
            infer_ms=_ms(timing.inference_time),
            server_ms=_ms(timing.total_time),
            batch_size=timing.batch_size,
            windows=timing.windows,
        )
        for name, proto_field in SPLIT_FIELDS.items():  # unset: a server that does not split
            if timing.HasField(proto_field):
                fields[name] = _ms(getattr(timing, proto_field))
    return fields


SPLIT_FIELDS = {
    "prepare_ms": "prepare_time",
    "wait_ms": "wait_time",
    "encode_ms": "encode_time",
    "decode_ms": "decode_time",
    "held_ms": "held_up_time",
}
"""Record field -> ServerTiming field of the server's timing split."""


def wait_until_serving(channel: grpc.Channel, timeout_s: float, api: str = "asr") -> None:
    """Block until the server's health says SERVING for the API's speech service. Uses Watch
    with wait_for_ready, so a server that is still starting is waited for, not polled."""
    health = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service=APIS[api].service)
    serving = health_pb2.HealthCheckResponse.SERVING
    try:
        for update in health.Watch(request, timeout=max(timeout_s, 0.1), wait_for_ready=True):
            if update.status == serving:
                return
    except grpc.RpcError as err:
        no_watch = err.code() == grpc.StatusCode.UNIMPLEMENTED
        if no_watch and health.Check(request, timeout=max(timeout_s, 0.1)).status == serving:
            return
        raise ServerNotReady(f"server not SERVING within {timeout_s:g} s: {err.details()}") from err
    raise ServerNotReady("health stream ended before the server said SERVING")


def server_info(channel: grpc.Channel, conn: Connection) -> dict[str, Any]:
    """asr.v1's GetServerInfo. With `--api google|riva` the target may be another vendor's
    server, which has no such rpc: then the report has no server facts."""
    stub = asr_pb2_grpc.SpeechStub(channel)
    try:
        info = stub.GetServerInfo(
            asr_pb2.GetServerInfoRequest(), timeout=30, metadata=conn.metadata or None
        )
    except grpc.RpcError as err:
        if conn.api != "asr" and err.code() == grpc.StatusCode.UNIMPLEMENTED:
            return {}
        raise
    return MessageToDict(info, preserving_proto_field_name=True)


def check_mode_supported(channel: grpc.Channel, conn: Connection) -> None:
    """For `--mode stream`: one short stream of silence; UNIMPLEMENTED means the server cannot
    be load-tested that way."""
    if conn.mode != "stream":
        return
    api = APIS[conn.api]
    silence = bytes(16000 * 2 // 10)  # 100 ms at 16 kHz
    try:
        api.stream(api.stub(channel), silence, 16000, timeout=30, metadata=conn.metadata or None)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.UNIMPLEMENTED:
            raise ModeNotSupported(
                f"--mode stream: the server at {conn.target} does not implement "
                f"StreamingRecognize (UNIMPLEMENTED: {err.details()}); use --mode unary"
            ) from err
        raise
