"""The speech core: what the three speech APIs (asr.v1, Google, Riva) share, in plain types.

Readiness and draining, the model check, stream slots and stream limits, and recognition
(unary and streaming) over the one Recognizer. No protobuf here: the edges
(`server.servicer` for asr.v1, `server.vendors.google`, `server.vendors.riva`) convert their
messages to `AudioFormat`, `DecodeOptions` and `StreamSettings`, call this core, and convert
the `Recognition` or `StreamEvent`s back. None of the edges imports another; what they share
beyond speech (Durations, stream framing) is in `server.edge`.

Only the model worker thread touches the accelerator: this module awaits the Recognizer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from server.audio import AudioFormat
from server.config import Settings
from server.errors import InvalidArgumentError, UnavailableError, clip
from server.metrics import Metrics
from server.models.base import DecodeOptions
from server.recognizer import Recognition, Recognizer
from server.streaming import StreamEvent, StreamLimits, StreamSettings, StreamSlots, run_stream

# Below these, a client's endpointing and interim intervals would re-decode too often.
MIN_ENDPOINT_SILENCE_MS = 100
MIN_INTERIM_INTERVAL_MS = 200


@dataclass
class SpeechCore:
    """One per server; every API edge holds it. `recognizer` is set once the model is warm
    (`ServerHandle.serve_model`), `draining` on SIGTERM."""

    settings: Settings
    metrics: Metrics
    recognizer: Recognizer | None = None  # None until the model is loaded and warmed up
    draining: bool = False  # set on SIGTERM: new calls are refused, open streams may finish
    streams: StreamSlots = field(init=False)

    def __post_init__(self) -> None:
        self.streams = StreamSlots(self.settings.max_streams)

    def ready(self) -> Recognizer:
        """The recognizer, or UNAVAILABLE while the model loads or the server drains."""
        if self.draining:
            raise UnavailableError("server is shutting down; retry on another replica")
        if self.recognizer is None:
            raise UnavailableError("model is still loading; retry when health says SERVING")
        return self.recognizer

    async def recognize(
        self,
        content: bytes,
        fmt: AudioFormat,
        options: DecodeOptions,
        time_remaining_s: float | None,
    ) -> Recognition:
        """One unary recognition: what every API's Recognize comes down to. `time_remaining_s`
        is the client's deadline as the edge received it (None: no deadline)."""
        deadline = None if time_remaining_s is None else time.monotonic() + time_remaining_s
        result = await self.ready().recognize(content, fmt, options, deadline)
        self.metrics.audio_seconds.inc(result.timing.audio_s)
        return result

    @contextlib.contextmanager
    def stream_slot(self) -> Iterator[None]:
        """A stream holds a slot (and counts as active) from its first byte, whatever its API:
        one that never sends its config is capped by --max-streams and timed out too."""
        with self.streams.slot():
            self.metrics.active_streams.inc()
            try:
                yield
            finally:
                self.metrics.active_streams.dec()

    def stream_settings(
        self,
        fmt: AudioFormat,
        options: DecodeOptions,
        interim_results: bool,
        single_utterance: bool,
        endpoint_silence_ms: int = 0,
        interim_interval_ms: int = 0,
    ) -> StreamSettings:
        """A stream's settings; 0 ms means the server's default."""
        if endpoint_silence_ms < 0 or interim_interval_ms < 0:
            raise InvalidArgumentError("endpoint_silence_ms and interim_interval_ms must be >= 0")
        endpoint_ms = endpoint_silence_ms or self.settings.endpoint_silence_ms
        interim_ms = interim_interval_ms or self.settings.interim_interval_ms
        return StreamSettings(
            sample_rate_hz=fmt.sample_rate_hz,
            channels=fmt.channels or 1,
            interim_results=interim_results,
            single_utterance=single_utterance,
            endpoint_silence_s=max(endpoint_ms, MIN_ENDPOINT_SILENCE_MS) / 1000,
            interim_interval_s=max(interim_ms, MIN_INTERIM_INTERVAL_MS) / 1000,
            options=options,
        )

    async def stream(
        self, chunks: AsyncIterator[bytes], cfg: StreamSettings
    ) -> AsyncIterator[StreamEvent]:
        """One stream, inside `stream_slot()`: LINEAR16 chunks in, events out, under the
        shared limits and metrics."""
        recognizer = self.ready()
        s = self.settings
        # Options are validated (the prompt tokenized) off the event loop.
        await asyncio.to_thread(recognizer.model.check_options, cfg.options)
        limits = StreamLimits(s.max_stream_s, s.stream_buffer_s, s.stream_idle_timeout_s)
        bytes_per_s = 2 * cfg.channels * cfg.sample_rate_hz
        events = run_stream(
            _counted(chunks, self.metrics, bytes_per_s),
            cfg,
            recognizer,
            limits,
            on_final=self.metrics.stream_final_seconds.observe,
            shutdown=self.streams.shutdown,
            turns=self.streams.turns,
        )
        started, interim_seen = time.monotonic(), False
        async for event in events:
            if event.result and not event.result.is_final and not interim_seen:
                interim_seen = True
                self.metrics.stream_first_interim_seconds.observe(time.monotonic() - started)
            yield event


def check_model(requested: str, served: str, also_accepted: frozenset[str] = frozenset()) -> None:
    """A request may name the served model (or one of `also_accepted`), or none."""
    if requested and requested != served and requested not in also_accepted:
        raise InvalidArgumentError(
            f"model {clip(requested)!r} is not served here; this server runs {served!r} "
            "(leave model empty to use it)"
        )


async def _counted(
    chunks: AsyncIterator[bytes], metrics: Metrics, bytes_per_s: int
) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        metrics.stream_audio_seconds.inc(len(chunk) / bytes_per_s)
        yield chunk
