"""The Speech servicer: protobuf in, plain dataclasses to the recognizer, protobuf out.

The only module besides `server.app` that imports generated code. Handlers are short scripts:
validate and convert the request, await the recognizer, convert the result. Errors are raised
as `server.errors` exceptions and mapped to statuses by `server.interceptors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration

import server
from asr.v1 import asr_pb2, asr_pb2_grpc
from server.audio import AudioFormat, Encoding
from server.config import Settings
from server.errors import DeadlineExceededError, InvalidArgumentError, UnavailableError, clip
from server.metrics import Metrics
from server.models.base import MAX_PROMPT_BYTES, DecodeOptions
from server.recognizer import Recognition, Recognizer, Segment, Timing
from server.streaming import StreamEvent, StreamLimits, StreamSettings, StreamSlots, run_stream

Config = asr_pb2.RecognitionConfig

_ENCODINGS = {
    Config.ENCODING_UNSPECIFIED: Encoding.AUTO,
    Config.LINEAR16: Encoding.LINEAR16,
    Config.FLAC: Encoding.FLAC,
    Config.WAV: Encoding.WAV,
    Config.OGG: Encoding.OGG,
}
# Byte bounds of the text fields, checked before anything reads them (see MAX_PROMPT_BYTES).
MAX_LANGUAGE_BYTES = 35  # the longest BCP-47 tag in practical use
MAX_MODEL_BYTES = 256
_TASKS = {
    Config.TASK_UNSPECIFIED: "transcribe",
    Config.TRANSCRIBE: "transcribe",
    Config.TRANSLATE: "translate",
}


@dataclass
class SpeechServicer(asr_pb2_grpc.SpeechServicer):
    settings: Settings
    metrics: Metrics
    recognizer: Recognizer | None = None  # None until the model is loaded and warmed up
    streams: StreamSlots = field(init=False)

    def __post_init__(self) -> None:
        self.streams = StreamSlots(self.settings.max_streams)

    draining: bool = False  # set on SIGTERM: new calls are refused, open streams may finish

    def _ready(self) -> Recognizer:
        if self.draining:
            raise UnavailableError("server is shutting down; retry on another replica")
        if self.recognizer is None:
            raise UnavailableError("model is still loading; retry when health says SERVING")
        return self.recognizer

    async def Recognize(
        self, request: asr_pb2.RecognizeRequest, context: grpc.aio.ServicerContext
    ) -> asr_pb2.RecognizeResponse:
        recognizer = self._ready()
        fmt, options = self._convert_config(request.config, recognizer)
        if request.audio.WhichOneof("audio_source") != "content":
            raise InvalidArgumentError("audio.content is required")
        return _response(await self.recognize(request.audio.content, fmt, options, context))

    async def recognize(
        self,
        content: bytes,
        fmt: AudioFormat,
        options: DecodeOptions,
        context: grpc.aio.ServicerContext,
    ) -> Recognition:
        """One unary recognition in plain types: what every API's Recognize comes down to
        (asr.v1 here, the Google and Riva edges in `server.vendors`)."""
        result = await self._ready().recognize(content, fmt, options, _deadline(context))
        self.metrics.audio_seconds.inc(result.timing.audio_s)
        return result

    async def StreamingRecognize(
        self,
        request_iterator: AsyncIterator[asr_pb2.StreamingRecognizeRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[asr_pb2.StreamingRecognizeResponse]:
        recognizer = self._ready()
        with self.stream_slot():
            first = await self.first_message(request_iterator)
            if first is None:
                return  # the client closed without sending anything: nothing to recognize
            cfg = self._stream_settings(first.streaming_config, recognizer)
            async for event in self.stream(audio_chunks(request_iterator), cfg):
                yield _stream_response(event)

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

    async def first_message(self, request_iterator: AsyncIterator[Any]) -> Any | None:
        """The stream's config message, within --stream-idle-timeout-s of opening it."""
        return await first_message(request_iterator, self.settings.stream_idle_timeout_s)

    async def stream(
        self, chunks: AsyncIterator[bytes], cfg: StreamSettings
    ) -> AsyncIterator[StreamEvent]:
        """One stream in plain types, inside `stream_slot()`: LINEAR16 chunks in, events out,
        under the shared limits and metrics (asr.v1 here, the Google and Riva edges in
        `server.vendors`)."""
        recognizer = self._ready()
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
        )
        started, interim_seen = time.monotonic(), False
        async for event in events:
            if event.result and not event.result.is_final and not interim_seen:
                interim_seen = True
                self.metrics.stream_first_interim_seconds.observe(time.monotonic() - started)
            yield event

    def _stream_settings(
        self, streaming: asr_pb2.StreamingRecognitionConfig, recognizer: Recognizer
    ) -> StreamSettings:
        if not streaming.HasField("config"):
            raise InvalidArgumentError("streaming_config.config is required (it is empty)")
        config = streaming.config
        if config.encoding not in (Config.ENCODING_UNSPECIFIED, Config.LINEAR16):
            raise InvalidArgumentError("streams carry raw LINEAR16 audio; set encoding LINEAR16")
        fmt, options = self._convert_config(config, recognizer)
        if streaming.endpoint_silence_ms < 0 or streaming.interim_interval_ms < 0:
            raise InvalidArgumentError("endpoint_silence_ms and interim_interval_ms must be >= 0")
        return self.stream_settings(
            fmt,
            options,
            streaming.interim_results,
            streaming.single_utterance,
            streaming.endpoint_silence_ms,
            streaming.interim_interval_ms,
        )

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
        endpoint_ms = endpoint_silence_ms or self.settings.endpoint_silence_ms
        interim_ms = interim_interval_ms or self.settings.interim_interval_ms
        return StreamSettings(
            sample_rate_hz=fmt.sample_rate_hz,
            channels=fmt.channels or 1,
            interim_results=interim_results,
            single_utterance=single_utterance,
            endpoint_silence_s=max(endpoint_ms, 100) / 1000,
            interim_interval_s=max(interim_ms, 200) / 1000,
            options=options,
        )

    async def GetServerInfo(
        self, request: asr_pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> asr_pb2.ServerInfo:
        recognizer = self._ready()
        info = recognizer.model.info
        engine = recognizer.batcher.engine
        s = self.settings
        return asr_pb2.ServerInfo(
            model_id=info.model_id,
            multilingual=info.multilingual,
            device=info.device,
            device_name=info.device_name,
            dtype=info.dtype,
            dtype_reason=info.dtype_reason,
            max_batch_size=s.max_batch_size,
            max_wait_ms=int(s.max_wait_ms),
            max_queue_size=s.max_queue_size,
            max_audio_s=s.max_audio_s,
            server_version=server.__version__,
            torch_version=_version("torch"),
            transformers_version=_version("transformers"),
            max_message_bytes=s.max_message_bytes,
            languages=list(info.languages),
            engine=engine,
            max_active=s.max_active if engine == "continuous" else 0,
            max_streams=s.max_streams,
            max_beam_size=s.max_beam_size,
            max_stream_s=s.max_stream_s,
            stream_buffer_s=s.stream_buffer_s,
            stream_idle_timeout_s=s.stream_idle_timeout_s,
            endpoint_silence_ms=s.endpoint_silence_ms,
            interim_interval_ms=s.interim_interval_ms,
            no_speech_threshold=s.no_speech_threshold,
            silence_dbfs=s.silence_dbfs,
            max_new_tokens=s.max_new_tokens,
            decode_step=getattr(recognizer.batcher, "decode_step", ""),
        )

    def _convert_config(
        self, config: asr_pb2.RecognitionConfig, recognizer: Recognizer
    ) -> tuple[AudioFormat, DecodeOptions]:
        if config.encoding not in _ENCODINGS:
            raise InvalidArgumentError(f"unknown audio encoding {config.encoding}")
        if config.task not in _TASKS:
            raise InvalidArgumentError(f"unknown task {config.task}")
        if config.sample_rate_hertz < 0:
            raise InvalidArgumentError(
                f"sample_rate_hertz must not be negative, not {config.sample_rate_hertz}"
            )
        if config.audio_channel_count < 0 or config.max_alternatives < 0:
            raise InvalidArgumentError("audio_channel_count and max_alternatives must be >= 0")
        _check_text_bounds(config)
        if config.model and config.model != recognizer.model.info.model_id:
            raise InvalidArgumentError(
                f"model {clip(config.model)!r} is not served here; this server runs "
                f"{recognizer.model.info.model_id!r} (leave model empty to use it)"
            )
        if not 0.0 <= config.temperature <= 1.0:
            raise InvalidArgumentError(f"temperature must be in [0, 1], not {config.temperature}")
        if not 0 <= config.beam_size <= self.settings.max_beam_size:
            raise InvalidArgumentError(
                f"beam_size must be 0..{self.settings.max_beam_size}, not {config.beam_size}"
            )
        fmt = AudioFormat(
            _ENCODINGS[config.encoding], config.sample_rate_hertz, config.audio_channel_count
        )
        language = config.language_code.split("-")[0].lower() or None
        options = DecodeOptions(
            language=language,
            task=_TASKS[config.task],
            temperature=config.temperature,
            beam_size=max(1, config.beam_size),
            prompt=config.initial_prompt,
            word_timestamps=config.enable_word_time_offsets,
        )
        return fmt, options  # the model checks options off the loop (recognizer, stream start)


def _check_text_bounds(config: asr_pb2.RecognitionConfig) -> None:
    for name, value, limit in (
        ("language_code", config.language_code, MAX_LANGUAGE_BYTES),
        ("model", config.model, MAX_MODEL_BYTES),
        ("initial_prompt", config.initial_prompt, MAX_PROMPT_BYTES),
    ):
        size = len(value.encode())
        if size > limit:
            raise InvalidArgumentError(f"{name} is {size} bytes; at most {limit}")


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def _audio_time(seconds: float) -> Duration:
    """A position or length in the audio, to the millisecond: word times come from float32
    sums ("1.059999943s"), and no client needs finer than a millisecond of audio."""
    d = Duration()
    d.FromMilliseconds(round(seconds * 1000))
    return d


def _duration(seconds: float) -> Duration:
    """A measured server time, to the microsecond."""
    d = Duration()
    d.FromMicroseconds(round(seconds * 1e6))
    return d


def _timing(t: Timing) -> asr_pb2.ServerTiming:
    return asr_pb2.ServerTiming(
        queue_time=_duration(t.queue_s),
        inference_time=_duration(t.infer_s),
        total_time=_duration(t.total_s),
        batch_size=t.batch_size,
        audio_duration=_audio_time(t.audio_s),
        windows=t.windows,
        prepare_time=_duration(t.prepare_s),
        wait_time=_duration(t.wait_s),
        encode_time=None if t.encode_s is None else _duration(t.encode_s),
        decode_time=_duration(t.decode_s),
        held_up_time=_duration(t.held_s),
    )


def _words(segment: Segment) -> list[asr_pb2.WordInfo]:
    return [
        asr_pb2.WordInfo(
            start_time=_audio_time(w.start_s),
            end_time=_audio_time(w.end_s),
            word=w.word,
            confidence=w.probability,
        )
        for w in segment.words
    ]


def _result(segment: Segment) -> asr_pb2.SpeechRecognitionResult:
    alternative = asr_pb2.SpeechRecognitionAlternative(
        transcript=segment.text, confidence=segment.confidence, words=_words(segment)
    )
    return asr_pb2.SpeechRecognitionResult(
        alternatives=[alternative],
        result_start_time=_audio_time(segment.start_s),
        result_end_time=_audio_time(segment.end_s),
        language_code=segment.language,
        no_speech_prob=segment.no_speech_prob,
    )


def _response(result: Recognition) -> asr_pb2.RecognizeResponse:
    return asr_pb2.RecognizeResponse(
        results=[_result(s) for s in result.segments],
        total_billed_time=_audio_time(result.timing.audio_s),
        timing=_timing(result.timing),
    )


async def first_message(request_iterator: AsyncIterator[Any], timeout_s: float) -> Any | None:
    """A stream's first message, which must carry the config and come within `timeout_s`;
    None if the client closed without sending anything. Any API whose stream messages are a
    `streaming_request` oneof of `streaming_config` and `audio_content` (asr.v1, Google,
    Riva)."""
    try:
        first = await asyncio.wait_for(anext(aiter(request_iterator), None), timeout_s)
    except asyncio.TimeoutError:
        raise DeadlineExceededError(
            f"no streaming_config within {timeout_s:g} s of opening the stream"
        ) from None
    if first is not None and first.WhichOneof("streaming_request") != "streaming_config":
        raise InvalidArgumentError(
            "the first message must carry streaming_config; audio_content comes after it"
        )
    return first


async def audio_chunks(request_iterator: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    """The audio of a stream after its first message; protocol errors end the stream. For
    the same APIs as `first_message`."""
    async for request in request_iterator:
        kind = request.WhichOneof("streaming_request")
        if kind == "streaming_config":
            raise InvalidArgumentError("streaming_config may only be sent once, first")
        if kind is None:
            raise InvalidArgumentError("a stream message carries neither config nor audio")
        yield request.audio_content


async def _counted(
    chunks: AsyncIterator[bytes], metrics: Metrics, bytes_per_s: int
) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        metrics.stream_audio_seconds.inc(len(chunk) / bytes_per_s)
        yield chunk


def _alternative(
    text: str, recognition: Recognition | None
) -> asr_pb2.SpeechRecognitionAlternative:
    if recognition is None:
        return asr_pb2.SpeechRecognitionAlternative(transcript=text)
    words = [w for segment in recognition.segments for w in _words(segment)]
    confidences = [s.confidence for s in recognition.segments]
    return asr_pb2.SpeechRecognitionAlternative(
        transcript=text, confidence=sum(confidences) / len(confidences), words=words
    )


def _stream_response(event: StreamEvent) -> asr_pb2.StreamingRecognizeResponse:
    response = asr_pb2.StreamingRecognizeResponse()
    if event.end_of_single_utterance:
        response.speech_event_type = asr_pb2.StreamingRecognizeResponse.END_OF_SINGLE_UTTERANCE
    if event.timing is not None:
        response.timing.CopyFrom(_timing(event.timing))
    if event.result is not None:
        r = event.result
        response.results.append(
            asr_pb2.StreamingRecognitionResult(
                alternatives=[_alternative(r.text, r.recognition)],
                is_final=r.is_final,
                stability=r.stability,
                result_start_time=_audio_time(r.start_s),
                result_end_time=_audio_time(r.end_s),
                language_code=r.language,
            )
        )
    return response
