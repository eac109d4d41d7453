"""The servicer and the app through a real gRPC server on loopback, with the fake model:
conversion, status codes, batching of concurrent calls, health, reflection, info."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from asr.v1 import asr_pb2
from server.config import Settings
from server.embedded import EmbeddedServer as ServerThread
from server.models.fake import FakeModel, describe
from tests.conftest import tone, wav_bytes

Config = asr_pb2.RecognitionConfig


@pytest.fixture
def fake():
    return FakeModel()


@pytest.fixture
def served(fake):
    server = ServerThread(Settings(max_batch_size=4, max_wait_ms=50, max_queue_size=8), fake)
    yield server.start()
    fake.gate = None
    server.stop()


def wav_request(seconds: float = 1.0, rate: int = 16_000) -> asr_pb2.RecognizeRequest:
    return asr_pb2.RecognizeRequest(
        audio=asr_pb2.RecognitionAudio(content=wav_bytes(tone(440, seconds, rate), rate))
    )


def test_recognize_returns_text_and_timing(served):
    response = served.stub().Recognize(wav_request(2.0), timeout=30)
    expected = describe(np.zeros(32_000))[:8]  # "n=32000 ": the fake saw 2 s at 16 kHz
    assert response.results[0].alternatives[0].transcript.startswith(expected)
    assert response.results[0].language_code == "en"
    assert response.results[0].result_end_time.ToNanoseconds() == 2_000_000_000
    assert response.timing.batch_size == 1
    assert response.timing.windows == 1
    assert response.timing.audio_duration.ToMilliseconds() == 2000
    assert (
        response.timing.total_time.ToNanoseconds() >= response.timing.inference_time.ToNanoseconds()
    )


def test_timing_split_adds_up_to_the_total(served, fake):
    """prepare + wait + decode + held up is the server's total, less building the response;
    the generate engine has no separate encoder time, so encode_time is unset."""
    fake.delay_s = 0.05  # model time per batch, so decode is more than noise
    t = served.stub().Recognize(wav_request(3.0), timeout=30).timing
    ms = {f: getattr(t, f).ToNanoseconds() / 1e6 for f in ("prepare_time", "wait_time",
          "decode_time", "held_up_time", "total_time", "inference_time")}  # fmt: skip
    assert not t.HasField("encode_time") and t.HasField("decode_time")
    assert ms["decode_time"] >= 50 and ms["decode_time"] == ms["inference_time"]
    assert ms["held_up_time"] == 0 and ms["prepare_time"] > 0
    parts = ms["prepare_time"] + ms["wait_time"] + ms["decode_time"] + ms["held_up_time"]
    assert parts <= ms["total_time"] <= parts + 20


def test_long_audio_is_split_into_windows_that_share_one_batch(served, fake):
    response = served.stub().Recognize(wav_request(70.0), timeout=60)
    assert response.timing.windows == 3
    assert len(response.results) == 3
    starts = [r.result_start_time.ToMilliseconds() for r in response.results]
    assert starts == sorted(starts) and starts[0] == 0
    assert fake.batches == [3]  # the three windows ran in one model call
    assert response.timing.batch_size == 3


def test_concurrent_requests_share_batches(served, fake):
    fake.gate = threading.Event()
    stub = served.stub()
    futures = [stub.Recognize.future(wav_request(1.0 + i / 10), timeout=30) for i in range(4)]
    assert fake.started.wait(10)
    fake.gate.set()
    responses = [f.result() for f in futures]
    # Each caller got its own result back (lengths differ per request).
    lengths = [r.results[0].alternatives[0].transcript.split()[0] for r in responses]
    assert lengths == [f"n={16_000 + i * 1_600}" for i in range(4)]
    assert max(r.timing.batch_size for r in responses) > 1


@pytest.mark.parametrize(
    ("config", "content", "message"),
    [
        (Config(), b"", "empty"),
        (Config(), b"garbage bytes, not audio" * 4, "not a WAV, FLAC, OGG or MP3"),
        (Config(encoding=Config.LINEAR16), b"\x00\x00" * 100, "needs sample_rate_hertz"),
        (Config(encoding=Config.LINEAR16, sample_rate_hertz=16_000), b"\x00" * 3, "whole number"),
        (Config(sample_rate_hertz=-5), b"\x00\x00", "negative"),
        (Config(encoding=Config.LINEAR16, sample_rate_hertz=10**9), b"\x00\x00", "between"),
        (Config(encoding=57), b"\x00\x00", "unknown audio encoding 57"),
        (Config(language_code="fr"), b"\x00\x00", "English-only"),
        (Config(model="whisper-huge"), b"\x00\x00", "not served here"),
        (Config(beam_size=99), b"\x00\x00", "beam_size"),
        (Config(temperature=3.0), b"\x00\x00", "temperature"),
    ],
)
def test_bad_input_gets_invalid_argument_and_the_server_keeps_serving(
    served, config, content, message
):
    stub = served.stub()
    request = asr_pb2.RecognizeRequest(
        config=config, audio=asr_pb2.RecognitionAudio(content=content)
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.Recognize(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()
    assert stub.Recognize(wav_request(), timeout=10).results  # still serving


def test_missing_audio_is_invalid(served):
    with pytest.raises(grpc.RpcError) as info:
        served.stub().Recognize(asr_pb2.RecognizeRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_too_long_audio_is_invalid():
    server = ServerThread(Settings(max_audio_s=5), FakeModel()).start()
    try:
        with pytest.raises(grpc.RpcError) as info:
            server.stub().Recognize(wav_request(6.0), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 5 s" in info.value.details()
    finally:
        server.stop()


def test_queue_full_gets_resource_exhausted(served, fake):
    fake.gate = threading.Event()
    stub = served.stub()
    running = stub.Recognize.future(wav_request(), timeout=30)
    assert fake.started.wait(10)
    # 8 windows fit in the queue (max_queue_size=8); a 9th request does not.
    queued = [stub.Recognize.future(wav_request(), timeout=30) for _ in range(8)]
    served.call(lambda h: _wait_depth(h, 8))
    with pytest.raises(grpc.RpcError) as info:
        stub.Recognize(wav_request(), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in info.value.details()
    fake.gate.set()
    assert all(f.result().results for f in [running, *queued])


async def _wait_depth(handle, depth: int) -> None:
    # Polls the server's own state on its loop (no fixed sleep decides the outcome).
    while handle.batcher.depth < depth:  # noqa: ASYNC110
        await asyncio.sleep(0.005)


def test_deadline_exceeded_while_queued(served, fake):
    fake.gate = threading.Event()
    stub = served.stub()
    running = stub.Recognize.future(wav_request(), timeout=30)
    assert fake.started.wait(10)
    with pytest.raises(grpc.RpcError) as info:
        stub.Recognize(wav_request(), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    fake.gate.set()
    running.result()
    assert len(fake.batches) == 1  # the expired request never reached the model


def test_model_failure_is_internal_without_traceback_and_server_recovers(served, fake):
    fake.fail_with = RuntimeError("secret internals")
    stub = served.stub()
    with pytest.raises(grpc.RpcError) as info:
        stub.Recognize(wav_request(), timeout=10)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "secret internals" not in info.value.details()
    assert "Traceback" not in info.value.details()
    fake.fail_with = None
    assert stub.Recognize(wav_request(), timeout=10).results


def test_server_info(served):
    info = served.stub().GetServerInfo(asr_pb2.GetServerInfoRequest(), timeout=10)
    assert info.model_id == "fake"
    assert info.max_batch_size == 4 and info.max_queue_size == 8 and info.max_wait_ms == 50
    assert info.server_version and info.torch_version and info.transformers_version
    # The fake model has no step-by-step decoder: the micro-batcher serves it.
    assert (info.engine, info.max_active) == ("generate", 0)


def test_server_info_reports_the_limits_a_client_may_hit():
    settings = Settings(
        max_streams=7,
        max_beam_size=3,
        max_stream_s=900,
        stream_buffer_s=12,
        stream_idle_timeout_s=9,
        endpoint_silence_ms=500,
        interim_interval_ms=400,
        no_speech_threshold=0.4,
        silence_dbfs=-55,
        max_new_tokens=200,
    )
    server = ServerThread(settings, FakeModel()).start()
    try:
        info = server.stub().GetServerInfo(asr_pb2.GetServerInfoRequest(), timeout=10)
    finally:
        server.stop()
    assert (info.max_streams, info.max_beam_size, info.max_new_tokens) == (7, 3, 200)
    assert info.max_stream_duration_s == 900
    assert (info.stream_buffer_s, info.stream_idle_timeout_s) == (12, 9)
    assert (info.endpoint_silence_ms, info.interim_interval_ms) == (500, 400)
    assert info.no_speech_threshold == pytest.approx(0.4)
    assert info.silence_dbfs == -55


def test_health_serving_for_overall_and_speech(served):
    stub = health_pb2_grpc.HealthStub(served.channel())
    for service in ("", "asr.v1.Speech"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(served):
    stub = reflection_pb2_grpc.ServerReflectionStub(served.channel())
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = next(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in reply.list_services_response.service}
    assert {"asr.v1.Speech", "grpc.health.v1.Health"} <= names


def test_requests_are_counted_by_status(served):
    stub = served.stub()
    stub.Recognize(wav_request(), timeout=10)
    with pytest.raises(grpc.RpcError):
        stub.Recognize(asr_pb2.RecognizeRequest(), timeout=10)
    registry = served.handle.metrics.registry
    ok = registry.get_sample_value("asr_requests_total", {"method": "Recognize", "code": "OK"})
    bad = registry.get_sample_value(
        "asr_requests_total", {"method": "Recognize", "code": "INVALID_ARGUMENT"}
    )
    assert ok == 1 and bad == 1
    assert registry.get_sample_value("asr_audio_seconds_total") == pytest.approx(1.0)
    # A fast rejection is an error, not a quick request: latency counts successes only.
    timed = {"method": "Recognize"}
    assert registry.get_sample_value("asr_request_seconds_count", timed) == 1


def test_many_parallel_clients_get_their_own_results():
    # A queue with room for every client: this test is about routing, not back-pressure.
    server = ServerThread(Settings(max_batch_size=4, max_wait_ms=5, max_queue_size=64), FakeModel())
    server.start()
    try:
        stub = server.stub()
        durations = [0.5 + i * 0.25 for i in range(12)]
        with ThreadPoolExecutor(12) as pool:
            responses = list(
                pool.map(lambda s: stub.Recognize(wav_request(s), timeout=30), durations)
            )
    finally:
        server.stop()
    got = [r.results[0].alternatives[0].transcript.split()[0] for r in responses]
    assert got == [f"n={int(s * 16_000)}" for s in durations]


def test_speech_gates_come_from_settings():
    server = ServerThread(Settings(no_speech_threshold=0.25, silence_dbfs=-30), FakeModel()).start()
    try:
        gate = server.handle.servicer.recognizer.gate
        assert (gate.no_speech_threshold, gate.silence_dbfs) == (0.25, -30)
        quiet = wav_bytes(tone(440, 1.0, 16_000) * 0.001, 16_000)  # about -63 dBFS
        response = server.stub().Recognize(
            asr_pb2.RecognizeRequest(audio=asr_pb2.RecognitionAudio(content=quiet)), timeout=10
        )
        assert not response.results  # below the gate: not decoded, no text
        assert response.timing.windows == 1 and response.timing.batch_size == 0
    finally:
        server.stop()


def test_audio_times_are_whole_milliseconds_and_timings_microseconds():
    from server.edge import audio_time, duration

    assert audio_time(1.059999943).ToJsonString() == "1.060s"
    assert audio_time(0.0004).ToJsonString() == "0s"
    assert duration(0.0001907291).ToJsonString() == "0.000191s"
