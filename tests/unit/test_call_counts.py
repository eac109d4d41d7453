"""`asr_requests_total` counts every call once, with the status its client saw: deadlines that
pass in the queue or during the upload, gRPC's own refusals (an oversize message, the concurrency
limit), not only what our handlers answer."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from asr.v1 import asr_pb2
from server.calls import DEADLINE_TOLERANCE_S, REFUSAL_WINDOW_S, Call, OpenCalls
from server.config import Settings
from server.embedded import EmbeddedServer
from server.models.fake import FakeModel
from tests.conftest import tone, wav_bytes

Req = asr_pb2.StreamingRecognizeRequest
Config = asr_pb2.RecognitionConfig
OVERSIZE = 65 * 1024 * 1024  # over the default 64 MiB --max-message-mb


def recognize_request(seconds: float = 1.0) -> asr_pb2.RecognizeRequest:
    audio = wav_bytes(tone(440, seconds, 16_000), 16_000)
    return asr_pb2.RecognizeRequest(audio=asr_pb2.RecognitionAudio(content=audio))


def counts(server: EmbeddedServer, method: str) -> Counter[str]:
    """The server's counts once every call it saw has ended (its open calls drop to zero)."""
    assert server.call(lambda h: h.calls.idle(30)) is True
    assert server.handle is not None
    registry = server.handle.metrics.registry
    found: Counter[str] = Counter()
    for code in grpc.StatusCode:
        value = registry.get_sample_value(
            "asr_requests_total", {"method": method, "code": code.name}
        )
        if value:
            found[code.name] = int(value)
    return found


def client_code(call) -> str:
    try:
        call()
    except grpc.RpcError as err:
        return err.code().name
    return "OK"


@pytest.fixture
def held():
    """A server whose model is held (the gate), so that work waits in the queue."""
    fake = FakeModel()
    fake.gate = threading.Event()
    server = EmbeddedServer(Settings(max_batch_size=1, max_wait_ms=1, max_queue_size=256), fake)
    server.start()
    yield server, fake
    fake.gate.set()
    server.stop()


def test_deadlines_that_pass_in_the_queue_are_all_deadline_exceeded(held):
    server, fake = held
    stub = server.stub()
    running = stub.Recognize.future(recognize_request(), timeout=60)
    assert fake.started.wait(10)
    request = recognize_request()
    with ThreadPoolExecutor(10) as pool:
        seen = list(pool.map(lambda _: client_code(lambda: stub.Recognize(request, timeout=1.5)),
                             range(10)))  # fmt: skip
    assert seen == ["DEADLINE_EXCEEDED"] * 10
    fake.gate.set()
    running.result()
    assert counts(server, "Recognize") == Counter({"DEADLINE_EXCEEDED": 10, "OK": 1})


def test_short_deadlines_are_counted_even_when_they_pass_during_the_upload(held, monkeypatch):
    """64 calls with a 50 ms deadline and 20 s of audio each: many end while their request is
    still arriving, before any handler could run; each is counted as its client saw it.

    Only calls that reach the application can be counted: on a loaded machine gRPC may drop a
    call whose deadline passes while it waits to be handed to the server's loop (the test
    counts the calls that reached the interceptor, and checks that every one was counted)."""
    reached = Counter[str]()
    open_call = OpenCalls.open

    def counting_open(self: OpenCalls, on_end: Callable[[], None]) -> None:
        reached["calls"] += 1
        open_call(self, on_end)

    monkeypatch.setattr(OpenCalls, "open", counting_open)
    server, fake = held
    stub = server.stub()
    # Connected first: a call whose deadline passes while the channel connects never reaches
    # the server, and no server can count it.
    stub.GetServerInfo(asr_pb2.GetServerInfoRequest(), timeout=30)
    request = recognize_request(20.0)

    def short_call(_: int) -> str:
        return client_code(lambda: stub.Recognize(request, timeout=0.05))

    with ThreadPoolExecutor(8) as pool:
        seen = Counter(pool.map(short_call, range(64)))
    fake.gate.set()
    assert seen == Counter({"DEADLINE_EXCEEDED": 64})
    counted = counts(server, "Recognize")
    assert counts(server, "GetServerInfo") == Counter({"OK": 1})
    assert counted == Counter({"DEADLINE_EXCEEDED": reached["calls"] - 1})
    assert reached["calls"] - 1 >= 32, f"only {reached['calls'] - 1} of 64 calls reached the server"


def test_an_oversize_unary_message_is_counted_resource_exhausted():
    server = EmbeddedServer(Settings(), FakeModel()).start()
    try:
        request = asr_pb2.RecognizeRequest(audio=asr_pb2.RecognitionAudio(content=bytes(OVERSIZE)))
        with pytest.raises(grpc.RpcError) as info:
            server.stub().Recognize(request, timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert counts(server, "Recognize") == Counter({"RESOURCE_EXHAUSTED": 1})
        assert server.stub().Recognize(recognize_request(), timeout=30).results  # serves on
    finally:
        server.stop()


def test_a_stream_whose_oversize_chunk_is_refused_is_counted_resource_exhausted():
    server = EmbeddedServer(Settings(), FakeModel()).start()
    try:
        config = Config(encoding=Config.LINEAR16, sample_rate_hertz=16_000)
        messages = [
            Req(streaming_config=asr_pb2.StreamingRecognitionConfig(config=config)),
            Req(audio_content=bytes(OVERSIZE)),
        ]
        with pytest.raises(grpc.RpcError) as info:
            list(server.stub().StreamingRecognize(iter(messages), timeout=60))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert counts(server, "StreamingRecognize") == Counter({"RESOURCE_EXHAUSTED": 1})
    finally:
        server.stop()


def test_the_concurrency_limit_of_grpc_is_counted_resource_exhausted():
    fake = FakeModel()
    fake.gate = threading.Event()
    server = EmbeddedServer(Settings(max_concurrent_rpcs=1), fake).start()
    try:
        stub = server.stub()
        running = stub.Recognize.future(recognize_request(), timeout=60)
        assert fake.started.wait(10)
        assert client_code(lambda: stub.Recognize(recognize_request(), timeout=30)) == (
            "RESOURCE_EXHAUSTED"
        )
        fake.gate.set()
        running.result()
        assert counts(server, "Recognize") == Counter({"RESOURCE_EXHAUSTED": 1, "OK": 1})
    finally:
        fake.gate.set()
        server.stop()


# -- the inference on its own, on a clock passed in ------------------------------------------
def test_a_cancel_just_before_the_deadline_is_the_deadline():
    call = Call("Recognize")
    call.begin(1.0)
    assert call.deadline is not None
    assert call.cut_short(call.deadline - DEADLINE_TOLERANCE_S / 2).name == "DEADLINE_EXCEEDED"
    assert call.cut_short(call.deadline - 0.5).name == "CANCELLED"
    assert not call.late(call.deadline - DEADLINE_TOLERANCE_S / 2)  # a response in time is OK


def test_a_cancel_right_after_the_request_ended_is_a_refusal():
    call = Call("StreamingRecognize")
    call.begin(None)
    call.input_ended()
    assert call.input_ended_at is not None
    assert call.cut_short(call.input_ended_at + 0.001).name == "RESOURCE_EXHAUSTED"
    assert call.cut_short(call.input_ended_at + REFUSAL_WINDOW_S + 1).name == "CANCELLED"
    assert Call("Recognize").cut_short().name == "RESOURCE_EXHAUSTED"  # no handler ever ran
