"""Streaming recognition: live LINEAR16 audio in, interim and final results out. No protobuf.

A stream is split into utterances by an energy endpointer: an utterance is final when speech
is followed by `endpoint_silence_s` of silence, when it nears Whisper's 30 s window (cut at its
quietest point, the rest carried over), or when the client half-closes. While an utterance
grows, it is re-decoded every `interim_interval_s` of new audio; every decode is one item in
the same micro-batch as unary requests and other streams, so many streams share model calls.

Interim text doesn't flicker: a word prefix is committed once two consecutive decodes agree
on it (LocalAgreement-2), and later interims always start with the committed words; `stability`
is the committed share of the interim text. Each decode after the first passes the last
interim's tokens as `DecodeOptions.draft`: the continuous engine verifies them in one pass and
decodes step by step only from the first token the model disagrees with, so a re-decode (and a
final) costs an encoder pass and a few steps, with the transcript of a plain decode. Only the
worker thread touches the model: this module only awaits the shared Recognizer.

Tasks per stream: a reader that pulls audio off the wire (and stops pulling when `buffer_s`
of audio is waiting, so gRPC flow control slows a client sending faster than real time), the
decode loop in `run_stream` (an async generator of StreamEvents, which awaits finals), and at
most one interim re-decode at a time, which a final cancels rather than waits for.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soxr

from server.audio import MAX_CHANNELS, MAX_RATE_HZ, MIN_RATE_HZ, SAMPLE_RATE, quietest_cut
from server.errors import DeadlineExceededError, InvalidArgumentError, QueueFullError
from server.models.base import DecodeOptions
from server.recognizer import Recognition, Recognizer, Timing

FRAME = 320  # 20 ms at 16 kHz: the endpointer's unit
SPEECH_DBFS = -42.0  # a frame louder than this counts as speech for endpointing
LEAD_IN_S = 0.5  # silence kept before the first speech of an utterance
MAX_UTTERANCE_S = 28.0  # finalize before Whisper's 30 s window is full


@dataclass(frozen=True)
class StreamSettings:
    sample_rate_hz: int
    channels: int = 1
    interim_results: bool = False
    single_utterance: bool = False
    endpoint_silence_s: float = 0.7
    interim_interval_s: float = 1.0
    options: DecodeOptions = field(default_factory=DecodeOptions)

    def __post_init__(self) -> None:
        if not MIN_RATE_HZ <= self.sample_rate_hz <= MAX_RATE_HZ:
            raise InvalidArgumentError(
                f"streaming sample_rate_hertz must be {MIN_RATE_HZ}..{MAX_RATE_HZ}, "
                f"not {self.sample_rate_hz}"
            )
        if not 1 <= self.channels <= MAX_CHANNELS:
            raise InvalidArgumentError(f"audio_channel_count must be 1..{MAX_CHANNELS}")


@dataclass(frozen=True)
class StreamLimits:
    max_stream_s: float = 3600.0
    buffer_s: float = 30.0
    idle_timeout_s: float = 30.0


@dataclass(frozen=True)
class StreamResult:
    text: str
    is_final: bool
    stability: float
    start_s: float
    end_s: float
    language: str
    recognition: Recognition | None = None  # finals: words, confidence


@dataclass(frozen=True)
class StreamEvent:
    result: StreamResult | None = None
    end_of_single_utterance: bool = False
    timing: Timing | None = None


class Utterance:
    """The audio of the utterance being recognized, its endpointing state and its agreement
    state. Pure and synchronous: fed 16 kHz samples, asked what to do next."""

    def __init__(self, cfg: StreamSettings) -> None:
        self.cfg = cfg
        self.audio = np.zeros(0, dtype=np.float32)
        self.start_s = 0.0  # where self.audio starts in the stream
        self.speech_seen = False
        self.trailing_silence_s = 0.0
        self.new_since_decode_s = 0.0
        self.committed: list[str] = []
        self.last_hypothesis: list[str] = []
        self.last_tokens: tuple[int, ...] = ()  # the last interim's, the next decode's draft
        self._partial = np.zeros(0, dtype=np.float32)  # < one frame, not yet classified

    @property
    def duration_s(self) -> float:
        return len(self.audio) / SAMPLE_RATE

    def push(self, samples: np.ndarray) -> None:
        self.audio = np.concatenate([self.audio, samples])
        self.new_since_decode_s += len(samples) / SAMPLE_RATE
        frames = np.concatenate([self._partial, samples])
        n = len(frames) // FRAME
        self._partial = frames[n * FRAME :]
        for frame in frames[: n * FRAME].reshape(n, FRAME):
            level = 10 * np.log10(float(np.mean(frame * frame)) + 1e-12)
            if level >= SPEECH_DBFS:
                self.speech_seen = True
                self.trailing_silence_s = 0.0
            else:
                self.trailing_silence_s += FRAME / SAMPLE_RATE
        if not self.speech_seen:
            self._drop_lead_in()

    def _drop_lead_in(self) -> None:
        """Before any speech, keep only the last LEAD_IN_S: silence is never decoded."""
        keep = int(LEAD_IN_S * SAMPLE_RATE)
        if len(self.audio) > keep:
            drop = len(self.audio) - keep
            self.audio = self.audio[drop:]
            self.start_s += drop / SAMPLE_RATE
            self.new_since_decode_s = 0.0

    def endpoint(self, closing: bool) -> int | None:
        """Samples to finalize now, or None. `closing`: the client half-closed."""
        if not self.speech_seen:
            return None
        if closing or self.trailing_silence_s >= self.cfg.endpoint_silence_s:
            return len(self.audio)
        if self.duration_s >= MAX_UTTERANCE_S:
            hi = len(self.audio)
            return quietest_cut(self.audio, hi - 5 * SAMPLE_RATE, hi)
        return None

    def wants_interim(self) -> bool:
        return (
            self.cfg.interim_results
            and self.speech_seen
            and self.new_since_decode_s >= self.cfg.interim_interval_s
        )

    def take(self, samples: int) -> tuple[np.ndarray, float]:
        """Remove the first `samples` as a finished utterance; the rest starts the next one."""
        head, rest = self.audio[:samples], self.audio[samples:]
        start = self.start_s
        self.start_s += samples / SAMPLE_RATE
        self.audio = np.zeros(0, dtype=np.float32)
        self.committed, self.last_hypothesis, self.last_tokens = [], [], ()
        self.speech_seen, self.trailing_silence_s = False, 0.0
        self.push(rest)  # re-classify what was carried over
        self.new_since_decode_s = len(self.audio) / SAMPLE_RATE
        return head, start

    def with_draft(self, options: DecodeOptions) -> DecodeOptions:
        """Decode options with the last interim's tokens as a draft (see the module doc)."""
        return dataclasses.replace(options, draft=self.last_tokens)

    def agree(self, text: str) -> tuple[str, float]:
        """LocalAgreement-2: commit the words two consecutive hypotheses share beyond what is
        committed; return the interim text (committed + the new tail) and its stability."""
        words = text.split()
        n = len(self.committed)
        while (
            n < min(len(words), len(self.last_hypothesis)) and words[n] == self.last_hypothesis[n]
        ):
            n += 1
        if words[: len(self.committed)] == self.committed:
            self.committed = words[:n]
        self.last_hypothesis = words
        shown = self.committed + words[len(self.committed) :]
        stability = len(self.committed) / len(shown) if shown else 0.0
        return " ".join(shown), stability


class PcmDecoder:
    """LINEAR16 chunks at any rate and channel count -> 16 kHz mono float32, continuous across
    chunk boundaries (a frame split between two messages is kept until it is whole)."""

    def __init__(self, cfg: StreamSettings) -> None:
        self.channels = cfg.channels
        self._carry = b""
        self._resampler = (
            None
            if cfg.sample_rate_hz == SAMPLE_RATE
            else soxr.ResampleStream(cfg.sample_rate_hz, SAMPLE_RATE, 1, dtype="float32")
        )

    def decode(self, chunk: bytes, last: bool = False) -> np.ndarray:
        data = self._carry + chunk
        frame = 2 * self.channels
        whole = len(data) - len(data) % frame
        self._carry = data[whole:]
        pcm = np.frombuffer(data[:whole], dtype="<i2").astype(np.float32) / 32768.0
        mono = pcm.reshape(-1, self.channels).mean(axis=1) if self.channels > 1 else pcm
        mono = np.ascontiguousarray(mono, dtype=np.float32)
        if self._resampler is not None:
            mono = self._resampler.resample_chunk(mono, last=last)
        return mono


class StreamSlots:
    """The cap on concurrent streams. A slot is freed as soon as its stream ends for any
    reason (finished, failed, cancelled by the client)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if self.active >= self.limit:
            raise QueueFullError(
                f"too many concurrent streams ({self.active} of {self.limit}); retry later"
            )
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


class _Reader:
    """Pulls audio off the wire into the utterance; pauses when too much is waiting."""

    def __init__(
        self, chunks: AsyncIterator[bytes], cfg: StreamSettings, limits: StreamLimits
    ) -> None:
        self.chunks = chunks
        self.limits = limits
        self.decoder = PcmDecoder(cfg)
        self.pending: list[np.ndarray] = []
        self.pending_s = 0.0
        self.received_s = 0.0
        self.closed = False
        self.last_audio_at: float | None = None  # monotonic time the last chunk arrived
        self.changed = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()

    async def run(self) -> None:
        try:
            while True:
                await self.room.wait()
                try:
                    chunk = await asyncio.wait_for(
                        anext(self.chunks, None), self.limits.idle_timeout_s
                    )
                except asyncio.TimeoutError:
                    raise DeadlineExceededError(
                        f"no audio for {self.limits.idle_timeout_s:g} s; stream closed"
                    ) from None
                if chunk is None:
                    self._add(self.decoder.decode(b"", last=True))
                    break
                self.last_audio_at = time.monotonic()
                self._add(self.decoder.decode(chunk))
                if self.received_s > self.limits.max_stream_s:
                    raise InvalidArgumentError(
                        f"stream is longer than {self.limits.max_stream_s:g} s of audio"
                    )
        finally:
            self.closed = True
            self.changed.set()

    def _add(self, samples: np.ndarray) -> None:
        if len(samples):
            self.pending.append(samples)
            self.pending_s += len(samples) / SAMPLE_RATE
            self.received_s += len(samples) / SAMPLE_RATE
        if self.pending_s >= self.limits.buffer_s:
            self.room.clear()
        self.changed.set()

    def drain(self) -> np.ndarray:
        samples = np.concatenate(self.pending) if self.pending else np.zeros(0, np.float32)
        self.pending, self.pending_s = [], 0.0
        self.room.set()
        return samples


async def run_stream(
    chunks: AsyncIterator[bytes],
    cfg: StreamSettings,
    recognizer: Recognizer,
    limits: StreamLimits,
    on_final: Callable[[float], None] | None = None,
) -> AsyncIterator[StreamEvent]:
    """The decode loop of one stream. `on_final(latency_s)` reports, for each final, the time
    from the end of its audio on the wire (endpoint or half-close) to the result.

    An interim re-decode runs as a task beside the loop, so audio keeps arriving while it
    decodes; when an utterance ends, a running interim is cancelled (with the continuous
    engine it leaves the decode batch at the next step) so that the final never waits for
    a result that is about to be outdated."""
    reader = _Reader(chunks, cfg, limits)
    reading = asyncio.create_task(reader.run(), name="stream-reader")
    utterance = Utterance(cfg)
    interim: _Interim | None = None
    changed = asyncio.ensure_future(reader.changed.wait())
    closing = False
    try:
        while True:
            await asyncio.wait(
                [changed, *([interim.task] if interim else [])],
                return_when=asyncio.FIRST_COMPLETED,
            )
            if interim is not None and interim.task.done():
                event = interim.event(utterance)
                interim = None
                if event is not None:
                    yield event
            if changed.done():
                reader.changed.clear()
                changed = asyncio.ensure_future(reader.changed.wait())
                utterance.push(reader.drain())
                closing = reader.closed and not reader.pending
                if reader.closed and reading.done() and reading.exception() is not None:
                    raise reading.exception()  # type: ignore[misc]
            if interim is not None and utterance.endpoint(closing) is not None:
                await interim.cancel()
                interim = None
            async for event in _finals(utterance, recognizer, cfg, closing):
                if event.result is not None and on_final:
                    on_final(time.monotonic() - (reader.last_audio_at or time.monotonic()))
                yield event
                if event.end_of_single_utterance:
                    return
            if closing:
                return
            # Interims are best effort: one at a time per stream, skipped while more audio is
            # waiting to be read or the server has a full batch queued (they'd only delay
            # finals), and batched after urgent work.
            if (
                interim is None
                and utterance.wants_interim()
                and not (reader.pending or recognizer.backlogged)
            ):
                interim = _Interim.start(utterance, recognizer, cfg)
    finally:
        for task in (changed, reading, interim.task if interim else None):
            if task is not None:
                await _cancel(task)


async def _cancel(task: asyncio.Future[Any]) -> None:
    """Cancel a task of this stream and wait for it to end, whatever it raises."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def _finals(
    utterance: Utterance, recognizer: Recognizer, cfg: StreamSettings, closing: bool
) -> AsyncIterator[StreamEvent]:
    """Finals for every endpoint in the audio so far (then END_OF_SINGLE_UTTERANCE if asked)."""
    while (cut := utterance.endpoint(closing)) is not None:
        options = utterance.with_draft(cfg.options)  # verified: the final is still the audio's
        samples, start_s = utterance.take(cut)
        result = await recognizer.recognize_samples(samples, options, offset_s=start_s)
        if result.text:
            end_s = start_s + len(samples) / SAMPLE_RATE
            language = result.segments[0].language
            final = StreamResult(result.text, True, 1.0, start_s, end_s, language, result)
            yield StreamEvent(final, timing=result.timing)
            if cfg.single_utterance:
                yield StreamEvent(end_of_single_utterance=True)
                return
        if closing and not utterance.speech_seen:
            return


@dataclass
class _Interim:
    """A re-decode of the utterance so far, running beside the stream's loop."""

    task: asyncio.Task[Recognition]
    start_s: float
    end_s: float

    @classmethod
    def start(cls, utterance: Utterance, recognizer: Recognizer, cfg: StreamSettings) -> _Interim:
        utterance.new_since_decode_s = 0.0
        options = utterance.with_draft(cfg.options)
        decode = recognizer.recognize_samples(utterance.audio, options, background=True)
        start_s = utterance.start_s
        return cls(asyncio.ensure_future(decode), start_s, start_s + utterance.duration_s)

    def event(self, utterance: Utterance) -> StreamEvent | None:
        """The interim result to send, if any. A full queue only skips this interim (best
        effort); any other failure ends the stream."""
        try:
            result = self.task.result()
        except QueueFullError:
            return None
        if not result.text:
            return None
        text, stability = utterance.agree(result.text)
        segments = result.segments
        utterance.last_tokens = segments[0].tokens if len(segments) == 1 else ()
        language = segments[0].language
        interim = StreamResult(text, False, stability, self.start_s, self.end_s, language)
        return StreamEvent(interim, timing=result.timing)

    async def cancel(self) -> None:
        await _cancel(self.task)
