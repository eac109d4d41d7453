"""Streaming recognition: live LINEAR16 audio in, interim and final results out. No protobuf.

A stream is split into utterances by an energy endpointer: an utterance is final when speech
is followed by `endpoint_silence_s` of silence, when it nears Whisper's 30 s window (cut at its
quietest point, the rest carried over), or when the client half-closes. While an utterance
grows, it is re-decoded every `interim_interval_s` of new audio; every decode is one item in
the same micro-batch as unary requests and other streams, so many streams share model calls.

Committed words stay: a word prefix is committed once two consecutive decodes agree on it
(LocalAgreement-2), and later interims always start with the committed words (the words after
them may still change); `stability` is the committed share of the interim text. Each interim
after the first passes the last interim's tokens as `DecodeOptions.draft`: the continuous engine
verifies them in one pass and decodes step by step only from the first token the model disagrees
with, so a re-decode costs an encoder pass and a few steps. A final is a plain decode of the
utterance's audio, with no draft, so it is exactly what Recognize gives for that audio: a draft's
keys and values come from one pass over many tokens, whose arithmetic differs from a step's in
the last bits, and in bf16 that decided near-ties later in the transcript (1 of 40 test-other
files differed). Only the worker thread touches the model: this module only awaits the shared
Recognizer.

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
from server.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    QueueFullError,
    UnavailableError,
)
from server.models.base import DecodeOptions
from server.recognizer import Recognition, Recognizer, Timing

FRAME = 320  # 20 ms at 16 kHz: the endpointer's unit
SPEECH_DBFS = -42.0  # a frame louder than this counts as speech for endpointing
# Silence kept before the first speech of an utterance. The encoder sees a 30 s window
# whatever the length, so lead-in costs nothing; cut short, it changed what Whisper heard
# (a final differed from Recognize of the same file for a 0.1 s trim).
LEAD_IN_S = 2.0
MAX_UTTERANCE_S = 28.0  # finalize before Whisper's 30 s window is full
MIN_DECODE_S = 0.02  # tiny messages are coalesced until this much audio is there
PUSH_S = 0.1  # audio read in one go is endpointed in pieces of this, whatever the pace


@dataclass(frozen=True)
class StreamSettings:
    sample_rate_hz: int
    channels: int = 1
    interim_results: bool = False
    single_utterance: bool = False
    endpoint_silence_s: float = 1.2
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
        # A frame's variance, not its power: a constant offset (DC) is not speech.
        levels = 10 * np.log10(frames[: n * FRAME].reshape(n, FRAME).var(axis=1) + 1e-12)
        for level in levels.tolist():
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


class InterimTurns:
    """Which streams re-decode next when not all can: the server has room for a few interims
    at a time (`Recognizer.room`), and those go to the streams whose utterances have gone
    longest without a decode. First come, first served left it to chance which streams got
    them (the decode issue saw 15 of 24 streams get none at all); this doesn't make room,
    it shares what there is. Streams ask at each piece of audio; one event loop, no locks."""

    # A place in line lapses when its stream hasn't asked again for this long (a live stream
    # asks with every piece of audio): a client that paused sending holds nobody back.
    HOLD_S = 1.0

    def __init__(self) -> None:
        # stream -> (seconds of audio not yet decoded, monotonic time it asked)
        self.waiting: dict[object, tuple[float, float]] = {}

    def ask(self, stream: object, overdue_s: float, room: int, now: float | None = None) -> bool:
        """Whether `stream`, with `overdue_s` of audio since its last decode, starts its
        interim now. It waits in line until then (or until `leave`, or HOLD_S of silence)."""
        now = time.monotonic() if now is None else now
        self.waiting[stream] = (overdue_s, now)
        ahead = sum(
            1
            for k, (s, asked) in self.waiting.items()
            if k is not stream and s > overdue_s and now - asked <= self.HOLD_S
        )
        if ahead >= room:
            return False
        del self.waiting[stream]
        return True

    def leave(self, stream: object) -> None:
        """`stream` no longer wants an interim (it has one running, its utterance ended, or
        it closed)."""
        self.waiting.pop(stream, None)


class StreamSlots:
    """The cap on concurrent streams, and their shutdown. A slot is taken when a stream opens
    (before its config arrives) and freed as soon as it ends for any reason (finished,
    failed, cancelled by the client)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.shutdown = asyncio.Event()  # set: open streams stop reading and finalize
        self.turns = InterimTurns()  # whose interim is next, across the streams
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if self.active >= self.limit:
            raise QueueFullError(
                f"too many concurrent streams ({self.active} of {self.limit}); retry later"
            )
        self.active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if not self.active:
                self._idle.set()

    async def wind_down(self, close_after_s: float, timeout_s: float) -> bool:
        """On SIGTERM: let open streams go on (their clients may half-close and get their
        finals as usual) for `close_after_s`, then stop reading them: each finalizes the
        audio it has received and ends with UNAVAILABLE. Waits at most `timeout_s` in all;
        True when every stream ended."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), max(0.0, close_after_s))
            return True
        self.shutdown.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), max(0.0, timeout_s - close_after_s))
            return True
        return False


class _Reader:
    """Pulls audio off the wire into the utterance; pauses when too much is waiting.

    Tiny messages are coalesced (decoded once at least MIN_DECODE_S of audio is there), and
    the idle timeout counts from the last message that carried audio: empty keep-alives
    don't keep a stream open. On server shutdown it stops reading as if the client had
    half-closed (`cut` tells the two apart)."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        cfg: StreamSettings,
        limits: StreamLimits,
        shutdown: asyncio.Event | None = None,
    ) -> None:
        self.chunks = chunks
        self.limits = limits
        self.decoder = PcmDecoder(cfg)
        self.shutdown = shutdown or asyncio.Event()
        self.min_decode_bytes = 2 * cfg.channels * max(1, int(cfg.sample_rate_hz * MIN_DECODE_S))
        self.pending: list[np.ndarray] = []
        self.pending_s = 0.0
        self.received_s = 0.0
        self.closed = False
        self.cut = False  # stopped by the server's shutdown, not by the client
        self.last_audio_at: float | None = None  # monotonic time the last audio arrived
        self.changed = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()
        self._raw: list[bytes] = []
        self._raw_bytes = 0

    async def run(self) -> None:
        stopping = asyncio.ensure_future(self.shutdown.wait())
        opened = time.monotonic()
        try:
            while True:
                if not self.room.is_set():
                    room = asyncio.ensure_future(self.room.wait())
                    await asyncio.wait([room, stopping], return_when=asyncio.FIRST_COMPLETED)
                    room.cancel()
                chunk = None if stopping.done() else await self._next(stopping, opened)
                if chunk is None:
                    self.cut = stopping.done()
                    self._add(self.decoder.decode(self._take_raw(), last=True))
                    break
                if chunk:
                    self.last_audio_at = time.monotonic()
                    self._raw.append(chunk)
                    self._raw_bytes += len(chunk)
                if self._raw_bytes >= self.min_decode_bytes:
                    self._add(self.decoder.decode(self._take_raw()))
                if self.received_s > self.limits.max_stream_s:
                    raise InvalidArgumentError(
                        f"stream is longer than {self.limits.max_stream_s:g} s of audio"
                    )
        finally:
            stopping.cancel()
            self.closed = True
            self.changed.set()

    async def _next(self, stopping: asyncio.Future[Any], opened: float) -> bytes | None:
        """The next message's audio; None when the client half-closed or the server is
        shutting down. DeadlineExceededError when no audio came for the idle timeout."""
        since = time.monotonic() - (self.last_audio_at or opened)
        reading = asyncio.ensure_future(anext(self.chunks, None))
        done, _ = await asyncio.wait(
            [reading, stopping],
            timeout=max(0.0, self.limits.idle_timeout_s - since),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if reading in done:
            return reading.result()
        await _cancel(reading)
        if stopping.done():
            return None
        raise DeadlineExceededError(f"no audio for {self.limits.idle_timeout_s:g} s; stream closed")

    def _take_raw(self) -> bytes:
        data = b"".join(self._raw)
        self._raw, self._raw_bytes = [], 0
        return data

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
    shutdown: asyncio.Event | None = None,
    turns: InterimTurns | None = None,
) -> AsyncIterator[StreamEvent]:
    """The decode loop of one stream. `on_final(latency_s)` reports, for each final, the time
    from the end of its audio on the wire (endpoint or half-close) to the result. When
    `shutdown` is set, the stream stops reading, finalizes what it received and ends with
    UnavailableError (the client should send the rest elsewhere). `turns`: the server's line
    of streams waiting to re-decode (StreamSlots.turns), so interims go round the streams.

    Endpointing sees the audio in pieces of PUSH_S, as if it had arrived in real time: audio
    read in one go (a client faster than real time) would otherwise hide the pauses inside
    it, and utterances would run together up to the 28 s cut.

    An interim re-decode runs as a task beside the loop, so audio keeps arriving while it
    decodes; when an utterance ends, a running interim is cancelled (with the continuous
    engine it leaves the decode batch at the next step) so that the final never waits for
    a result that is about to be outdated."""
    turns = turns or InterimTurns()
    key = object()
    reader = _Reader(chunks, cfg, limits, shutdown)
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
            audio = np.zeros(0, dtype=np.float32)
            if changed.done():
                reader.changed.clear()
                changed = asyncio.ensure_future(reader.changed.wait())
                audio = reader.drain()
                closing = reader.closed and not reader.pending
                if reader.closed and reading.done() and reading.exception() is not None:
                    raise reading.exception()  # type: ignore[misc]
            pieces = _pieces(audio)
            for i, piece in enumerate(pieces):
                utterance.push(piece)
                ending = closing and i == len(pieces) - 1
                if interim is not None and utterance.endpoint(ending) is not None:
                    await interim.cancel()
                    interim = None
                async for event in _finals(utterance, recognizer, cfg, ending):
                    if event.result is not None and on_final:
                        on_final(time.monotonic() - (reader.last_audio_at or time.monotonic()))
                    yield event
                    if event.end_of_single_utterance:
                        return
            if closing:
                if reader.cut:
                    raise UnavailableError(
                        f"server is shutting down: the {reader.received_s:.1f} s of audio "
                        "received were finalized; send the rest on a new stream"
                    )
                return
            # Interims are best effort: one at a time per stream, skipped while more audio is
            # waiting to be read, started only while the server has room for them (a full
            # batch queued: they'd only delay finals), the most overdue stream first, and
            # batched after urgent work.
            wants = interim is None and utterance.wants_interim() and not reader.pending
            if not wants:
                turns.leave(key)
            elif turns.ask(key, utterance.new_since_decode_s, recognizer.room):
                interim = _Interim.start(utterance, recognizer, cfg)
    finally:
        turns.leave(key)
        for task in (changed, reading, interim.task if interim else None):
            if task is not None:
                await _cancel(task)


def _pieces(audio: np.ndarray) -> list[np.ndarray]:
    n = int(PUSH_S * SAMPLE_RATE)
    return [audio[i : i + n] for i in range(0, len(audio), n)] or [audio]


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
        samples, start_s = utterance.take(cut)
        # No draft: the final is the unary transcript of its audio (see the module doc).
        result = await recognizer.recognize_samples(samples, cfg.options, offset_s=start_s)
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
