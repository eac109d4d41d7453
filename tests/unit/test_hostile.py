"""What hostile and unlucky clients broke (issue 14, section 1), through a real gRPC server on
loopback with the fake model, and the audio decoder directly: each test failed before its fix."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import tracemalloc

import grpc
import numpy as np
import pytest
import soundfile as sf

from asr.v1 import asr_pb2
from server.audio import SAMPLE_RATE, AudioFormat, Encoding, decode
from server.config import Settings
from server.embedded import EmbeddedServer
from server.errors import InvalidAudioError
from server.interceptors import ErrorInterceptor
from server.models.fake import FakeModel
from tests.conftest import tone, wav_bytes

Config = asr_pb2.RecognitionConfig
Req = asr_pb2.StreamingRecognizeRequest


def constant_flac(rate: int, channels: int, seconds: float, value: float = 0.25) -> bytes:
    """A legal FLAC of constant samples, written a second at a time (a few KB for minutes)."""
    buf = io.BytesIO()
    block = np.full((rate, channels), value, dtype=np.float32)
    with sf.SoundFile(buf, "w", rate, channels, "PCM_16", format="FLAC") as f:
        for _ in range(int(seconds)):
            f.write(block)
    return buf.getvalue()


@pytest.fixture
def fake():
    return FakeModel()


@pytest.fixture
def served(fake):
    server = EmbeddedServer(Settings(max_batch_size=4, max_queue_size=8, max_streams=2), fake)
    yield server.start()
    fake.gate = None
    server.stop()


def recognize(served, content: bytes, **config) -> asr_pb2.RecognizeResponse:
    request = asr_pb2.RecognizeRequest(
        config=Config(**config), audio=asr_pb2.RecognitionAudio(content=content)
    )
    return served.stub().Recognize(request, timeout=60)


def refused(served, content: bytes, **config) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        recognize(served, content, **config)
    return info.value


# -- 1.1 a small FLAC that declares a huge decode ---------------------------------------------
def test_a_flac_declaring_more_work_than_the_budget_is_refused_before_decoding():
    content = constant_flac(384_000, 8, 40)  # 123M samples: over 384k/s x 60 s
    assert len(content) < 200_000
    with pytest.raises(InvalidAudioError, match="rate x channels x duration"):
        decode(content, AudioFormat(), 60.0)


def test_file_decoding_memory_is_the_output_plus_a_block():
    content = constant_flac(48_000, 8, 30)  # 11.5M samples: 46 MB as one float32 array
    tracemalloc.start()
    try:
        out = decode(content, AudioFormat(), 600.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(out) == 30 * SAMPLE_RATE
    assert peak < 4 * out.nbytes + 8 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_a_flac_of_unknown_length_is_decoded_and_still_bounded():
    content = bytearray(wav_bytes(tone(440, 2.0, 16_000), 16_000, "PCM_16", "FLAC"))
    # STREAMINFO's 36-bit total_samples (bytes 21-25 after "fLaC" and the block header): 0.
    content[21] &= 0xF0
    content[22:26] = b"\x00\x00\x00\x00"
    out = decode(bytes(content), AudioFormat(), 600.0)
    assert 2 * SAMPLE_RATE - 4096 <= len(out) <= 2 * SAMPLE_RATE  # the last block may be lost
    with pytest.raises(InvalidAudioError, match="at most 1 s"):
        decode(bytes(content), AudioFormat(), 1.0)


# -- 1.5 cheap inputs, expensive work ---------------------------------------------------------
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_samples_are_refused(served, fake, value):
    samples = tone(440, 1.0, 16_000)
    samples[100] = value
    error = refused(served, wav_bytes(samples, 16_000, "FLOAT"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "NaN or infinite" in error.details()
    assert fake.batches == []


def test_samples_beyond_full_scale_are_clipped():
    samples = np.full(16_000, 1e38, dtype=np.float32)
    samples[::2] = -1e38
    out = decode(wav_bytes(samples, 16_000, "FLOAT"), AudioFormat(), 600.0)
    assert np.abs(out).max() <= 1.0


def test_constant_samples_are_silence_and_cost_no_model_time(served, fake):
    response = recognize(served, constant_flac(16_000, 1, 120))
    assert response.results == [] and response.timing.windows >= 4
    assert fake.batches == []


# -- 1.3 / 1.8 text fields and error messages --------------------------------------------------
def test_text_fields_are_bounded_in_bytes_and_checked_off_the_event_loop(served, fake):
    audio = wav_bytes(tone(440, 1.0, 16_000), 16_000)
    error = refused(served, audio, initial_prompt="word " * 200_000)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "initial_prompt is 1000000 bytes; at most 4096" in error.details()
    error = refused(served, audio, language_code="x" * 1_000_000)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(error.details()) < 100
    recognize(served, audio, initial_prompt="a short prompt")
    assert fake.check_threads and "test-server" not in fake.check_threads


def test_error_messages_cut_echoed_values_and_hold_no_reprs(served):
    audio = wav_bytes(tone(440, 1.0, 16_000), 16_000)
    error = refused(served, audio, model="m" * 200)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and len(error.details()) < 300
    error = refused(served, b"garbage, not audio" * 100)
    assert "0x" not in error.details() and "<_io" not in error.details()


# -- 1.7 a request that can never fit -----------------------------------------------------------
def test_audio_needing_more_windows_than_the_queue_is_invalid_not_retryable(served):
    error = refused(served, wav_bytes(tone(440, 300.0, 16_000), 16_000))  # 11 windows, queue 8
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 8" in error.details() and "never fit" in error.details()


# -- 1.10 the audio contract -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "config", "message"),
    [
        (wav_bytes(tone(440, 1.0, 16_000), 16_000), {"encoding": Config.OGG}, "is WAV, not OGG"),
        (wav_bytes(tone(440, 1.0, 16_000), 16_000), {"encoding": Config.FLAC}, "not FLAC"),
        (wav_bytes(tone(440, 1.0, 16_000), 16_000, fmt="AIFF"), {}, "is AIFF"),
        (wav_bytes(tone(440, 1.0, 16_000), 16_000), {"audio_channel_count": 2}, "header says 1"),
    ],
)
def test_encoding_and_channel_count_are_enforced_for_files(served, content, config, message):
    error = refused(served, content, **config)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()


def test_encoding_is_enforced_in_the_decoder_too():
    with pytest.raises(InvalidAudioError, match="not WAV"):
        decode(wav_bytes(tone(440, 1.0, 16_000), 16_000, fmt="FLAC"), AudioFormat(Encoding.WAV), 9)


# -- 1.9 metrics with the status the client saw -------------------------------------------------
def counted(served, method: str, code: str) -> float:
    metrics = served.handle.metrics
    return (
        metrics.registry.get_sample_value("asr_requests_total", {"method": method, "code": code})
        or 0.0
    )


def test_malformed_protobuf_is_invalid_argument_and_counted(served):
    call = served.channel().unary_unary("/asr.v1.Speech/Recognize")
    with pytest.raises(grpc.RpcError) as info:
        call(b"\xff\xff\xff\xff", timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid asr.v1.RecognizeRequest" in info.value.details()
    assert counted(served, "Recognize", "INVALID_ARGUMENT") == 1


def test_a_client_deadline_is_counted_as_deadline_exceeded(served, fake, monkeypatch):
    counted_event = threading.Event()
    original = ErrorInterceptor._count

    def count(self, method, code, started):
        original(self, method, code, started)
        counted_event.set()

    monkeypatch.setattr(ErrorInterceptor, "_count", count)
    fake.gate = threading.Event()
    request = asr_pb2.RecognizeRequest(
        audio=asr_pb2.RecognitionAudio(content=wav_bytes(tone(440, 1.0, 16_000), 16_000))
    )
    with pytest.raises(grpc.RpcError) as info:
        served.stub().Recognize(request, timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert counted_event.wait(10)
    fake.gate.set()
    assert counted(served, "Recognize", "DEADLINE_EXCEEDED") == 1
    assert counted(served, "Recognize", "CANCELLED") == 0


# -- 1.6 streams that hold slots for free ------------------------------------------------------
def config_message() -> Req:
    config = Config(encoding=Config.LINEAR16, sample_rate_hertz=16_000)
    return Req(streaming_config=asr_pb2.StreamingRecognitionConfig(config=config))


def test_a_stream_without_config_holds_a_counted_slot_and_is_timed_out():
    server = EmbeddedServer(Settings(max_streams=1, stream_idle_timeout_s=1), FakeModel()).start()
    release = threading.Event()
    opened = threading.Event()

    def nothing():
        opened.set()
        release.wait(30)
        yield from ()

    try:
        silent = server.stub().StreamingRecognize(nothing(), timeout=30)
        assert opened.wait(10)
        with pytest.raises(grpc.RpcError) as info:
            next(silent)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no streaming_config within 1 s" in info.value.details()
    finally:
        release.set()
        server.stop()


def test_empty_keepalives_do_not_extend_the_idle_timeout():
    server = EmbeddedServer(Settings(stream_idle_timeout_s=1), FakeModel()).start()
    release = threading.Event()

    def keepalives():
        yield config_message()
        while not release.wait(0.1):  # an empty message every 100 ms, for ever
            yield Req(audio_content=b"")

    try:
        with pytest.raises(grpc.RpcError) as info:
            list(server.stub().StreamingRecognize(keepalives(), timeout=30))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no audio for 1 s" in info.value.details()  # the server's, not the client's
    finally:
        release.set()
        server.stop()


# -- 1.11 a port in use --------------------------------------------------------------------------
@pytest.mark.slow  # a subprocess
def test_a_metrics_port_in_use_is_one_clear_line_and_exit_1(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0",
             "--metrics-port", str(port), "--cache-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in run.stderr


# -- 1.12 endpointing does not depend on the pace -------------------------------------------------
def pcm(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def finals_of(served, messages: list[Req]) -> list[tuple[int, int]]:
    responses = served.stub().StreamingRecognize(iter(messages), timeout=60)
    return [
        (r.result_start_time.ToMilliseconds(), r.result_end_time.ToMilliseconds())
        for resp in responses
        for r in resp.results
        if r.is_final
    ]


def test_audio_sent_at_once_is_endpointed_as_if_it_came_in_real_time(served):
    gap = np.zeros(32_000, dtype=np.float32)  # 2 s: past the endpointer's 1.2 s
    audio = pcm(np.concatenate([tone(300, 2.0, 16_000), gap] * 3))
    at_once = finals_of(served, [config_message(), Req(audio_content=audio)])
    paced = finals_of(
        served,
        [config_message()]
        + [Req(audio_content=audio[i : i + 3200]) for i in range(0, len(audio), 3200)],
    )
    assert len(at_once) == 3
    assert at_once == paced


def test_one_byte_messages_are_coalesced(served, monkeypatch):
    from server.streaming import PcmDecoder

    calls = []
    original = PcmDecoder.decode

    def decode(self, chunk, last=False):
        calls.append(len(chunk))
        return original(self, chunk, last)

    monkeypatch.setattr(PcmDecoder, "decode", decode)
    audio = pcm(tone(300, 0.5, 16_000))
    finals = finals_of(served, [config_message()] + [Req(audio_content=bytes([b])) for b in audio])
    assert len(finals) == 1 and finals[0][1] == 500
    assert len(calls) < len(audio) / 500  # one decode per 20 ms, not per byte


# -- 1.4 SIGTERM drains streams -------------------------------------------------------------------
class HeldStream:
    """A stream that sends 1 s of speech and keeps the call open until released."""

    def __init__(self, stub) -> None:
        self.release = threading.Event()
        self.sent = threading.Event()
        self.responses: list[asr_pb2.StreamingRecognizeResponse] = []
        self.error: grpc.RpcError | None = None

        def messages():
            yield config_message()
            yield Req(audio_content=pcm(tone(300, 1.0, 16_000)))
            self.sent.set()
            self.release.wait(30)

        self.call = stub.StreamingRecognize(messages(), timeout=30)
        self.thread = threading.Thread(target=self._read)
        self.thread.start()

    def _read(self) -> None:
        try:
            self.responses.extend(self.call)
        except grpc.RpcError as err:
            self.error = err

    def finals(self) -> list[str]:
        return [r.alternatives[0].transcript for p in self.responses for r in p.results]


async def _until(predicate) -> None:
    import asyncio

    while not predicate():  # polls the server's own state on its loop  # noqa: ASYNC110
        await asyncio.sleep(0.005)


def test_sigterm_lets_open_streams_finalize_what_they_sent(served):
    stub = served.stub()
    cut, closing = HeldStream(stub), HeldStream(stub)
    assert cut.sent.wait(10) and closing.sent.wait(10)
    served.call(lambda h: _until(lambda: h.servicer.streams.active == 2))
    drained: list[bool] = []
    drain = threading.Thread(target=lambda: drained.append(served.call(
        lambda h: h.drain_and_stop(2.0))))  # fmt: skip
    drain.start()
    served.call(lambda h: _until(lambda: h.servicer.draining))
    with pytest.raises(grpc.RpcError) as info:  # new calls are refused at once
        recognize(served, wav_bytes(tone(440, 1.0, 16_000), 16_000))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    closing.release.set()  # half-closes during the grace: its final, then OK
    closing.thread.join(10)
    assert closing.error is None and len(closing.finals()) == 1
    cut.thread.join(10)  # never half-closes: cut near the end of the grace, final first
    drain.join(10)
    assert len(cut.finals()) == 1 and cut.finals()[0].startswith("n=16000")
    assert cut.error is not None and cut.error.code() == grpc.StatusCode.UNAVAILABLE
    assert "1.0 s of audio received were finalized" in cut.error.details()
    assert drained == [True]
    cut.release.set()


def test_a_runaway_decode_stops_at_its_loop_and_keeps_the_phrase_once():
    import torch

    from server.models.whisper_step import DecodeSequence, GreedyRuntime
    from tests.unit.test_continuous import TinyWhisper

    runtime = GreedyRuntime(TinyWhisper(False), max_active=2)
    tokens = [3, 7, 8] + [5, 6] * 18  # 39 tokens ending in a 2-token loop
    seq = DecodeSequence("x", [runtime.sot], 440, "en", tokens=tokens, logprobs=[0.0] * 39)
    scores = torch.full((1, runtime.hf.config.vocab_size), -float("inf"))
    scores[0, 5] = 0.0  # the model goes on looping
    runtime._choose([seq], scores)
    assert seq.finished  # long before the 440-token limit
    assert runtime.result(seq).tokens == (3, 7, 8, 5, 6)
