"""Streaming: the utterance state machine, the PCM decoder, and the protocol through a real
gRPC server on loopback with the fake model (codes, limits, cancellation)."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from asr.v1 import asr_pb2
from server.config import Settings
from server.embedded import EmbeddedServer
from server.models.fake import FakeModel
from server.streaming import LEAD_IN_S, PcmDecoder, StreamSettings, Utterance
from tests.conftest import tone

Config = asr_pb2.RecognitionConfig
Req = asr_pb2.StreamingRecognizeRequest


def pcm(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


# -- the utterance state machine -------------------------------------------------------------
def cfg(**kw) -> StreamSettings:
    return StreamSettings(sample_rate_hz=16_000, **kw)


def test_silence_alone_is_never_an_utterance_and_is_not_kept():
    u = Utterance(cfg(interim_results=True))
    u.push(np.zeros(16_000 * 5, dtype=np.float32))
    assert u.endpoint(closing=True) is None
    assert not u.wants_interim()
    assert u.duration_s <= LEAD_IN_S and u.start_s == pytest.approx(5 - LEAD_IN_S)


def test_the_silence_before_early_speech_is_kept_as_a_whole_file_would_have_it():
    """Speech 1.5 s into a stream: the utterance starts at 0, like the same audio sent to
    Recognize (a trimmed lead-in changed what Whisper transcribed)."""
    u = Utterance(cfg())
    u.push(np.zeros(24_000, dtype=np.float32))
    u.push(tone(300, 1.0, 16_000))
    samples, start = u.take(u.endpoint(closing=True) or 0)
    assert start == 0.0 and len(samples) == 40_000


def test_a_pause_inside_a_sentence_does_not_end_the_utterance_by_default():
    """Read speech pauses up to about a second mid-sentence (LibriSpeech); Whisper does
    worse on the pieces than on the sentence, so the default endpoint waits longer."""
    u = Utterance(cfg())
    u.push(tone(300, 1.0, 16_000))
    u.push(np.zeros(16_000, dtype=np.float32))
    assert u.endpoint(closing=False) is None
    assert Settings().endpoint_silence_ms == 1000 * cfg().endpoint_silence_s > 1000


def test_speech_then_silence_ends_an_utterance():
    u = Utterance(cfg(endpoint_silence_s=0.5))
    u.push(tone(300, 1.0, 16_000))
    assert u.endpoint(closing=False) is None
    u.push(np.zeros(int(16_000 * 0.6), dtype=np.float32))
    cut = u.endpoint(closing=False)
    assert cut == len(u.audio)
    samples, start = u.take(cut)
    assert len(samples) == 16_000 * 1.6 and start == 0.0
    assert not u.speech_seen and u.start_s == pytest.approx(1.6)


def test_long_speech_is_cut_before_30s_at_a_quiet_point():
    u = Utterance(cfg())
    speech = tone(300, 29.0, 16_000)
    speech[16_000 * 25 : 16_000 * 25 + 1_600] = 0  # a short pause at 25 s
    u.push(speech)
    cut = u.endpoint(closing=False)
    assert cut is not None and 16_000 * 25 <= cut <= 16_000 * 25 + 1_600
    u.take(cut)
    assert u.speech_seen  # the carried-over rest is speech, re-classified


def test_interims_follow_the_interval():
    u = Utterance(cfg(interim_results=True, interim_interval_s=1.0))
    u.push(tone(300, 0.5, 16_000))
    assert not u.wants_interim()
    u.push(tone(300, 0.6, 16_000))
    assert u.wants_interim()


def test_local_agreement_commits_what_two_hypotheses_share_and_never_flickers():
    u = Utterance(cfg())
    assert u.agree("the cat") == ("the cat", 0.0)
    assert u.agree("the cat sat") == ("the cat sat", pytest.approx(2 / 3))
    # A later hypothesis rewrites a committed word: the committed prefix stays on screen.
    text, stability = u.agree("a cat sat on")
    assert text.startswith("the cat") and stability > 0
    assert u.committed == ["the", "cat"]


def test_pcm_decoder_keeps_a_frame_split_across_chunks_and_resamples():
    d = PcmDecoder(StreamSettings(sample_rate_hz=8_000, channels=2))
    stereo = np.repeat(tone(440, 1.0, 8_000)[:, None], 2, axis=1)
    data = pcm(stereo)
    out = np.concatenate([d.decode(data[:1001]), d.decode(data[1001:]), d.decode(b"", last=True)])
    assert abs(len(out) - 16_000) < 40
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spectrum) * 16_000 / len(out) - 440) < 5


def test_bad_stream_rate_is_invalid():
    from server.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="sample_rate_hertz"):
        StreamSettings(sample_rate_hz=0)


# -- the protocol, through gRPC --------------------------------------------------------------
@pytest.fixture
def served():
    model = FakeModel()
    server = EmbeddedServer(Settings(max_streams=2, max_wait_ms=5), model).start()
    server.model = model  # type: ignore[attr-defined]
    yield server
    model.gate = None
    server.stop()


def config_message(rate: int = 16_000, **kw) -> Req:
    config = Config(encoding=Config.LINEAR16, sample_rate_hertz=rate)
    return Req(streaming_config=asr_pb2.StreamingRecognitionConfig(config=config, **kw))


def speech(seconds: float) -> list[Req]:
    audio = pcm(tone(300, seconds, 16_000))
    return [Req(audio_content=audio[i : i + 3200]) for i in range(0, len(audio), 3200)]


def test_a_stream_gets_a_final_on_half_close(served):
    responses = list(served.stub().StreamingRecognize(iter([config_message(), *speech(1.0)])))
    finals = [r for resp in responses for r in resp.results if r.is_final]
    assert len(finals) == 1
    assert finals[0].alternatives[0].transcript.startswith("n=")
    assert finals[0].result_end_time.ToMilliseconds() == 1000
    assert responses[-1].timing.batch_size >= 1


def test_single_utterance_ends_with_the_event(served):
    silence = Req(audio_content=pcm(np.zeros(16_000)))
    messages = [config_message(single_utterance=True), *speech(1.0), silence, *speech(1.0)]
    responses = list(served.stub().StreamingRecognize(iter(messages)))
    finals = [r for resp in responses for r in resp.results if r.is_final]
    assert len(finals) == 1
    assert responses[-1].speech_event_type == (
        asr_pb2.StreamingRecognizeResponse.END_OF_SINGLE_UTTERANCE
    )


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([Req(audio_content=b"\x00\x00")], "first message must carry streaming_config"),
        ([config_message(), config_message()], "only be sent once"),
        ([Req(streaming_config=asr_pb2.StreamingRecognitionConfig())], "config is required"),
        ([config_message(rate=0)], "sample_rate_hertz"),
        ([Req(streaming_config=asr_pb2.StreamingRecognitionConfig(
            config=Config(encoding=Config.FLAC, sample_rate_hertz=16_000)))], "LINEAR16"),
    ],
)  # fmt: skip
def test_protocol_errors_are_invalid_argument(served, messages, message):
    with pytest.raises(grpc.RpcError) as info:
        list(served.stub().StreamingRecognize(iter(messages), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


class HeldStream:
    """A stream whose client keeps it open until released."""

    def __init__(self, stub) -> None:
        self.release = threading.Event()
        self.sent = threading.Event()

        def messages():
            yield config_message()
            yield speech(0.2)[0]
            self.sent.set()
            self.release.wait(30)

        self.call = stub.StreamingRecognize(messages(), timeout=30)


def test_stream_limit_and_a_cancelled_stream_frees_its_slot(served):
    stub = served.stub()
    held = [HeldStream(stub), HeldStream(stub)]
    for h in held:
        assert h.sent.wait(10)
    served.call(lambda h: _wait_streams(h, 2))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamingRecognize(iter([config_message(), *speech(0.2)]), timeout=10))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too many concurrent streams" in info.value.details()
    held[0].call.cancel()  # the client goes away: its slot is free at once
    served.call(lambda h: _wait_streams(h, 1))
    responses = list(stub.StreamingRecognize(iter([config_message(), *speech(0.5)]), timeout=10))
    assert any(r.is_final for resp in responses for r in resp.results)
    held[1].release.set()
    list(held[1].call)


async def _wait_streams(handle, active: int) -> None:
    import asyncio

    # Polls the server's own state on its loop (no fixed sleep decides the outcome).
    while handle.servicer.streams.active != active:  # noqa: ASYNC110
        await asyncio.sleep(0.005)


def test_idle_stream_is_closed_with_deadline_exceeded():
    server = EmbeddedServer(Settings(stream_idle_timeout_s=1), FakeModel()).start()
    release = threading.Event()

    def messages():
        yield config_message()
        release.wait(30)

    try:
        with pytest.raises(grpc.RpcError) as info:
            list(server.stub().StreamingRecognize(messages(), timeout=30))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no audio for 1 s" in info.value.details()
    finally:
        release.set()
        server.stop()


# -- the decode loop against a scripted recognizer ---------------------------------------------
class ScriptedRecognizer:
    """Finals answer at once; interims (background decodes) hang until cancelled."""

    room = 8

    def __init__(self) -> None:
        import asyncio

        self.interim_started = asyncio.Event()
        self.interim_cancelled = asyncio.Event()

    async def recognize_samples(self, samples, options, background=False, offset_s=0.0):
        import asyncio

        from server.recognizer import Recognition, Segment, Timing

        if background:
            self.interim_started.set()
            try:
                await asyncio.Event().wait()  # a decode that would take forever
            except asyncio.CancelledError:
                self.interim_cancelled.set()
                raise
        seconds = len(samples) / 16_000
        segment = Segment(f"{seconds:.1f} s", offset_s, offset_s + seconds, "en", 0.9, 0.0, ())
        return Recognition([segment], Timing(0.0, 0.0, 0.0, 1, seconds, 1))


class RecordingRecognizer:
    """Answers every decode at once with the same tokens; records each call's draft."""

    room = 8

    def __init__(self) -> None:
        self.calls: list[tuple[bool, tuple[int, ...]]] = []

    async def recognize_samples(self, samples, options, background=False, offset_s=0.0):
        from server.recognizer import Recognition, Segment, Timing

        self.calls.append((background, options.draft))
        seconds = len(samples) / 16_000
        segment = Segment("w", offset_s, offset_s + seconds, "en", 0.9, 0.0, (), (7, 8, 9))
        return Recognition([segment], Timing(0.0, 0.0, 0.0, 1, seconds, 1))


async def test_interims_reuse_drafts_and_finals_decode_plainly():
    """A draft verified in one pass can tip a near-tie (bf16) where a plain decode doesn't:
    interims take the last interim's tokens as a draft, a final never does, so it is the
    unary transcript of its audio."""
    from server.streaming import _finals, _Interim

    recognizer = RecordingRecognizer()
    settings = cfg(interim_results=True, interim_interval_s=0.5)
    u = Utterance(settings)
    u.push(tone(300, 1.0, 16_000))
    first = _Interim.start(u, recognizer, settings)  # type: ignore[arg-type]
    await first.task
    first.event(u)
    assert u.last_tokens == (7, 8, 9)
    second = _Interim.start(u, recognizer, settings)  # type: ignore[arg-type]
    await second.task
    finals = [e async for e in _finals(u, recognizer, settings, closing=True)]  # type: ignore[arg-type]
    assert len(finals) == 1 and finals[0].result is not None and finals[0].result.is_final
    assert recognizer.calls == [(True, ()), (True, (7, 8, 9)), (False, ())]


async def test_a_final_cancels_the_running_interim_instead_of_waiting_for_it():
    import asyncio

    from server.streaming import StreamLimits, run_stream

    recognizer = ScriptedRecognizer()
    half_close = asyncio.Event()

    async def chunks():
        yield pcm(tone(300, 1.5, 16_000))
        await half_close.wait()

    stream = run_stream(chunks(), cfg(interim_results=True), recognizer, StreamLimits())
    events = []

    async def consume():
        async for event in stream:
            events.append(event)

    consumer = asyncio.ensure_future(consume())
    await asyncio.wait_for(recognizer.interim_started.wait(), 10)
    half_close.set()
    await asyncio.wait_for(consumer, 10)
    assert recognizer.interim_cancelled.is_set()
    assert [(e.result.text, e.result.is_final) for e in events] == [("1.5 s", True)]


def test_interim_turns_go_to_the_most_overdue_streams_first():
    """With room for one interim, the stream with the most audio not yet decoded goes first,
    whoever asks first; a stream that leaves the line no longer holds anyone back."""
    from server.streaming import InterimTurns

    turns = InterimTurns()
    a, b, c = object(), object(), object()
    assert not turns.ask(a, 1.0, room=0, now=0.0)  # no room: waits in line
    assert turns.ask(b, 3.0, room=1, now=0.1)  # the most overdue goes, though a asked first
    assert set(turns.waiting) == {a}
    assert not turns.ask(c, 0.5, room=1, now=0.2)  # a is more overdue and still waiting
    assert turns.ask(c, 0.5, room=2, now=0.3)  # room for both: c needn't wait for a
    assert not turns.ask(c, 0.2, room=1, now=0.4)
    turns.leave(a)  # a's utterance ended, or it started its interim
    assert turns.ask(c, 0.2, room=1, now=0.5)
    assert turns.waiting == {}


def test_a_stream_that_stopped_asking_holds_nobody_back():
    """A client that paused sending (its stream stays open, up to the idle timeout) keeps
    its place in line only for InterimTurns.HOLD_S."""
    from server.streaming import InterimTurns

    turns = InterimTurns()
    paused, live = object(), object()
    assert not turns.ask(paused, 5.0, room=0, now=0.0)
    assert not turns.ask(live, 1.0, room=1, now=0.5)  # paused is ahead, and recent
    assert turns.ask(live, 1.6, room=1, now=0.5 + InterimTurns.HOLD_S + 0.1)


async def test_without_room_for_interims_a_stream_still_gets_its_finals():
    import asyncio

    from server.streaming import StreamLimits, run_stream

    recognizer = RecordingRecognizer()
    recognizer.room = 0  # a full batch always queued

    async def chunks():
        for _ in range(3):
            yield pcm(tone(300, 1.0, 16_000))
            await asyncio.sleep(0)

    stream = run_stream(chunks(), cfg(interim_results=True), recognizer, StreamLimits())
    events = [e async for e in stream]
    assert [e.result.is_final for e in events if e.result] == [True]
    assert recognizer.calls == [(False, ())]  # no interim was started
